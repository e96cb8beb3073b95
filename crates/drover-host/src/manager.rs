//! The VM manager: records, lifecycle, supervision and re-adoption.
//!
//! Rules it keeps:
//! - A VM's record is written to the store before any answer reports the change.
//! - One lifecycle operation runs at a time per VM (`VmSlot::op`); reads never wait on it.
//! - QEMU outlives droverd. At open, every VM recorded as not stopped is re-adopted from its pid
//!   file and QMP socket, or marked stopped with the reason when its QEMU is gone.
//! - The QMP connection ending is the authoritative "QEMU exited" signal; the supervisor then
//!   waits for the process itself to go (so disks are unlocked) and records why it ended.

//!
//! Where each part lives (one file each under `manager/`; `manager.rs` keeps the shared types,
//! opening the store and the read-only views):
//! - the lifecycle: `lifecycle.rs` (create, start, stop, restart, delete; which config boots and
//!   whether it fits), `launch.rs` (a QEMU's process, command line, QMP and agent link),
//!   `supervise.rs` (waiting for QEMU to end and recording why), `adopt.rs` (re-adoption after
//!   a restart), `persist.rs` (records written before answers, the journal), `door.rs` (the one
//!   door: permission, state and the operation lock as an `OpGuard`), `registry.rs` (each
//!   feature's VM-event subscriber and store tables), `helpers.rs` (helper QEMUs and their pids);
//! - saved states: `state.rs` (save, restore, delete, the receiver kept on standby),
//!   `hibernate.rs`, `clone.rs`, `check.rs` (does a state fit a target), `layers.rs` (disk layer
//!   chains that states pin);
//! - live migration to another host: `migrate.rs`;
//! - persistent runtime configuration: `live.rs` (live changes through the `Vmm` seam, config
//!   generations);
//! - the guest: `guest.rs` (the broker: port A requests, principals, rate buckets), `agent.rs`
//!   (waiting for the agent, exec), `files.rs` (`vm cp`), `identity.rs` (host facts, generation
//!   id, identity updates), `console.rs` (serial logs and input);
//! - images: `guest_image.rs` (the images droverd builds), `images.rs` (imported disk images),
//!   `seed.rs` (NoCloud seeds);
//! - storage: `records.rs` (storage records apart from wire types), `upgrade.rs` (record
//!   migrations at open), `qemu_files.rs` (what QEMU's own user is given);
//! - `crash_tests.rs`: a store that refuses writes, a delete cut off.
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
mod agent;
mod check;
mod files;
pub use files::{FileRead, MAX_FILE_REQUEST};
mod clone;
mod console;
#[cfg(test)]
mod crash_tests;
mod door;
use door::OpGuard;
mod guest;
mod guest_image;
mod helpers;
mod hibernate;
mod identity;
mod images;
mod launch;
mod layers;
mod lifecycle;
mod live;
mod migrate;
mod persist;
mod qemu_files;
mod records;
mod registry;
use registry::VmTable;
mod seed;
mod state;
mod supervise;
use launch::block_nodes;
use lifecycle::not_started;
use supervise::{exit, io_error_pause, log_tail, watch_agent_presence};
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

/// The QEMU probe's directory under `run/` (the start-up sweep kills a killed droverd's probe
/// QEMU by it).
const PROBE_DIR: &str = ".probe";

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
    /// How long after its virtio-serial driver came up a guest may take to open the agent's
    /// port before the VM is shown as having no agent ([`crate::agent_link::no_agent_seen`]).
    pub no_agent_after: Duration,
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
    /// True once QEMU is reaped: its files, and the locks on its disk images, are free.
    exited: watch::Receiver<bool>,
    /// True once its stop is recorded and the VM may run a new QEMU; the old one may still be
    /// exiting (see `supervise`).
    recorded: watch::Receiver<bool>,
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

    /// This QEMU as the backend seam's [`crate::vmm::Vmm`], with the daemon's copy of its events.
    fn vmm(&self) -> crate::vmm::QemuVmm {
        crate::vmm::QemuVmm::new(self.qmp.clone(), self.events.clone())
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
            recorded: self.recorded.clone(),
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

impl DaemonConfig {
    /// Settings for unit tests: a fresh state dir under `dir`, TCG, no pools, default limits.
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &Path) -> DaemonConfig {
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
            no_agent_after: crate::agent_link::NO_AGENT_AFTER_DRIVER,
        }
    }
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
            &cfg.state_dir.join("run").join(PROBE_DIR),
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

    /// A manager on a fresh state dir under `dir` (TCG, no pools), for unit tests.
    #[cfg(test)]
    pub(crate) async fn for_tests(dir: &Path, limits: crate::limits::Limits) -> Manager {
        let cfg = DaemonConfig {
            limits,
            ..DaemonConfig::for_tests(dir)
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

    fn runtime(&self, slot: &Arc<VmSlot>) -> Option<Runtime> {
        lock(&slot.rt).clone()
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
