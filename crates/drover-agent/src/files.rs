//! Files in and out of the guest for `drover vm cp`: pieces written in order to a temporary
//! file beside the target, which replaces the target in one rename once complete and synced;
//! pieces read at an offset.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_proto::{FileData, FileGet, FilePut};

/// Mode of a copied file when the host names none.
const DEFAULT_MODE: u32 = 0o644;

/// Why a file request failed: a stable code and a message for the host.
#[derive(Debug)]
pub struct FileError {
    /// `not_found`, `bad_request`, `io`.
    pub code: &'static str,
    /// What happened, naming the path.
    pub message: String,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> FileError {
    FileError {
        code: if e.kind() == io::ErrorKind::NotFound {
            "not_found"
        } else {
            "io"
        },
        message: format!("{what} {}: {e}", path.display()),
    }
}

/// The temporary file a copy to `path` is written to: hidden, beside it (so the rename stays on
/// one file system).
pub fn part_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.drover-part"))
}

/// Write one piece.
pub fn put(p: &FilePut) -> Result<(), FileError> {
    let path = Path::new(&p.path);
    if path.file_name().is_none() || p.path.ends_with('/') {
        return Err(FileError {
            code: "bad_request",
            message: format!("{} names a directory, not a file", p.path),
        });
    }
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(FileError {
            code: "bad_request",
            message: format!("{} is a directory; name the file to write", p.path),
        });
    }
    let part = part_path(path);
    let mut f = if p.offset == 0 {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .map_err(|e| io_err("creating", &part, e))?
    } else {
        let f = OpenOptions::new()
            .write(true)
            .open(&part)
            .map_err(|e| io_err("continuing", &part, e))?;
        let have = f.metadata().map_err(|e| io_err("reading", &part, e))?.len();
        // Pieces come in order; a gap or overlap means two copies to one path, or a lost piece.
        if have != p.offset {
            return Err(FileError {
                code: "bad_request",
                message: format!(
                    "a piece for {} at offset {} does not follow the {have} bytes written (another copy to the same path?)",
                    p.path, p.offset
                ),
            });
        }
        f
    };
    f.seek(SeekFrom::Start(p.offset))
        .and_then(|_| f.write_all(&p.data))
        .map_err(|e| io_err("writing", &part, e))?;
    if p.done {
        let mode = p.mode.unwrap_or(DEFAULT_MODE);
        f.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err("finishing", &part, e))?;
        drop(f);
        fs::rename(&part, path).map_err(|e| io_err("moving into place", path, e))?;
        // The rename is durable once the directory is synced.
        if let Some(dir) = path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
    }
    Ok(())
}

/// Read one piece.
pub fn get(g: &FileGet) -> Result<FileData, FileError> {
    let path = Path::new(&g.path);
    let mut f = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let meta = f.metadata().map_err(|e| io_err("reading", path, e))?;
    if meta.is_dir() {
        return Err(FileError {
            code: "bad_request",
            message: format!("{} is a directory; copy files one by one", g.path),
        });
    }
    let len = (g.len as usize).min(drover_proto::MAX_FILE_CHUNK);
    let mut data = vec![0u8; len];
    f.seek(SeekFrom::Start(g.offset))
        .map_err(|e| io_err("reading", path, e))?;
    let mut got = 0;
    // Files like /proc's report size 0 and still have content: read until the piece is full or
    // the file ends.
    while got < len {
        match f.read(&mut data[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading", path, e)),
        }
    }
    data.truncate(got);
    Ok(FileData {
        eof: got < len,
        size: meta.size().max(g.offset + got as u64),
        mode: meta.mode() & 0o7777,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(path: &Path, offset: u64, data: &[u8], done: bool) -> FilePut {
        FilePut {
            path: path.display().to_string(),
            offset,
            data: data.to_vec(),
            done,
            mode: Some(0o755),
        }
    }

    #[test]
    fn pieces_replace_the_file_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bin");
        fs::write(&target, b"old").unwrap();
        put(&piece(&target, 0, b"hello ", false)).unwrap();
        assert_eq!(
            fs::read(&target).unwrap(),
            b"old",
            "the old file until done"
        );
        // Out of order: refused, nothing lost.
        let e = put(&piece(&target, 3, b"x", false)).unwrap_err();
        assert_eq!(e.code, "bad_request");
        put(&piece(&target, 6, b"world", true)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello world");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(!part_path(&target).exists(), "no temporary file left");

        let r = get(&FileGet {
            path: target.display().to_string(),
            offset: 6,
            len: 3,
        })
        .unwrap();
        assert_eq!((r.data.as_slice(), r.eof, r.size), (&b"wor"[..], false, 11));
        let r = get(&FileGet {
            path: target.display().to_string(),
            offset: 9,
            len: 100,
        })
        .unwrap();
        assert_eq!((r.data.as_slice(), r.eof), (&b"ld"[..], true));
        let e = get(&FileGet {
            path: dir.path().join("none").display().to_string(),
            offset: 0,
            len: 1,
        })
        .unwrap_err();
        assert_eq!(e.code, "not_found");
        let e = put(&piece(dir.path(), 0, b"x", true)).unwrap_err();
        assert_eq!(e.code, "bad_request");
    }
}
