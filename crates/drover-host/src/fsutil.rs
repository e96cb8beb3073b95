//! Files replaced whole: a reader (or a restart after a crash) sees the old content or the new,
//! never a part.

use std::io::Write as _;
use std::path::Path;

/// Replace `path` with `data` atomically and durably: written beside it, synced, renamed over
/// it, and the directory synced so the rename survives a crash.
pub fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, true)
}

/// Replace `path` with `data` atomically, not durably: for what only matters while this boot
/// lasts (no fsync to wait for on a busy disk).
pub fn replace_file_volatile(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, false)
}

fn replace(path: &Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path
        .parent()
        .filter(|d| durable && !d.as_os_str().is_empty())
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_file_is_replaced_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("manifest.json");
        super::replace_file(&p, b"one").expect("first");
        super::replace_file(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("manifest.json")]);
    }
}
