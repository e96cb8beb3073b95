//! Facts about the host: CPUs, memory, disk, name, and its identity (host id, serial, model).

use drover_proto::HostIdentity;
use std::io::Read as _;
use std::path::Path;

/// Where the kernel exposes the machine's DMI (SMBIOS) strings.
pub const DMI_DIR: &str = "/sys/class/dmi/id";

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

/// Check a `--host-id`: 1-64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_host_id(id: &str) -> Result<(), String> {
    if drover_proto::valid_host_id(id) {
        Ok(())
    } else {
        Err(format!(
            "invalid host id {id:?}: use 1-{} characters of a-z, A-Z, 0-9, '.', '_', '-'",
            drover_proto::MAX_HOST_ID
        ))
    }
}

/// One DMI string (first line, trimmed, at most [`drover_proto::MAX_HOST_FIELD`] bytes of
/// printable text); `None` when unreadable (`product_serial` is root-only), empty, or a
/// placeholder firmware writes when it has nothing to say.
pub fn dmi_field(dir: &Path, name: &str) -> Option<String> {
    let mut buf = Vec::new();
    std::fs::File::open(dir.join(name))
        .and_then(|f| f.take(4096).read_to_end(&mut buf))
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line: String = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let mut end = line.len().min(drover_proto::MAX_HOST_FIELD);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let v = line[..end].trim().to_string();
    let placeholder = matches!(
        v.to_ascii_lowercase().as_str(),
        "" | "none" | "0" | "not specified" | "to be filled by o.e.m." | "default string"
    );
    (!placeholder).then_some(v)
}

/// This host's identity: `id` (already checked with [`check_host_id`]) or [`host_id`]; serial
/// and model from DMI under `dmi_dir` when readable, else derived (`drover-<id>`, and
/// `unknown (no DMI)`), so a guest always gets a complete answer.
pub fn host_identity(id: Option<&str>, dmi_dir: &Path) -> HostIdentity {
    let id = id.map(str::to_string).unwrap_or_else(|| {
        // The default must itself be a valid id: the host name may not be.
        let raw = host_id();
        let clean: String = raw
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(drover_proto::MAX_HOST_ID)
            .collect();
        if clean.is_empty() {
            "localhost".into()
        } else {
            clean
        }
    });
    HostIdentity {
        serial: dmi_field(dmi_dir, "product_serial").unwrap_or_else(|| format!("drover-{id}")),
        model: dmi_field(dmi_dir, "product_name").unwrap_or_else(|| "unknown (no DMI)".into()),
        name: hostname()
            .chars()
            .take(drover_proto::MAX_HOST_FIELD)
            .collect(),
        id,
    }
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

    #[test]
    fn identity_from_dmi_or_derived() {
        let dir = tempfile::tempdir().unwrap();
        let none = host_identity(Some("h-1"), dir.path());
        assert_eq!(none.id, "h-1");
        assert_eq!(none.serial, "drover-h-1");
        assert_eq!(none.model, "unknown (no DMI)");
        assert!(none.check().is_ok());
        std::fs::write(dir.path().join("product_serial"), "  SN123\x07 \nmore\n").unwrap();
        std::fs::write(dir.path().join("product_name"), "To Be Filled By O.E.M.\n").unwrap();
        let dmi = host_identity(Some("h-1"), dir.path());
        assert_eq!(dmi.serial, "SN123");
        assert_eq!(dmi.model, "unknown (no DMI)", "placeholders are not models");
        std::fs::write(dir.path().join("product_name"), "x".repeat(500)).unwrap();
        assert!(
            host_identity(None, dir.path()).check().is_ok(),
            "bounded and valid"
        );
        assert!(check_host_id("h2.example_1-a").is_ok());
        for bad in ["", "has space", "a/b", &"x".repeat(65)] {
            assert!(check_host_id(bad).is_err(), "{bad:?}");
        }
    }
}

/// A byte count for people, in one unit family: `320.0 MiB`, `83.4 GiB`, `512 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes_read_in_one_unit_family() {
        use super::human_size;
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(320 << 20), "320.0 MiB");
        assert_eq!(human_size(85418 << 10), "83.4 MiB");
        assert_eq!(human_size(66 << 30), "66.0 GiB");
    }
}
