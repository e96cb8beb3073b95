//! Cache directory plumbing: the builders' lock, durable writes, the `current` pointer, cleanup.
//!
//! Layout of `cache_dir`:
//! ```text
//! .lock                          flock'ed exclusively by a running build
//! current -> 3f2a9c0d1e4b5a67    symlink to the image in use (swapped atomically)
//! 3f2a9c0d1e4b5a67/              vmlinux, initramfs.cpio, manifest.json (first 16 hex of the key)
//! kernels/<pkg>_<ver>.k<N>/      unpacked kernel stage: vmlinux, selected modules, kernel.json
//! downloads/<pkg>_<ver>_amd64.deb
//! .tmp-*/                        builds in progress (or left by a crash; removed under the lock)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

/// Name of the pointer to the image in use.
pub const CURRENT: &str = "current";
/// Name of the lock file.
pub const LOCK: &str = ".lock";
/// Prefix of temporary build directories.
pub const TMP_PREFIX: &str = ".tmp-";

/// An exclusive `flock` on `cache_dir/.lock`, released on drop (when the file is closed).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Takes the builders' lock. `on_wait` is called once if another builder holds it.
pub fn lock(cache_dir: &Path, on_wait: &mut dyn FnMut(&Path)) -> Result<Lock, ImageError> {
    let path = cache_dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx("open", &path)?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid open descriptor owned by `file` for the duration of these calls.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Lock { _file: file });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(ImageError::Lock { path, source: err });
    }
    on_wait(&path);
    loop {
        // SAFETY: as above.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
            return Ok(Lock { _file: file });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(ImageError::Lock { path, source: err });
        }
    }
}

/// fsyncs a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Writes `data` to `path` and fsyncs it.
pub fn write_synced(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let mut f = File::create(path).ctx("create", path)?;
    io::Write::write_all(&mut f, data).ctx("write", path)?;
    f.sync_all().ctx("fsync", path)
}

/// The directory `current` points at, if the pointer exists and is a plain name in `cache_dir`.
pub fn read_current(cache_dir: &Path) -> Result<Option<PathBuf>, ImageError> {
    let link = cache_dir.join(CURRENT);
    let target = match fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // EINVAL: not a symlink (something else is in the way); treat as "no current image".
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(ImageError::io("read symlink", link, e)),
    };
    let mut comps = target.components();
    match (comps.next(), comps.next()) {
        (Some(std::path::Component::Normal(name)), None) => Ok(Some(cache_dir.join(name))),
        _ => Ok(None),
    }
}

/// Points `current` at `cache_dir/name` atomically (a new symlink renamed over the old one).
pub fn set_current(cache_dir: &Path, name: &str) -> Result<(), ImageError> {
    let tmp = cache_dir.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp).ctx("create symlink", &tmp)?;
    let link = cache_dir.join(CURRENT);
    fs::rename(&tmp, &link).ctx(&format!("rename {} to", tmp.display()), &link)?;
    sync_dir(cache_dir)
}

/// Moves the fully written directory `from` to `to`, replacing a previous `to` (a forced rebuild of
/// the same key): the old one is first renamed aside, since rename(2) will not replace a non-empty
/// directory.
pub fn install_dir(from: &Path, to: &Path, parent: &Path) -> Result<(), ImageError> {
    if to.exists() {
        let aside = parent.join(format!("{TMP_PREFIX}old-{}", std::process::id()));
        let _ = fs::remove_dir_all(&aside);
        fs::rename(to, &aside).ctx(&format!("rename {} to", to.display()), &aside)?;
        fs::remove_dir_all(&aside).ctx("remove", &aside)?;
    }
    fs::rename(from, to).ctx(&format!("rename {} to", from.display()), to)?;
    sync_dir(parent)
}

/// Removes entries of `dir` for which `stale(name)` holds. Only call with the lock held. Failures
/// are logged, not returned: cleanup must not fail a build that succeeded.
pub fn remove_stale(dir: &Path, stale: &dyn Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !stale(&name) {
            continue;
        }
        let path = entry.path();
        let res = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match res {
            Ok(()) => tracing::debug!(path = %path.display(), "removed old cache entry"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove old cache entry")
            }
        }
    }
}

/// True for image directory names (16 lowercase hex digits).
pub fn is_image_dir_name(name: &str) -> bool {
    name.len() == 16
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_pointer_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_current(d.path()).unwrap(), None);
        set_current(d.path(), "0123456789abcdef").unwrap();
        assert_eq!(
            read_current(d.path()).unwrap(),
            Some(d.path().join("0123456789abcdef"))
        );
        set_current(d.path(), "fedcba9876543210").unwrap();
        assert_eq!(
            read_current(d.path()).unwrap(),
            Some(d.path().join("fedcba9876543210"))
        );
        // A pointer escaping the cache is ignored.
        fs::remove_file(d.path().join(CURRENT)).unwrap();
        std::os::unix::fs::symlink("../etc", d.path().join(CURRENT)).unwrap();
        assert_eq!(read_current(d.path()).unwrap(), None);
    }

    #[test]
    fn lock_is_exclusive_between_open_files() {
        let d = tempfile::tempdir().unwrap();
        let first = lock(d.path(), &mut |_| panic!("must not wait")).unwrap();
        let path = d.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut waited = false;
            let _second = lock(&path, &mut |_| waited = true).unwrap();
            tx.send(waited).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "second lock taken while the first is held"
        );
        drop(first);
        assert!(
            rx.recv().unwrap(),
            "second locker should have reported waiting"
        );
        t.join().unwrap();
    }

    #[test]
    fn install_replaces_and_cleanup_removes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for n in ["a", "b"] {
            fs::create_dir(p.join(n)).unwrap();
            fs::write(p.join(n).join("f"), n).unwrap();
        }
        install_dir(&p.join("a"), &p.join("b"), p).unwrap();
        assert_eq!(fs::read_to_string(p.join("b/f")).unwrap(), "a");
        assert!(!p.join("a").exists());
        fs::create_dir(p.join("0123456789abcdef")).unwrap();
        fs::write(p.join("keep"), "").unwrap();
        remove_stale(p, &|n| is_image_dir_name(n) || n == "b");
        let mut left: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["keep"]);
    }
}
