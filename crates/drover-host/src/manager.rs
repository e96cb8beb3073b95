//! The VM manager: records, lifecycle, supervision and re-adoption.
//!
//! Rules it keeps:
//! - A VM's record is written to the store before any answer reports the change.
//! - One lifecycle operation runs at a time per VM (`VmSlot::op`); reads never wait on it.
//! - QEMU outlives droverd. At open, every VM recorded as not stopped is re-adopted from its pid
//!   file and QMP socket, or marked stopped with the reason when its QEMU is gone.
//! - The QMP connection ending is the authoritative "QEMU exited" signal; the supervisor then
//!   waits for the process itself to go (so disks are unlocked) and records why it ended.

use crate::action::VmAction;
use crate::agent_link::{AgentLink, LinkError};
use crate::auth::{Caller, Permission, Role};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use drover_api::{
    AgentStatus, ExitInfo, HostInfo, ImageInfo, JournalEntry, StartRequest, VmInfo, VmState,
};
use drover_model::{
    format_size, Accel, Boot, ConfigHistory, DiskConfig, DiskSource, MacAddr, NicConfig,
    PersistMode, VmConfig, VmSpec,
};
use drover_qemu::accel::AccelChoice;
use drover_qemu::cmdline::{self, KernelBoot, LaunchSpec, RunPaths};
use drover_qemu::qmp::{Qmp, QmpEvent};
use drover_qemu::{img, process};
use drover_store::Write;
use drover_store::{Store, StoreExt};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch};

mod guest;
mod identity;
mod live;
mod migrate;
mod state;

/// A saved state to load at launch.
/// How a QEMU is to start besides its config.
#[derive(Default)]
struct QemuMode<'a> {
    /// Wait for an incoming migration.
    incoming: bool,
    /// `-S`: stay paused.
    stopped: bool,
    /// Map this file privately as guest RAM.
    ram_private: Option<&'a Path>,
    /// Only holds state: no images, no host ports.
    detached: bool,
}

/// What a new QEMU does first.
#[derive(Clone, Copy)]
enum LaunchKind<'a> {
    /// Boot the guest.
    Boot,
    /// Load a saved state and run it.
    Restore(&'a RestoreSpec),
    /// Wait, paused, for a live migration from another host (which then commits or aborts).
    Incoming,
}

pub(crate) struct RestoreSpec {
    /// Device state (and RAM, for classic saves).
    pub devices: PathBuf,
    /// The RAM file of a fast save.
    pub memory: Option<PathBuf>,
    /// A classic save written with `mapped-ram`.
    pub mapped_ram: bool,
}

const VMS: &str = "vms";
/// Tables besides [`VMS`] with one row per VM, keyed by its name.
const VM_TABLES_BY_NAME: &[&str] = &[HISTORY, identity::GENERATIONS];
/// Tables whose rows of VM `n` are keyed `n/...`.
const VM_TABLES_BY_PREFIX: &[&str] = &[
    JOURNAL,
    guest::PRINCIPALS,
    guest::AUDIT,
    guest::REQUESTS,
    state::STATES,
];
const HISTORY: &str = "history";
const JOURNAL: &str = "journal";
const ROLES: &str = "roles";
/// Root ports kept free for later hot-plug of disks and NICs. Each costs the guest ~25 ms of
/// boot under TCG (ACPI hot-plug tables the kernel parses), so few are reserved: after a restart
/// hot-plugged devices are cold-plugged and the ports are free again.
pub const HOTPLUG_PORTS: u32 = 4;
/// Memory kept back for the host when checking whether a VM fits.
const HOST_RESERVE: u64 = 256 << 20;

/// droverd's settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Root of everything droverd keeps.
    pub state_dir: PathBuf,
    /// Where the default guest image is built and cached.
    pub image_dir: PathBuf,
    /// The static `drover-agent` put into the guest image.
    pub agent_binary: Option<PathBuf>,
    /// The QEMU installation every VM runs on (emulator, qemu-img, qemu-nbd, firmware).
    pub qemu: drover_qemu::install::QemuInstall,
    /// Accelerator override for every VM (auto-detected when `None`).
    pub accel: Option<Accel>,
    /// Whether new VMs keep their live changes.
    pub persist_default: bool,
    /// How new VMs store generations.
    pub persist_mode_default: PersistMode,
    /// This host's component id, what guests see (`drover-guest host-id`) and `GET /v1/host` shows.
    pub identity: drover_proto::HostIdentity,
    /// The address other hosts reach this one at (the `--listen` IP): where incoming
    /// migrations listen for memory and disks. Loopback when unset.
    pub migration_addr: Option<std::net::IpAddr>,
}

struct Runtime {
    qmp: Qmp,
    agent: AgentLink,
    /// The config QEMU was launched with.
    launched: VmConfig,
    /// Active block node per disk id, when it differs from the launch-time `disk-<id>`.
    nodes: Arc<Mutex<std::collections::HashMap<String, String>>>,
    /// Every QMP event, for operations that wait on one (DEVICE_DELETED).
    events: broadcast::Sender<QmpEvent>,
    pid: u32,
    exited: watch::Receiver<bool>,
    /// Set by an operator stop so the supervisor records the right reason.
    stop_reason: Arc<Mutex<Option<String>>>,
}

impl Runtime {
    /// The block node a disk's guest device writes to now.
    fn active_node(&self, d: &DiskConfig) -> String {
        lock(&self.nodes)
            .get(d.id.as_str())
            .cloned()
            .unwrap_or_else(|| cmdline::disk_node(d))
    }
}

impl Clone for Runtime {
    fn clone(&self) -> Self {
        Runtime {
            qmp: self.qmp.clone(),
            agent: self.agent.clone(),
            launched: self.launched.clone(),
            nodes: self.nodes.clone(),
            events: self.events.clone(),
            pid: self.pid,
            exited: self.exited.clone(),
            stop_reason: self.stop_reason.clone(),
        }
    }
}

struct VmSlot {
    op: tokio::sync::Mutex<()>,
    /// Held while a state's memory is streamed out of the running QEMU: stopping or replacing
    /// that QEMU waits for it, or the capture would be cut off.
    capture: Arc<tokio::sync::Mutex<()>>,
    /// A QEMU kept ready to receive the next fast save of this VM (with the config it fits).
    standby: tokio::sync::Mutex<Option<(VmConfig, state::Receiver)>>,
    info: Mutex<VmInfo>,
    rt: Mutex<Option<Runtime>>,
}

impl VmSlot {
    fn new(info: VmInfo) -> Arc<VmSlot> {
        Arc::new(VmSlot {
            op: tokio::sync::Mutex::new(()),
            capture: Arc::new(tokio::sync::Mutex::new(())),
            standby: tokio::sync::Mutex::new(None),
            info: Mutex::new(info),
            rt: Mutex::new(None),
        })
    }
}

struct Shared {
    cfg: DaemonConfig,
    store: Box<dyn Store>,
    accel: AccelChoice,
    qemu_version: String,
    /// What the QEMU can do; `None` when the probe failed (VMs then run as before pinning).
    probe: Option<drover_qemu::probe::QemuProbe>,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
    create_lock: tokio::sync::Mutex<()>,
    image_lock: tokio::sync::Mutex<()>,
    journal_seq: std::sync::atomic::AtomicU64,
    buckets: Mutex<std::collections::HashMap<String, guest::Bucket>>,
}

/// The VM manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    s: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Manager {
    /// Open the state dir, detect the accelerator, load records and re-adopt running VMs.
    pub async fn open(cfg: DaemonConfig, store: Box<dyn Store>) -> Result<Self> {
        for dir in [
            &cfg.state_dir,
            &cfg.state_dir.join("vms"),
            &cfg.state_dir.join("run"),
            &cfg.image_dir,
        ] {
            std::fs::create_dir_all(dir).map_err(|e| io_ctx("creating", dir, e))?;
        }
        let accel = match cfg.accel {
            Some(a) => AccelChoice {
                accel: a,
                reason: format!("{a} forced with --accel"),
            },
            None => drover_qemu::accel::detect(),
        };
        tracing::info!(accel = %accel.accel, "accelerator: {}", accel.reason);
        if !drover_qemu::install::set_current(cfg.qemu.clone()) {
            tracing::warn!("another QEMU installation is already in use by this process; qemu-img runs from it");
        }
        let probe = match drover_qemu::probe::probe(
            &cfg.qemu,
            accel.accel,
            &cfg.state_dir.join("run").join(".probe"),
        )
        .await
        {
            Ok(p) => {
                tracing::info!(
                    version = %p.version,
                    emulator = %cfg.qemu.emulator.display(),
                    q35 = p.resolve_machine("q35").unwrap_or("?"),
                    ms = p.probe_ms,
                    "QEMU probed"
                );
                for q in p.quirks() {
                    tracing::info!("QEMU {}: {q}", p.version);
                }
                Some(p)
            }
            Err(e) => {
                tracing::warn!("{e}; VMs run with unpinned machine types (q35, -cpu max)");
                None
            }
        };
        let qemu_version = match &probe {
            Some(p) => p.version.to_string(),
            None => process::version(&cfg.qemu.emulator).unwrap_or_else(|e| {
                tracing::warn!("{e}");
                "unknown".into()
            }),
        };
        let records: Vec<(String, VmInfo)> = store.list(VMS)?;
        let mgr = Manager {
            s: Arc::new(Shared {
                cfg,
                store,
                accel,
                qemu_version,
                probe,
                vms: Mutex::new(BTreeMap::new()),
                create_lock: tokio::sync::Mutex::new(()),
                image_lock: tokio::sync::Mutex::new(()),
                // Journal keys sort by time across restarts.
                journal_seq: std::sync::atomic::AtomicU64::new(hostfacts::now_ms() * 1000),
                buckets: Mutex::default(),
            }),
        };
        for (name, mut info) in records {
            info.config.normalize();
            let state = info.state;
            let slot = VmSlot::new(info);
            lock(&mgr.s.vms).insert(name.clone(), slot.clone());
            if state != VmState::Stopped {
                mgr.readopt(&name, &slot).await?;
            }
        }
        mgr.recover_states().await;
        Ok(mgr)
    }

    fn run_paths(&self, name: &str) -> RunPaths {
        let mut p = RunPaths::new(&self.s.cfg.state_dir.join("run").join(name));
        p.ram = self.ram_dir().join(name);
        p
    }

    /// Where guest RAM files live: in memory (/dev/shm) when it exists, so a running guest's
    /// memory never becomes disk writeback; one directory per state dir so daemons do not meet.
    fn ram_dir(&self) -> PathBuf {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let key = hex::encode(
                &sha2::Sha256::digest(self.s.cfg.state_dir.as_os_str().as_encoded_bytes())[..6],
            );
            shm.join(format!("drover-{key}"))
        } else {
            self.s.cfg.state_dir.join("run")
        }
    }
    fn vm_dir(&self, name: &str) -> PathBuf {
        self.s.cfg.state_dir.join("vms").join(name)
    }
    /// The serial console log of a VM (kept across runs).
    pub fn console_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log")
    }

    fn slot(&self, name: &str) -> Result<Arc<VmSlot>> {
        lock(&self.s.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| HostError::NotFound(name.to_string()))
    }

    /// Write the record durably, then make it the in-memory truth.
    fn persist(&self, slot: &VmSlot, change: impl FnOnce(&mut VmInfo)) -> Result<VmInfo> {
        self.commit(slot, |i| {
            change(i);
            Ok(Vec::new())
        })
    }

    /// Change the record and write it, with the other writes `change` returns, in one durable
    /// transaction; only then does the in-memory record change. An error changes nothing.
    fn commit(
        &self,
        slot: &VmSlot,
        change: impl FnOnce(&mut VmInfo) -> Result<Vec<Write>>,
    ) -> Result<VmInfo> {
        let mut info = lock(&slot.info);
        let mut next = info.clone();
        let mut writes = change(&mut next)?;
        next.agent = None;
        writes.insert(0, drover_store::put(VMS, &next.name, &next)?);
        let t = Instant::now();
        self.s.store.apply(writes)?;
        tracing::debug!(
            vm = next.name,
            us = t.elapsed().as_micros() as u64,
            "record committed"
        );
        *info = next.clone();
        Ok(next)
    }

    /// A VM's configuration history (a VM created before histories existed has an empty one).
    fn history(&self, info: &VmInfo) -> Result<ConfigHistory> {
        Ok(self
            .s
            .store
            .get::<ConfigHistory>(HISTORY, &info.name)?
            .unwrap_or_else(|| ConfigHistory::new(info.config.clone())))
    }

    /// A sequence number for journal and audit keys and guest tickets: increasing, and (seeded
    /// from the clock at start) still increasing across droverd restarts.
    fn next_seq(&self) -> u64 {
        self.s
            .journal_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A journal record of a change, as a store write.
    fn journal(&self, vm: &str, who: &str, kind: &str, changes: Vec<String>) -> Result<Write> {
        let seq = self.next_seq();
        let entry = JournalEntry {
            seq,
            at_ms: hostfacts::now_ms(),
            who: who.to_string(),
            changes,
            kind: kind.to_string(),
        };
        Ok(drover_store::put(
            JOURNAL,
            &format!("{vm}/{seq:020}"),
            &entry,
        )?)
    }

    /// The journal of one VM, oldest first.
    pub fn journal_of(&self, name: &str) -> Result<Vec<JournalEntry>> {
        self.slot(name)?;
        self.vm_records(JOURNAL, name)
    }

    /// The records of one VM in a table keyed `<vm>/<key>`, in key order.
    fn vm_records<T: serde::de::DeserializeOwned>(&self, table: &str, vm: &str) -> Result<Vec<T>> {
        Ok(self
            .s
            .store
            .list_prefix::<T>(table, &format!("{vm}/"))?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// The caller behind a uid: uid 0 is admin, others have the role granted to them, if any.
    pub fn caller(&self, uid: Option<u32>) -> Caller {
        match uid {
            Some(0) => Caller {
                name: "uid 0".into(),
                role: Some(Role::Admin),
            },
            Some(uid) => Caller {
                name: format!("uid {uid}"),
                role: self
                    .s
                    .store
                    .get::<Role>(ROLES, &uid.to_string())
                    .ok()
                    .flatten(),
            },
            None => Caller {
                name: "unknown caller".into(),
                role: None,
            },
        }
    }

    /// Give a uid a role (or take it away with `None`).
    pub fn set_role(&self, caller: &Caller, uid: u32, role: Option<Role>) -> Result<()> {
        caller.require(Permission::Admin)?;
        if uid == 0 {
            return Err(HostError::Invalid("uid 0 is always admin".into()));
        }
        match role {
            Some(r) => self.s.store.put(ROLES, &uid.to_string(), &r)?,
            None => self.s.store.delete(ROLES, &uid.to_string())?,
        }
        Ok(())
    }

    /// Every granted role.
    pub fn roles(&self) -> Result<Vec<(u32, Role)>> {
        Ok(self
            .s
            .store
            .list::<Role>(ROLES)?
            .into_iter()
            .filter_map(|(k, r)| k.parse().ok().map(|uid| (uid, r)))
            .collect())
    }

    fn view(&self, slot: &Arc<VmSlot>) -> VmInfo {
        let mut info = lock(&slot.info).clone();
        info.agent = lock(&slot.rt).as_ref().map(|rt| rt.agent.status());
        info
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<VmInfo> {
        Ok(self.view(&self.slot(name)?))
    }

    /// All VMs, by name.
    pub fn list(&self) -> Vec<VmInfo> {
        let slots: Vec<Arc<VmSlot>> = lock(&self.s.vms).values().cloned().collect();
        slots.iter().map(|s| self.view(s)).collect()
    }

    /// Host facts for `drover host info`.
    pub fn host_info(&self) -> HostInfo {
        let mem = hostfacts::memory();
        let (disk_total, disk_free) = hostfacts::disk(&self.s.cfg.state_dir);
        let vms = self.list();
        let running: Vec<&VmInfo> = vms.iter().filter(|v| v.state != VmState::Stopped).collect();
        HostInfo {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            hostname: hostfacts::hostname(),
            accel: self.s.accel.accel,
            accel_reason: self.s.accel.reason.clone(),
            qemu_binary: self.s.cfg.qemu.emulator.display().to_string(),
            qemu_version: self.s.qemu_version.clone(),
            cpus: hostfacts::cpus(),
            memory_total: mem.total,
            memory_available: mem.available,
            state_dir: self.s.cfg.state_dir.display().to_string(),
            disk_total,
            disk_free,
            vms_defined: vms.len() as u32,
            vms_running: running.len() as u32,
            memory_allocated: running.iter().map(|v| v.config.memory).sum(),
            identity: Some(self.s.cfg.identity.clone()),
            qemu: self.qemu_facts(),
        }
    }

    /// The probe of this host's QEMU as `host info` shows it.
    pub(crate) fn qemu_facts(&self) -> Option<drover_api::QemuFacts> {
        let p = self.s.probe.as_ref()?;
        let q = &self.s.cfg.qemu;
        Some(drover_api::QemuFacts {
            version: p.version.to_string(),
            package: p.package.clone(),
            dir: q.dir.as_ref().map(|d| d.display().to_string()),
            qemu_img: q.qemu_img.display().to_string(),
            qemu_nbd: q.qemu_nbd.display().to_string(),
            firmware_dir: q.data_dir.display().to_string(),
            machines: p.machines.iter().map(|m| m.name.clone()).collect(),
            machine_aliases: p
                .machines
                .iter()
                .filter_map(|m| m.alias.clone().map(|a| (a, m.name.clone())))
                .collect(),
            cpu_models: p
                .cpu_models
                .iter()
                .filter(|c| c.unavailable.is_empty())
                .map(|c| c.name.clone())
                .collect(),
            migration_capabilities: p.migration_capabilities.clone(),
            qmp_commands: p.qmp_commands,
            new_vm_platform: self.new_vm_platform(),
            quirks: p.quirks(),
            probe_ms: p.probe_ms,
        })
    }

    /// What a VM created now is pinned to: the versioned machine type `q35` means here, the
    /// named TCG CPU model, and RAM padding only where this QEMU has the bug it avoids. Without
    /// a probe, what VMs always had.
    fn new_vm_platform(&self) -> drover_model::Platform {
        match &self.s.probe {
            Some(p) => drover_model::Platform {
                machine: p.resolve_machine("q35").map(str::to_string),
                cpu: p.tcg_cpu_model().map(str::to_string),
                ram_pad: p.tcg_dirty_tracking_bug(),
            },
            None => drover_model::Platform::default(),
        }
    }

    // ---------------------------------------------------------------- create / delete

    /// Define a VM: validate, check the host can ever run it, create its disks, record it.
    pub async fn create(&self, spec: VmSpec) -> Result<VmInfo> {
        let valid = spec.validate()?;
        let name = valid.name.to_string();
        let _guard = self.s.create_lock.lock().await;
        if lock(&self.s.vms).contains_key(&name) {
            return Err(HostError::AlreadyExists(name));
        }
        let host_cpus = hostfacts::cpus();
        if valid.cpus > host_cpus {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} vCPUs; this host has {host_cpus} CPUs",
                valid.cpus
            )));
        }
        let mem = hostfacts::memory();
        if valid.memory > mem.total.saturating_sub(HOST_RESERVE) {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} of memory; this host has {} in all",
                format_size(valid.memory),
                format_size(mem.total)
            )));
        }
        let paths = self.run_paths(&name);
        if paths.longest_socket().as_os_str().len() > cmdline::MAX_SOCKET_PATH {
            return Err(HostError::Invalid(format!(
                "the socket path {} is longer than the {}-byte limit; use a shorter state dir or VM name",
                paths.longest_socket().display(),
                cmdline::MAX_SOCKET_PATH
            )));
        }
        let boot = spec.boot.resolve()?;
        if let Boot::Kernel { kernel, initrd, .. } = &boot {
            for p in std::iter::once(kernel).chain(initrd.iter()) {
                if !p.is_file() {
                    return Err(HostError::Invalid(format!(
                        "boot file {} does not exist",
                        p.display()
                    )));
                }
            }
        }
        let vm_dir = self.vm_dir(&name);
        // A leftover directory from a crash between mkdir and the record write is ours to reuse.
        std::fs::create_dir_all(vm_dir.join("disks"))
            .map_err(|e| io_ctx("creating", &vm_dir, e))?;
        let mut disks = Vec::new();
        let result = async {
            for (id, source, readonly) in &valid.disks {
                disks.push(match source {
                    DiskSource::Create { size } => {
                        let path = vm_dir.join("disks").join(format!("{id}.qcow2"));
                        // A stale file from an earlier failed create of the same name: replace it.
                        let _ = std::fs::remove_file(&path);
                        let p = path.clone();
                        let size = *size;
                        tokio::task::spawn_blocking(move || img::create_qcow2(&p, size))
                            .await
                            .map_err(|e| HostError::Internal(e.to_string()))??;
                        DiskConfig {
                            id: id.clone(),
                            path,
                            format: drover_model::DiskFormat::Qcow2,
                            size,
                            readonly: *readonly,
                            owned: true,
                            index: disks.len() as u32,
                            slot: None,
                        }
                    }
                    DiskSource::Image { path } => {
                        let p = path.clone();
                        let info = tokio::task::spawn_blocking(move || img::inspect(&p))
                            .await
                            .map_err(|e| HostError::Internal(e.to_string()))??;
                        DiskConfig {
                            id: id.clone(),
                            path: path.clone(),
                            format: info.format,
                            size: info.virtual_size,
                            readonly: *readonly,
                            owned: false,
                            index: disks.len() as u32,
                            slot: None,
                        }
                    }
                });
            }
            let nics = valid
                .nics
                .iter()
                .map(|(id, mac, backend)| NicConfig {
                    id: id.clone(),
                    mac: mac.unwrap_or_else(|| MacAddr::qemu_local(rand::random())),
                    backend: backend.clone(),
                    slot: None,
                })
                .collect();
            let config = VmConfig {
                name: valid.name.clone(),
                cpus: valid.cpus,
                memory: valid.memory,
                disks: disks.clone(),
                nics,
                boot,
                accel: spec.accel,
                max_memory: valid.max_memory,
            };
            config.validate_config()?;
            let info = VmInfo {
                name: name.clone(),
                state: VmState::Stopped,
                config,
                created_at_ms: hostfacts::now_ms(),
                pid: None,
                accel: None,
                started_at_ms: None,
                last_exit: None,
                agent: None,
                persist: self.s.cfg.persist_default,
                persist_mode: self.s.cfg.persist_mode_default,
                running_config: None,
                next_config: None,
                started_from: None,
                migration: None,
                platform: self.new_vm_platform(),
            };
            self.s.store.apply(vec![
                drover_store::put(VMS, &name, &info)?,
                drover_store::put(HISTORY, &name, &ConfigHistory::new(info.config.clone()))?,
                identity::generation_write(&name, "created")?,
            ])?;
            Ok::<_, HostError>(info)
        }
        .await;
        match result {
            Ok(info) => {
                let slot = VmSlot::new(info.clone());
                lock(&self.s.vms).insert(name.clone(), slot);
                tracing::info!(vm = name, "created");
                Ok(info)
            }
            Err(e) => {
                // Nothing half-made stays behind.
                let _ = std::fs::remove_dir_all(&vm_dir);
                Err(e)
            }
        }
    }

    /// Every stored row that belongs to VM `name` (table, key, value): its record, history and
    /// generation id under its name, journal, guest principals, audit, queued requests and states
    /// under `name/`. What a delete removes and a migration carries.
    fn vm_rows(&self, name: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
        let prefix = format!("{name}/");
        let mut rows = Vec::new();
        for table in [VMS].iter().chain(VM_TABLES_BY_NAME) {
            if let Some(v) = self.s.store.get_raw(table, name)? {
                rows.push((table.to_string(), name.to_string(), v));
            }
        }
        for table in VM_TABLES_BY_PREFIX {
            for (key, v) in self.s.store.list_raw(table)? {
                if key.starts_with(&prefix) {
                    rows.push((table.to_string(), key, v));
                }
            }
        }
        Ok(rows)
    }

    /// Remove a VM, its owned disks and its logs. Operator-provided images are left alone.
    pub async fn delete(&self, name: &str, force: bool) -> Result<VmInfo> {
        let slot = self.slot(name)?;
        let state = lock(&slot.info).state;
        if force && state == VmState::Running {
            self.stop(name, 0, true).await?;
        }
        let _op = slot.op.lock().await;
        let info = lock(&slot.info).clone();
        VmAction::Delete
            .check(name, info.state)
            .map_err(HostError::Conflict)?;
        let writes = self
            .vm_rows(name)?
            .into_iter()
            .map(|(table, key, _)| Write::Delete { table, key })
            .collect();
        self.s.store.apply(writes)?;
        lock(&self.s.vms).remove(name);
        for d in info.config.disks.iter().filter(|d| d.owned) {
            let _ = std::fs::remove_file(&d.path);
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        let _ = std::fs::remove_dir_all(self.run_paths(name).dir);
        let _ = std::fs::remove_file(self.run_paths(name).ram);
        // The RAM copies of its states.
        let prefix = format!("{name}@");
        if let Ok(dir) = std::fs::read_dir(self.ram_dir()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        tracing::info!(vm = name, "deleted");
        Ok(info)
    }

    // ---------------------------------------------------------------- start

    /// Launch QEMU for a stopped VM; returns once QEMU runs and QMP answers. `req` picks the
    /// configuration: by default the latest generation when persistence is on, else the initial.
    pub async fn start(&self, name: &str, req: &StartRequest, caller: &Caller) -> Result<VmInfo> {
        let slot = self.slot(name)?;
        let _op = slot.op.lock().await;
        self.start_locked(name, &slot, req, caller).await
    }

    async fn start_locked(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        req: &StartRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let info = lock(&slot.info).clone();
        VmAction::Start
            .check(name, info.state)
            .map_err(HostError::Conflict)?;
        let (config, started_from) = self.choose_config(slot, &info, req, caller)?;
        self.check_fits(name, &config)?;
        self.launch(
            name,
            slot,
            config.cold_plugged(),
            started_from,
            LaunchKind::Boot,
        )
        .await
    }

    /// Launch QEMU with `config`: boot it, restore a saved state, or wait for a migration.
    async fn launch(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        config: VmConfig,
        started_from: String,
        kind: LaunchKind<'_>,
    ) -> Result<VmInfo> {
        let restore = match kind {
            LaunchKind::Restore(r) => Some(r),
            _ => None,
        };
        let incoming = matches!(kind, LaunchKind::Incoming);
        let kernel = self.kernel_boot(&config).await?;
        let accel = config.accel.unwrap_or(self.s.accel.accel);
        let paths = self.run_paths(name);
        let _ = std::fs::remove_dir_all(&paths.dir);
        let _ = std::fs::remove_file(&paths.ram);
        std::fs::create_dir_all(&paths.dir).map_err(|e| io_ctx("creating", &paths.dir, e))?;
        let ram_dir = self.ram_dir();
        std::fs::create_dir_all(&ram_dir).map_err(|e| io_ctx("creating", &ram_dir, e))?;
        std::fs::create_dir_all(self.vm_dir(name))
            .map_err(|e| io_ctx("creating", &self.vm_dir(name), e))?;
        let console = self.console_path(name);
        let args = self.qemu_args(
            name,
            &config,
            kernel,
            accel,
            &paths,
            &console,
            QemuMode {
                incoming: restore.is_some() || incoming,
                stopped: incoming,
                // A fast state's memory is mapped privately: the guest runs on the saved pages
                // at once, and its writes never reach the state.
                ram_private: restore.and_then(|r| r.memory.as_deref()),
                detached: false,
            },
        )?;
        self.persist(slot, |i| i.state = VmState::Starting)?;
        let started = Instant::now();
        let mut child = match self.spawn_qemu(&args, &paths.qemu_log) {
            Ok(c) => c,
            Err(e) => {
                self.persist(slot, |i| {
                    i.state = VmState::Stopped;
                    i.last_exit = Some(exit("start-failed", Some(e.to_string())));
                })?;
                return Err(e.into());
            }
        };
        let pid = child.id().unwrap_or(0);
        let connected = self
            .connect_qmp(&paths.qmp, Some(&mut child), pid, Duration::from_secs(15))
            .await;
        let (qmp, events) = match connected {
            Ok(c) => c,
            Err(why) => {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let detail = format!("{why}; {}", log_tail(&paths.qemu_log));
                self.persist(slot, |i| {
                    i.state = VmState::Stopped;
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(HostError::Internal(format!(
                    "QEMU could not start VM {name}: {detail}"
                )));
            }
        };
        if let Some(r) = restore {
            let loaded = async {
                if r.mapped_ram {
                    drover_qemu::migrate::load_state_mapped(&qmp, &r.devices).await?;
                } else {
                    drover_qemu::migrate::load_state(&qmp, &r.devices, r.memory.is_some()).await?;
                }
                qmp.execute("cont", None).await.map(|_| ())
            }
            .await;
            if let Err(e) = loaded {
                let _ = qmp.execute("quit", None).await;
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let detail = format!(
                    "loading the saved state failed: {e}; {}",
                    log_tail(&paths.qemu_log)
                );
                self.persist(slot, |i| {
                    i.state = VmState::Stopped;
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(HostError::Internal(format!("VM {name}: {detail}")));
            }
        }
        let info = self.persist(slot, |i| {
            i.state = if incoming {
                VmState::Starting
            } else {
                VmState::Running
            };
            i.pid = Some(pid);
            i.accel = Some(accel);
            i.started_at_ms = Some(hostfacts::now_ms());
            i.running_config = Some(config.clone());
            // An arriving VM keeps the next-boot changes it was given on its old host.
            if !incoming {
                i.next_config = None;
            }
            i.started_from = Some(started_from.clone());
        })?;
        self.attach(
            name,
            slot,
            qmp,
            events,
            Some(child),
            pid,
            started,
            config.clone(),
        );
        tracing::info!(vm = name, pid, %accel, "started");
        let _ = info;
        Ok(self.view(slot))
    }

    /// Finish or undo, in the background, a migration a previous droverd left on record.
    fn spawn_recover_migration(&self, name: &str, slot: &Arc<VmSlot>) {
        if lock(&slot.info).migration.is_some() {
            let (mgr, vm, slot) = (self.clone(), name.to_string(), slot.clone());
            tokio::spawn(async move { mgr.recover_migration(&vm, &slot).await });
        }
    }

    /// QEMU's command line for VM `name` running `config`.
    #[allow(clippy::too_many_arguments)]
    fn qemu_args(
        &self,
        name: &str,
        config: &VmConfig,
        kernel: Option<KernelBoot>,
        accel: Accel,
        paths: &RunPaths,
        console: &Path,
        mode: QemuMode<'_>,
    ) -> Result<Vec<String>> {
        let generation_id = self.generation_id(name)?;
        let platform = self
            .slot(name)
            .map(|s| lock(&s.info).platform.clone())
            .unwrap_or_default();
        let qboot = self.s.cfg.qemu.qboot();
        Ok(cmdline::build(&LaunchSpec {
            config,
            platform: &platform,
            install_args: self.s.cfg.qemu.emulator_args(),
            accel,
            paths,
            console_log: console,
            kernel,
            hotplug_ports: HOTPLUG_PORTS,
            max_cpus: hostfacts::cpus().clamp(config.cpus, drover_model::MAX_VCPUS),
            qboot: Some(qboot).filter(|p| p.exists()),
            ram_file: true,
            ram_private: mode.ram_private,
            stopped: mode.stopped,
            detached: mode.detached,
            incoming: mode.incoming,
            generation_id: Some(&generation_id),
        }))
    }

    /// Start this host's QEMU with `args`, its output going to `log`.
    fn spawn_qemu(
        &self,
        args: &[String],
        log: &Path,
    ) -> std::result::Result<tokio::process::Child, process::ProcessError> {
        let q = &self.s.cfg.qemu;
        process::spawn(&q.emulator, &q.env(), args, log)
    }

    /// Wait for QEMU's QMP socket; fail early if QEMU exits first.
    async fn connect_qmp(
        &self,
        path: &Path,
        mut child: Option<&mut tokio::process::Child>,
        pid: u32,
        timeout: Duration,
    ) -> std::result::Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), String> {
        let deadline = Instant::now() + timeout;
        let mut last_err = String::from("QMP socket never appeared");
        while Instant::now() < deadline {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("QEMU exited at once ({status})"));
                }
            } else if !process::is_alive(pid, "") {
                return Err("QEMU is not running".into());
            }
            match Qmp::connect(path).await {
                Ok(c) => return Ok(c),
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("timed out waiting for QMP: {last_err}"))
    }

    /// Resolve the kernel to boot: the default image (built on first use), a given kernel, or none.
    async fn kernel_boot(&self, config: &VmConfig) -> Result<Option<KernelBoot>> {
        match &config.boot {
            Boot::Disk { .. } => Ok(None),
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Ok(Some(KernelBoot {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone().unwrap_or_else(|| "console=ttyS0".into()),
            })),
            Boot::Default { cmdline } => {
                let image = match self.current_image()? {
                    Some(i) => i,
                    None => {
                        tracing::info!("no guest image built yet; building it now (first use)");
                        self.build_image(false, |p| tracing::info!("image: {p}"))
                            .await?
                    }
                };
                let mut line = drover_image::default_cmdline().to_string();
                line.push_str(&format!(" drover.hostname={}", config.name));
                if let Some(extra) = cmdline {
                    line.push(' ');
                    line.push_str(extra);
                }
                Ok(Some(KernelBoot {
                    kernel: PathBuf::from(&image.kernel),
                    initrd: Some(PathBuf::from(&image.initrd)),
                    cmdline: line,
                }))
            }
        }
    }

    /// Install the runtime and its supervisor for a QEMU that is up.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        qmp: Qmp,
        events: mpsc::UnboundedReceiver<QmpEvent>,
        child: Option<tokio::process::Child>,
        pid: u32,
        started: Instant,
        launched: VmConfig,
    ) {
        let paths = self.run_paths(name);
        let (exited_tx, exited_rx) = watch::channel(false);
        let (link_stop_tx, link_stop_rx) = watch::channel(false);
        let agent = AgentLink::spawn(
            name.to_string(),
            paths.port_a.clone(),
            paths.port_b.clone(),
            started,
            link_stop_rx,
            Some(self.request_handler(name)),
        );
        let (events_tx, _) = broadcast::channel(64);
        let rt = Runtime {
            qmp,
            agent,
            launched,
            nodes: Arc::default(),
            events: events_tx.clone(),
            pid,
            exited: exited_rx,
            stop_reason: Arc::default(),
        };
        *lock(&slot.rt) = Some(rt.clone());
        let mgr = self.clone();
        let slot = slot.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            mgr.supervise(
                &name,
                &slot,
                events,
                events_tx,
                child,
                pid,
                rt.stop_reason.clone(),
                paths,
            )
            .await;
            let _ = link_stop_tx.send(true);
            *lock(&slot.rt) = None;
            let _ = exited_tx.send(true);
        });
    }

    /// Follow QEMU until it exits, then record how it ended.
    #[allow(clippy::too_many_arguments)]
    async fn supervise(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        mut events: mpsc::UnboundedReceiver<QmpEvent>,
        events_tx: broadcast::Sender<QmpEvent>,
        child: Option<tokio::process::Child>,
        pid: u32,
        stop_reason: Arc<Mutex<Option<String>>>,
        paths: RunPaths,
    ) {
        let mut shutdown: Option<serde_json::Value> = None;
        while let Some(ev) = events.recv().await {
            // Nobody listening is the normal case.
            let _ = events_tx.send(ev.clone());
            match ev.name.as_str() {
                "SHUTDOWN" => shutdown = Some(ev.data),
                "RESET" => tracing::info!(vm = name, "guest reset"),
                "GUEST_PANICKED" => tracing::warn!(vm = name, "guest panicked: {}", ev.data),
                other => tracing::debug!(vm = name, "QMP event {other}"),
            }
        }
        // QMP closed: QEMU is exiting. Wait for the process itself so its disks are free.
        let marker = paths.dir.display().to_string();
        let status = match child {
            Some(mut c) => match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
                Ok(Ok(s)) => Some(s.to_string()),
                _ => {
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = c.wait().await;
                    Some("killed after QMP closed".into())
                }
            },
            None => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while process::is_alive(pid, &marker) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if process::is_alive(pid, &marker) {
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
                None
            }
        };
        // The guest's memory is gone with it; free the RAM file (it lives in /dev/shm).
        let _ = std::fs::remove_file(&paths.ram);
        self.drop_standby(slot).await;
        let operator = lock(&stop_reason).clone();
        let guest = shutdown
            .as_ref()
            .and_then(|d| d.get("guest"))
            .and_then(|g| g.as_bool())
            .unwrap_or(false);
        let qemu_reason = shutdown
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(|r| r.as_str())
            .map(str::to_string);
        let exit_info = match (operator, guest, &qemu_reason) {
            (Some(how), _, _) => exit("operator-stop", Some(how)),
            (None, true, r) => exit("guest-poweroff", r.clone()),
            (None, false, Some(r)) if r == "host-signal" => {
                exit("killed", Some("QEMU received a signal".into()))
            }
            (None, false, Some(r)) => exit("host-shutdown", Some(r.clone())),
            (None, false, None) => exit(
                "crashed",
                Some(format!(
                    "QEMU exited without a shutdown{}; {}",
                    status.map(|s| format!(" ({s})")).unwrap_or_default(),
                    log_tail(&paths.qemu_log)
                )),
            ),
        };
        tracing::info!(vm = name, reason = exit_info.reason, "stopped");
        let recorded = self.record_stopped(slot, exit_info.clone());
        if let Err(e) = recorded {
            tracing::error!(vm = name, "could not record the stop: {e}");
        }
        // A VM that was arriving by migration and lost its QEMU is not ours: drop it.
        let arriving = matches!(
            lock(&slot.info).migration,
            Some(drover_api::MigrationMark {
                role: drover_api::MigrationRole::Incoming,
                phase: drover_api::MigrationPhase::Copying,
                ..
            })
        );
        if arriving {
            let (mgr, vm) = (self.clone(), name.to_string());
            tokio::spawn(async move { mgr.discard_incoming(&vm).await });
        }
    }

    /// Record a stop and, with persistence on, seal the config the VM ran with (live changes and
    /// next-boot changes included) as a new generation, in one transaction.
    fn record_stopped(&self, slot: &VmSlot, exit_info: ExitInfo) -> Result<VmInfo> {
        let mut sealed = None;
        let info = self.commit(slot, |i| {
            let mut writes = Vec::new();
            let ran = i.next_config.take().or_else(|| i.running_config.take());
            if let (true, Some(cfg)) = (i.persist, ran) {
                let mut history = self.history(i)?;
                let why = format!("sealed at shutdown ({})", exit_info.reason);
                if let Some(gen) = history.seal(
                    &cfg.cold_plugged(),
                    i.persist_mode,
                    "droverd",
                    &why,
                    hostfacts::now_ms(),
                )? {
                    writes.push(drover_store::put(HISTORY, &i.name, &history)?);
                    writes.push(self.journal(
                        &i.name,
                        "droverd",
                        &format!("sealed generation {gen}"),
                        Vec::new(),
                    )?);
                    sealed = Some(gen);
                }
            }
            i.state = VmState::Stopped;
            i.pid = None;
            i.accel = None;
            i.started_at_ms = None;
            i.running_config = None;
            i.next_config = None;
            i.started_from = None;
            i.last_exit = Some(exit_info);
            Ok(writes)
        })?;
        if let Some(gen) = sealed {
            tracing::info!(
                vm = info.name,
                generation = gen,
                "sealed the running config"
            );
        }
        Ok(info)
    }

    /// Pick the config a start boots, per the request and the persistence flag. Stores a
    /// composed config as a generation when asked.
    fn choose_config(
        &self,
        slot: &VmSlot,
        info: &VmInfo,
        req: &StartRequest,
        caller: &Caller,
    ) -> Result<(VmConfig, String)> {
        let mut history = self.history(info)?;
        let (gen, mut from) = match req.config {
            Some(g) => (
                g,
                if g == 0 {
                    "initial".to_string()
                } else {
                    format!("generation {g}")
                },
            ),
            None => match history.latest().filter(|_| info.persist) {
                Some(g) => (g, format!("generation {g}")),
                None => (0, "initial".to_string()),
            },
        };
        let base = history.resolve(gen)?;
        let composing = !(req.without.is_empty() && req.with.is_empty() && req.set.is_empty());
        if !composing {
            if req.save_as_generation {
                return Err(HostError::Invalid(
                    "--save-as-generation stores a composed config: give --without, --with or --set too".into(),
                ));
            }
            return Ok((base, from));
        }
        let without = req
            .without
            .iter()
            .map(|k| k.parse::<drover_model::ElementKey>())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut with = Vec::new();
        for w in &req.with {
            let (g, key) = w.split_once(':').ok_or_else(|| {
                HostError::Invalid(format!("--with {w:?}: use GEN:KEY, e.g. 3:nic:net1"))
            })?;
            let g: u32 = g.parse().map_err(|_| {
                HostError::Invalid(format!("--with {w:?}: {g:?} is not a generation number"))
            })?;
            let key: drover_model::ElementKey = key.parse()?;
            let element = history.element(g, &key)?;
            with.push((format!("generation {g}"), key, element));
        }
        let (mut set_cpus, mut set_memory) = (None, None);
        for kv in &req.set {
            match kv.split_once('=') {
                Some(("cpus", v)) => {
                    set_cpus =
                        Some(v.parse().map_err(|_| {
                            HostError::Invalid(format!("--set {kv:?}: not a number"))
                        })?)
                }
                Some(("memory", v)) => set_memory = Some(drover_model::parse_size(v)?),
                _ => {
                    return Err(HostError::Invalid(format!(
                        "--set {kv:?}: use cpus=N or memory=SIZE"
                    )))
                }
            }
        }
        let composed = drover_model::compose(&drover_model::Compose {
            base,
            without,
            with,
            set_cpus,
            set_memory,
        })?;
        from = format!("composed from {from}");
        if req.save_as_generation {
            if let Some(g) = history.seal(
                &composed,
                info.persist_mode,
                &caller.name,
                "composed at start",
                hostfacts::now_ms(),
            )? {
                let name = info.name.clone();
                let hist = history.clone();
                self.commit(slot, |_| {
                    Ok(vec![
                        drover_store::put(HISTORY, &name, &hist)?,
                        self.journal(
                            &name,
                            &caller.name,
                            &format!("stored composed config as generation {g}"),
                            Vec::new(),
                        )?,
                    ])
                })?;
                from = format!("generation {g} (composed)");
            }
        }
        Ok((composed, from))
    }

    /// Whether the host can run `config` now: memory available, vCPUs, disks present.
    fn check_fits(&self, name: &str, config: &VmConfig) -> Result<()> {
        self.check_room(name, config)?;
        for d in &config.disks {
            if !d.path.exists() {
                return Err(HostError::Invalid(format!(
                    "disk {} of VM {name} is missing: {} does not exist",
                    d.id,
                    d.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Whether this host has the memory and CPUs `config` needs now.
    fn check_room(&self, name: &str, config: &VmConfig) -> Result<()> {
        let mem = hostfacts::memory();
        if config.memory > mem.available.saturating_sub(HOST_RESERVE) {
            return Err(HostError::Resources(format!(
                "VM {name} needs {} of memory; only {} is available on this host now",
                format_size(config.memory),
                format_size(mem.available)
            )));
        }
        let cpus = hostfacts::cpus();
        if config.cpus > cpus {
            return Err(HostError::Resources(format!(
                "VM {name} asks for {} vCPUs; this host has {cpus} CPUs",
                config.cpus
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- re-adoption

    async fn readopt(&self, name: &str, slot: &Arc<VmSlot>) -> Result<()> {
        let paths = self.run_paths(name);
        let marker = paths.dir.display().to_string();
        let pid = process::read_pidfile(&paths.pidfile).or(lock(&slot.info).pid);
        if let Some(pid) = pid.filter(|&p| process::is_alive(p, &marker)) {
            match self
                .connect_qmp(&paths.qmp, None, pid, Duration::from_secs(5))
                .await
            {
                Ok((qmp, events)) => {
                    self.persist(slot, |i| {
                        // One still arriving by migration does not run until it is committed.
                        let arriving = i.migration.as_ref().is_some_and(|m| {
                            m.role == drover_api::MigrationRole::Incoming
                                && m.phase != drover_api::MigrationPhase::Committed
                        });
                        i.state = if arriving {
                            VmState::Starting
                        } else {
                            VmState::Running
                        };
                        i.pid = Some(pid);
                    })?;
                    let launched = {
                        let i = lock(&slot.info);
                        i.running_config.clone().unwrap_or_else(|| i.config.clone())
                    };
                    let nodes = block_nodes(&qmp).await;
                    // Drover pauses a VM only inside a state save; a VM still paused now was
                    // left so by a droverd that died mid-save.
                    let migrating = lock(&slot.info)
                        .migration
                        .as_ref()
                        .is_some_and(|m| m.phase != drover_api::MigrationPhase::Committed);
                    if !migrating && qmp.status().await.ok().as_deref() == Some("paused") {
                        tracing::warn!(
                            vm = name,
                            "VM was left paused by an interrupted save; resuming it"
                        );
                        let _ = qmp.execute("cont", None).await;
                    }
                    self.attach(name, slot, qmp, events, None, pid, Instant::now(), launched);
                    if let Some(rt) = self.runtime(slot) {
                        *lock(&rt.nodes) = nodes;
                    }
                    self.resume_requests(name);
                    tracing::info!(vm = name, pid, "re-adopted running VM");
                    self.spawn_recover_migration(name, slot);
                    return Ok(());
                }
                Err(e) => {
                    // Alive but unreachable: QEMU is wedged. Do not leave an unmanaged VM behind.
                    tracing::warn!(
                        vm = name,
                        pid,
                        "QEMU alive but QMP unreachable ({e}); killing it"
                    );
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        // Its memory file outlived it (QEMU was not around to see it removed).
        let _ = std::fs::remove_file(&paths.ram);
        let detail = format!(
            "QEMU exited while droverd was not running; {}",
            log_tail(&paths.qemu_log)
        );
        self.record_stopped(slot, exit("exited-while-daemon-down", Some(detail.clone())))?;
        self.resume_requests(name);
        self.spawn_recover_migration(name, slot);
        tracing::info!(
            vm = name,
            "was running before droverd restarted and has since exited"
        );
        Ok(())
    }

    // ---------------------------------------------------------------- stop / restart

    fn runtime(&self, slot: &Arc<VmSlot>) -> Option<Runtime> {
        lock(&slot.rt).clone()
    }

    /// Stop a running VM: the agent's shutdown, then ACPI power-down, then kill.
    pub async fn stop(&self, name: &str, timeout_s: u64, force: bool) -> Result<VmInfo> {
        let slot = self.slot(name)?;
        let _op = slot.op.lock().await;
        self.stop_locked(name, &slot, timeout_s, force).await
    }

    async fn stop_locked(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        timeout_s: u64,
        force: bool,
    ) -> Result<VmInfo> {
        VmAction::Stop
            .check(name, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        let Some(rt) = self.runtime(slot) else {
            return Err(HostError::Conflict(format!("VM {name} is not running")));
        };
        // A state capture streams from this QEMU: let it end rather than cut it off (bounded, so
        // a stuck capture cannot keep a VM from stopping).
        let _capture =
            match tokio::time::timeout(Duration::from_secs(300), slot.capture.lock()).await {
                Ok(g) => Some(g),
                Err(_) => {
                    tracing::warn!(
                        vm = name,
                        "stopping although a state capture is still running"
                    );
                    None
                }
            };
        self.persist(slot, |i| i.state = VmState::Stopping)?;
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        let mut exited = rt.exited.clone();
        let wait_until = |mut rx: watch::Receiver<bool>, until: Instant| async move {
            let left = until.saturating_duration_since(Instant::now());
            matches!(
                tokio::time::timeout(left, rx.wait_for(|e| *e)).await,
                Ok(Ok(_))
            )
        };
        let set_reason = |how: &str| *lock(&rt.stop_reason) = Some(how.to_string());
        let mut done = false;
        if !force && timeout_s > 0 {
            // 1. The agent: the cleanest shutdown (syncs disks).
            let agent_ready = rt.agent.status().ready;
            if agent_ready {
                set_reason("shut down by the guest agent");
                let budget = Duration::from_secs(timeout_s.min(5));
                match rt
                    .agent
                    .call(drover_proto::Body::Shutdown { reboot: false }, budget)
                    .await
                {
                    Ok(_) => {
                        let until = Instant::now() + (deadline - Instant::now()) * 2 / 3;
                        done = wait_until(exited.clone(), until).await;
                    }
                    Err(e) => tracing::info!(vm = name, "agent shutdown failed: {e}; trying ACPI"),
                }
            }
            // 2. ACPI power button.
            if !done && Instant::now() < deadline {
                set_reason("ACPI power-down");
                if rt.qmp.execute("system_powerdown", None).await.is_ok() {
                    done = wait_until(exited.clone(), deadline).await;
                }
            }
        }
        if !done {
            // 3. Ask QEMU to quit (flushes its disks), then SIGKILL.
            set_reason(if force {
                "forced stop"
            } else {
                "killed after the graceful-stop timeout"
            });
            let _ = rt
                .qmp
                .execute_timeout("quit", None, Duration::from_secs(2))
                .await;
            done = wait_until(exited.clone(), Instant::now() + Duration::from_secs(3)).await;
            if !done {
                process::signal(rt.pid, nix::sys::signal::Signal::SIGKILL);
                done = matches!(
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await,
                    Ok(Ok(_))
                );
            }
        }
        if !done {
            self.persist(slot, |i| i.state = VmState::Running)?;
            return Err(HostError::Timeout(format!(
                "VM {name} did not stop even after SIGKILL"
            )));
        }
        Ok(self.view(slot))
    }

    /// Stop, then start again.
    pub async fn restart(&self, name: &str, timeout_s: u64, force: bool) -> Result<VmInfo> {
        let slot = self.slot(name)?;
        let _op = slot.op.lock().await;
        VmAction::Restart
            .check(name, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        self.stop_locked(name, &slot, timeout_s, force).await?;
        self.start_locked(name, &slot, &StartRequest::default(), &Caller::daemon())
            .await
    }

    // ---------------------------------------------------------------- agent

    /// Wait until the VM's agent is ready, up to `wait`.
    pub async fn wait_agent(&self, name: &str, wait: Duration) -> Result<AgentStatus> {
        let slot = self.slot(name)?;
        let Some(rt) = self.runtime(&slot) else {
            return Err(HostError::Conflict(format!(
                "VM {name} is not running; start it first (`drover vm start {name}`)"
            )));
        };
        let mut exited = rt.exited.clone();
        tokio::select! {
            r = rt.agent.wait_ready(wait) => r.map_err(|e| match e {
                LinkError::Timeout(_) => HostError::Timeout(format!(
                    "the agent in VM {name} did not become ready within {}s; see `drover vm console {name}`",
                    wait.as_secs()
                )),
                other => HostError::Agent(format!("VM {name}: {other}")),
            }),
            _ = exited.wait_for(|e| *e) => {
                let why = lock(&slot.info).last_exit.clone().map(|e| format!("{}: {}", e.reason, e.detail.unwrap_or_default())).unwrap_or_default();
                Err(HostError::Conflict(format!("VM {name} stopped while waiting for its agent ({why})")))
            }
        }
    }

    /// Run a command in the guest.
    pub async fn exec(
        &self,
        name: &str,
        req: drover_api::ExecRequest,
    ) -> Result<drover_proto::ExecResult> {
        let slot = self.slot(name)?;
        VmAction::Exec
            .check(name, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        if req.argv.is_empty() {
            return Err(HostError::Invalid("exec needs a command".into()));
        }
        if req.timeout_s == 0 || req.timeout_s > 24 * 3600 {
            return Err(HostError::Invalid(
                "exec timeout must be between 1 s and 24 h".into(),
            ));
        }
        let Some(rt) = self.runtime(&slot) else {
            return Err(HostError::Conflict(format!("VM {name} is not running")));
        };
        // Right after a start or restore the agent may be seconds away: wait a little for it.
        if !rt.agent.status().ready && rt.agent.wait_ready(Duration::from_secs(10)).await.is_err() {
            return Err(HostError::Agent(format!(
                "the agent in VM {name} is not ready yet; wait with `drover vm start {name} --wait` or see `drover vm console {name}`"
            )));
        }
        let body = drover_proto::Body::Exec(drover_proto::ExecRequest {
            argv: req.argv,
            stdin: req.stdin,
            timeout_ms: req.timeout_s * 1000,
        });
        // Validate locally what the agent would refuse, for a clear error.
        drover_proto::encode(&drover_proto::Frame::new(0, body.clone()))
            .map_err(|e| HostError::Invalid(e.to_string()))?;
        match rt
            .agent
            .call(body, Duration::from_secs(req.timeout_s + 10))
            .await
        {
            Ok(drover_proto::Body::ExecResult(r)) => Ok(r),
            Ok(other) => Err(HostError::Agent(format!(
                "unexpected reply from the agent: {other:?}"
            ))),
            Err(LinkError::Timeout(d)) => Err(HostError::Timeout(format!(
                "the agent in VM {name} did not answer within {}s",
                d.as_secs()
            ))),
            Err(e) => Err(HostError::Agent(format!("VM {name}: {e}"))),
        }
    }

    /// Read the console log from `offset`, at most `max` bytes; returns the bytes and the next offset.
    pub fn console(&self, name: &str, offset: u64, max: usize) -> Result<(Vec<u8>, u64)> {
        self.slot(name)?;
        use std::io::{Read, Seek, SeekFrom};
        let path = self.console_path(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(io_ctx("reading", &path, e)),
        };
        let len = f.metadata().map_err(|e| io_ctx("reading", &path, e))?.len();
        let start = offset.min(len);
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_ctx("reading", &path, e))?;
        let mut buf = Vec::new();
        f.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io_ctx("reading", &path, e))?;
        let next = start + buf.len() as u64;
        Ok((buf, next))
    }

    // ---------------------------------------------------------------- image

    fn agent_binary(&self) -> Result<PathBuf> {
        if let Some(p) = &self.s.cfg.agent_binary {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe().map_err(|e| HostError::Internal(e.to_string()))?;
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let candidates = [
            dir.join("drover-agent-static"),
            dir.join("../x86_64-unknown-linux-gnu/release/drover-agent"),
            dir.join("../../x86_64-unknown-linux-gnu/release/drover-agent"),
            PathBuf::from("/usr/lib/drover/drover-agent"),
        ];
        candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
            HostError::ImageMissing(
                "no static drover-agent binary found to put in the guest image; build it with \
                 `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p drover-agent --target x86_64-unknown-linux-gnu` \
                 or pass droverd --agent-binary PATH"
                    .into(),
            )
        })
    }

    /// The current default guest image, if built.
    pub fn current_image(&self) -> Result<Option<ImageInfo>> {
        let loaded = drover_image::load(&self.s.cfg.image_dir)
            .map_err(|e| HostError::ImageMissing(e.to_string()))?;
        Ok(loaded.map(image_info))
    }

    /// Build (or reuse, when inputs are unchanged) the default guest image.
    pub async fn build_image(
        &self,
        force: bool,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<ImageInfo> {
        let _guard = self.s.image_lock.lock().await;
        let spec = drover_image::ImageSpec {
            cache_dir: self.s.cfg.image_dir.clone(),
            agent_binary: self.agent_binary()?,
            kernel_package: None,
            force,
        };
        let built = tokio::task::spawn_blocking(move || {
            drover_image::build(&spec, &mut |p| progress(crate::image_progress(&p)))
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::ImageMissing(format!("guest image build failed: {e}")))?;
        Ok(image_info(built))
    }
}

fn image_info(b: drover_image::BuiltImage) -> ImageInfo {
    ImageInfo {
        dir: b.dir.display().to_string(),
        kernel: b.kernel.display().to_string(),
        initrd: b.initrd.display().to_string(),
        manifest: serde_json::to_value(&b.manifest).unwrap_or_default(),
    }
}

fn exit(reason: &str, detail: Option<String>) -> ExitInfo {
    ExitInfo {
        at_ms: hostfacts::now_ms(),
        reason: reason.to_string(),
        detail,
    }
}

/// Which block node each Drover disk device writes to (after saves, no longer `disk-<id>`).
async fn block_nodes(qmp: &Qmp) -> std::collections::HashMap<String, String> {
    let mut map = std::collections::HashMap::new();
    if let Ok(serde_json::Value::Array(list)) = qmp.execute("query-block", None).await {
        for b in list {
            let qdev = b.get("qdev").and_then(|q| q.as_str()).unwrap_or_default();
            let node = b
                .get("inserted")
                .and_then(|i| i.get("node-name"))
                .and_then(|n| n.as_str());
            let id = qdev.split('/').find_map(|part| part.strip_prefix("disk-"));
            if let (Some(id), Some(node)) = (id, node) {
                map.insert(id.to_string(), node.to_string());
            }
        }
    }
    map
}

/// The last lines of QEMU's own log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "QEMU logged nothing".into()
    } else {
        format!("QEMU log: {tail}")
    }
}
