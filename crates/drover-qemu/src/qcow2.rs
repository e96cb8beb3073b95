//! What a qcow2 file's header says about files outside it: its backing file and whether its data
//! lives in an external file. Read by droverd itself (bounded, no QEMU), because a file a user
//! put in an image pool is untrusted: its header could name any host file for QEMU to open.

use std::io::Read;
use std::path::{Path, PathBuf};

/// `QFI\xfb`.
const MAGIC: [u8; 4] = *b"QFI\xfb";
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: u32 = 1023;
/// Where a backing file name may start at most (QEMU keeps it in the first cluster, 2 MiB at
/// most).
const MAX_BACKING_OFFSET: u64 = 2 << 20;
/// Incompatible feature bit: the guest data is in an external data file.
const EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// What the header names outside the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct References {
    /// The backing file, as written (relative names are relative to the image's directory).
    pub backing: Option<String>,
    /// The image keeps its data in an external file (named in a header extension).
    pub external_data: bool,
}

/// Why a header was not understood.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HeaderError {
    /// Not a qcow2 file.
    #[error("not a qcow2 image (no QFI magic)")]
    NotQcow2,
    /// A field out of range.
    #[error("qcow2 header: {0}")]
    Bad(String),
    /// Reading failed.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::sync::Arc<std::io::Error>,
    },
}

/// Bytes of a file [`parse`] may need: the header and the longest backing name it may name.
pub const READ_LIMIT: u64 = MAX_BACKING_OFFSET + MAX_BACKING_NAME as u64;

/// Parse the start of a qcow2 file (`data`: its first bytes, up to [`READ_LIMIT`]).
pub fn parse(data: &[u8]) -> Result<References, HeaderError> {
    let be64 = |at: usize| -> Option<u64> {
        data.get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let be32 = |at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
    };
    if data.get(0..4) != Some(&MAGIC[..]) {
        return Err(HeaderError::NotQcow2);
    }
    let short = || HeaderError::Bad("truncated header".into());
    let version = be32(4).ok_or_else(short)?;
    if !(2..=3).contains(&version) {
        return Err(HeaderError::Bad(format!("version {version}")));
    }
    let offset = be64(8).ok_or_else(short)?;
    let size = be32(16).ok_or_else(short)?;
    let external_data = version >= 3 && be64(72).ok_or_else(short)? & EXTERNAL_DATA_FILE != 0;
    let backing = if offset == 0 || size == 0 {
        None
    } else {
        if size > MAX_BACKING_NAME || offset > MAX_BACKING_OFFSET {
            return Err(HeaderError::Bad(format!(
                "backing file name of {size} bytes at {offset}"
            )));
        }
        let start = offset as usize;
        let name = data
            .get(start..start + size as usize)
            .ok_or_else(|| HeaderError::Bad("backing file name past the end".into()))?;
        Some(String::from_utf8_lossy(name).into_owned())
    };
    Ok(References {
        backing,
        external_data,
    })
}

/// [`parse`] on the file at `path` (reading at most [`READ_LIMIT`] bytes).
pub fn read(path: &Path) -> Result<References, HeaderError> {
    let io = |e| HeaderError::Io {
        path: path.to_path_buf(),
        source: std::sync::Arc::new(e),
    };
    let f = std::fs::File::open(path).map_err(io)?;
    read_from(f, path)
}

/// [`parse`] on an open file (e.g. one droverd opened beneath an image pool).
pub fn read_from(f: std::fs::File, path: &Path) -> Result<References, HeaderError> {
    let mut data = Vec::new();
    f.take(READ_LIMIT)
        .read_to_end(&mut data)
        .map_err(|e| HeaderError::Io {
            path: path.to_path_buf(),
            source: std::sync::Arc::new(e),
        })?;
    parse(&data)
}

/// The backing file a header names, as a path: relative names are relative to `image`'s
/// directory (as QEMU resolves them). `None` for protocol names (`nbd:`, `json:`), which droverd
/// never writes.
pub fn backing_path(image: &Path, name: &str) -> Option<PathBuf> {
    if name.starts_with("json:") || (name.contains(':') && !name.starts_with('/')) {
        return None;
    }
    let p = Path::new(name);
    Some(if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, backing: Option<&str>, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        if let Some(b) = backing {
            h[8..16].copy_from_slice(&200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[200..200 + b.len()].copy_from_slice(b.as_bytes());
        }
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn reads_backing_names_and_the_external_data_bit() {
        assert_eq!(parse(&header(3, None, 0)).unwrap(), References::default());
        let r = parse(&header(3, Some("/etc/shadow"), 0)).unwrap();
        assert_eq!(r.backing.as_deref(), Some("/etc/shadow"));
        assert!(
            parse(&header(3, None, EXTERNAL_DATA_FILE))
                .unwrap()
                .external_data
        );
        // Version 2 has no feature fields: the bit's bytes mean nothing there.
        assert!(
            !parse(&header(2, None, EXTERNAL_DATA_FILE))
                .unwrap()
                .external_data
        );
    }

    #[test]
    fn refuses_what_is_not_a_sound_header() {
        assert!(matches!(parse(b"\0\0\0\0"), Err(HeaderError::NotQcow2)));
        assert!(matches!(parse(&MAGIC), Err(HeaderError::Bad(_))));
        assert!(matches!(
            parse(&header(4, None, 0)),
            Err(HeaderError::Bad(_))
        ));
        let mut h = header(3, Some("x"), 0);
        h[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(parse(&h), Err(HeaderError::Bad(_))));
        let mut h = header(3, Some("x"), 0);
        h[8..16].copy_from_slice(&510u64.to_be_bytes());
        h[16..20].copy_from_slice(&10u32.to_be_bytes());
        assert!(
            matches!(parse(&h), Err(HeaderError::Bad(_))),
            "past the end"
        );
    }

    #[test]
    fn backing_paths_resolve_like_qemu() {
        let img = Path::new("/pool/a/top.qcow2");
        assert_eq!(
            backing_path(img, "base.qcow2"),
            Some("/pool/a/base.qcow2".into())
        );
        assert_eq!(backing_path(img, "/etc/shadow"), Some("/etc/shadow".into()));
        assert_eq!(backing_path(img, "nbd:localhost:10809"), None);
        assert_eq!(backing_path(img, "json:{\"driver\":\"raw\"}"), None);
    }

    /// Whatever bytes a user's file holds, the parser answers without panicking.
    #[test]
    fn never_panics_on_arbitrary_bytes() {
        use proptest::prelude::*;
        proptest!(|(mut data in proptest::collection::vec(any::<u8>(), 0..600), magic: bool)| {
            if magic && data.len() >= 4 {
                data[0..4].copy_from_slice(&MAGIC);
            }
            let _ = parse(&data);
        });
    }

    /// A real image made by qemu-img reads the same.
    #[test]
    fn agrees_with_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let run = |args: &[&str]| {
            std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !run(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]) {
            return; // qemu-img absent: the pure tests above still run.
        }
        assert!(run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            top.to_str().unwrap()
        ]));
        assert_eq!(read(&base).unwrap(), References::default());
        let r = read(&top).unwrap();
        assert_eq!(r.backing.as_deref(), Some("base.qcow2"));
        assert_eq!(backing_path(&top, "base.qcow2"), Some(base));
    }
}
