//! Facts about the host: CPUs, memory, disk, name.

use std::path::Path;

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
}

/// Parse `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    Memory {
        total: field("MemTotal:"),
        available: field("MemAvailable:"),
    }
}

/// This host's memory.
pub fn memory() -> Memory {
    std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default()
}

/// Logical CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Total and free bytes of the filesystem holding `path`.
pub fn disk(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            // The field widths differ between libc targets; u64 holds them all.
            #[allow(clippy::unnecessary_cast)]
            let (frag, blocks, avail) = (
                s.fragment_size() as u64,
                s.blocks() as u64,
                s.blocks_available() as u64,
            );
            (blocks * frag, avail * frag)
        }
        Err(_) => (0, 0),
    }
}

/// Host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A stable id of this host: from /etc/machine-id (first 12 hex digits), else the host name.
pub fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().chars().take(12).collect::<String>())
        .filter(|s| s.len() == 12)
        .unwrap_or_else(hostname)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   23000000 kB\n",
        );
        assert_eq!(m.total, 24_000_000 * 1024);
        assert_eq!(m.available, 23_000_000 * 1024);
        assert!(memory().total > 0);
    }
}
