//! The inventory a scan reports: CPUs, memory, disks, NICs, DMI strings and the kernel, read
//! from `/proc` and `/sys`. Every file read is bounded and every field optional: a scan reports
//! what it can read rather than fail.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Largest file read.
const MAX_FILE: u64 = 256 * 1024;
/// Most disks or NICs listed.
const MAX_DEVICES: usize = 256;
/// Longest string field kept.
const MAX_FIELD: usize = 256;
/// DMI files reported (those readable).
pub const DMI_FIELDS: [&str; 12] = [
    "sys_vendor",
    "product_name",
    "product_version",
    "product_serial",
    "product_uuid",
    "board_vendor",
    "board_name",
    "board_serial",
    "chassis_vendor",
    "chassis_type",
    "bios_vendor",
    "bios_version",
];

/// Where to read from (the real `/proc` and `/sys`, or a fixture).
#[derive(Debug, Clone)]
pub struct Roots {
    /// `/proc`.
    pub proc_dir: PathBuf,
    /// `/sys`.
    pub sys_dir: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc_dir: "/proc".into(),
            sys_dir: "/sys".into(),
        }
    }
}

/// Read at most [`MAX_FILE`] bytes of `path` as text.
fn read(path: &Path) -> Option<String> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE).read_to_end(&mut buf))
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The first line of `path`, trimmed, bounded, without control characters; `None` if empty.
fn field(path: &Path) -> Option<String> {
    let text = read(path)?;
    let v: String = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Sorted entry names of a directory (at most [`MAX_DEVICES`]).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.truncate(MAX_DEVICES);
    v
}

/// `(logical CPUs, first model name)` from `/proc/cpuinfo`.
pub fn parse_cpuinfo(text: &str) -> (u32, Option<String>) {
    let mut count = 0;
    let mut model = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "processor" => count += 1,
            "model name" if model.is_none() => {
                model = Some(v.trim().chars().take(MAX_FIELD).collect())
            }
            _ => {}
        }
    }
    (count, model)
}

/// How many CPUs a kernel CPU list names (`0-3,5,7-8` → 7); `None` if malformed.
pub fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    Some(n)
}

/// `MemTotal` in bytes from `/proc/meminfo`.
pub fn parse_mem_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .and_then(|kb| kb.checked_mul(1024))
}

/// Take the inventory.
pub fn scan(roots: &Roots) -> Value {
    let proc_ = &roots.proc_dir;
    let sys = &roots.sys_dir;
    let (cpu_count, cpu_model) = read(&proc_.join("cpuinfo"))
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or((0, None));
    let online = read(&sys.join("devices/system/cpu/online")).and_then(|t| parse_cpu_list(&t));

    let disks: Vec<Value> = names(&sys.join("block"))
        .into_iter()
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .map(|n| {
            let d = sys.join("block").join(&n);
            let sectors = field(&d.join("size")).and_then(|s| s.parse::<u64>().ok());
            json!({
                "name": n,
                "size_bytes": sectors.and_then(|s| s.checked_mul(512)),
                "serial": field(&d.join("serial")).or_else(|| field(&d.join("device/serial"))),
                "model": field(&d.join("device/model")),
                "read_only": field(&d.join("ro")).map(|r| r == "1"),
            })
        })
        .collect();

    let nics: Vec<Value> = names(&sys.join("class/net"))
        .into_iter()
        .filter(|n| n != "lo")
        .map(|n| {
            let d = sys.join("class/net").join(&n);
            json!({
                "name": n,
                "mac": field(&d.join("address")),
                "mtu": field(&d.join("mtu")).and_then(|m| m.parse::<u32>().ok()),
                "state": field(&d.join("operstate")),
            })
        })
        .collect();

    let dmi_dir = sys.join("class/dmi/id");
    let mut dmi = Map::new();
    for f in DMI_FIELDS {
        if let Some(v) = field(&dmi_dir.join(f)) {
            dmi.insert(f.to_string(), Value::String(v));
        }
    }

    json!({
        "cpus": { "count": cpu_count, "online": online, "model": cpu_model },
        "memory": { "total_bytes": read(&proc_.join("meminfo")).and_then(|t| parse_mem_total(&t)) },
        "disks": disks,
        "nics": nics,
        "dmi": dmi,
        "kernel": {
            "release": field(&proc_.join("sys/kernel/osrelease")),
            "version": field(&proc_.join("sys/kernel/version")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    #[test]
    fn parsers() {
        let cpuinfo = "processor\t: 0\nmodel name\t: QEMU TCG CPU version 2.5+\nflags: x\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            parse_cpuinfo(cpuinfo),
            (2, Some("QEMU TCG CPU version 2.5+".into()))
        );
        assert_eq!(parse_cpuinfo("garbage\n:::\n"), (0, None));
        assert_eq!(parse_cpu_list("0-3,5,7-8\n"), Some(7));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("0-4294967295"), None, "no overflow");
        assert_eq!(parse_mem_total("MemTotal:   2048 kB\n"), Some(2 << 20));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 99999999999999999999 kB"), None);
    }

    #[test]
    fn scan_of_a_fixture() {
        let dir = TempDir::new("inventory");
        let root = dir.path();
        let w = |p: &str, text: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        w("proc/cpuinfo", "processor : 0\nmodel name : Test CPU\n");
        w("proc/meminfo", "MemTotal: 1024 kB\n");
        w("proc/sys/kernel/osrelease", "6.1.0-28-amd64\n");
        w("sys/devices/system/cpu/online", "0\n");
        w("sys/block/vda/size", "2048\n");
        w("sys/block/vda/serial", "data\n");
        w("sys/block/vda/ro", "0\n");
        w("sys/block/loop0/size", "1\n");
        w("sys/class/net/eth0/address", "52:54:00:00:00:01\n");
        w("sys/class/net/lo/address", "00:00:00:00:00:00\n");
        w(
            "sys/class/dmi/id/product_name",
            "Standard PC (Q35 + ICH9, 2009)\n",
        );
        w("sys/class/dmi/id/sys_vendor", "\n");
        let inv = scan(&Roots {
            proc_dir: root.join("proc"),
            sys_dir: root.join("sys"),
        });
        assert_eq!(inv["cpus"]["count"], 1);
        assert_eq!(inv["cpus"]["online"], 1);
        assert_eq!(inv["memory"]["total_bytes"], 1 << 20);
        assert_eq!(inv["disks"].as_array().unwrap().len(), 1);
        assert_eq!(inv["disks"][0]["size_bytes"], 1 << 20);
        assert_eq!(inv["disks"][0]["serial"], "data");
        assert_eq!(inv["nics"][0]["name"], "eth0");
        assert_eq!(inv["nics"].as_array().unwrap().len(), 1);
        assert_eq!(inv["dmi"]["product_name"], "Standard PC (Q35 + ICH9, 2009)");
        assert!(
            inv["dmi"].get("sys_vendor").is_none(),
            "empty fields are left out"
        );
        assert_eq!(inv["kernel"]["release"], "6.1.0-28-amd64");
        // Nothing readable at all: still an inventory.
        let empty = scan(&Roots {
            proc_dir: root.join("none"),
            sys_dir: root.join("none"),
        });
        assert_eq!(empty["cpus"]["count"], 0);
    }
}
