//! Copying large, mostly sparse files (guest RAM) fast: a reflink where the filesystem has them
//! (XFS, btrfs: no data is copied), else only the data extents, in the kernel, on several threads
//! when asked (a paused guest's memory copy is on the guest's pause).

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
    copy_open(&from, &to, 1).map(|(kind, _)| kind)
}

/// Copy the open file `from` into the empty file `to` (same length afterwards), on up to
/// `threads` threads; also returns the data bytes copied (0 for a reflink).
pub fn copy_open(from: &File, to: &File, threads: usize) -> io::Result<(CopyKind, u64)> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if r == 0 {
        return Ok((CopyKind::Reflink, 0));
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let data = extents(from, len)?;
    let bytes = copy_extents(from, to, &data, threads)?;
    // Durability is the caller's call: a save syncs after the guest has resumed.
    Ok((CopyKind::Sparse, bytes))
}

/// Copy the first `max` data bytes of `from` (holes skipped) into the empty file `to`, as
/// [`copy_open`] would, never by reflink: what a full copy's rate is measured on. Returns the
/// data bytes copied.
pub fn copy_prefix(from: &File, to: &File, max: u64, threads: usize) -> io::Result<u64> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let data = first_bytes(&extents(from, len)?, max);
    copy_extents(from, to, &data, threads)
}

/// The first `max` bytes of `extents`, the last one cut short where needed.
fn first_bytes(extents: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut left = max;
    let mut out = Vec::new();
    for &(off, len) in extents {
        if left == 0 {
            break;
        }
        let take = len.min(left);
        out.push((off, take));
        left -= take;
    }
    out
}

/// Copy `data` (extents of `from`) into `to` at the same offsets, on up to `threads` threads;
/// returns the bytes copied.
fn copy_extents(from: &File, to: &File, data: &[(u64, u64)], threads: usize) -> io::Result<u64> {
    let bytes = data.iter().map(|(_, l)| l).sum();
    let parts = split(data, threads.max(1));
    if parts.len() <= 1 {
        for &(off, l) in parts.first().map(Vec::as_slice).unwrap_or_default() {
            copy_range(from, to, off, l)?;
        }
    } else {
        std::thread::scope(|s| {
            let jobs: Vec<_> = parts
                .iter()
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .try_for_each(|&(off, l)| copy_range(from, to, off, l))
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a copy thread panicked")))
            })
        })?;
    }
    Ok(bytes)
}

/// The data extents of `f` (offset, length), holes left out.
fn extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let (mut pos, end) = (0i64, len as i64);
    while pos < end {
        // SAFETY: plain lseek on an open fd.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        pos = hole;
    }
    Ok(out)
}

/// Cut `extents` into at most `n` parts of about equal bytes (extents split where needed, on
/// 4 KiB boundaries), in order.
fn split(extents: &[(u64, u64)], n: usize) -> Vec<Vec<(u64, u64)>> {
    const PAGE: u64 = 4096;
    let total: u64 = extents.iter().map(|(_, l)| l).sum();
    if total == 0 {
        return Vec::new();
    }
    let share = total.div_ceil(n as u64).div_ceil(PAGE) * PAGE;
    let mut parts = vec![Vec::new()];
    let mut room = share;
    for &(mut off, mut len) in extents {
        while len > 0 {
            if room == 0 {
                parts.push(Vec::new());
                room = share;
            }
            let take = len.min(room);
            if let Some(p) = parts.last_mut() {
                p.push((off, take));
            }
            off += take;
            len -= take;
            room -= take;
        }
    }
    parts
}

/// Copy `len` bytes at `offset` in the kernel, else through memory.
fn copy_range(from: &File, to: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (offset as i64, offset as i64);
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: offsets point at valid i64s; fds are open. Explicit offsets leave the fds'
        // positions alone, so threads may share them.
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
                return copy_through_memory(from, to, off_in as u64, left);
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        left -= n as usize;
    }
    Ok(())
}

/// Copy `len` bytes at `offset` with plain reads and writes.
fn copy_through_memory(from: &File, to: &File, offset: u64, len: usize) -> io::Result<()> {
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
    use proptest::prelude::*;
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

    #[test]
    fn copies_on_several_threads_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        let mut f = File::create(&src).unwrap();
        let mut want = vec![0u8; 12 << 20];
        for (i, at) in [0usize, 3 << 20, 7 << 20].into_iter().enumerate() {
            let block: Vec<u8> = (0..(1 << 20) + 123).map(|j| (i * 7 + j) as u8).collect();
            f.seek(SeekFrom::Start(at as u64)).unwrap();
            f.write_all(&block).unwrap();
            want[at..at + block.len()].copy_from_slice(&block);
        }
        f.set_len(want.len() as u64).unwrap();
        drop(f);
        for threads in [1, 2, 3, 8] {
            let dst = dir.path().join(format!("b{threads}"));
            let to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dst)
                .unwrap();
            let (kind, bytes) = copy_open(&File::open(&src).unwrap(), &to, threads).unwrap();
            assert_eq!(std::fs::read(&dst).unwrap(), want, "{threads} threads");
            if kind == CopyKind::Sparse {
                assert!(bytes >= 3 * ((1 << 20) + 123), "{bytes}");
            }
        }
    }

    #[test]
    fn a_prefix_copy_takes_the_first_data_bytes_only() {
        assert_eq!(
            first_bytes(&[(0, 10), (100, 10), (200, 10)], 15),
            vec![(0, 10), (100, 5)]
        );
        assert_eq!(first_bytes(&[(0, 10)], 0), vec![]);
        assert_eq!(first_bytes(&[(0, 10)], 99), vec![(0, 10)]);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        let mut f = File::create(&src).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[2u8; 8192]).unwrap();
        drop(f);
        let dst = dir.path().join("b");
        let to = File::create(&dst).unwrap();
        let bytes = copy_prefix(&File::open(&src).unwrap(), &to, 8192, 2).unwrap();
        assert_eq!(bytes, 8192);
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len(), (1 << 20) + 8192, "same length as the source");
        assert!(got[..4096].iter().all(|&b| b == 1));
        // Where the filesystem reports the hole, the prefix skips it.
        let from = File::open(&src).unwrap();
        if extents(&from, (1 << 20) + 8192).unwrap().len() == 2 {
            assert!(got[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 2));
            assert!(
                got[(1 << 20) + 4096..].iter().all(|&b| b == 0),
                "past the prefix"
            );
        }
    }

    proptest! {
        /// The parts cover every extent's bytes exactly once, in order, and none is more than
        /// a page over an equal share.
        #[test]
        fn split_covers_every_byte_once(
            raw in proptest::collection::vec((0u64..64, 1u64..64), 0..20),
            n in 1usize..6,
        ) {
            let mut extents = Vec::new();
            let mut at = 0;
            for (gap, len) in raw {
                at += gap * 4096;
                extents.push((at, len * 4096));
                at += len * 4096;
            }
            let parts = split(&extents, n);
            let total: u64 = extents.iter().map(|(_, l)| l).sum();
            prop_assert!(parts.len() <= n);
            let flat: Vec<(u64, u64)> = parts.iter().flatten().copied().collect();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (o, l) in flat {
                match merged.last_mut() {
                    Some((mo, ml)) if *mo + *ml == o => *ml += l,
                    _ => merged.push((o, l)),
                }
            }
            let mut want: Vec<(u64, u64)> = Vec::new();
            for &(o, l) in &extents {
                match want.last_mut() {
                    Some((wo, wl)) if *wo + *wl == o => *wl += l,
                    _ => want.push((o, l)),
                }
            }
            prop_assert_eq!(merged, want);
            let share = total.div_ceil(n as u64).div_ceil(4096) * 4096;
            for p in &parts {
                prop_assert!(p.iter().map(|(_, l)| l).sum::<u64>() <= share);
            }
        }
    }
}
