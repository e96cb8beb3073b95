//! A minimal writer for the "newc" cpio format (what the kernel unpacks as an initramfs).
//!
//! Every entry is owned by 0:0 and has mtime 0, so the archive depends only on its contents
//! (reproducible images, and a content hash is meaningful). The caller emits parents before
//! children; the kernel does not create missing parent directories.

use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams newc entries into `W`; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0, (0, 0))?;
        self.pad()
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.file_from(name, perm, data.len() as u64, &mut &data[..])
    }

    /// A regular file of exactly `size` bytes read from `data` (errors if it has fewer).
    pub fn file_from(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        self.header(name, S_IFREG | (perm & 0o7777), 1, size, (0, 0))?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{name}: expected {size} bytes, got {copied} (file changed while archiving?)"
                ),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// A symbolic link `name` → `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, 1, target.len() as u64, (0, 0))?;
        self.raw(target.as_bytes())?;
        self.pad()
    }

    /// A character device node (e.g. `dev/console`, 5:1).
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))?;
        self.pad()
    }

    /// Writes the `TRAILER!!!` entry and returns the writer and the archive's size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        // The trailer has inode 0 and nlink 1, like GNU cpio writes it.
        self.next_ino = 0;
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        self.pad()?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: newc entries are limited to 4 GiB"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (only used by the "crc" variant)
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.raw(h.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad()
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Pads to the next multiple of 4 (newc aligns both the name and the data).
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.raw(&[0u8; 3][..n])
    }
}

/// A parsed newc entry (for tests and for checking a built image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path as stored (no leading `/`).
    pub name: String,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// File contents or symlink target.
    pub data: Vec<u8>,
    /// (major, minor) of a device node.
    pub rdev: (u32, u32),
    /// Owner (uid, gid).
    pub owner: (u32, u32),
}

/// Parses a whole newc archive up to its trailer.
pub fn parse(mut b: &[u8]) -> Result<Vec<Entry>, String> {
    let total = b.len();
    let mut entries = Vec::new();
    loop {
        let at = total - b.len();
        if b.len() < 110 || &b[..6] != b"070701" {
            return Err(format!("no newc header at offset {at}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            u32::from_str_radix(s, 16).map_err(|e| format!("bad header field at offset {at}: {e}"))
        };
        let (mode, uid, gid, size, rmaj, rmin, namesize) = (
            field(1)?,
            field(2)?,
            field(3)?,
            field(6)? as usize,
            field(9)?,
            field(10)?,
            field(11)? as usize,
        );
        let name_end = 110 + namesize;
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + size;
        if namesize == 0 || b.len() < data_end {
            return Err(format!("truncated entry at offset {at}"));
        }
        let name = String::from_utf8_lossy(&b[110..name_end - 1]).into_owned();
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            data: b[data_start..data_end].to_vec(),
            rdev: (rmaj, rmin),
            owner: (uid, gid),
        });
        b = &b[(data_end.div_ceil(4) * 4).min(b.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF fake busybox")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.dir("etc", 0o755).unwrap();
        w.file("etc/empty", 0o644, b"").unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        let (buf, n) = w.finish().unwrap();
        assert_eq!(n as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        buf
    }

    #[test]
    fn round_trips_through_parser() {
        let e = parse(&sample()).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/empty",
                "init"
            ]
        );
        assert_eq!(e[1].mode, 0o100_755);
        assert_eq!(e[1].data, b"\x7fELF fake busybox");
        assert_eq!(e[2].mode, 0o120_777);
        assert_eq!(e[2].data, b"busybox");
        assert_eq!((e[4].mode, e[4].rdev), (0o020_600, (5, 1)));
        assert!(e.iter().all(|e| e.owner == (0, 0)));
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file_from("x", 0o644, 10, &mut &b"abc"[..]).is_err());
    }

    #[test]
    fn round_trips_through_system_cpio() {
        let Ok(out) = Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed; skipping the system cpio round trip");
            return;
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let list = Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            list.status.success(),
            "{}",
            String::from_utf8_lossy(&list.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&list.stdout),
            "bin\nbin/busybox\nbin/sh\ndev\ndev/console\netc\netc/empty\ninit\n"
        );
        // Extract (without device nodes, which may need privileges) and compare contents.
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let x = Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .args(["bin/*", "init", "etc/*"])
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
        assert_eq!(
            std::fs::read(root.join("bin/busybox")).unwrap(),
            b"\x7fELF fake busybox"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap().to_str(),
            Some("busybox")
        );
        assert_eq!(
            std::fs::read(root.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(root.join("etc/empty")).unwrap(), b"");
    }
}
