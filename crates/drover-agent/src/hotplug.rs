//! Bringing hot-plugged vCPUs and memory online.
//!
//! When the host hot-plugs a vCPU or a DIMM, the guest kernel adds it *offline* unless configured
//! to online it itself, and this guest has no udev rules to do it. So the agent scans sysfs right
//! after start and then every second, and onlines every offline CPU
//! (`devices/system/cpu/cpuN/online` reads `0` → write `1`) and every offline memory block
//! (`devices/system/memory/memoryN/state` reads `offline` → write `online`).
//!
//! Deliberately simple: *everything* offline is onlined, including a CPU an administrator took
//! offline by hand (it comes back within a second). In this guest the host owns the shape of the
//! VM; to run with fewer CPUs, ask the host (`drover-guest reconfigure --cpus N`).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

/// The real sysfs.
pub const DEFAULT_SYSFS: &str = "/sys";
/// Time between scans.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// What one scan did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// CPUs brought online (names such as `cpu3`).
    pub cpus: Vec<String>,
    /// Memory blocks brought online (names such as `memory40`).
    pub memory: Vec<String>,
    /// Entries that were offline and could not be onlined, with why.
    pub failed: Vec<(String, String)>,
}

/// Remembers which failures were already logged, so a block the kernel refuses to online (e.g.
/// not removable, no movable zone) does not log every second.
#[derive(Debug, Default)]
pub struct Onliner {
    root: PathBuf,
    failures_logged: HashSet<(String, String)>,
}

impl Onliner {
    /// Scan the sysfs tree at `root` (normally [`DEFAULT_SYSFS`]; a fake tree in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Onliner {
            root: root.into(),
            failures_logged: HashSet::new(),
        }
    }

    /// Online everything offline once, logging each thing onlined and each new failure.
    pub fn scan(&mut self) -> ScanReport {
        let mut report = ScanReport::default();
        let cpu_dir = self.root.join("devices/system/cpu");
        for (name, dir) in numbered(&cpu_dir, "cpu") {
            // cpu0 usually has no `online` file: it cannot go offline.
            match online_if(&dir.join("online"), "0", "1") {
                Ok(true) => {
                    crate::log!("onlined {name}");
                    report.cpus.push(name);
                }
                Ok(false) => {}
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        let mem_dir = self.root.join("devices/system/memory");
        for (name, dir) in numbered(&mem_dir, "memory") {
            match online_if(&dir.join("state"), "offline", "online") {
                Ok(true) => {
                    crate::log!("onlined {name}");
                    report.memory.push(name);
                }
                Ok(false) => {}
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        for (name, why) in &report.failed {
            if self.failures_logged.insert((name.clone(), why.clone())) {
                crate::log!("cannot online {name}: {why}");
            }
        }
        report
    }

    /// Scan now and then every [`SCAN_INTERVAL`], forever.
    pub fn run(mut self) -> ! {
        loop {
            self.scan();
            thread::sleep(SCAN_INTERVAL);
        }
    }
}

/// Entries `<prefix><digits>` under `dir`, sorted by number. A missing `dir` (no memory hotplug
/// support in the kernel) is simply empty.
fn numbered(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(prefix)?.parse::<u64>().ok()?;
            Some((n, name, e.path()))
        })
        .collect();
    out.sort();
    out.into_iter()
        .map(|(_, name, path)| (name, path))
        .collect()
}

/// If `file` reads `offline` (trimmed), write `online` to it. `Ok(false)` when it reads anything
/// else or does not exist.
fn online_if(file: &Path, offline: &str, online: &str) -> io::Result<bool> {
    let state = match fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if state.trim() != offline {
        return Ok(false);
    }
    // Sysfs attributes take one write of the whole value; fs::write opens with O_TRUNC, which
    // sysfs ignores.
    fs::write(file, online)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn put(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn get(root: &Path, rel: &str) -> String {
        fs::read_to_string(root.join(rel)).unwrap()
    }

    #[test]
    fn onlines_offline_cpus_and_memory_only() {
        let dir = TempDir::new("sysfs");
        let root = dir.path();
        fs::create_dir_all(root.join("devices/system/cpu/cpu0")).unwrap();
        put(root, "devices/system/cpu/cpu1/online", "1\n");
        put(root, "devices/system/cpu/cpu2/online", "0\n");
        put(root, "devices/system/cpu/cpu10/online", "0\n");
        put(root, "devices/system/cpu/cpufreq/online", "0\n");
        put(root, "devices/system/cpu/online", "0-1\n");
        put(root, "devices/system/memory/memory0/state", "online\n");
        put(root, "devices/system/memory/memory8/state", "offline\n");
        put(
            root,
            "devices/system/memory/memory9/state",
            "going-offline\n",
        );
        put(
            root,
            "devices/system/memory/auto_online_blocks",
            "offline\n",
        );

        let mut o = Onliner::new(root);
        let r = o.scan();
        assert_eq!(r.cpus, ["cpu2", "cpu10"]);
        assert_eq!(r.memory, ["memory8"]);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(get(root, "devices/system/cpu/cpu2/online"), "1");
        assert_eq!(get(root, "devices/system/cpu/cpu1/online"), "1\n");
        assert_eq!(get(root, "devices/system/cpu/cpufreq/online"), "0\n");
        assert_eq!(get(root, "devices/system/memory/memory8/state"), "online");
        assert_eq!(
            get(root, "devices/system/memory/memory9/state"),
            "going-offline\n"
        );

        // Nothing left to do; a newly plugged CPU is picked up by the next scan.
        assert_eq!(o.scan(), ScanReport::default());
        put(root, "devices/system/cpu/cpu3/online", "0\n");
        assert_eq!(o.scan().cpus, ["cpu3"]);
    }

    #[test]
    fn missing_tree_is_empty_and_failures_are_reported() {
        let dir = TempDir::new("sysfs-empty");
        let mut o = Onliner::new(dir.path().join("nothing"));
        assert_eq!(o.scan(), ScanReport::default());

        // A block whose state is a directory cannot be read: reported, not fatal.
        fs::create_dir_all(dir.path().join("devices/system/memory/memory1/state")).unwrap();
        let mut o = Onliner::new(dir.path());
        let r = o.scan();
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "memory1");
        assert_eq!(o.scan().failed.len(), 1, "still failing, logged once");
        assert_eq!(o.failures_logged.len(), 1);
    }
}
