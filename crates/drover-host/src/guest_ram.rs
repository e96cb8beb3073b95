//! Copying a paused guest's memory straight out of its QEMU, at the speed of a file copy.
//!
//! A guest that booted has its RAM in a file in /dev/shm that QEMU maps shared: the file *is* its
//! memory, so while QEMU is paused a copy of the file (in the kernel, holes kept) is the memory
//! at one point in time. One restored from a fast state maps the state's RAM copy privately
//! (its writes are anonymous copy-on-write memory): that memory is streamed instead, because
//! QEMU 7.2 can leave only *shared* memory out of its device state (`x-ignore-shared`).
//! The file is opened through `/proc/PID/map_files`, the very file QEMU maps.

use crate::filecopy;
use std::fs::File;
use std::io;
use std::path::Path;

#[cfg(test)]
const PAGE: u64 = 4096;

/// One mapping in `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    private: bool,
    offset: u64,
    inode: u64,
    path: String,
}

/// The mappings of files under `dir` in a `/proc/PID/maps` text.
fn file_vmas(maps: &str, dir: &Path) -> Vec<Vma> {
    let dir = format!("{}/", dir.display());
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms, offset, _dev, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.collect::<Vec<_>>().join(" ");
            let path = path.strip_suffix(" (deleted)").unwrap_or(&path).to_string();
            if !path.starts_with(&dir) {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some(Vma {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                private: perms.as_bytes().get(3) == Some(&b'p'),
                offset: u64::from_str_radix(offset, 16).ok()?,
                inode: inode.parse().ok()?,
                path,
            })
        })
        .collect()
}

/// The guest RAM mapping: a file under `dir` mapped from offset 0, exactly `size` bytes long,
/// in one piece (the kernel may split one mapping into adjacent ones with the same file).
fn ram_mapping(vmas: &[Vma], size: u64) -> Option<(u64, bool, String)> {
    let mut i = 0;
    while i < vmas.len() {
        let first = &vmas[i];
        let mut end = first.end;
        i += 1;
        while let Some(v) = vmas.get(i) {
            let continues = v.inode == first.inode
                && v.start == end
                && v.private == first.private
                && v.offset == first.offset + (end - first.start);
            if !continues {
                break;
            }
            end = v.end;
            i += 1;
        }
        if first.offset == 0 && end - first.start == size {
            return Some((first.start, first.private, first.path.clone()));
        }
    }
    None
}

/// Where a QEMU maps its guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMapping {
    pid: u32,
    start: u64,
    first_end: u64,
    /// Shared (the file is the memory) rather than private (copy-on-write over it).
    pub shared: bool,
    /// The file's path (as QEMU opened it).
    pub path: String,
}

/// Find the `size`-byte guest RAM that QEMU `pid` maps from a file under `ram_dir`.
pub fn find(pid: u32, ram_dir: &Path, size: u64) -> io::Result<RamMapping> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let vmas = file_vmas(&maps, ram_dir);
    let Some((start, private, path)) = ram_mapping(&vmas, size) else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "QEMU {pid} maps no {size}-byte guest memory file under {}",
                ram_dir.display()
            ),
        ));
    };
    // map_files names each mapping by its range; the first one's opens the file.
    let first_end = vmas
        .iter()
        .find(|v| v.start == start)
        .map_or(start + size, |v| v.end);
    Ok(RamMapping {
        pid,
        start,
        first_end,
        shared: !private,
        path,
    })
}

impl RamMapping {
    fn open(&self) -> io::Result<File> {
        let (pid, s, e) = (self.pid, self.start, self.first_end);
        File::open(format!("/proc/{pid}/map_files/{s:x}-{e:x}")).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("opening QEMU {pid}'s memory file {}: {err}", self.path),
            )
        })
    }

    /// Bytes of the file that hold data (what a copy copies).
    pub fn touched_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.open()?.metadata()?.blocks() * 512)
    }

    /// This host's copy rate now (bytes per second): up to `max` bytes of the memory copied
    /// on `threads` threads into a scratch file `scratch` (removed again), the guest running.
    /// A busy host copies slower than the rate its last save measured; a save that pauses the
    /// guest for a copy asks this first.
    pub fn copy_rate_now(&self, scratch: &Path, max: u64, threads: usize) -> io::Result<u64> {
        let to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(scratch)?;
        let t = std::time::Instant::now();
        let copied = filecopy::copy_prefix(&self.open()?, &to, max, threads);
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        drop(to);
        let _ = std::fs::remove_file(scratch);
        Ok((copied? as f64 / secs) as u64)
    }

    /// Copy a shared mapping's memory into the new empty file `to` on up to `threads`
    /// threads; QEMU must be paused. Returns the data bytes copied.
    pub fn copy(&self, to: &File, threads: usize) -> io::Result<u64> {
        if !self.shared {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "QEMU {} maps {} privately: its memory is not the file's",
                    self.pid, self.path
                ),
            ));
        }
        filecopy::copy_open(&self.open()?, to, threads).map(|(_, bytes)| bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-p 00000000 00:1b 777 /dev/shm/drover-ab/web@s3 (deleted)
7f0008000000-7f0010000000 rw-p 08000000 00:1b 777 /dev/shm/drover-ab/web@s3 (deleted)
7f0020000000-7f0020001000 rw-s 00000000 00:1b 778 /dev/shm/drover-ab/other
7f0030000000-7f0030100000 rw-s 00000000 00:1b 779 /dev/shm/drover-abc/web
";

    #[test]
    fn finds_the_guest_memory_among_the_mappings() {
        let vmas = file_vmas(MAPS, Path::new("/dev/shm/drover-ab"));
        assert_eq!(vmas.len(), 3, "{vmas:?}");
        // Split into two adjacent mappings of one file: found whole, by its first range.
        assert_eq!(
            ram_mapping(&vmas, 256 << 20),
            Some((
                0x7f00_0000_0000,
                true,
                "/dev/shm/drover-ab/web@s3".to_string()
            ))
        );
        assert_eq!(
            ram_mapping(&vmas, 4096),
            Some((0x7f00_2000_0000, false, "/dev/shm/drover-ab/other".into()))
        );
        // No mapping of that size, and another daemon's dir is not ours.
        assert_eq!(ram_mapping(&vmas, 128 << 20), None);
        assert_eq!(ram_mapping(&vmas, 1 << 20), None);
    }

    /// The real thing, on this process: a shared mapping of a file in /dev/shm is copied as
    /// written through the mapping; a private one is refused.
    #[test]
    fn copies_a_shared_mapping_and_refuses_a_private_one() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let size = 64 * PAGE;
        let mut want = vec![0u8; size as usize];
        let mut maps = Vec::new();
        for (name, flags) in [("ram", libc::MAP_SHARED), ("priv", libc::MAP_PRIVATE)] {
            let path = dir.path().join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            // Private: the mapping is a different size, so the two are told apart.
            let len = if name == "ram" { size } else { 2 * size };
            f.set_len(len).unwrap();
            // SAFETY: a fresh mapping of a file we own, unmapped before the test ends.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            maps.push((base, len));
        }
        let mem = maps[0].0 as *mut u8;
        for p in [0u64, 3, 40] {
            // SAFETY: inside the shared mapping.
            unsafe { *mem.add((p * PAGE + 7) as usize) = 0xA0 + p as u8 };
            want[(p * PAGE + 7) as usize] = 0xA0 + p as u8;
        }
        let new = |n: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join(n))
                .unwrap()
        };
        let pid = std::process::id();
        let ram = find(pid, dir.path(), size).unwrap();
        assert!(ram.shared);
        assert!(ram.touched_bytes().unwrap() >= 3 * PAGE);
        let to = new("copy");
        ram.copy(&to, 2).unwrap();
        assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), want);
        // The rate probe copies, measures and leaves no file behind.
        let scratch = dir.path().join("probe");
        assert!(ram.copy_rate_now(&scratch, 2 * PAGE, 2).unwrap() > 0);
        assert!(!scratch.exists());
        let private = find(pid, dir.path(), 2 * size).unwrap();
        assert!(!private.shared);
        assert!(private.copy(&new("copy2"), 1).is_err());
        for (base, len) in maps {
            // SAFETY: the mappings made above.
            unsafe { libc::munmap(base, len as usize) };
        }
    }
}
