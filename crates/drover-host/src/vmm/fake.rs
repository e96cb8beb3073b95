//! A fake VMM for unit tests of the host's coordination rules.
//!
//! It models what those rules depend on in QEMU: the run state; devices and the backend each
//! uses (a block node, a netdev, a memory object), with QEMU's refusals (a duplicate id, a
//! missing backend, freeing a backend a device still uses); a guest that releases an unplugged
//! device at once (a `DEVICE_DELETED` event) unless told to hold it; vCPU slots; a save's
//! steps (a device state is written only while paused; a background snapshot restarts the
//! guest once its device state is taken, as QEMU < 9.0 does, or leaves it paused); an outgoing
//! live migration (disk mirrors that copy [`MIRROR_STEP`] per query up to [`MIRROR_LEN`] and
//! stay `ready`, a memory copy of [`RAM_STEP`] per query up to [`RAM`] that waits paused before
//! the switch-over when asked to, and refuses to continue while a mirror still runs). Every QMP
//! command it is asked for is recorded as `"<command> <id>"`, and any one of them can be made to
//! fail at its Nth call.

use super::Vmm;
use drover_model::{DiskConfig, NicConfig};
use drover_qemu::cmdline::{disk_node, nic_node};
use drover_qemu::hotplug::dimm_ids;
use drover_qemu::live_migration::{BlockJob, LiveMigrationError, NbdTarget, Progress, Tuning};
use drover_qemu::qmp::{QmpError, QmpEvent};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::broadcast;

/// A mirrored disk's size.
pub const MIRROR_LEN: u64 = 64 << 20;
/// What a mirror copies between two queries.
pub const MIRROR_STEP: u64 = 16 << 20;
/// The guest memory a migration sends.
pub const RAM: u64 = 128 << 20;
/// What the memory copy sends between two queries.
pub const RAM_STEP: u64 = 32 << 20;

/// A qcow2 disk `id` of `size` bytes, for tests' configs.
pub fn test_disk(id: &str, size: u64) -> DiskConfig {
    DiskConfig::unplaced(
        drover_model::ElementId::new(id).unwrap_or_else(|e| panic!("{id}: {e}")),
        format!("/nonexistent/{id}.qcow2").into(),
        drover_model::DiskFormat::Qcow2,
        size,
        false,
        true,
    )
}

/// A one-vCPU VM `v` of `memory` bytes with disks `disks`, for tests.
pub fn test_config(memory: u64, disks: &[&str]) -> drover_model::VmConfig {
    drover_model::VmConfig {
        name: drover_model::VmName::new("v").unwrap_or_else(|e| panic!("{e}")),
        cpus: 1,
        memory,
        disks: disks.iter().map(|d| test_disk(d, 64 << 20)).collect(),
        nics: Vec::new(),
        boot: drover_model::Boot::Default { cmdline: None },
        accel: None,
        max_memory: None,
    }
}

/// A fake running QEMU. See the module docs.
#[derive(Debug)]
pub struct FakeVmm {
    state: Mutex<State>,
    events: broadcast::Sender<QmpEvent>,
}

#[derive(Debug, Default)]
struct State {
    status: String,
    /// Device id -> the backend it uses (none for a vCPU).
    devices: BTreeMap<String, Option<String>>,
    /// Block nodes, netdevs and memory objects, by id.
    backends: BTreeSet<String>,
    /// Devices the guest does not release when asked, by id or (ending in `*`) id prefix.
    held: BTreeSet<String>,
    cpus: u32,
    max_cpus: u32,
    fd_sets: u64,
    /// How a capture left streaming ends (`None`: none is under way).
    capture: Option<(String, String)>,
    /// A background snapshot has been started and not yet taken its device state.
    snapshotting: bool,
    /// Disk mirror jobs by id: bytes copied.
    mirrors: BTreeMap<String, u64>,
    /// The outgoing migration: its status and memory bytes sent.
    outgoing: Option<(String, u64, bool)>,
    /// Mirror jobs that vanish at the next query (a failed copy).
    lost_mirrors: BTreeSet<String>,
    mirrors_stalled: bool,
    memory_stalled: bool,
    /// QEMU's reason when the migration fails at its next query.
    migration_fails: Option<String>,
    calls: Vec<String>,
    /// (command, n): the nth call of `command` from now on fails.
    failures: Vec<(String, usize)>,
}

impl FakeVmm {
    /// A running VMM with `cpus` of `max_cpus` vCPUs plugged and the boot-time devices of
    /// `cfg` (its disks and NICs with their backends).
    pub fn running(cfg: &drover_model::VmConfig, max_cpus: u32) -> Self {
        let mut s = State {
            status: "running".into(),
            cpus: cfg.cpus,
            max_cpus,
            ..State::default()
        };
        for d in &cfg.disks {
            s.backends.insert(disk_node(d));
            s.devices.insert(disk_node(d), Some(disk_node(d)));
        }
        for n in &cfg.nics {
            let node = nic_node(n.id.as_str());
            s.backends.insert(node.clone());
            s.devices.insert(node.clone(), Some(node));
        }
        FakeVmm {
            state: Mutex::new(s),
            events: broadcast::channel(64).0,
        }
    }

    /// A running VMM with one vCPU and no disks or NICs.
    pub fn bare() -> Self {
        FakeVmm {
            state: Mutex::new(State {
                status: "running".into(),
                cpus: 1,
                max_cpus: 1,
                ..State::default()
            }),
            events: broadcast::channel(64).0,
        }
    }

    /// Device `id` now writes to block node `node` (as after a snapshot put a layer on top;
    /// the node below stays, as its backing).
    pub fn move_to_node(&self, id: &str, node: &str) {
        let mut s = self.lock();
        s.backends.insert(node.into());
        s.devices.insert(id.into(), Some(node.into()));
    }

    /// A state capture is under way; let be, it ends as `end`, leaving the run state `then`.
    pub fn capturing(&self, end: &str, then: &str) {
        self.lock().capture = Some((end.into(), then.into()));
    }

    /// Set the run state `status` reports.
    pub fn set_status(&self, status: &str) {
        self.lock().status = status.into();
    }

    /// Mirror job `job` disappears at the next query, as a failed one does.
    pub fn lose_mirror(&self, job: &str) {
        self.lock().lost_mirrors.insert(job.into());
    }

    /// The disk mirrors copy nothing more (a cut network).
    pub fn stall_mirrors(&self) {
        self.lock().mirrors_stalled = true;
    }

    /// The memory copy sends nothing more (a cut network).
    pub fn stall_memory(&self) {
        self.lock().memory_stalled = true;
    }

    /// The outgoing migration fails at its next query, QEMU saying `why`.
    pub fn fail_migration(&self, why: &str) {
        self.lock().migration_fails = Some(why.into());
    }

    /// The guest keeps device `id` when asked to release it (no `DEVICE_DELETED`).
    pub fn hold(&self, id: &str) {
        self.lock().held.insert(id.into());
    }

    /// The guest keeps every device whose id starts with `prefix` (one whose id is made at
    /// the step, a DIMM's).
    pub fn hold_prefix(&self, prefix: &str) {
        self.lock().held.insert(format!("{prefix}*"));
    }

    /// The `n`th call (1-based, counted from now) of QMP `command` fails.
    pub fn fail(&self, command: &str, n: usize) {
        self.lock().failures.push((command.into(), n));
    }

    /// Every QMP command asked for so far, as `"<command> <id>"`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The devices plugged now, by id.
    pub fn devices(&self) -> Vec<String> {
        self.lock().devices.keys().cloned().collect()
    }

    /// The backends (block nodes, netdevs, memory objects) present now, by id.
    pub fn backends(&self) -> Vec<String> {
        self.lock().backends.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record `command` on `id` and fail it when a failure was injected for this call.
    fn call(&self, s: &mut State, command: &str, id: &str) -> Result<(), QmpError> {
        s.calls
            .push(format!("{command} {id}").trim_end().to_string());
        let mut failed = false;
        for f in s.failures.iter_mut().filter(|f| f.0 == command) {
            f.1 -= 1;
            failed |= f.1 == 0;
        }
        s.failures.retain(|f| f.1 > 0);
        if failed {
            return Err(err(command, "injected failure"));
        }
        Ok(())
    }

    fn backend_add(&self, command: &str, id: &str) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, command, id)?;
        if !s.backends.insert(id.into()) {
            return Err(err(command, &format!("Duplicate ID '{id}'")));
        }
        Ok(())
    }

    fn backend_del(&self, command: &str, id: &str) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, command, id)?;
        if s.devices.values().any(|b| b.as_deref() == Some(id)) {
            return Err(err(command, &format!("Node '{id}' is busy")));
        }
        if !s.backends.remove(id) {
            return Err(err(command, &format!("'{id}' not found")));
        }
        Ok(())
    }

    fn device_add(&self, id: &str, backend: Option<&str>) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "device_add", id)?;
        if s.devices.contains_key(id) {
            return Err(err("device_add", &format!("Duplicate device ID '{id}'")));
        }
        if let Some(b) = backend.filter(|b| !s.backends.contains(*b)) {
            return Err(err("device_add", &format!("'{b}' not found")));
        }
        s.devices.insert(id.into(), backend.map(str::to_string));
        Ok(())
    }

    /// Write a device state into `file`: only of a paused guest, whose state would otherwise
    /// not be the one of one instant.
    fn save(&self, command: &str, file: &Path) -> Result<(), QmpError> {
        let mut s = self.lock();
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        self.call(&mut s, command, name)?;
        if s.status != "paused" {
            return Err(err(command, &format!("the guest is {}", s.status)));
        }
        Ok(())
    }

    /// Plug a device over a backend, as QEMU's hot-plug helpers do: the backend first, taken
    /// out again when the device fails.
    fn plug(&self, backend_cmd: &str, del_cmd: &str, id: &str) -> Result<(), QmpError> {
        self.backend_add(backend_cmd, id)?;
        if let Err(e) = self.device_add(id, Some(id)) {
            let _ = self.backend_del(del_cmd, id);
            return Err(e);
        }
        Ok(())
    }
}

fn err(command: &str, desc: &str) -> QmpError {
    QmpError::Command {
        command: command.into(),
        class: "GenericError".into(),
        desc: desc.into(),
    }
}

impl Vmm for FakeVmm {
    async fn status(&self) -> Result<String, QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "query-status", "")?;
        Ok(s.status.clone())
    }

    async fn cont(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "cont", "")?;
        s.status = "running".into();
        Ok(())
    }

    async fn pause(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "stop", "")?;
        s.status = "paused".into();
        Ok(())
    }

    async fn snapshot_disk(
        &self,
        node: &str,
        _overlay: &Path,
        new_node: &str,
    ) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "blockdev-snapshot", node)?;
        let Some(dev) = s
            .devices
            .iter()
            .find(|(_, b)| b.as_deref() == Some(node))
            .map(|(d, _)| d.clone())
        else {
            return Err(err(
                "blockdev-snapshot",
                &format!("Cannot find device='' nor node-name='{node}'"),
            ));
        };
        if !s.backends.insert(new_node.into()) {
            return Err(err("blockdev-add", &format!("Duplicate ID '{new_node}'")));
        }
        s.devices.insert(dev, Some(new_node.into()));
        Ok(())
    }

    async fn save_state(&self, file: &Path, _shared_ram: bool) -> Result<(), QmpError> {
        self.save("migrate", file)
    }

    async fn save_state_mapped(&self, file: &Path) -> Result<(), QmpError> {
        self.save("migrate-mapped", file)
    }

    async fn background_snapshot(&self, uri: &str) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "background-snapshot", uri)?;
        s.snapshotting = true;
        Ok(())
    }

    async fn wait_device_state(
        &self,
        keeps_run_state: bool,
        _timeout: Duration,
    ) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "query-migrate", "")?;
        if !std::mem::take(&mut s.snapshotting) {
            return Err(err("query-migrate", "no background snapshot is under way"));
        }
        if !keeps_run_state {
            s.status = "running".into();
        }
        Ok(())
    }

    async fn quit(&self, _timeout: Duration) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "quit", "")?;
        s.status = "shutdown".into();
        Ok(())
    }

    async fn settle_capture(&self, _timeout: Duration) -> Result<Option<String>, QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "query-migrate", "")?;
        let Some((end, then)) = s.capture.take() else {
            return Ok(None);
        };
        s.status = then;
        Ok(Some(end))
    }

    fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    async fn mirror_disk(
        &self,
        job: &str,
        node: &str,
        _target: &NbdTarget<'_>,
        _speed: u64,
    ) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "blockdev-mirror", job)?;
        if !s.backends.contains(node) {
            return Err(err(
                "blockdev-mirror",
                &format!("Cannot find node '{node}'"),
            ));
        }
        if !s.backends.insert(job.into()) {
            return Err(err("blockdev-add", &format!("Duplicate ID '{job}'")));
        }
        s.mirrors.insert(job.into(), 0);
        Ok(())
    }

    async fn block_jobs(&self, ids: &[String]) -> Result<Vec<BlockJob>, QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "query-block-jobs", "")?;
        let lost = std::mem::take(&mut s.lost_mirrors);
        s.mirrors.retain(|j, _| !lost.contains(j));
        let step = if s.mirrors_stalled { 0 } else { MIRROR_STEP };
        Ok(s.mirrors
            .iter_mut()
            .filter(|(j, _)| ids.contains(j))
            .map(|(j, done)| {
                *done = (*done + step).min(MIRROR_LEN);
                BlockJob {
                    device: j.clone(),
                    offset: *done,
                    len: MIRROR_LEN,
                    ready: *done == MIRROR_LEN,
                }
            })
            .collect())
    }

    async fn complete_mirrors(
        &self,
        jobs: &[String],
        _timeout: Duration,
    ) -> Result<(), LiveMigrationError> {
        let mut s = self.lock();
        for j in jobs {
            self.call(&mut s, "block-job-cancel", j)?;
            if s.mirrors.remove(j).is_none() {
                return Err(err("block-job-cancel", &format!("Block job '{j}' not found")).into());
            }
            s.backends.remove(j);
        }
        Ok(())
    }

    async fn start_outgoing(&self, uri: &str, tuning: &Tuning) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "migrate", uri)?;
        s.outgoing = Some(("setup".into(), 0, tuning.pause_before_switchover));
        Ok(())
    }

    async fn migration_progress(&self) -> Result<Progress, QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "query-migrate", "")?;
        let Some((mut phase, mut sent, pause_before)) = s.outgoing.take() else {
            return Ok(Progress::from_query(&serde_json::json!({})));
        };
        if let Some(why) = s.migration_fails.take() {
            s.outgoing = Some(("failed".into(), sent, pause_before));
            s.status = "running".into();
            let q = serde_json::json!({ "status": "failed", "error-desc": why });
            return Ok(Progress::from_query(&q));
        }
        match phase.as_str() {
            "setup" => phase = "active".into(),
            "active" => {
                let step = if s.memory_stalled { 0 } else { RAM_STEP };
                sent = (sent + step).min(RAM);
                if sent == RAM {
                    // The last pass: paused, then either waiting for the mirrors or done.
                    let (status, next) = if pause_before {
                        ("paused", "pre-switchover")
                    } else {
                        ("postmigrate", "completed")
                    };
                    s.status = status.into();
                    phase = next.into();
                }
            }
            _ => {}
        }
        let q = serde_json::json!({
            "status": phase,
            "downtime": if phase == "completed" { 12 } else { 0 },
            "ram": { "transferred": sent, "total": RAM, "remaining": RAM - sent },
        });
        s.outgoing = Some((phase, sent, pause_before));
        Ok(Progress::from_query(&q))
    }

    async fn continue_switchover(&self) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "migrate-continue", "")?;
        if !s.mirrors.is_empty() {
            // QEMU would send the final state; the destination would miss the last writes.
            return Err(err("migrate-continue", "disk mirrors are still running"));
        }
        match s.outgoing.as_mut() {
            Some((phase, _, _)) if phase == "pre-switchover" => *phase = "completed".into(),
            _ => return Err(err("migrate-continue", "not paused before the switch-over")),
        }
        s.status = "postmigrate".into();
        Ok(())
    }

    async fn abandon_outgoing(&self, nodes: &[String]) {
        let mut s = self.lock();
        let _ = self.call(&mut s, "migrate_cancel", "");
        s.outgoing = None;
        s.mirrors.clear();
        s.status = "running".into();
        for n in nodes {
            s.backends.remove(n);
        }
    }

    async fn add_fd(
        &self,
        _fd: BorrowedFd<'_>,
        opaque: &str,
        set: Option<u64>,
    ) -> Result<Option<u64>, QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "add-fd", opaque)?;
        Ok(Some(set.unwrap_or_else(|| {
            s.fd_sets += 1;
            s.fd_sets
        })))
    }

    async fn add_disk(
        &self,
        d: &DiskConfig,
        _port: u8,
        _blockdev: Option<Value>,
    ) -> Result<(), QmpError> {
        self.plug("blockdev-add", "blockdev-del", &disk_node(d))
    }

    async fn add_nic(&self, n: &NicConfig, _port: u8) -> Result<(), QmpError> {
        self.plug("netdev_add", "netdev_del", &nic_node(n.id.as_str()))
    }

    async fn request_unplug(&self, id: &str) -> Result<(), QmpError> {
        let mut s = self.lock();
        self.call(&mut s, "device_del", id)?;
        if !s.devices.contains_key(id) {
            return Err(err("device_del", &format!("Device '{id}' not found")));
        }
        let held = s.held.iter().any(|h| match h.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => h == id,
        });
        if held {
            return Ok(());
        }
        s.devices.remove(id);
        if id.starts_with("vcpu-") {
            s.cpus -= 1;
        }
        drop(s);
        let _ = self.events.send(QmpEvent {
            name: "DEVICE_DELETED".into(),
            data: serde_json::json!({ "device": id }),
        });
        Ok(())
    }

    async fn remove_disk_backend(&self, node: &str) -> Result<(), QmpError> {
        self.backend_del("blockdev-del", node)
    }

    async fn remove_nic_backend(&self, n: &NicConfig) -> Result<(), QmpError> {
        self.backend_del("netdev_del", &nic_node(n.id.as_str()))
    }

    async fn add_cpus(&self, target: u32) -> Result<Vec<String>, QmpError> {
        let (present, max) = {
            let mut s = self.lock();
            self.call(&mut s, "query-hotpluggable-cpus", "")?;
            (s.cpus, s.max_cpus)
        };
        if target <= present {
            return Ok(Vec::new());
        }
        if target > max {
            return Err(err(
                "device_add",
                &format!("only {} vCPU slots are free", max - present),
            ));
        }
        // As QEMU's helper: plugged in ascending order, unplugged again if one fails.
        let mut added: Vec<String> = Vec::new();
        for n in present..target {
            let id = format!("vcpu-s{n}-c0-t0");
            if let Err(e) = self.device_add(&id, None) {
                for id in added.iter().rev() {
                    let _ = self.request_unplug(id).await;
                }
                return Err(e);
            }
            self.lock().cpus += 1;
            added.push(id);
        }
        Ok(added)
    }

    async fn add_memory(&self, id: &str, _bytes: u64) -> Result<(), QmpError> {
        let (dimm, mem) = dimm_ids(id);
        self.backend_add("object-add", &mem)?;
        if let Err(e) = self.device_add(&dimm, Some(&mem)) {
            let _ = self.backend_del("object-del", &mem);
            return Err(e);
        }
        Ok(())
    }

    async fn remove_memory_backend(&self, id: &str) -> Result<(), QmpError> {
        self.backend_del("object-del", &dimm_ids(id).1)
    }
}
