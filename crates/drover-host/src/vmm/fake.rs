//! A fake VMM for unit tests of the host's coordination rules.
//!
//! It models what those rules depend on in QEMU: the run state; devices and the backend each
//! uses (a block node, a netdev, a memory object), with QEMU's refusals (a duplicate id, a
//! missing backend, freeing a backend a device still uses); a guest that releases an unplugged
//! device at once (a `DEVICE_DELETED` event) unless told to hold it; vCPU slots. Every QMP
//! command it is asked for is recorded as `"<command> <id>"`, and any one of them can be made to
//! fail at its Nth call.

use super::Vmm;
use drover_model::{DiskConfig, NicConfig};
use drover_qemu::cmdline::{disk_node, nic_node};
use drover_qemu::hotplug::dimm_ids;
use drover_qemu::qmp::{QmpError, QmpEvent};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::broadcast;

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
