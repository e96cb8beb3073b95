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
use crate::vm_events::{Adoption, Bus, VmEvent};
use drover_api::{
    AgentStatus, ExitInfo, HostInfo, ImageInfo, JournalEntry, StartRequest, VmInfo, VmState,
};
use drover_model::{
    format_size, Accel, Boot, ConfigHistory, DiskConfig, DiskSource, MacAddr, NicBackend,
    NicConfig, PersistMode, VmConfig, VmSpec,
};
use drover_qemu::accel::AccelChoice;
use drover_qemu::cmdline::{self, KernelBoot, LaunchSpec, RunPaths};
use drover_qemu::qmp::{Qmp, QmpEvent};
use drover_qemu::{img, process};
use drover_store::Write;
use drover_store::{Store, StoreExt};
use records::VmRecord;
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch};

mod adopt;
mod check;
mod files;
pub use files::{FileRead, MAX_FILE_REQUEST};
mod clone;
mod door;
use door::OpGuard;
mod guest;
mod helpers;
mod hibernate;
mod identity;
mod images;
mod layers;
mod live;
mod migrate;
mod qemu_files;
mod records;
mod registry;
use registry::VmTable;
mod seed;
mod state;
mod upgrade;

/// How a QEMU is to start besides its config.
struct QemuMode<'a> {
    /// Wait for an incoming migration.
    incoming: bool,
    /// `-S`: stay paused.
    stopped: bool,
    /// Map this file privately as guest RAM.
    ram_private: Option<&'a Path>,
    /// Only holds state: no images, no host ports.
    detached: bool,
    /// Hot-plugged devices of the VM this QEMU continues.
    plugged: &'a drover_model::Plugged,
}

/// What a new QEMU does first.
#[derive(Clone, Copy)]
enum LaunchKind<'a> {
    /// Boot the guest.
    Boot,
    /// Load a saved state and run it.
    Restore(&'a RestoreSpec),
    /// Wait, paused, for a live migration from another host (which then commits or aborts),
    /// with the devices the VM has hot-plugged there.
    Incoming(&'a drover_model::Plugged),
}

pub(crate) struct RestoreSpec {
    /// Device state (and RAM, for classic saves).
    pub devices: PathBuf,
    /// The RAM file of a fast save.
    pub memory: Option<PathBuf>,
    /// The state's id.
    pub state: String,
    /// Disk id → the layer the state pins (a fresh overlay goes on each); `None` for a clone,
    /// whose config names its own overlays on those layers already.
    pub layers: Option<BTreeMap<String, PathBuf>>,
    /// A classic save written with `mapped-ram`.
    pub mapped_ram: bool,
    /// Check the device state against this manifest's checksum while QEMU loads it (`None`:
    /// checked before, or nothing to check).
    pub verify: Option<drover_api::StateInfo>,
    /// The devices the saved VM had hot-plugged, made again before the state loads.
    pub plugged: drover_model::Plugged,
}

const VMS: &str = "vms";
/// The lifecycle's own per-VM tables (every feature declares its own: [`registry`]).
const TABLES: &[VmTable] = &[
    VmTable::by_name(VMS),
    VmTable::by_name(HISTORY),
    VmTable::by_prefix(JOURNAL),
];
const HISTORY: &str = "history";
/// Deletes in progress: what is left to remove of a VM whose records are gone.
const DELETING: &str = "deleting";

/// What a delete still has to remove once the VM's records are gone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DeleteIntent {
    /// The VM's own disk files (operator-provided images are never removed).
    owned_disks: Vec<PathBuf>,
}
const JOURNAL: &str = "journal";
const ROLES: &str = "roles";
/// Root ports kept free for later hot-plug of disks and NICs. Each costs the guest ~25 ms of
/// boot under TCG (ACPI hot-plug tables the kernel parses), so few are reserved: after a restart
/// hot-plugged devices are cold-plugged and the ports are free again.
pub const HOTPLUG_PORTS: u32 = 4;
/// Memory kept back for the host when checking whether a VM fits.
const HOST_RESERVE: u64 = 256 << 20;

/// Whether a QEMU version string (`7.2.22`) is older than `major.minor` (unknown: assume old).
fn qemu_before(version: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => true,
    }
}

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
    /// Directories non-admins may name images, kernels and initrds in (besides `image_dir`).
    pub pools: Vec<crate::pools::Pool>,
    /// Bounds on what guests and callers can make droverd keep.
    pub limits: crate::limits::Limits,
    /// The user QEMU runs as ([`crate::qemu_user`]).
    pub qemu_user: crate::qemu_user::QemuUser,
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
    /// The operation lock: held through an [`OpGuard`] (see `door`).
    op: Arc<tokio::sync::Mutex<()>>,
    /// Held while a state's memory is streamed out of the running QEMU: stopping or replacing
    /// that QEMU waits for it, or the capture would be cut off.
    capture: Arc<tokio::sync::Mutex<()>>,
    /// Held while a captured (ready, restorable) state's memory is written to disk: what moves
    /// the VM's states elsewhere waits for it; restores and stops need not.
    persist: Arc<tokio::sync::Mutex<()>>,
    /// A QEMU kept ready to receive the next fast save of this VM (with the config it fits).
    standby: tokio::sync::Mutex<Option<(VmConfig, drover_model::Plugged, state::Receiver)>>,
    info: Mutex<VmInfo>,
    rt: Mutex<Option<Runtime>>,
    /// Writes of a change that already happened (QEMU exited) which the store could not take
    /// yet (a full disk): written before any later change of this VM, and retried meanwhile.
    pending: Mutex<Vec<Write>>,
}

impl VmSlot {
    fn new(info: VmInfo) -> Arc<VmSlot> {
        Arc::new(VmSlot {
            op: Arc::new(tokio::sync::Mutex::new(())),
            capture: Arc::new(tokio::sync::Mutex::new(())),
            persist: Arc::new(tokio::sync::Mutex::new(())),
            standby: tokio::sync::Mutex::new(None),
            info: Mutex::new(info),
            rt: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
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
    /// The guest broker's rate buckets and verified secrets.
    broker: guest::Broker,
    pools: crate::pools::Pools,
    /// Whom QEMU runs as.
    qemu_user: crate::qemu_user::QemuUser,
    /// Set once droverd is stopping: no new QEMU starts after it.
    stopping: std::sync::atomic::AtomicBool,
    /// Checks a controller's fencing token against the cluster (set with `--cluster`).
    fence_check: Mutex<Option<FenceCheck>>,
    /// What happened to VMs, for `GET /v1/events`.
    events: crate::events::Events,
    /// Connections to the VMs' serial console sockets (keystrokes from web consoles).
    console_inputs: crate::console::ConsoleInputs,
    /// Console WebSockets open now, at most [`CONSOLE_SOCKETS_MAX`].
    console_sockets: Arc<tokio::sync::Semaphore>,
    /// The migrations running now.
    migrations: migrate::Migrations,
    /// State files this daemon hashed, so an unchanged one is not read again.
    hashes: state::Hashes,
    /// How fast this host copies a paused guest's memory, bytes per second (measured by each
    /// copy; see `state::choose_capture`).
    copy_rate: std::sync::atomic::AtomicU64,
    /// Where the lifecycle tells features what happened to VMs ([`registry::SUBSCRIBERS`]).
    bus: Bus<Manager>,
}

/// Answers whether a cluster member may start here with its token right now (`Err`: the
/// cluster could not be asked).
pub type FenceCheck = Arc<
    dyn Fn(
            drover_api::Fence,
        ) -> futures_util::future::BoxFuture<'static, std::result::Result<bool, String>>
        + Send
        + Sync,
>;

/// Console WebSockets open at once (each polls its VM's log); more are refused with 429.
pub const CONSOLE_SOCKETS_MAX: usize = 64;

/// The VM manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    s: Arc<Shared>,
}

/// QEMU's user must be able to run the emulator and reach the state dir; say so at start
/// rather than at each VM's start.
fn check_qemu_user_reach(u: &crate::qemu_user::QemuUser, cfg: &DaemonConfig) -> Result<()> {
    use crate::qemu_user::Need;
    if !u.is_dedicated() {
        return Ok(());
    }
    if !u.may(&cfg.qemu.emulator, Need::Exec) {
        return Err(HostError::Invalid(format!(
            "QEMU runs as user {} (--qemu-user), which cannot run {}: a directory above it is closed to it, or the file is not executable by it",
            u.name,
            cfg.qemu.emulator.display()
        )));
    }
    let mut dir = cfg.state_dir.clone();
    // Everything above the state dir: droverd sets the state dir itself.
    if dir.pop() && !u.may(&dir, Need::Exec) {
        return Err(HostError::Invalid(format!(
            "QEMU runs as user {} (--qemu-user), which cannot pass through {} to reach the state dir {}: open it to others (chmod o+x) or pick another --state-dir",
            u.name,
            dir.display(),
            cfg.state_dir.display()
        )));
    }
    Ok(())
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
        // Records written by an older droverd are migrated once, before anything reads them.
        let migrated = upgrade::upgrade(store.as_ref(), &cfg.state_dir)?;
        if !migrated.is_empty() {
            tracing::info!(
                vms = migrated.join(","),
                "records migrated to schema {}: disks named by origin, layers in chains",
                upgrade::SCHEMA
            );
        }
        let records: Vec<(String, VmInfo)> = records::vms(store.as_ref())?;
        let (cfg_pools, cfg_image_dir) = (cfg.pools.clone(), cfg.image_dir.clone());
        let qemu_user = cfg.qemu_user.clone();
        check_qemu_user_reach(&qemu_user, &cfg)?;
        // Fast saves write-protect guest RAM with userfaultfd; QEMU 8.1 and later get it from
        // /dev/userfaultfd (only the caller's own memory), which its user needs to open. Older
        // ones call userfaultfd(2), which a non-root user may only with
        // vm.unprivileged_userfaultfd = 1 (see spawn_qemu).
        let uffd = Path::new("/dev/userfaultfd");
        if qemu_user.is_dedicated() && !qemu_before(&qemu_version, (8, 1)) && uffd.exists() {
            if let Err(e) = qemu_user.grant(uffd, true) {
                tracing::warn!(
                    "cannot give /dev/userfaultfd to QEMU's user {}: {e}; fast saves will fail",
                    qemu_user.name
                );
            }
        }
        if qemu_user.is_dedicated()
            && qemu_before(&qemu_version, (8, 1))
            && std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
                .is_ok_and(|v| v.trim() == "0")
        {
            tracing::warn!(
                "QEMU {qemu_version} runs as {} and calls userfaultfd(2) for fast saves, which vm.unprivileged_userfaultfd = 0 forbids it: fast saves will fail (classic ones work). Set it to 1 (scripts/install-deps.sh writes /etc/sysctl.d/60-drover-userfaultfd.conf), or run QEMU 8.1 or later",
                qemu_user.name
            );
        }
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
                broker: Default::default(),
                pools: crate::pools::Pools::new(cfg_pools, &cfg_image_dir),
                qemu_user,
                stopping: std::sync::atomic::AtomicBool::new(false),
                fence_check: Mutex::new(None),
                events: crate::events::Events::default(),
                console_inputs: Default::default(),
                console_sockets: Arc::new(tokio::sync::Semaphore::new(CONSOLE_SOCKETS_MAX)),
                migrations: Default::default(),
                hashes: Default::default(),
                copy_rate: state::INITIAL_COPY_RATE.into(),
                bus: Bus::new(&registry::SUBSCRIBERS),
            }),
        };
        for (name, mut info) in records {
            info.config.normalize();
            let state = info.state;
            let slot = VmSlot::new(info);
            lock(&mgr.s.vms).insert(name.clone(), slot.clone());
            // A hibernated VM has no QEMU to find: its state is on disk.
            if !matches!(state, VmState::Stopped | VmState::Hibernated) {
                // One VM that cannot be re-adopted must not keep droverd (and the others) down.
                if let Err(e) = mgr.readopt(&name, &slot).await {
                    tracing::error!(vm = name, "re-adopting failed: {e}");
                }
            }
        }
        mgr.finish_deletes();
        mgr.recover_states().await;
        mgr.resume_pending_identities();
        for (vm, pids) in mgr.unknown_qemus() {
            tracing::warn!(vm, ?pids, "a QEMU of this state dir runs for a VM the store does not know (a store recovered from an older checkpoint?); it is left alone");
        }
        let weak = Arc::downgrade(&mgr.s);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(s) = weak.upgrade() else { return };
                let m = Manager { s };
                let _ = tokio::task::spawn_blocking(move || m.rotate_consoles()).await;
            }
        });
        Ok(mgr)
    }

    /// Rotate every console.log past its cap: its bytes move to `console.log.1` (replacing the
    /// older one) and it starts empty again (QEMU appends, so it writes on at the new end).
    /// Checked every second, so a log exceeds its cap by at most one second of output; what a
    /// guest writes between the copy and the truncation is lost.
    fn rotate_consoles(&self) {
        let cap = self.s.cfg.limits.console_log_max;
        let names: Vec<String> = lock(&self.s.vms).keys().cloned().collect();
        for name in names {
            let path = self.console_path(&name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.len() <= cap {
                continue;
            }
            let old = path.with_extension("log.1");
            let rotated = std::fs::copy(&path, &old).and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(0))
            });
            match rotated {
                Ok(()) => tracing::debug!(vm = name, bytes = meta.len(), "console log rotated"),
                Err(e) => tracing::warn!(vm = name, "cannot rotate {}: {e}", path.display()),
            }
        }
    }

    /// A manager on a fresh state dir under `dir` (TCG, no pools), for unit tests.
    #[cfg(test)]
    pub(crate) async fn for_tests(dir: &Path, limits: crate::limits::Limits) -> Manager {
        let cfg = DaemonConfig {
            state_dir: dir.join("state"),
            image_dir: dir.join("images"),
            agent_binary: None,
            qemu: drover_qemu::install::QemuInstall::system(),
            accel: Some(drover_model::Accel::Tcg),
            persist_default: true,
            persist_mode_default: drover_model::PersistMode::Diff,
            identity: hostfacts::host_identity(Some("host-t"), &dir.join("no-dmi")),
            migration_addr: None,
            pools: Vec::new(),
            limits,
            qemu_user: crate::qemu_user::QemuUser::droverd(),
        };
        let store = drover_store::RedbStore::open(&dir.join("d.redb")).expect("test store");
        Manager::open(cfg, Box::new(store))
            .await
            .expect("test manager")
    }

    /// QEMUs running from this state dir (`run/<vm>/`) for VMs the store has no record of.
    fn unknown_qemus(&self) -> BTreeMap<String, Vec<u32>> {
        let known = lock(&self.s.vms);
        running_vm_qemus(&self.s.cfg.state_dir)
            .into_iter()
            .filter(|(vm, _)| !known.contains_key(vm))
            .collect()
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
    /// The state dir this daemon keeps its truth in.
    pub fn state_dir(&self) -> &Path {
        &self.s.cfg.state_dir
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
        Self::flush_pending(&*self.s.store, slot, &info)?;
        let mut next = info.clone();
        let mut writes = change(&mut next)?;
        next.agent = None;
        writes.insert(
            0,
            drover_store::put(VMS, &next.name, &VmRecord::from(&next))?,
        );
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

    /// Write what an earlier [`Manager::commit_or_defer`] could not, with the current record.
    fn flush_pending(store: &dyn Store, slot: &VmSlot, info: &VmInfo) -> Result<()> {
        let mut pending = lock(&slot.pending);
        if pending.is_empty() {
            return Ok(());
        }
        let mut writes = pending.clone();
        let mut current = info.clone();
        current.agent = None;
        writes.push(drover_store::put(
            VMS,
            &current.name,
            &VmRecord::from(&current),
        )?);
        store.apply(writes)?;
        pending.clear();
        tracing::info!(
            vm = info.name,
            "the store took the writes it had refused earlier"
        );
        Ok(())
    }

    /// Like [`Manager::commit`], for a change that has already happened whether or not the
    /// store takes it (QEMU exited, QEMU re-adopted): when the store fails (a full disk), the
    /// in-memory record changes anyway, so the VM is not shown `stopping` forever, and the
    /// writes are retried every 2 s until the store takes them (or a later change of this VM
    /// writes them first). A droverd killed meanwhile finds the truth again at re-adoption.
    fn commit_or_defer(
        &self,
        slot: &Arc<VmSlot>,
        change: impl FnOnce(&mut VmInfo) -> Result<Vec<Write>>,
    ) -> Result<VmInfo> {
        let mut info = lock(&slot.info);
        let mut next = info.clone();
        let writes = change(&mut next)?;
        next.agent = None;
        let mut all = lock(&slot.pending).clone();
        all.extend(writes.iter().cloned());
        let record = drover_store::put(VMS, &next.name, &VmRecord::from(&next))?;
        all.push(record.clone());
        match self.s.store.apply(all) {
            Ok(()) => lock(&slot.pending).clear(),
            Err(e) => {
                tracing::warn!(
                    vm = next.name,
                    "the store refused a record ({e}); keeping it in memory and retrying"
                );
                let first = {
                    let mut pending = lock(&slot.pending);
                    let first = pending.is_empty();
                    // The record itself too, so something is pending even without other writes
                    // (a flush writes the record as it is then, after these).
                    pending.extend(writes);
                    pending.push(record);
                    first
                };
                if first {
                    let (store_of, slot) = (self.clone(), slot.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            // Each lock in its own statement: `flush_pending` takes them again.
                            let info = lock(&slot.info).clone();
                            let empty = lock(&slot.pending).is_empty();
                            if empty
                                || Self::flush_pending(&*store_of.s.store, &slot, &info).is_ok()
                            {
                                break;
                            }
                        }
                    });
                }
            }
        }
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
                uid: Some(0),
            },
            Some(uid) => Caller {
                name: format!("uid {uid}"),
                role: self
                    .s
                    .store
                    .get::<Role>(ROLES, &uid.to_string())
                    .ok()
                    .flatten(),
                uid: Some(uid),
            },
            None => Caller {
                name: "unknown caller".into(),
                role: None,
                uid: None,
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
        info.unwritten = self
            .unwritten_layers(&info.name)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(disk, origin, top)| {
                info.config
                    .disks
                    .iter()
                    .any(|d| d.id.as_str() == disk && d.path == origin)
                    .then_some((disk, top))
            })
            .collect();
        info
    }

    /// The user's images (outside the state dir) whose disk's latest data is in a layer of
    /// droverd's over them: (disk id, the image, that layer).
    fn unwritten_layers(&self, name: &str) -> Result<Vec<(String, PathBuf, PathBuf)>> {
        let state = &self.s.cfg.state_dir;
        Ok(self
            .all_layers(name)?
            .into_iter()
            .flat_map(|(disk, l)| {
                l.tops
                    .into_iter()
                    .map(move |(origin, top)| (disk.clone(), origin, top))
            })
            .filter(|(_, origin, top)| !origin.starts_with(state) && top != origin)
            .collect())
    }

    /// Before a delete: write each user's image's latest data back into it from droverd's
    /// layers (`qemu-img commit`), so the image holds what the VM last wrote. The VM is stopped
    /// and its states go with it, so nothing depends on the image as it was. A crash midway
    /// leaves the VM and its layers: the next delete writes back again.
    async fn write_back_user_images(&self, name: &str) -> Result<Vec<PathBuf>> {
        let mut done = Vec::new();
        for (disk, origin, top) in self.unwritten_layers(name)? {
            let (t, o) = (top.clone(), origin.clone());
            let started = Instant::now();
            tokio::task::spawn_blocking(move || img::commit(&t, &o))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))?
                .map_err(|e| {
                    HostError::Internal(format!(
                        "VM {name}: writing disk {disk}'s latest data back into {} failed ({e}); nothing was deleted. Retry, or delete with --discard-changes to leave the image as it was at the first save",
                        origin.display()
                    ))
                })?;
            tracing::info!(vm = name, disk, image = %origin.display(), ms = started.elapsed().as_millis() as u64, "wrote the disk's latest data back into the user's image");
            done.push(origin);
        }
        Ok(done)
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

    /// What a metrics scrape reads: every VM's state, and each running QEMU's pid, QMP
    /// connection and disk ids (those of the config it runs now).
    pub fn metrics_targets(&self) -> (Vec<VmState>, Vec<crate::metrics::VmTarget<Qmp>>) {
        let slots: Vec<(String, Arc<VmSlot>)> = lock(&self.s.vms)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let mut states = Vec::new();
        let mut targets = Vec::new();
        for (name, slot) in slots {
            let info = lock(&slot.info).clone();
            states.push(info.state);
            if let Some(rt) = lock(&slot.rt).as_ref() {
                let config = info.running_config.as_ref().unwrap_or(&info.config);
                targets.push(crate::metrics::VmTarget {
                    name,
                    pid: rt.pid,
                    qmp: rt.qmp.clone(),
                    disks: config.disks.iter().map(|d| d.id.to_string()).collect(),
                });
            }
        }
        (states, targets)
    }

    /// Host facts for `drover host info`.
    pub fn host_info(&self) -> HostInfo {
        let mem = hostfacts::memory();
        let (disk_total, disk_free) = hostfacts::disk(&self.s.cfg.state_dir);
        let vms = self.list();
        // A hibernated VM holds no memory or CPUs here.
        let running: Vec<&VmInfo> = vms
            .iter()
            .filter(|v| !matches!(v.state, VmState::Stopped | VmState::Hibernated))
            .collect();
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

    /// The record of a VM just defined with `config`, stopped, with this host's defaults.
    fn new_record(&self, config: VmConfig, platform: drover_model::Platform) -> VmInfo {
        VmInfo {
            name: config.name.to_string(),
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
            paused_reason: None,
            platform,
            fence: None,
            hibernation: None,
            identity: None,
            unwritten: Default::default(),
            clone_of: None,
        }
    }

    /// Define a VM: validate, check the host can ever run it, create its disks, record it.
    ///
    /// Paths a non-admin names (disk images, kernel, initrd) must be files in an image pool,
    /// and its port forwards unprivileged ports on loopback (see [`crate::pools`]).
    pub async fn create(&self, spec: VmSpec, caller: &Caller) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let (spec, image_boot) = self.expand_from_image(spec)?;
        let mut valid = spec.validate()?;
        for (_, source, readonly) in valid.disks.iter_mut() {
            if let DiskSource::Image { path } = source {
                let usage = if *readonly {
                    crate::pools::PathUse::DiskReadOnly
                } else {
                    crate::pools::PathUse::DiskReadWrite
                };
                *path = self.s.pools.resolve(caller, path, usage)?;
            }
        }
        for (_, _, backend) in &valid.nics {
            match backend {
                NicBackend::User { forwards } => {
                    for f in forwards {
                        crate::pools::check_forward(caller, f)?;
                    }
                }
                // A host interface is the host's network: an admin's choice.
                NicBackend::Tap { ifname } => {
                    caller.require(Permission::Admin).map_err(|_| {
                        HostError::Forbidden(format!(
                            "tap device {ifname}: only an admin may connect a VM to a host interface; use user networking"
                        ))
                    })?;
                }
            }
        }
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
        let mut boot = spec.boot.resolve()?;
        if let Boot::Kernel { kernel, initrd, .. } = &mut boot {
            for p in std::iter::once(&mut *kernel).chain(initrd.iter_mut()) {
                let from_image = image_boot
                    .as_ref()
                    .is_some_and(|b| *p == b.kernel || *p == b.initrd);
                // Before any look at the file: a non-admin learns nothing of paths outside pools.
                *p = if from_image {
                    p.clone()
                } else {
                    self.s
                        .pools
                        .resolve(caller, p, crate::pools::PathUse::Boot)?
                };
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
                            base: None,
                            index: disks.len() as u32,
                            slot: None,
                            addr: None,
                        }
                    }
                    DiskSource::FromImage { name, size } => {
                        let mut d = self
                            .disk_from_image(&vm_dir, id, name, *size, *readonly)
                            .await?;
                        d.index = disks.len() as u32;
                        d
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
                            base: None,
                            index: disks.len() as u32,
                            slot: None,
                            addr: None,
                        }
                    }
                });
            }
            let nics: Vec<NicConfig> = valid
                .nics
                .iter()
                .map(|(id, mac, backend)| NicConfig {
                    id: id.clone(),
                    mac: mac.unwrap_or_else(|| MacAddr::qemu_local(rand::random())),
                    backend: backend.clone(),
                    slot: None,
                    addr: None,
                })
                .collect();
            if let Some(s) = &spec.seed {
                disks.push(seed::make_disk(&name, s, &vm_dir, &nics, &disks)?);
            }
            let mut config = VmConfig {
                name: valid.name.clone(),
                cpus: valid.cpus,
                memory: valid.memory,
                disks: disks.clone(),
                nics,
                boot,
                accel: spec.accel,
                max_memory: valid.max_memory,
            };
            // Every device's PCI slot is recorded from the start.
            config.pin_pci();
            config.validate_config()?;
            let info = self.new_record(config, self.new_vm_platform());
            self.s.store.apply(vec![
                drover_store::put(VMS, &name, &VmRecord::from(&info))?,
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
                self.publish(VmEvent::Created { info: info.clone() }).await;
                Ok(info)
            }
            Err(e) => {
                // Nothing half-made stays behind.
                let _ = std::fs::remove_dir_all(&vm_dir);
                Err(e)
            }
        }
    }

    /// Every stored row that belongs to VM `name` (table, key, value), in every table of
    /// [`registry::VM_TABLES`]. What a delete removes and a migration carries.
    fn vm_rows(&self, name: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
        let mut rows = Vec::new();
        for table in registry::vm_tables() {
            match table.keyed {
                registry::Keyed::ByName => {
                    if let Some(v) = self.s.store.get_raw(table.name, name)? {
                        rows.push((table.name.to_string(), name.to_string(), v));
                    }
                }
                registry::Keyed::ByPrefix => {
                    for (key, v) in self.s.store.list_raw(table.name)? {
                        if table.owns(&key, name) {
                            rows.push((table.name.to_string(), key, v));
                        }
                    }
                }
            }
        }
        Ok(rows)
    }

    /// Remove a VM, its owned disks and its logs. Operator-provided images are left alone.
    ///
    /// A durable intent: one transaction removes the VM's records and records what is left to
    /// remove (`deleting/<name>`); the files go next, then that record. A droverd killed in
    /// between finishes the removal at its next start.
    ///
    /// A disk given as `image=PATH` gets the VM's latest data written back into the image first
    /// (after a save it lives in droverd's layers), unless `discard_changes`: the image then stays
    /// as it was when the first save pinned it.
    pub async fn delete(
        &self,
        name: &str,
        force: bool,
        discard_changes: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(name)?;
        if force && VmAction::Stop.check(name, lock(&slot.info).state).is_ok() {
            self.stop(name, 0, true, caller).await?;
        }
        let op = self.door(name, VmAction::Delete, caller).await?;
        let slot = op.slot();
        self.refuse_if_cloned(name, None, &format!("delete VM {name}"))?;
        let mut info = self.view(slot);
        if discard_changes {
            if !info.unwritten.is_empty() {
                tracing::warn!(vm = name, disks = ?info.unwritten.keys().collect::<Vec<_>>(), "deleting without writing the latest data back into the user's images (--discard-changes)");
            }
        } else {
            self.write_back_user_images(name).await?;
            info.unwritten.clear();
        }
        let _create = self.s.create_lock.lock().await;
        let intent = DeleteIntent {
            owned_disks: info
                .config
                .disks
                .iter()
                .filter(|d| d.owned)
                .map(|d| d.path.clone())
                .collect(),
        };
        let mut writes: Vec<Write> = self
            .vm_rows(name)?
            .into_iter()
            .map(|(table, key, _)| Write::Delete { table, key })
            .collect();
        writes.push(drover_store::put(DELETING, name, &intent)?);
        self.s.store.apply(writes)?;
        lock(&self.s.vms).remove(name);
        crate::crashpoint::hit("delete-files");
        self.finish_delete(name, &intent);
        tracing::info!(vm = name, "deleted");
        self.publish(VmEvent::Deleted { vm: name.into() }).await;
        Ok(info)
    }

    /// Remove what a recorded delete left: helper processes, owned disks, the VM's directories
    /// and RAM files; then the record of the delete.
    fn finish_delete(&self, name: &str, intent: &DeleteIntent) {
        self.reap_helpers(Some(name), &[]);
        for d in &intent.owned_disks {
            let _ = std::fs::remove_file(d);
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
        let _ = std::fs::remove_dir_all(self.run_paths(name).dir);
        let _ = std::fs::remove_file(self.run_paths(name).ram);
        // The RAM copies of its states (and their interrupted copies).
        let prefix = format!("{name}@");
        if let Ok(dir) = std::fs::read_dir(self.ram_dir()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Err(e) = self.s.store.delete(DELETING, name) {
            tracing::warn!(
                vm = name,
                "could not drop the record of a finished delete: {e}"
            );
        }
    }

    /// At start: finish the deletes a killed droverd left half done.
    fn finish_deletes(&self) {
        let Ok(rows) = self.s.store.list::<DeleteIntent>(DELETING) else {
            return;
        };
        for (name, intent) in rows {
            if lock(&self.s.vms).contains_key(&name) {
                // Recreated since (cannot happen through the API, which holds the create lock).
                let _ = self.s.store.delete(DELETING, &name);
                continue;
            }
            tracing::info!(
                vm = name,
                "finishing a delete interrupted by a droverd stop"
            );
            self.finish_delete(&name, &intent);
        }
    }

    // ---------------------------------------------------------------- start

    /// Launch QEMU for a stopped VM; returns once QEMU runs and QMP answers. `req` picks the
    /// configuration: by default the latest generation when persistence is on, else the initial.
    pub async fn start(&self, name: &str, req: &StartRequest, caller: &Caller) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Start, caller).await?;
        self.start_locked(name, &op, req, caller).await
    }

    /// Start with the lock held; the state is checked again, for a restart's second half.
    async fn start_locked(
        &self,
        name: &str,
        op: &OpGuard,
        req: &StartRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        VmAction::Start
            .check(name, info.state)
            .map_err(HostError::Conflict)?;
        let (config, started_from) = self.choose_config(slot, &info, req, caller)?;
        self.check_fits(name, &config)?;
        // A cluster member starts only where and while the cluster assigns it: a controller's
        // start with its token, and any other start (an operator's, a restart) with the token
        // of its last one, so a member re-placed elsewhere never runs here again.
        if let Some(f) = req.fence.as_ref().or(info.fence.as_ref()) {
            self.check_fence(name, f).await?;
            if req.fence.is_some() {
                // Durable before QEMU exists: a restarted droverd knows which member this is.
                self.persist(slot, |i| i.fence = Some(f.clone()))?;
            }
            // Before QEMU exists too: the fence watchdog kills it if droverd goes silent.
            crate::fence_watchdog::mark_member(&self.s.cfg.state_dir, name)
                .map_err(|e| io_ctx("marking as a cluster member", &self.vm_dir(name), e))?;
        }
        let info = self
            .launch(name, slot, config.pinned(), started_from, LaunchKind::Boot)
            .await?;
        self.publish(VmEvent::Started { info: info.clone() }).await;
        Ok(info)
    }

    /// Use `check` for the fencing tokens of cluster starts (droverd `--cluster`).
    pub fn set_fence_check(&self, check: FenceCheck) {
        *lock(&self.s.fence_check) = Some(check);
    }

    /// A controller's start of member `f` as VM `name`: only if the cluster says, right now,
    /// that the member is assigned here at exactly this token. Fails closed: without a cluster
    /// to ask, or when it does not answer, nothing starts.
    async fn check_fence(&self, name: &str, f: &drover_api::Fence) -> Result<()> {
        if f.vm_name() != name {
            return Err(HostError::Invalid(format!(
                "a fenced start of member {}/{}-{} names VM {name}; its VM is {}",
                f.service,
                f.app,
                f.index,
                f.vm_name()
            )));
        }
        let check = lock(&self.s.fence_check).clone().ok_or_else(|| {
            HostError::Conflict(format!(
                "VM {name}: a controller's start (fencing token {}) needs droverd --cluster to check it; not starting",
                f.token
            ))
        })?;
        match check(f.clone()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(HostError::Conflict(format!(
                "VM {name}: member {}/{}-{} is not assigned to this host at revision {} (re-placed or restarted since); not starting a second copy",
                f.service, f.app, f.index, f.token
            ))),
            Err(e) => Err(HostError::Conflict(format!(
                "VM {name}: cannot check member {}/{}-{}'s assignment in the cluster ({e}); not starting",
                f.service, f.app, f.index
            ))),
        }
    }

    /// Start a QEMU process for `config`, confined: as its own user ([`crate::qemu_user`]), with
    /// the descriptors `inherit` (its fd sets), seccomp (`-sandbox`: obsolete system calls,
    /// privilege changes and resource control denied) and no capabilities but those it needs —
    /// `CAP_NET_BIND_SERVICE` only for a forward an admin set below port 1024, `CAP_SYS_PTRACE`
    /// only for QEMU before 8.1 running as root (background snapshots call `userfaultfd`). `spawn` is
    /// denied too: QEMU is handed state files open, never runs a command. Refused once droverd
    /// is stopping.
    fn spawn_qemu(
        &self,
        config: &VmConfig,
        mut args: Vec<String>,
        log: &Path,
        inherit: Vec<i32>,
    ) -> Result<tokio::process::Child> {
        if self.s.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HostError::Conflict(
                "droverd is stopping and starts no QEMU; run the command again once it is back"
                    .into(),
            ));
        }
        args.extend([
            "-sandbox".to_string(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string(),
        ]);
        let mut keep = 0;
        let low_port = config.nics.iter().any(|n| match &n.backend {
            NicBackend::User { forwards } => forwards.iter().any(|f| f.host_port < 1024),
            NicBackend::Tap { .. } => false,
        });
        if low_port {
            keep |= process::CAP_NET_BIND_SERVICE;
        }
        // QEMU before 8.1 calls userfaultfd(2) for background snapshots. As root it needs
        // CAP_SYS_PTRACE for that; as its own user it never gets it (it would let an escaped
        // QEMU trace root's processes): vm.unprivileged_userfaultfd = 1 lets it instead.
        if qemu_before(&self.s.qemu_version, (8, 1)) && !self.s.qemu_user.is_dedicated() {
            keep |= process::CAP_SYS_PTRACE;
        }
        let q = &self.s.cfg.qemu;
        let confine = process::Confine {
            keep,
            run_as: self.s.qemu_user.run_as.clone(),
            inherit,
        };
        Ok(process::spawn_confined(
            &q.emulator,
            &q.env(),
            &args,
            log,
            Some(&confine),
        )?)
    }

    /// From now on no QEMU starts: droverd is stopping (SIGTERM).
    pub fn begin_shutdown(&self) {
        self.s
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.s.events.close();
    }

    /// The event feed (`GET /v1/events`).
    pub fn events(&self) -> &crate::events::Events {
        &self.s.events
    }

    /// Tell followers of the event feed a feature's news about `vm` (a save, a restore, a
    /// migration, a hibernation: nothing else reacts to those); call it once the change is
    /// durable. What the lifecycle tells goes through the VM event bus ([`Manager::publish`]),
    /// whose feed subscriber writes it here too.
    pub(crate) fn event(&self, vm: &str, kind: drover_api::EventKind, details: serde_json::Value) {
        self.s.events.emit(vm, kind, details);
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
        let incoming = matches!(kind, LaunchKind::Incoming(_));
        let none = drover_model::Plugged::default();
        let plugged = match kind {
            LaunchKind::Boot => &none,
            LaunchKind::Restore(r) => &r.plugged,
            LaunchKind::Incoming(p) => p,
        };
        for d in config.disks.iter().filter(|d| !d.owned) {
            self.s.pools.recheck(&d.path)?;
        }
        if let Boot::Kernel { kernel, initrd, .. } = &config.boot {
            for p in std::iter::once(kernel).chain(initrd.iter()) {
                self.s.pools.recheck(p)?;
            }
        }
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
        let kernel = self.qemu_boot_files(kernel, &paths.dir)?;
        if let Some(r) = restore {
            // QEMU reads the state's files (7.2 opens a private RAM mapping read-write).
            self.grant_qemu(&r.devices, false)?;
            if let Some(m) = &r.memory {
                self.grant_qemu(m, true)?;
            }
        }
        // Configs name disks by origin; QEMU opens each disk's current layer (never a pinned one).
        let on_layers = self
            .open_layers(
                name,
                slot,
                &config,
                restore.and_then(|r| {
                    r.layers.as_ref().map(|layers| layers::RestoreLayers {
                        state: &r.state,
                        layers,
                    })
                }),
            )
            .await?;
        let disks = self.prepare_qemu_launch(name, &paths, &console, &on_layers)?;
        let args = self.qemu_args(
            name,
            &on_layers,
            kernel,
            accel,
            &paths,
            &console,
            &disks,
            QemuMode {
                incoming: restore.is_some() || incoming,
                stopped: incoming,
                // A fast state's memory is mapped privately: the guest runs on the saved pages
                // at once, and its writes never reach the state.
                ram_private: restore.and_then(|r| r.memory.as_deref()),
                detached: false,
                plugged,
            },
        )?;
        // Everything re-adoption needs is durable before QEMU exists: a droverd killed from here
        // on finds the config the QEMU runs (or no QEMU at all).
        self.persist(slot, |i| {
            i.state = VmState::Starting;
            i.pid = None;
            i.accel = Some(accel);
            i.running_config = Some(config.clone());
            i.started_from = Some(started_from.clone());
        })?;
        let started = Instant::now();
        let spawned = self.spawn_qemu(&config, args, &paths.qemu_log, disks.inherit());
        // QEMU has its own copies of the descriptors now.
        drop(disks);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.persist(slot, |i| {
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(e.to_string())));
                })?;
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        crate::crashpoint::hit("start-spawned");
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
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(HostError::Internal(format!(
                    "QEMU could not start VM {name}: {detail}"
                )));
            }
        };
        if let Some(r) = restore {
            crate::crashpoint::hit("restore-loading");
            // The state's checksum is checked while QEMU reads it: the file is read at the
            // pace of the slower of the two, not twice in a row, and the guest runs only once
            // both are done.
            let check = r.verify.clone().map(|state| {
                let (devices, hashes) = (r.devices.clone(), self.s.hashes.clone());
                tokio::task::spawn_blocking(move || hashes.check_devices(&state, &devices))
            });
            let loaded = async {
                if r.mapped_ram {
                    drover_qemu::migrate::load_state_mapped(&qmp, &r.devices).await
                } else {
                    drover_qemu::migrate::load_state(&qmp, &r.devices, r.memory.is_some()).await
                }
            }
            .await;
            let checked = match check {
                None => Ok(()),
                Some(c) => c.await.unwrap_or_else(|e| {
                    Err(HostError::Internal(format!(
                        "checking the state failed: {e}"
                    )))
                }),
            };
            let failed: Option<HostError> = match (loaded, checked) {
                (Ok(()), Ok(())) => qmp.execute("cont", None).await.err().map(HostError::from),
                (Err(e), _) => Some(e.into()),
                (Ok(()), Err(e)) => Some(e),
            };
            if let Some(e) = failed {
                let _ = qmp.execute("quit", None).await;
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let detail = format!(
                    "loading the saved state failed: {e}; {}",
                    log_tail(&paths.qemu_log)
                );
                self.persist(slot, |i| {
                    not_started(i);
                    i.last_exit = Some(exit("start-failed", Some(detail.clone())));
                })?;
                return Err(match e {
                    // A damaged state says so, as it did before anything started.
                    HostError::Invalid(m) => HostError::Invalid(m),
                    _ => HostError::Internal(format!("VM {name}: {detail}")),
                });
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
            // Running again (a resume, or a restore of any state): no longer hibernated.
            i.hibernation = None;
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
        disks: &qemu_files::QemuDisks,
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
            disk_chains: &disks.chains,
            fds: &disks.args(),
            plugged: mode.plugged,
        }))
    }

    /// Start this host's QEMU with `args`, its output going to `log`.
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
            exited: exited_rx.clone(),
            stop_reason: Arc::default(),
        };
        *lock(&slot.rt) = Some(rt.clone());
        tokio::spawn(watch_agent_presence(
            rt.qmp.clone(),
            rt.agent.clone(),
            exited_rx.clone(),
        ));
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
                // QEMU stops the guest itself when a disk write fails with werror=stop or
                // enospc (the default): show that, not `running`.
                "BLOCK_IO_ERROR"
                    if ev.data.get("action").and_then(|a| a.as_str()) == Some("stop") =>
                {
                    let why = io_error_pause(name, Some(&ev.data));
                    tracing::warn!(vm = name, "{why}");
                    let _ = self.commit_or_defer(slot, |i| {
                        if i.state == VmState::Running {
                            i.state = VmState::Paused;
                            i.paused_reason = Some(why);
                        }
                        Ok(Vec::new())
                    });
                }
                "RESUME" if lock(&slot.info).state == VmState::Paused => {
                    tracing::info!(vm = name, "QEMU resumed the guest");
                    let _ = self.commit_or_defer(slot, |i| {
                        if i.state == VmState::Paused {
                            i.state = VmState::Running;
                            i.paused_reason = None;
                        }
                        Ok(Vec::new())
                    });
                }
                "VSERPORT_CHANGE"
                    if ev.data.get("id").and_then(|i| i.as_str())
                        == Some(cmdline::PORT_A_DEVICE)
                        && ev.data.get("open").and_then(|o| o.as_bool()) == Some(true) =>
                {
                    let agent = lock(&slot.rt).as_ref().map(|rt| rt.agent.clone());
                    if let Some(agent) = agent {
                        agent.note_guest_opened();
                    }
                }
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
        qemu_files::free_ram_file(&paths.ram);
        self.publish(VmEvent::QemuGone { vm: name.into() }).await;
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
        if let Err(e) = &recorded {
            tracing::error!(vm = name, "could not record the stop: {e}");
        }
        self.publish(VmEvent::Exited {
            vm: name.into(),
            exit: exit_info,
            recorded: recorded.is_ok(),
        })
        .await;
    }

    /// Record a stop and, with persistence on, seal the config the VM ran with (live changes and
    /// next-boot changes included) as a new generation, in one transaction.
    fn record_stopped(&self, slot: &Arc<VmSlot>, exit_info: ExitInfo) -> Result<VmInfo> {
        let mut sealed = None;
        let info = self.commit_or_defer(slot, |i| {
            let mut writes = Vec::new();
            let ran = i.next_config.take().or_else(|| i.running_config.take());
            if let (true, Some(cfg)) = (i.persist, ran) {
                let mut history = self.history(i)?;
                let why = format!("sealed at shutdown ({})", exit_info.reason);
                if let Some(gen) = history.seal(
                    &cfg.pinned(),
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
            i.paused_reason = None;
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
        let composing = !(req.without.is_empty()
            && req.with.is_empty()
            && req.cpus.is_none()
            && req.memory.is_none());
        if !composing {
            if req.save_as_generation {
                return Err(HostError::Invalid(
                    "storing a composed config as a generation needs something composed: elements left out or taken from other generations, or cpus or memory set".into(),
                ));
            }
            return Ok((base, from));
        }
        let without = req.without.clone();
        let mut with = Vec::new();
        for w in &req.with {
            let element = history.element(w.generation, &w.element)?;
            with.push((
                format!("generation {}", w.generation),
                w.element.clone(),
                element,
            ));
        }
        let (set_cpus, set_memory) = (req.cpus, req.memory);
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
            let layer = self.current_layer(name, d)?;
            if !layer.exists() {
                return Err(HostError::Invalid(format!(
                    "disk {} of VM {name} is missing: {} does not exist",
                    d.id,
                    layer.display()
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
                    let found = {
                        let i = lock(&slot.info);
                        adopt::Found {
                            migrating: i
                                .migration
                                .as_ref()
                                .is_some_and(|m| m.phase != drover_api::MigrationPhase::Committed),
                            has_config: i.running_config.is_some(),
                        }
                    };
                    // No one waits on its events before it is attached.
                    let vmm = crate::vmm::QemuVmm::new(qmp.clone(), broadcast::channel(1).0);
                    let status = match adopt::settle(name, &vmm, found).await {
                        adopt::Settled::Adopt { status } => status,
                        adopt::Settled::CutOff(why) => {
                            let deadline = Instant::now() + Duration::from_secs(5);
                            while process::is_alive(pid, &marker) && Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if process::is_alive(pid, &marker) {
                                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                            }
                            let _ = std::fs::remove_file(&paths.ram);
                            self.record_stopped(
                                slot,
                                exit(
                                    "start-interrupted",
                                    Some(format!("{why}; its QEMU was stopped: start it again")),
                                ),
                            )?;
                            self.publish(VmEvent::Readopted {
                                vm: name.into(),
                                outcome: Adoption::StartCutOff,
                            })
                            .await;
                            return Ok(());
                        }
                    };
                    let io_error = status.as_deref() == Some("io-error");
                    self.commit_or_defer(slot, |i| {
                        // One still arriving by migration does not run until it is committed.
                        let arriving = i.migration.as_ref().is_some_and(|m| {
                            m.role == drover_api::MigrationRole::Incoming
                                && m.phase != drover_api::MigrationPhase::Committed
                        });
                        i.state = adopt::adopted_state(arriving, status.as_deref());
                        i.paused_reason = io_error.then(|| io_error_pause(name, None));
                        i.pid = Some(pid);
                        Ok(Vec::new())
                    })?;
                    let launched = {
                        let i = lock(&slot.info);
                        i.running_config.clone().unwrap_or_else(|| i.config.clone())
                    };
                    let (nodes, files) = block_nodes(&qmp).await;
                    if let Err(e) = self.reconcile_layers(name, slot, &launched, &files) {
                        tracing::warn!(vm = name, "cannot check the disks' layers: {e}");
                    }
                    adopt::resume_if_left_paused(name, &vmm, found, status.as_deref()).await;
                    self.attach(name, slot, qmp, events, None, pid, Instant::now(), launched);
                    if let Some(rt) = self.runtime(slot) {
                        *lock(&rt.nodes) = nodes;
                    }
                    tracing::info!(vm = name, pid, "re-adopted running VM");
                    self.publish(VmEvent::Readopted {
                        vm: name.into(),
                        outcome: Adoption::Running,
                    })
                    .await;
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
        self.publish(VmEvent::Readopted {
            vm: name.into(),
            outcome: Adoption::ExitedWhileDown,
        })
        .await;
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
    pub async fn stop(
        &self,
        name: &str,
        timeout_s: u64,
        force: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Stop, caller).await?;
        self.stop_locked(name, &op, timeout_s, force).await
    }

    /// Stop with the lock held; the state is checked again, as the VM may have exited since
    /// the caller's own check (a hibernate's save, a restore's replacement).
    async fn stop_locked(
        &self,
        name: &str,
        op: &OpGuard,
        timeout_s: u64,
        force: bool,
    ) -> Result<VmInfo> {
        let slot = op.slot();
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
        let before = lock(&slot.info).state;
        // Deferred rather than refused when the store cannot write (a full disk is when a paused
        // VM most needs stopping); the stop's outcome is recorded the same way.
        self.commit_or_defer(slot, |i| {
            i.state = VmState::Stopping;
            Ok(Vec::new())
        })?;
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
            // Back to what it was even if the store refuses the write: never `stopping` forever.
            self.commit_or_defer(slot, |i| {
                i.state = before;
                Ok(Vec::new())
            })?;
            return Err(HostError::Timeout(format!(
                "VM {name} did not stop even after SIGKILL"
            )));
        }
        Ok(self.view(slot))
    }

    /// Stop, then start again.
    pub async fn restart(
        &self,
        name: &str,
        timeout_s: u64,
        force: bool,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Restart, caller).await?;
        self.stop_locked(name, &op, timeout_s, force).await?;
        self.start_locked(name, &op, &StartRequest::default(), &Caller::daemon())
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
                LinkError::NoAgent(why) => HostError::Agent(format!(
                    "VM {name} runs but shows no guest agent: {why}. Install drover-agent in the guest, or see `drover vm console {name}`; exec, guest saves and scans need it"
                )),
                other => HostError::Agent(format!("VM {name}: {other}")),
            }),
            _ = exited.wait_for(|e| *e) => {
                let why = lock(&slot.info).last_exit.clone().map(|e| format!("{}: {}", e.reason, e.detail.unwrap_or_default())).unwrap_or_default();
                Err(HostError::Conflict(format!("VM {name} stopped while waiting for its agent ({why})")))
            }
        }
    }

    /// The agent of running VM `name`, once ready: right after a start or restore it may be
    /// seconds away, so wait a little for it. `what` names the feature for the error.
    async fn ready_agent(&self, name: &str, slot: &Arc<VmSlot>, what: &str) -> Result<AgentLink> {
        let Some(rt) = self.runtime(slot) else {
            return Err(HostError::Conflict(format!("VM {name} is not running")));
        };
        if !rt.agent.status().ready {
            match rt.agent.wait_ready(Duration::from_secs(10)).await {
                Ok(_) => {}
                Err(LinkError::NoAgent(why)) => {
                    return Err(HostError::Agent(format!(
                        "VM {name} shows no guest agent ({why}); {what} needs drover-agent in the guest"
                    )))
                }
                Err(_) => {
                    return Err(HostError::Agent(format!(
                        "the agent in VM {name} is not ready yet; wait with `drover vm start {name} --wait` or see `drover vm console {name}`"
                    )))
                }
            }
        }
        Ok(rt.agent.clone())
    }

    /// Run a command in the guest.
    pub async fn exec(
        &self,
        name: &str,
        req: drover_api::ExecRequest,
        caller: &Caller,
    ) -> Result<drover_proto::ExecResult> {
        let slot = self.look(name, VmAction::Exec, caller)?;
        if req.argv.is_empty() {
            return Err(HostError::Invalid("exec needs a command".into()));
        }
        if req.timeout_s == 0 || req.timeout_s > 24 * 3600 {
            return Err(HostError::Invalid(
                "exec timeout must be between 1 s and 24 h".into(),
            ));
        }
        let agent = self.ready_agent(name, &slot, "exec").await?;
        let body = drover_proto::Body::Exec(drover_proto::ExecRequest {
            argv: req.argv,
            stdin: req.stdin,
            timeout_ms: req.timeout_s * 1000,
        });
        // Validate locally what the agent would refuse, for a clear error.
        drover_proto::encode(&drover_proto::Frame::new(0, body.clone()))
            .map_err(|e| HostError::Invalid(e.to_string()))?;
        match agent
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

    /// A place for one more console WebSocket, held while it is open; `None` when
    /// [`CONSOLE_SOCKETS_MAX`] are open.
    pub fn console_socket(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.s.console_sockets.clone().try_acquire_owned().ok()
    }

    /// Type `bytes` into the VM's serial console (its guest reads them as serial input).
    ///
    /// The caller's right to type was checked once for the whole console session.
    pub async fn console_input(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.look(name, VmAction::ConsoleInput, &Caller::daemon())?;
        self.s
            .console_inputs
            .send(&self.run_paths(name).console, bytes)
            .await
            .map_err(|e| HostError::Conflict(format!("VM {name}: {e}")))
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
        // Past the end: the log was rotated since the caller's last read; start over.
        let start = if offset > len { 0 } else { offset };
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

    /// What an image build takes from this daemon's configuration.
    fn image_spec(&self, force: bool) -> Result<drover_image::ImageSpec> {
        Ok(drover_image::ImageSpec {
            cache_dir: self.s.cfg.image_dir.clone(),
            agent_binary: self.agent_binary()?,
            kernel_package: None,
            force,
        })
    }

    /// The current image of a distribution (`debian-12`), if built.
    pub fn current_distro_image(&self, distro: &str) -> Result<Option<ImageInfo>> {
        check_distro(distro)?;
        let loaded = drover_image::debian::load(&self.s.cfg.image_dir)
            .map_err(|e| HostError::ImageMissing(e.to_string()))?;
        Ok(loaded.map(|b| ImageInfo {
            image: self.image_get(distro).ok(),
            ..distro_image_info(b)
        }))
    }

    /// Build (or reuse) a distribution image (`debian-12`): debootstrap, the agent's package.
    pub async fn build_distro_image(
        &self,
        distro: &str,
        force: bool,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<ImageInfo> {
        check_distro(distro)?;
        let _guard = self.s.image_lock.lock().await;
        let spec = self.image_spec(force)?;
        let built = tokio::task::spawn_blocking(move || {
            drover_image::debian::build(&spec, &mut |p| progress(crate::image_progress(&p)))
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::ImageMissing(format!("{distro} image build failed: {e}")))?;
        // Imported under the distribution's name, so `vm create --from-image debian-12` works.
        let boot = drover_api::ImageBoot {
            kernel: built.kernel.clone(),
            initrd: built.initrd.clone(),
            cmdline: built.manifest.cmdline.clone(),
        };
        let (image, note) = self
            .import_built(distro, &built.disk, &boot, &built.manifest.key)
            .await?;
        let mut info = distro_image_info(built);
        info.image = Some(image);
        info.note = note;
        Ok(info)
    }

    /// Build (or reuse, when inputs are unchanged) the default guest image.
    pub async fn build_image(
        &self,
        force: bool,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<ImageInfo> {
        let _guard = self.s.image_lock.lock().await;
        let spec = self.image_spec(force)?;
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
        disk: None,
        cmdline: None,
        image: None,
        note: None,
    }
}

fn distro_image_info(b: drover_image::debian::DebianImage) -> ImageInfo {
    ImageInfo {
        dir: b.dir.display().to_string(),
        kernel: b.kernel.display().to_string(),
        initrd: b.initrd.display().to_string(),
        disk: Some(b.disk.display().to_string()),
        cmdline: Some(b.manifest.cmdline.clone()),
        manifest: serde_json::to_value(&b.manifest).unwrap_or_default(),
        image: None,
        note: None,
    }
}

/// The one distribution Drover builds images of, or an error naming it.
fn check_distro(distro: &str) -> Result<()> {
    if distro == drover_image::debian::DISTRO {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "unknown distribution {distro:?}; Drover builds `{}`",
            drover_image::debian::DISTRO
        )))
    }
}

/// The VM QEMUs (not helpers) running from `state_dir`, by VM name: what a missing or empty
/// store must not forget.
pub fn running_vm_qemus(state_dir: &Path) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (pid, rest) in process::with_path_under(&state_dir.join("run")) {
        let mut parts = rest.splitn(2, '/');
        if let (Some(vm), Some(file)) = (parts.next(), parts.next()) {
            if !file.starts_with("cap-") && !vm.is_empty() {
                let pids = out.entry(vm.to_string()).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    out
}

/// Back to stopped after a launch that never ran the guest (nothing to seal).
fn not_started(i: &mut VmInfo) {
    // A resume that fails leaves the VM hibernated: its state is still there to resume from.
    i.state = if i.hibernation.is_some() {
        VmState::Hibernated
    } else {
        VmState::Stopped
    };
    i.pid = None;
    i.accel = None;
    i.running_config = None;
    i.started_from = None;
}

fn exit(reason: &str, detail: Option<String>) -> ExitInfo {
    ExitInfo {
        at_ms: hostfacts::now_ms(),
        reason: reason.to_string(),
        detail,
    }
}

/// Which block node each Drover disk device writes to (after saves, no longer `disk-<id>`).
/// What a running QEMU's disks (by Drover disk id) are now: their top block node, and the
/// file of that node's image (only plain absolute paths; QEMU's `json:` names are left out).
async fn block_nodes(
    qmp: &Qmp,
) -> (
    std::collections::HashMap<String, String>,
    std::collections::HashMap<String, PathBuf>,
) {
    let mut nodes = std::collections::HashMap::new();
    let mut files = std::collections::HashMap::new();
    if let Ok(serde_json::Value::Array(list)) = qmp.execute("query-block", None).await {
        for b in list {
            let qdev = b.get("qdev").and_then(|q| q.as_str()).unwrap_or_default();
            let Some(id) = qdev.split('/').find_map(|part| part.strip_prefix("disk-")) else {
                continue;
            };
            let inserted = b.get("inserted");
            if let Some(node) = inserted
                .and_then(|i| i.get("node-name"))
                .and_then(|n| n.as_str())
            {
                nodes.insert(id.to_string(), node.to_string());
            }
            let file = inserted
                .and_then(|i| i.get("image"))
                .and_then(|i| i.get("filename"))
                .or_else(|| inserted.and_then(|i| i.get("file")))
                .and_then(|f| f.as_str())
                .map(PathBuf::from)
                .filter(|p| p.is_absolute());
            if let Some(f) = file {
                files.insert(id.to_string(), f);
            }
        }
    }
    (nodes, files)
}

/// Why a VM shows `paused` when QEMU stopped it after a failed disk write (`detail`: what
/// QEMU's `BLOCK_IO_ERROR` said).
fn io_error_pause(vm: &str, detail: Option<&serde_json::Value>) -> String {
    let what = detail
        .map(|d| {
            let dev = d
                .get("device")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .or_else(|| d.get("node-name").and_then(|v| v.as_str()))
                .unwrap_or("a disk");
            let why = if d.get("nospace").and_then(|v| v.as_bool()) == Some(true) {
                "no space left on device".to_string()
            } else {
                d.get("reason")
                    .and_then(|v| v.as_str())
                    .unwrap_or("I/O error")
                    .to_string()
            };
            format!("writing {dev} failed: {why}")
        })
        .unwrap_or_else(|| "a disk write failed".into());
    format!(
        "QEMU paused the guest: {what}; free space on the disks' filesystem, then `drover vm restart {vm}`"
    )
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

/// Follow, once a second until the agent answers or QEMU exits, whether the guest shows an
/// agent: when the guest's virtio-serial driver came up (QEMU's `x-query-virtio-status`; a
/// QEMU without it leaves only the time since start) and, through
/// [`AgentLink::judge_presence`], whether anything opened the request port since.
async fn watch_agent_presence(qmp: Qmp, agent: AgentLink, mut exited: watch::Receiver<bool>) {
    let mut driver_since: Option<Instant> = None;
    let mut can_query = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = exited.wait_for(|e| *e) => return,
        }
        if agent.status().ready {
            return;
        }
        if driver_since.is_none() && can_query {
            let args = serde_json::json!({"path": cmdline::VSER_VIRTIO_PATH});
            match qmp.execute("x-query-virtio-status", Some(args)).await {
                // Decoded status bits name `DRIVER_OK` once the guest driver is set up.
                Ok(v) if v.to_string().contains("DRIVER_OK") => driver_since = Some(Instant::now()),
                Ok(_) => {}
                Err(_) => can_query = false,
            }
        }
        agent.judge_presence(driver_since.map(|t| t.elapsed()));
    }
}

#[cfg(test)]
mod crash_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A store that refuses every write while `full` is set, like one on a full disk.
    struct Fillable {
        inner: drover_store::RedbStore,
        full: Arc<AtomicBool>,
    }

    impl Store for Fillable {
        fn get_raw(
            &self,
            t: &str,
            k: &str,
        ) -> std::result::Result<Option<Vec<u8>>, drover_store::StoreError> {
            self.inner.get_raw(t, k)
        }
        fn list_raw(
            &self,
            t: &str,
        ) -> std::result::Result<Vec<(String, Vec<u8>)>, drover_store::StoreError> {
            self.inner.list_raw(t)
        }
        fn apply(&self, w: Vec<Write>) -> std::result::Result<(), drover_store::StoreError> {
            if self.full.load(Ordering::SeqCst) {
                return Err(drover_store::StoreError::Op {
                    op: "write",
                    table: "vms".into(),
                    key: String::new(),
                    message: "No space left on device (os error 28)".into(),
                });
            }
            self.inner.apply(w)
        }
    }

    pub(super) fn cfg(dir: &Path) -> DaemonConfig {
        DaemonConfig {
            state_dir: dir.join("state"),
            image_dir: dir.join("images"),
            agent_binary: None,
            qemu: drover_qemu::install::QemuInstall::system(),
            accel: Some(Accel::Tcg),
            persist_default: true,
            persist_mode_default: PersistMode::Diff,
            identity: hostfacts::host_identity(Some("host-t"), &dir.join("no-dmi")),
            migration_addr: None,
            pools: Vec::new(),
            limits: crate::limits::Limits::default(),
            qemu_user: crate::qemu_user::QemuUser::droverd(),
        }
    }

    async fn manager(dir: &Path, full: Arc<AtomicBool>) -> Manager {
        let inner = drover_store::RedbStore::open(&dir.join("d.redb")).unwrap();
        Manager::open(cfg(dir), Box::new(Fillable { inner, full }))
            .await
            .unwrap()
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec::from_toml(&format!(
            "name = \"{name}\"\nmemory = \"64M\"\n[[disk]]\nid = \"d\"\nsize = \"8M\""
        ))
        .unwrap()
    }

    /// A change that already happened is shown at once when the store refuses it, and written
    /// by itself once the store takes writes again; a change meanwhile fails cleanly.
    #[tokio::test]
    async fn refused_records_are_kept_and_written_once_the_store_works() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let m = manager(dir.path(), full.clone()).await;
        m.create(spec("v"), &Caller::daemon()).await.unwrap();
        let slot = m.slot("v").unwrap();
        m.persist(&slot, |i| i.state = VmState::Stopping).unwrap();
        full.store(true, Ordering::SeqCst);
        m.record_stopped(&slot, exit("operator-stop", None))
            .unwrap();
        assert_eq!(m.get("v").unwrap().state, VmState::Stopped, "shown at once");
        let stored: VmRecord = m.s.store.get(VMS, "v").unwrap().unwrap();
        assert_eq!(stored.state, VmState::Stopping, "not on disk yet");
        assert!(m.persist(&slot, |i| i.persist = false).is_err());
        full.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stored: VmRecord = m.s.store.get(VMS, "v").unwrap().unwrap();
            if stored.state == VmState::Stopped {
                assert_eq!(stored.last_exit.unwrap().reason, "operator-stop");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the refused record was never written"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A delete recorded but cut off before its files went is finished at the next open.
    #[tokio::test]
    async fn an_interrupted_delete_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let m = manager(dir.path(), full.clone()).await;
        let info = m.create(spec("gone"), &Caller::daemon()).await.unwrap();
        let disk = info.config.disks[0].path.clone();
        assert!(disk.exists());
        // What delete's one transaction leaves when droverd dies right after it.
        let mut writes: Vec<Write> = m
            .vm_rows("gone")
            .unwrap()
            .into_iter()
            .map(|(table, key, _)| Write::Delete { table, key })
            .collect();
        writes.push(
            drover_store::put(
                DELETING,
                "gone",
                &DeleteIntent {
                    owned_disks: vec![disk.clone()],
                },
            )
            .unwrap(),
        );
        m.s.store.apply(writes).unwrap();
        std::fs::create_dir_all(m.run_paths("gone").dir).unwrap();
        std::fs::create_dir_all(m.ram_dir()).unwrap();
        std::fs::write(m.ram_dir().join("gone@s1"), b"ram").unwrap();
        drop(m);
        let m = manager(dir.path(), full).await;
        assert!(m.list().is_empty());
        assert!(!disk.exists(), "owned disk removed");
        assert!(!m.vm_dir("gone").exists() && !m.run_paths("gone").dir.exists());
        assert!(!m.ram_dir().join("gone@s1").exists());
        assert!(m.s.store.list_raw(DELETING).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(m.ram_dir());
    }
}
