//! Copying large, mostly sparse files (guest RAM) fast: a reflink where the filesystem has them
//! (XFS, btrfs: no data is copied), else only the data extents, in the kernel.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FICLONE` from linux/fs.h.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Shared extents (copy-on-write).
    Reflink,
    /// Data extents copied, holes kept.
    Sparse,
}

/// Copy `src` to a new file `dst` (which must not exist).
pub fn copy(src: &Path, dst: &Path) -> io::Result<CopyKind> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if r == 0 {
        return Ok(CopyKind::Reflink);
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        // SAFETY: plain lseek on an open fd.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole };
        let mut off_in = data;
        let mut off_out = data;
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: offsets point at valid i64s; fds are open.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut off_in,
                    to.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (tmpfs -> ext4) older kernels refuse: copy through memory.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOSYS)
                        | Some(libc::EOPNOTSUPP)
                ) {
                    copy_range(&from, &to, off_in as u64, left)?;
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        pos = hole;
    }
    // Durability is the caller's call: a save syncs after the guest has resumed.
    Ok(CopyKind::Sparse)
}

/// Copy `len` bytes at `offset` with plain reads and writes.
fn copy_range(from: &File, to: &File, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0usize;
    while done < len {
        let want = buf.len().min(len - done);
        let n = from.read_at(&mut buf[..want], offset + done as u64)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], offset + done as u64)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        f.set_len(16 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("b");
        copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(copy(&src, &dst).is_err(), "never overwrites");
        // Across filesystems when /dev/shm is there (the RAM-file case).
        if std::path::Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            let dst2 = shm.path().join("c");
            copy(&src, &dst2).unwrap();
            assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst2).unwrap());
        }
    }
}
