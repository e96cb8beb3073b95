//! What the QEMU droverd runs can do, asked once at start: its version, QMP commands (from
//! `query-qmp-schema`), migration capabilities, machine types and CPU models.
//!
//! Version-specific behaviour is decided here and nowhere else, so a workaround applies only
//! where the probe says it is needed and a newer feature is used where it exists.

use crate::install::QemuInstall;
use crate::qmp::{Qmp, QmpError};
use drover_model::Accel;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The named CPU model new VMs get under TCG, when the QEMU has it with nothing unavailable.
///
/// `-cpu max` differs between QEMU versions (10.0 adds x2apic, fsrm, rdseed, sha-ni, ... to
/// 7.2's), so a state or migration stream from one does not fit the other. Westmere (SSE4.2,
/// AES-NI, PCLMUL, POPCNT) is the newest Intel model that both 7.2 and 10.0 report usable
/// under TCG with nothing unavailable (`query-cpu-definitions`): every newer one lacks some
/// feature there (on 7.2 SandyBridge already lacks x2apic and tsc-deadline; Haswell and later
/// also pcid and invpcid). Boot to /init takes the same QEMU CPU time as with `max` on both
/// versions within the noise (bench/boot.py).
pub const TCG_CPU_MODEL: &str = "Westmere";

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The emulator did not start or answer.
    #[error("probing {binary}: {message}")]
    Start {
        /// The emulator.
        binary: String,
        /// What went wrong (with QEMU's own words where it said any).
        message: String,
    },
    /// A query failed.
    #[error("probing QEMU: {0}")]
    Qmp(#[from] QmpError),
}

/// A QEMU version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl QemuVersion {
    /// Whether this is `major.minor` or newer.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// `7.2` of `7.2.22`: the part that decides what the QEMU can do.
    pub fn release(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One machine type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineType {
    /// Its versioned name (`pc-q35-7.2`).
    pub name: String,
    /// The alias that means it in this QEMU (`q35`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// One CPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// Its name (`Westmere`).
    pub name: String,
    /// Features the model has that the accelerator cannot give (empty: usable as is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
}

/// What one QEMU can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuProbe {
    /// Version.
    pub version: QemuVersion,
    /// The distribution's package version (`Debian 1:7.2+dfsg-7+deb12u18`), if it says.
    #[serde(default)]
    pub package: String,
    /// Machine types (q35 family only: the ones Drover can run).
    pub machines: Vec<MachineType>,
    /// CPU models, with what the probed accelerator lacks of each.
    pub cpu_models: Vec<CpuModel>,
    /// Migration capabilities (`query-migrate-capabilities`).
    pub migration_capabilities: Vec<String>,
    /// How many QMP commands its schema has (`query-qmp-schema`).
    pub qmp_commands: usize,
    /// Whether `migrate` takes `file:` URIs (QEMU 8.2 and newer).
    #[serde(default)]
    pub file_uri: bool,
    /// How long the probe took, in milliseconds.
    #[serde(default)]
    pub probe_ms: u64,
}

impl QemuProbe {
    /// The versioned machine type `alias` means here (`q35` → `pc-q35-7.2`).
    pub fn resolve_machine(&self, alias: &str) -> Option<&str> {
        self.machines
            .iter()
            .find(|m| m.alias.as_deref() == Some(alias) || m.name == alias)
            .map(|m| m.name.as_str())
    }

    /// Whether machine type `name` exists here (a versioned name or an alias).
    pub fn has_machine(&self, name: &str) -> bool {
        self.resolve_machine(name).is_some()
    }

    /// Whether CPU model `name` exists here and the probed accelerator gives all its features.
    /// `-feature` flags after the name only take features away, so the base model decides.
    pub fn cpu_usable(&self, model: &str) -> bool {
        let base = model.split(',').next().unwrap_or(model);
        self.cpu_models
            .iter()
            .any(|c| c.name == base && c.unavailable.is_empty())
    }

    /// Whether migration capability `name` exists.
    pub fn has_capability(&self, name: &str) -> bool {
        self.migration_capabilities.iter().any(|c| c == name)
    }

    /// QEMU < 9.0 under TCG loses guest writes during live migration when a RAM block is a
    /// multiple of 256 KiB (fixed in 9.0 by "physmem: Fix migration dirty bitmap coherency with
    /// TCG memory access"): new VMs get padded RAM, and hot-plugged memory is not live-migrated.
    pub fn tcg_dirty_tracking_bug(&self) -> bool {
        !self.version.at_least(9, 0)
    }

    /// QEMU 9.0 and newer return a VM to the run state it had when a background snapshot began
    /// (7.2 always restarted it): Drover, which pauses first, resumes it itself.
    pub fn background_snapshot_keeps_run_state(&self) -> bool {
        self.version.at_least(9, 0)
    }

    /// The CPU model new TCG VMs get: [`TCG_CPU_MODEL`] when usable here, else `None` (`max`).
    pub fn tcg_cpu_model(&self) -> Option<&'static str> {
        self.cpu_usable(TCG_CPU_MODEL).then_some(TCG_CPU_MODEL)
    }

    /// The version-dependent behaviours in force, one line each, for the log and `host info`.
    pub fn quirks(&self) -> Vec<String> {
        let mut q = Vec::new();
        if self.tcg_dirty_tracking_bug() {
            q.push("TCG dirty-tracking bug (< 9.0): new VMs get 8 KiB of RAM padding; hot-plugged memory is not live-migrated under TCG".into());
        } else {
            q.push("no TCG dirty-tracking bug (>= 9.0): no RAM padding for new VMs; hot-plugged memory migrates live".into());
        }
        if self.background_snapshot_keeps_run_state() {
            q.push("background snapshots keep the run state (>= 9.0): Drover resumes the VM once its device state is taken".into());
        } else {
            q.push("background snapshots restart the VM themselves (< 9.0)".into());
        }
        q.push("background snapshots read every page before write-protecting it (QEMU does not use UFFD_FEATURE_WP_UNPOPULATED): the first save of a QEMU pauses longer".into());
        if self.has_capability("mapped-ram") {
            q.push("mapped-ram available (>= 9.0): classic saves write RAM with mapped-ram and multifd (bench/mapped_ram.py)".into());
        }
        q
    }
}

/// Probe `install`'s emulator under `accel`, in `work_dir` (its QMP socket lives there).
pub async fn probe(
    install: &QemuInstall,
    accel: Accel,
    work_dir: &Path,
) -> Result<QemuProbe, ProbeError> {
    let t0 = Instant::now();
    let binary = install.emulator.display().to_string();
    let start = |message: String| ProbeError::Start {
        binary: binary.clone(),
        message,
    };
    // What a killed droverd's probe left goes first; whatever this one leaves goes when it
    // returns, on every path (the dir is the probe's alone).
    let _ = std::fs::remove_dir_all(work_dir);
    std::fs::create_dir_all(work_dir)
        .map_err(|e| start(format!("creating {}: {e}", work_dir.display())))?;
    let _cleanup = RemoveOnDrop(work_dir);
    let sock = work_dir.join("probe.sock");
    let log = work_dir.join("probe.log");
    let _ = std::fs::remove_file(&sock);
    let mut args = install.emulator_args();
    args.extend(
        [
            "-machine",
            "none",
            "-accel",
            &accel.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ]
        .map(String::from),
    );
    let out = std::fs::File::create(&log)
        .map_err(|e| start(format!("creating {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| start(format!("{}: {e}", log.display())))?;
    let mut child = install
        .tokio_command(&install.emulator)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| start(e.to_string()))?;
    let said = |log: &Path| {
        std::fs::read_to_string(log)
            .map(|s| s.trim().chars().take(500).collect::<String>())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(start(format!(
                "QEMU exited at once ({status}): {}",
                said(&log)
            )));
        }
        if let Ok((q, _events)) = Qmp::connect(&sock).await {
            break q;
        }
        if Instant::now() > deadline {
            return Err(start(format!("QMP did not answer in 20 s: {}", said(&log))));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let result = query(&qmp).await;
    let _ = qmp.execute("quit", None).await;
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let mut p = result?;
    p.probe_ms = t0.elapsed().as_millis() as u64;
    Ok(p)
}

/// Removes a directory and what it holds when dropped.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

async fn query(qmp: &Qmp) -> Result<QemuProbe, ProbeError> {
    let version = qmp.execute("query-version", None).await?;
    let machines = qmp.execute("query-machines", None).await?;
    let cpus = qmp.execute("query-cpu-definitions", None).await?;
    let caps = qmp.execute("query-migrate-capabilities", None).await?;
    let schema = qmp.execute("query-qmp-schema", None).await?;
    Ok(parse(&version, &machines, &cpus, &caps, &schema))
}

/// The version numbers at the end of a machine type's name (`[7, 2]` of `pc-q35-7.2`).
fn machine_version(name: &str) -> Vec<u32> {
    name.rsplit('-')
        .next()
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect()
}

/// Build a probe from QEMU's answers (strict about nothing: unknown fields are ignored, missing
/// ones leave the lists short).
pub fn parse(
    version: &Value,
    machines: &Value,
    cpus: &Value,
    caps: &Value,
    schema: &Value,
) -> QemuProbe {
    let n = |k: &str| {
        version
            .get("qemu")
            .and_then(|q| q.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32
    };
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let mut machines: Vec<MachineType> = list(machines)
        .iter()
        .filter_map(|m| {
            let name = s(m, "name")?;
            name.contains("q35").then(|| MachineType {
                name,
                alias: s(m, "alias"),
            })
        })
        .collect();
    // By version (`pc-q35-10.0` after `pc-q35-9.2`), not as text.
    machines.sort_by_key(|m| machine_version(&m.name));
    let mut cpu_models: Vec<CpuModel> = list(cpus)
        .iter()
        .filter_map(|c| {
            Some(CpuModel {
                name: s(c, "name")?,
                unavailable: c
                    .get("unavailable-features")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect();
    cpu_models.sort_by(|a, b| a.name.cmp(&b.name));
    let migration_capabilities = list(caps)
        .iter()
        .filter_map(|c| s(c, "capability"))
        .collect();
    let qmp_commands = list(schema)
        .iter()
        .filter(|e| e.get("meta-type").and_then(Value::as_str) == Some("command"))
        .count();
    let package = s(version, "package").unwrap_or_default().trim().to_string();
    let version = QemuVersion {
        major: n("major"),
        minor: n("minor"),
        micro: n("micro"),
    };
    QemuProbe {
        file_uri: version.at_least(8, 2),
        version,
        package,
        machines,
        cpu_models,
        migration_capabilities,
        qmp_commands,
        probe_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A killed droverd's probe left its files: the next probe removes them, and leaves
    /// nothing itself, whether it succeeds (the system's QEMU, where installed) or fails.
    #[tokio::test]
    async fn a_probe_leaves_nothing_in_its_dir_and_clears_a_killed_ones() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join(".probe");
        let stale = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("probe.log"), b"from a killed droverd").unwrap();
            std::fs::write(dir.join("other"), b"x").unwrap();
        };
        let system = QemuInstall::system();
        if system.emulator.exists() {
            stale(&dir);
            let p = probe(&system, Accel::Tcg, &dir).await;
            assert!(p.is_ok(), "{:?}", p.err());
            let left: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(!dir.exists(), "the probe left its dir, holding {left:?}");
        }
        stale(&dir);
        let mut missing = QemuInstall::system();
        missing.emulator = base.path().join("no-such-qemu");
        assert!(probe(&missing, Accel::Tcg, &dir).await.is_err());
        assert!(!dir.exists(), "a failed probe left its dir");
    }

    fn probe_of(major: u32, minor: u32) -> QemuProbe {
        let alias = format!("pc-q35-{major}.{minor}");
        parse(
            &json!({"qemu": {"major": major, "minor": minor, "micro": 2}, "package": " Debian 1:x "}),
            &json!([
                {"name": "pc-q35-7.2", "alias": if major == 7 { Some("q35") } else { None }},
                {"name": alias, "alias": "q35"},
                {"name": "pc-i440fx-7.2", "alias": "pc"},
                {"name": "none"},
            ]),
            &json!([
                {"name": "Westmere", "unavailable-features": []},
                {"name": "Haswell", "unavailable-features": ["x2apic", "pcid"]},
                {"name": "max"},
            ]),
            &json!([{"capability": "x-ignore-shared", "state": false},
                    {"capability": "mapped-ram", "state": false}]),
            &json!([{"name": "migrate", "meta-type": "command"},
                    {"name": "query-status", "meta-type": "command"},
                    {"name": "0", "meta-type": "object"}]),
        )
    }

    #[test]
    fn answers_become_what_drover_decides_by() {
        let p = probe_of(10, 0);
        assert_eq!(p.version.to_string(), "10.0.2");
        assert_eq!(p.package, "Debian 1:x");
        assert_eq!(p.resolve_machine("q35"), Some("pc-q35-10.0"));
        assert!(p.has_machine("pc-q35-7.2") && !p.has_machine("pc-q35-11.0"));
        assert!(p.machines.iter().all(|m| m.name.contains("q35")));
        assert_eq!(
            p.machines.last().map(|m| m.name.as_str()),
            Some("pc-q35-10.0"),
            "newest last"
        );
        assert!(p.cpu_usable("Westmere") && p.cpu_usable("Westmere,-aes"));
        assert!(
            !p.cpu_usable("Haswell"),
            "a model with unavailable features"
        );
        assert!(!p.cpu_usable("Skylake-Client"), "an unknown model");
        assert_eq!(p.tcg_cpu_model(), Some(TCG_CPU_MODEL));
        assert_eq!(p.qmp_commands, 2);
        assert!(p.has_capability("mapped-ram") && p.file_uri);
        assert!(!p.tcg_dirty_tracking_bug() && p.background_snapshot_keeps_run_state());

        let old = probe_of(7, 2);
        assert_eq!(old.resolve_machine("q35"), Some("pc-q35-7.2"));
        assert!(old.tcg_dirty_tracking_bug() && !old.background_snapshot_keeps_run_state());
        assert!(!old.file_uri);
        assert!(old.quirks().iter().any(|q| q.contains("RAM padding")));
        assert!(QemuVersion {
            major: 9,
            minor: 0,
            micro: 0
        }
        .at_least(9, 0));
        assert!(!QemuVersion {
            major: 8,
            minor: 2,
            micro: 9
        }
        .at_least(9, 0));
    }
}
