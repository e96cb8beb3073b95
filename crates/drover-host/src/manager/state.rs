//! Saved VM states: device state + memory + pinned disk layers + the config the VM ran with.
//!
//! Fast path (PLATFORM.md): guest RAM lives in a shared file, so a save is: pause, put a fresh
//! qcow2 overlay on every disk (the old layer is now the state's, read-only), then take the
//! memory one of two ways ([`Capture`]):
//! - **copy**: write the device state with `x-ignore-shared` (milliseconds) and copy the RAM
//!   file in the kernel on several threads while the guest stays paused; the state is
//!   restorable when the save answers. The pause grows with the memory the guest touched.
//! - **stream**: a background snapshot into a second QEMU waiting with the state's RAM file as
//!   its memory; the guest runs on after ~0.1 s at any size, the state is restorable once the
//!   stream is done (about 3x slower than a copy here). The only way for a guest running on a
//!   restored state's memory (mapped privately: its memory is not a file to copy).
//!
//! `auto` copies when the copy fits [`COPY_PAUSE_BUDGET_MS`] at the rate this host measured.
//! A restore starts QEMU with the state's RAM copy mapped privately and new overlays on the
//! pinned layers, and loads the device state (`-incoming defer`).

use super::records::StateRecord;
use super::{lock, LaunchKind, Manager, OpGuard, QemuMode, RestoreSpec, VmSlot};
use crate::action::VmAction;
use crate::auth::Caller;
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use crate::vm_events::{Reaction, Subscriber, VmEvent};
use drover_api::{
    Capture, GuestSaveNote, StateInfo, StatePhase, StateSection, VmInfo, VmState, STATE_FORMAT,
};
use drover_model::DiskFormat;
use drover_qemu::cmdline::RunPaths;
use drover_qemu::qmp::Qmp;
use drover_qemu::{hotplug, img, migrate, process};
use drover_store::StoreExt;
use futures_util::FutureExt as _;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod capture;

pub(super) const STATES: &str = "states";

/// The number of the last state id issued per VM (`s<N>`), so a deleted state's id is never
/// issued again: work still under way for it (a write-out, a RAM file) must not meet a new
/// state of the same name.
const STATE_IDS: &str = "state_ids";

/// Saved states' per-VM tables.
pub(super) const TABLES: &[super::VmTable] = &[
    super::VmTable::by_prefix(STATES),
    super::VmTable::by_name(STATE_IDS),
];

/// The next state number: above every existing state's, above the last one issued (`issued`),
/// and not one `taken` says is still in use elsewhere.
fn next_state_number<'a>(
    existing: impl Iterator<Item = &'a str>,
    issued: u64,
    taken: impl Fn(u64) -> bool,
) -> u64 {
    let mut n = existing
        .filter_map(|id| id.strip_prefix('s')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        .max(issued)
        + 1;
    while taken(n) {
        n += 1;
    }
    n
}

/// Saved states' part in the VM events: the receiver kept ready for a VM's next save goes with
/// its QEMU, before the stop is recorded (so a next start never finds one of the old QEMU).
pub(super) const SUBSCRIBER: Subscriber<Manager> = Subscriber::new("saved states", on_vm_event);

fn on_vm_event<'a>(m: &'a Manager, ev: &'a VmEvent) -> Reaction<'a> {
    async move {
        if let VmEvent::QemuGone { vm } = ev {
            if let Ok(slot) = m.slot(vm) {
                m.drop_standby(&slot).await;
            }
        }
        Ok(())
    }
    .boxed()
}

/// How many of a VM's newest states keep a copy of their memory in RAM for instant restores.
const STATES_IN_RAM: usize = 2;

/// What a copy of guest memory is assumed to run at before this host has measured one (tmpfs
/// to tmpfs copied 2.0-2.7 GB/s on the 2-core test machines).
pub(super) const INITIAL_COPY_RATE: u64 = 2_000_000_000;

/// `auto` copies a guest's memory (pausing it meanwhile) when that takes at most this long.
pub const COPY_PAUSE_BUDGET_MS: u64 = 1000;

/// A copying save's RAM file while it is written (swept at start).
const COPYING_SUFFIX: &str = ".copying";

/// How a fast save takes the guest's memory: as asked, or for `auto` a copy when the guest's
/// memory is a shared file (`shared`) whose `touched` bytes copy within the budget at `rate`
/// bytes per second. `Err` says why a copy that was asked for cannot be made.
pub(super) fn choose_capture(
    asked: Capture,
    shared: Option<bool>,
    touched: u64,
    rate: u64,
) -> std::result::Result<Capture, String> {
    let fits = copy_fits(touched, rate);
    match (asked, shared) {
        (Capture::Stream, _) => Ok(Capture::Stream),
        (Capture::Copy, Some(true)) => Ok(Capture::Copy),
        (Capture::Copy, Some(false)) => Err(
            "it runs on a restored state's memory, mapped privately, which only a stream can take (use --capture stream or auto)".into(),
        ),
        (Capture::Copy, None) => Err("its QEMU's memory file was not found".into()),
        (Capture::Auto, Some(true)) if fits => Ok(Capture::Copy),
        (Capture::Auto, _) => Ok(Capture::Stream),
    }
}

/// Whether `touched` bytes copy within the pause budget at `rate` bytes per second.
fn copy_fits(touched: u64, rate: u64) -> bool {
    touched.saturating_mul(1000) / rate.max(1) <= COPY_PAUSE_BUDGET_MS
}

/// How much of a guest's memory the rate probe copies (32 ms at 2 GB/s).
const PROBE_BYTES: u64 = 64 << 20;

/// The rate probe's scratch file (swept at start).
const PROBE_SUFFIX: &str = ".rate-probe";

/// Whether `auto` measures the copy rate before it decides: when a copy fits the budget at the
/// rate learned from the last copy but would not at a quarter of it (a host busy now), so a
/// small guest saves without the probe and a large one streams without it.
fn needs_probe(touched: u64, learned: u64) -> bool {
    copy_fits(touched, learned) && !copy_fits(touched, learned / 4)
}

/// The block node of disk `disk`'s overlay made by the save of state `id`.
fn layer_node(disk: &str, id: &str) -> String {
    format!("disk-{disk}-{id}")
}

/// How a save writes the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SaveHow {
    /// In QEMU's migration stream, into the state's file (hibernation, `--classic`).
    Classic,
    /// A RAM copy kept for instant restores, taken as [`Capture`] says.
    Fast(Capture),
}

/// Threads for a memory copy (the guest's vCPUs are paused meanwhile).
fn copy_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The QEMU that receives a fast save's memory stream.
pub(super) struct Receiver {
    qmp: Qmp,
    /// `None` for one adopted from an earlier droverd (not our child).
    child: Option<tokio::process::Child>,
    pid: u32,
    paths: RunPaths,
    /// Where it listens for the stream.
    uri: String,
    /// Its durable record (see `helpers`): VM and key, dropped once it has exited.
    record: (Manager, String, String),
}

impl Receiver {
    /// Stop it and drop what it received.
    async fn discard(self) {
        let ram = self.paths.ram.clone();
        self.discard_keep_ram().await;
        let _ = std::fs::remove_file(ram);
    }

    /// Stop it; its RAM file (the state's memory) stays.
    async fn discard_keep_ram(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp.execute("quit", None)).await;
        match self.child.as_mut() {
            Some(child) => {
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    process::signal(self.pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                }
            }
            None => {
                let marker = self.paths.dir.display().to_string();
                let deadline = Instant::now() + Duration::from_secs(5);
                while process::is_alive(self.pid, &marker) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                process::signal(self.pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
        let (mgr, vm, key) = &self.record;
        mgr.forget_helper(vm, key);
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The temporary name a state's memory is copied to before it is renamed into place.
pub(super) const LOADING_SUFFIX: &str = ".loading";

/// Copy a state's memory from disk back into RAM at `dst`: to a temporary name, checked
/// against the manifest's checksum, synced, then renamed. A restore cut off at any point leaves
/// at most the temporary file (removed at the next start), never a partial copy under the name
/// a later restore maps.
fn load_memory(src: &Path, dst: &Path, sha256: Option<&str>, state: &str) -> Result<()> {
    let mut name = dst.as_os_str().to_owned();
    name.push(LOADING_SUFFIX);
    let tmp = PathBuf::from(name);
    let _ = std::fs::remove_file(&tmp);
    let ctx = |e| io_ctx("loading the saved memory into", &tmp, e);
    crate::filecopy::copy(src, &tmp).map_err(ctx)?;
    if let Some(want) = sha256 {
        let got = sha256_file(&tmp).map_err(ctx)?;
        if got != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(HostError::Invalid(format!(
                "state {state} is damaged: its memory ({}) does not match its checksum",
                src.display()
            )));
        }
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(ctx)?;
    crate::crashpoint::hit("restore-ram-copy");
    std::fs::rename(&tmp, dst).map_err(ctx)?;
    Ok(())
}

/// What identifies one version of a file: any write to it (or a copy put in its place) changes
/// its ctime, which no program can set back, so an equal stamp means the same bytes as when it
/// was hashed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Files this droverd hashed, with the stamp they had then and their checksum: a restore of an
/// unchanged state does not read all of it again (a classic state holds the whole RAM). Kept in
/// memory only (one per daemon, in `Shared`), so a restarted droverd hashes each file once more.
#[derive(Clone, Default)]
pub(super) struct Hashes(
    Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, (FileStamp, String)>>>,
);

impl Hashes {
    /// The checksum of `path`, from the record of an earlier hash when the file has not changed
    /// since; otherwise hashed now and recorded.
    fn sha256(&self, path: &Path) -> std::io::Result<String> {
        let before = FileStamp::of(path)?;
        if let Some((stamp, sum)) = lock(&self.0).get(path) {
            if *stamp == before {
                return Ok(sum.clone());
            }
        }
        let sum = sha256_file(path)?;
        // Changed while it was read: its checksum describes no single version, so keep no record.
        if FileStamp::of(path)? == before {
            lock(&self.0).insert(path.to_path_buf(), (before, sum.clone()));
        }
        Ok(sum)
    }

    /// Refuse a state whose device state does not match its checksum. An unchanged file that
    /// matched before is not read again.
    pub(super) fn check_devices(&self, state: &StateInfo, devices: &Path) -> Result<()> {
        let sum = self
            .sha256(devices)
            .map_err(|e| io_ctx("reading", devices, e))?;
        if state.devices.sha256.as_deref() != Some(sum.as_str()) {
            return Err(HostError::Invalid(format!(
                "state {} is damaged: its device state does not match its checksum",
                state.id
            )));
        }
        Ok(())
    }
}

fn valid_state_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Manager {
    pub(super) fn states_dir(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join("states")
    }

    /// A VM's saved states, oldest first.
    pub fn states(&self, vm: &str) -> Result<Vec<StateInfo>> {
        self.slot(vm)?;
        let mut v: Vec<StateInfo> = self
            .vm_records::<StateRecord>(STATES, vm)?
            .into_iter()
            .map(StateInfo::from)
            .collect();
        v.sort_by_key(|s| s.id.trim_start_matches('s').parse::<u64>().unwrap_or(0));
        Ok(v)
    }

    /// One state, by id or name.
    pub fn state(&self, vm: &str, which: &str) -> Result<StateInfo> {
        let all = self.states(vm)?;
        let known: Vec<String> = all
            .iter()
            .map(|s| format!("{} ({})", s.id, s.name))
            .collect();
        all.into_iter()
            .find(|s| s.id == which || s.name == which)
            .ok_or_else(|| {
                HostError::Missing(format!(
                    "VM {vm} has no state {which}; known: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    /// Save a running VM's state (host side: `drover snapshot create`).
    pub async fn snapshot_create(
        &self,
        vm: &str,
        name: Option<String>,
        classic: bool,
        capture: Capture,
        caller: &Caller,
    ) -> Result<StateInfo> {
        let op = self.door(vm, VmAction::Save, caller).await?;
        let how = if classic {
            SaveHow::Classic
        } else {
            SaveHow::Fast(capture)
        };
        let save = self.save_locked(vm, &op, name, how, &caller.name, None);
        crate::metrics::timed(crate::metrics::Op::Save, save).await
    }

    /// Save with the lock held; the door checked that the VM runs.
    pub(super) async fn save_locked(
        &self,
        vm: &str,
        op: &OpGuard,
        name: Option<String>,
        how: SaveHow,
        who: &str,
        guest: Option<GuestSaveNote>,
    ) -> Result<StateInfo> {
        let (classic, capture) = match how {
            SaveHow::Classic => (true, Capture::Auto),
            SaveHow::Fast(c) => (false, c),
        };
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        if let Some(n) = &name {
            if !valid_state_name(n) {
                return Err(HostError::Invalid(format!(
                    "invalid state name {n:?}: 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.'"
                )));
            }
            if self.states(vm)?.iter().any(|s| &s.name == n) {
                return Err(HostError::Conflict(format!(
                    "VM {vm} already has a state named {n}"
                )));
            }
        }
        let rt = self
            .runtime(slot)
            .ok_or_else(|| HostError::Conflict(format!("VM {vm} is not running")))?;
        let running = info
            .running_config
            .clone()
            .ok_or_else(|| HostError::Internal("no running config".into()))?;
        // A VM grown live holds vCPUs and DIMMs its command line never named; the state
        // records them, so a restore makes them again before it loads the state.
        let plugged = hotplug::plugged(&rt.qmp)
            .await
            .map_err(|e| HostError::Conflict(format!("VM {vm} cannot be saved now: {e}")))?;
        plugged.check(&running).map_err(|e| {
            HostError::Internal(format!("VM {vm}'s QEMU disagrees with its config: {e}"))
        })?;
        if let Some(raw) = running.disks.iter().find(|d| d.format != DiskFormat::Qcow2) {
            return Err(HostError::Invalid(format!(
                "disk {} is {}; saved states need qcow2 disks to pin a layer",
                raw.id, raw.format
            )));
        }
        // Refuse before pausing when the disk cannot take the memory copy.
        let need = running.memory + (64 << 20);
        let (_, free) = hostfacts::disk(&self.vm_dir(vm));
        if free < need {
            return Err(HostError::Resources(format!(
                "saving VM {vm} needs about {} free on {}; {} is free",
                hostfacts::human_size(need),
                self.vm_dir(vm).display(),
                hostfacts::human_size(free)
            )));
        }
        // How the memory is taken, decided before anything is made: a stream needs its
        // receiver listening before the pause.
        let ram = (!classic)
            .then(|| {
                let base = plugged.base_memory(&running);
                let size = drover_qemu::cmdline::ram_bytes(base, info.platform.ram_pad);
                crate::guest_ram::find(rt.pid, &self.ram_dir(), size).ok()
            })
            .flatten();
        let plan = if classic {
            None
        } else {
            let touched = ram
                .as_ref()
                .and_then(|m| m.touched_bytes().ok())
                .unwrap_or(u64::MAX);
            let learned = self.s.copy_rate.load(std::sync::atomic::Ordering::Relaxed);
            let rate = match &ram {
                Some(m)
                    if capture == Capture::Auto && m.shared && needs_probe(touched, learned) =>
                {
                    self.copy_rate_now(vm, m)
                        .await
                        .map_or(learned, |now| now.min(learned))
                }
                _ => learned,
            };
            Some(
                choose_capture(capture, ram.as_ref().map(|m| m.shared), touched, rate).map_err(
                    |why| HostError::Conflict(format!("VM {vm}'s memory cannot be copied: {why}")),
                )?,
            )
        };
        // A save a droverd crash cut off after the disks moved left its id in QEMU's node
        // names (and no state): skip it, or the node cannot be added again.
        let nodes: Vec<String> = lock(&rt.nodes).values().cloned().collect();
        let issued: u64 = self.s.store.get(STATE_IDS, vm)?.unwrap_or(0);
        let n = next_state_number(
            self.states(vm)?.iter().map(|s| s.id.as_str()),
            issued,
            |n| {
                running
                    .disks
                    .iter()
                    .any(|d| nodes.contains(&layer_node(d.id.as_str(), &format!("s{n}"))))
            },
        );
        // Durable before the id is used anywhere.
        self.s.store.put(STATE_IDS, vm, &n)?;
        let id = format!("s{n}");
        let dir = self.states_dir(vm).join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io_ctx("creating", &dir, e))?;
        let mapped_ram = classic
            && self
                .s
                .probe
                .as_ref()
                .is_some_and(|p| p.has_capability("mapped-ram"));
        // Every other save hands QEMU its file open (`migrate::save_state`); only a `mapped-ram`
        // save has QEMU open the file by name, so only then may it write in the state's dir.
        if mapped_ram {
            self.qemu_writes_in(&dir)?;
        }
        let devices = dir.join("devices.bin");
        // Overlays for the running VM, made before pausing (they only name their backing file).
        let mut overlays = Vec::new();
        for d in &running.disks {
            let overlay = self.vm_dir(vm).join("disks").join(format!(
                "{}.{id}-{}.qcow2",
                d.id,
                hostfacts::now_ms()
            ));
            // On the layer the guest writes to now (the config names the disk's origin).
            let top = self.current_layer(vm, d)?;
            let (o, b, size) = (overlay.clone(), top, d.size);
            let made = tokio::task::spawn_blocking(move || img::create_overlay(&o, &b, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))?;
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            // QEMU opens it by name and writes to it from the save on.
            if let Err(e) = self.grant_qemu(&overlay, true) {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(&overlay);
                return Err(e);
            }
            overlays.push(overlay);
        }
        // The fast path streams memory into a second QEMU that waits, paused, with the state's
        // RAM file as its memory; it must be listening before the VM is paused.
        let capture_guard = slot.capture.clone().lock_owned().await;
        let receiver = if plan != Some(Capture::Stream) {
            None
        } else {
            match self
                .take_receiver(vm, slot, &id, &running, &plugged, &rt)
                .await
            {
                Ok(r) => Some(r),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    for o in &overlays {
                        let _ = std::fs::remove_file(o);
                    }
                    return Err(e);
                }
            }
        };
        crate::crashpoint::hit("save-receiver");
        // The state's config is the running one (disks by origin); the layers it pins are
        // recorded in the disks' chains. The running VM moves to new overlays.
        let state_cfg = running.clone();
        let moves: Vec<capture::DiskMove> = running
            .disks
            .iter()
            .zip(&overlays)
            .map(|(d, o)| capture::DiskMove {
                node: rt.active_node(d),
                overlay: o.clone(),
                new_node: layer_node(d.id.as_str(), &id),
            })
            .collect();
        let keeps_run_state = self
            .s
            .probe
            .as_ref()
            .is_some_and(|p| p.background_snapshot_keeps_run_state());
        let memory = match &receiver {
            Some(r) => capture::Memory::Stream {
                uri: &r.uri,
                keeps_run_state,
            },
            None if plan == Some(Capture::Copy) => capture::Memory::Copy { devices: &devices },
            // Faster than the exec stream where QEMU has it (bench/mapped_ram.py).
            None if mapped_ram => capture::Memory::Mapped { devices: &devices },
            None => capture::Memory::Whole { devices: &devices },
        };
        let vmm = rt.vmm();
        let capture::Paused {
            saved,
            moved,
            resumed,
            paused_ms,
        } = capture::paused_capture(
            &vmm,
            &moves,
            memory,
            |i| {
                let d = &running.disks[i];
                lock(&rt.nodes).insert(d.id.to_string(), moves[i].new_node.clone());
            },
            || async {
                match &ram {
                    Some(m) => self.copy_guest_ram(vm, &id, m).await,
                    None => Ok(()),
                }
            },
        )
        .await;
        // The running VM now writes to the overlays that were plugged, even if a later step
        // failed; the layers under them are the state's when it was saved. No config changes.
        let mut pinned = std::collections::BTreeMap::new();
        let mut writes = Vec::new();
        for (d, overlay) in running.disks.iter().zip(&overlays).take(moved) {
            let mut chain = self.disk_layers(vm, d.id.as_str())?;
            if saved.is_ok() {
                pinned.insert(d.id.to_string(), chain.save(&d.path, &id, overlay)?);
            } else {
                chain.set_top(&d.path, overlay)?;
            }
            writes.push(self.layers_write(vm, d.id.as_str(), &chain)?);
        }
        self.commit(slot, |_| Ok(writes))?;
        for o in overlays.iter().skip(moved) {
            let _ = std::fs::remove_file(o);
        }

        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(r) = receiver {
                r.discard().await;
            }
            return Err(e);
        }
        resumed?;
        let mut state = StateInfo {
            format: STATE_FORMAT,
            id: id.clone(),
            name: name.unwrap_or_else(|| id.clone()),
            vm: vm.to_string(),
            created_at_ms: hostfacts::now_ms(),
            created_by: who.to_string(),
            mode: if classic {
                "classic".into()
            } else {
                "fast".into()
            },
            config: state_cfg,
            layers: pinned,
            devices: StateSection {
                file: "devices.bin".into(),
                bytes: 0,
                sha256: None,
            },
            memory: (!classic).then(|| StateSection {
                file: "memory.bin".into(),
                // The boot RAM; DIMMs travel with the device state.
                bytes: plugged.base_memory(&running),
                sha256: None,
            }),
            paused_ms,
            capture: plan,
            phase: StatePhase::Capturing,
            failure: None,
            guest_save: guest,
            saved_on: self.saved_on(&info.platform, info.accel).map(|mut on| {
                on.ram_stream = mapped_ram.then(|| "mapped-ram".to_string());
                on
            }),
            plugged: plugged.clone(),
        };
        match receiver {
            Some(r) => {
                // Answered now: the point in time is fixed and the guest runs on. The memory
                // streams out behind it; a restore of this state waits for it.
                self.write_state(&state)?;
                let mgr = self.clone();
                let (a_qmp, st) = (rt.qmp.clone(), state.clone());
                let (vm2, slot2) = (vm.to_string(), slot.clone());
                tokio::spawn(async move {
                    mgr.finish_capture(st, a_qmp, r, capture_guard, slot2.persist.clone())
                        .await;
                    mgr.prepare_standby(&vm2, &slot2);
                });
            }
            // Restorable now; written to disk behind the answer.
            None if plan == Some(Capture::Copy) => {
                self.seal_sections(&mut state, &devices, None)?;
                state.phase = StatePhase::Ready;
                self.write_state(&state)?;
                let (mgr, st, persist) = (self.clone(), state.clone(), slot.persist.clone());
                tokio::spawn(async move {
                    let written = mgr.write_out(st.clone(), capture_guard, persist).await;
                    if let Err(e) = written {
                        mgr.fail_capture(st, e);
                    }
                });
            }
            None => {
                drop(capture_guard);
                self.seal_sections(&mut state, &devices, None)?;
                state.phase = StatePhase::Durable;
                self.write_state(&state)?;
            }
        }
        tracing::info!(vm, state = id, paused_ms, mode = state.mode, "state saved");
        self.event(
            vm,
            drover_api::EventKind::StateSaved,
            serde_json::json!({ "state": state.id, "name": state.name, "by": who, "guest": state.guest_save.is_some() }),
        );
        Ok(state)
    }

    /// The QEMU and machine a state saved now belongs to (`None` without a probe).
    fn saved_on(
        &self,
        platform: &drover_model::Platform,
        accel: Option<drover_model::Accel>,
    ) -> Option<drover_api::SavedOn> {
        let p = self.s.probe.as_ref()?;
        Some(drover_api::SavedOn {
            qemu_version: p.version.to_string(),
            machine: match &platform.machine {
                Some(m) => m.clone(),
                None => p.resolve_machine("q35")?.to_string(),
            },
            cpu: platform.cpu_arg().to_string(),
            ram_stream: None,
            accel,
            host: Some(self.s.cfg.identity.id.clone()),
        })
    }

    /// Where a state's memory lives in RAM (/dev/shm), next to the running guests' memory.
    pub(super) fn state_ram(&self, vm: &str, id: &str) -> PathBuf {
        self.ram_dir().join(format!("{vm}@{id}"))
    }

    /// A receiver for state `id`: the one kept ready for this VM when it still fits (same
    /// config), else a new one. Its RAM file gets the state's name either way.
    async fn take_receiver(
        &self,
        vm: &str,
        slot: &Arc<VmSlot>,
        id: &str,
        config: &drover_model::VmConfig,
        plugged: &drover_model::Plugged,
        rt: &super::Runtime,
    ) -> Result<Receiver> {
        let ready = slot.standby.lock().await.take();
        if let Some((cfg, made_with, r)) = ready {
            let same = cfg == *config && made_with == *plugged;
            if same && process::is_alive(r.pid, &r.paths.dir.display().to_string()) {
                let ram = self.state_ram(vm, id);
                // The receiver maps the file; renaming it does not disturb that.
                if std::fs::rename(&r.paths.ram, &ram).is_ok() {
                    let mut r = r;
                    r.paths.ram = ram;
                    return Ok(r);
                }
            }
            r.discard().await;
        }
        self.spawn_receiver(vm, id, config, plugged, rt).await
    }

    /// Keep a receiver ready for VM `vm`'s next save (after a first one: a VM whose states are
    /// saved once is likely to be saved again), so a save does not wait for QEMU to start.
    pub(super) fn prepare_standby(&self, vm: &str, slot: &Arc<VmSlot>) {
        let (mgr, vm, slot) = (self.clone(), vm.to_string(), slot.clone());
        tokio::spawn(async move {
            let Some(rt) = mgr.runtime(&slot) else { return };
            let Some(cfg) = lock(&slot.info).running_config.clone() else {
                return;
            };
            let mut standby = slot.standby.lock().await;
            if standby.is_some() {
                return;
            }
            let plugged = match hotplug::plugged(&rt.qmp).await {
                Ok(p) => p,
                Err(e) => return tracing::debug!(vm, "no receiver kept ready: {e}"),
            };
            match mgr.spawn_receiver(&vm, "next", &cfg, &plugged, &rt).await {
                // Only while the VM it was made for still runs.
                Ok(r) if mgr.runtime(&slot).is_some_and(|now| now.pid == rt.pid) => {
                    *standby = Some((cfg, plugged, r));
                }
                Ok(r) => r.discard().await,
                Err(e) => tracing::debug!(vm, "no receiver kept ready: {e}"),
            }
        });
    }

    /// Stop the receiver kept ready for a VM (it stopped, or its QEMU was replaced).
    pub(super) async fn drop_standby(&self, slot: &Arc<VmSlot>) {
        if let Some((_, _, r)) = slot.standby.lock().await.take() {
            r.discard().await;
        }
    }

    /// Start the QEMU that receives a state's memory: same machine as the VM, paused, waiting
    /// for a migration stream, with the state's RAM file as shared memory.
    async fn spawn_receiver(
        &self,
        vm: &str,
        id: &str,
        config: &drover_model::VmConfig,
        plugged: &drover_model::Plugged,
        rt: &super::Runtime,
    ) -> Result<Receiver> {
        let mut paths = RunPaths::new(&self.run_paths(vm).dir.join(format!("cap-{id}")));
        paths.ram = self.state_ram(vm, id);
        let need = config.memory + (64 << 20);
        let (_, free) = hostfacts::disk(&self.ram_dir());
        if free < need {
            return Err(HostError::Resources(format!(
                "saving VM {vm} needs about {} free in {} for its memory; {} is free",
                hostfacts::human_size(need),
                self.ram_dir().display(),
                hostfacts::human_size(free)
            )));
        }
        let _ = std::fs::remove_dir_all(&paths.dir);
        let _ = std::fs::remove_file(&paths.ram);
        std::fs::create_dir_all(&paths.dir).map_err(|e| io_ctx("creating", &paths.dir, e))?;
        // It creates its sockets and the state's RAM file; its disks are null-co.
        self.prepare_qemu_dirs(vm, &paths.dir)?;
        let kernel = self.kernel_boot(&rt.launched).await?;
        let kernel = self.qemu_boot_files(kernel, &paths.dir)?;
        let accel = lock(&self.slot(vm)?.info)
            .accel
            .unwrap_or(self.s.accel.accel);
        let console = paths.dir.join("console.log");
        let args = self.qemu_args(
            vm,
            config,
            kernel,
            accel,
            &paths,
            &console,
            &Default::default(),
            QemuMode {
                incoming: true,
                stopped: true,
                ram_private: None,
                detached: true,
                plugged,
            },
        )?;
        let mut child = self.spawn_qemu(config, args, &paths.qemu_log, Vec::new())?;
        let pid = child.id().unwrap_or(0);
        // Durable before it is given work, so a droverd that dies from here on leaves no
        // orphan: the next one kills it.
        let key = format!(
            "{}.{pid}",
            paths.dir.file_name().unwrap_or_default().to_string_lossy()
        );
        if let Err(e) = self.record_helper(vm, &key, pid, &paths.dir) {
            process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let _ = std::fs::remove_dir_all(&paths.dir);
            let _ = std::fs::remove_file(&paths.ram);
            return Err(e);
        }
        let record = (self.clone(), vm.to_string(), key);
        let qmp = match self
            .connect_qmp(&paths.qmp, Some(&mut child), pid, Duration::from_secs(15))
            .await
        {
            Ok((q, _events)) => q,
            Err(why) => {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let _ = std::fs::remove_file(&paths.ram);
                let _ = std::fs::remove_dir_all(&paths.dir);
                self.forget_helper(vm, &record.2);
                return Err(HostError::Internal(format!(
                    "QEMU could not start to receive VM {vm}'s memory: {why}"
                )));
            }
        };
        let uri = format!("unix:{}", paths.dir.join("mig.sock").display());
        let r = Receiver {
            qmp,
            child: Some(child),
            pid,
            paths,
            uri,
            record,
        };
        if let Err(e) = migrate::receive_snapshot(&r.qmp, &r.uri).await {
            r.discard().await;
            return Err(e.into());
        }
        Ok(r)
    }

    /// After a fast save has answered: wait for the memory stream, take the device state from
    /// the receiving QEMU (without RAM), then write the memory to disk. Each step is recorded,
    /// so `drover snapshot show` tells how far it got and a failure is never silent.
    ///
    /// `capturing` (the slot's capture lock) is let go once the state is ready: a restore, a
    /// clone or a stop need not wait for the write-out to disk, which reads the RAM copy they
    /// only map privately. The write-out holds `persist` instead (taken before `capturing` is
    /// let go, so a migration waiting for both never finds a ready state without its file).
    async fn finish_capture(
        &self,
        mut state: StateInfo,
        vm_qmp: Qmp,
        r: Receiver,
        capturing: tokio::sync::OwnedMutexGuard<()>,
        persist: Arc<tokio::sync::Mutex<()>>,
    ) {
        let dir = self.states_dir(&state.vm).join(&state.id);
        let devices = dir.join(&state.devices.file);
        crate::crashpoint::hit("capture");
        let streamed = async {
            migrate::wait_migration(&vm_qmp, Duration::from_secs(3600)).await?;
            migrate::wait_migration(&r.qmp, Duration::from_secs(60)).await?;
            // A droverd killed just after it took the device state leaves the receiver in
            // `postmigrate` (it refuses a second one) with the device file written: keep that.
            let taken = r.qmp.status().await.ok().as_deref() == Some("postmigrate")
                && std::fs::metadata(&devices).is_ok_and(|m| m.len() > 0);
            if !taken {
                migrate::save_state(&r.qmp, &devices, true).await?;
            }
            Ok::<_, HostError>(())
        }
        .await
        .map_err(|e| {
            HostError::Internal(format!(
                "{e}; receiving QEMU: {}",
                super::log_tail(&r.paths.qemu_log)
            ))
        });
        r.discard_keep_ram().await;
        let t = Instant::now();
        let result = match streamed {
            Ok(()) => {
                async {
                    self.seal_sections(&mut state, &devices, None)?;
                    state.phase = StatePhase::Ready;
                    self.write_state_kept(&state)?;
                    tracing::debug!(
                        vm = state.vm,
                        state = state.id,
                        sealed_ms = t.elapsed().as_millis() as u64,
                        "state memory streamed"
                    );
                    self.write_out(state.clone(), capturing, persist).await
                }
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.fail_capture(state, e);
        }
    }

    /// A ready state's memory to disk: `persist` is taken before `capturing` is let go, so a
    /// migration waiting for both never finds a ready state without its file.
    async fn write_out(
        &self,
        mut state: StateInfo,
        capturing: tokio::sync::OwnedMutexGuard<()>,
        persist: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<()> {
        let _persisting = persist.lock_owned().await;
        drop(capturing);
        self.persist_memory(&mut state).await?;
        tracing::info!(
            vm = state.vm,
            state = state.id,
            "state memory captured and on disk"
        );
        Ok(())
    }

    /// Record that a state's capture or write-out failed, and drop its RAM copy.
    fn fail_capture(&self, mut state: StateInfo, e: HostError) {
        let _ = std::fs::remove_file(self.state_ram(&state.vm, &state.id));
        if self.state(&state.vm, &state.id).is_err() {
            // Deleted while its memory was written: nothing to record.
            tracing::info!(
                vm = state.vm,
                state = state.id,
                "state deleted before its capture ended: {e}"
            );
            return;
        }
        tracing::warn!(vm = state.vm, state = state.id, "state capture failed: {e}");
        state.phase = StatePhase::Failed;
        state.failure = Some(e.to_string());
        // Checked just above that it still exists.
        if let Err(e) = self.write_state(&state) {
            tracing::warn!("could not record the failure of state {}: {e}", state.id);
        }
    }

    /// The rate a copy of VM `vm`'s memory runs at now, measured on a part of it while the
    /// guest runs; `None` (logged) when it could not be measured.
    async fn copy_rate_now(&self, vm: &str, ram: &crate::guest_ram::RamMapping) -> Option<u64> {
        let scratch = self.ram_dir().join(format!("{vm}{PROBE_SUFFIX}"));
        let m = ram.clone();
        let measured = tokio::task::spawn_blocking(move || {
            m.copy_rate_now(&scratch, PROBE_BYTES, copy_threads())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match measured {
            Ok(rate) => {
                tracing::debug!(vm, rate, "memory copy rate measured before the save");
                Some(rate)
            }
            Err(e) => {
                tracing::debug!(vm, error = %e, "memory copy rate not measured");
                None
            }
        }
    }

    /// Copy a paused guest's memory to state `id`'s RAM file (through a temporary name), and
    /// learn this host's copy rate from it.
    async fn copy_guest_ram(
        &self,
        vm: &str,
        id: &str,
        ram: &crate::guest_ram::RamMapping,
    ) -> Result<()> {
        let dst = self.state_ram(vm, id);
        let mut tmp = dst.clone().into_os_string();
        tmp.push(COPYING_SUFFIX);
        let tmp = PathBuf::from(tmp);
        let (m, t2) = (ram.clone(), tmp.clone());
        let t = Instant::now();
        let copied = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&t2)?;
            m.copy(&to, copy_threads())
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?;
        let bytes = match copied {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(HostError::Internal(format!(
                    "copying VM {vm}'s memory: {e}"
                )));
            }
        };
        crate::crashpoint::hit("save-copy");
        std::fs::rename(&tmp, &dst).map_err(|e| io_ctx("renaming", &tmp, e))?;
        let ms = t.elapsed().as_millis().max(1) as u64;
        // Halfway to the new figure: one slow copy (a busy host) does not flip the choice.
        if bytes >= 64 << 20 {
            let rate = bytes.saturating_mul(1000) / ms;
            let old = self.s.copy_rate.load(std::sync::atomic::Ordering::Relaxed);
            self.s
                .copy_rate
                .store((old + rate) / 2, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::debug!(vm, state = id, bytes, ms, "guest memory copied");
        Ok(())
    }

    /// Copy a ready state's memory from RAM to its directory, sync it, checksum it, and mark the
    /// state durable; then drop RAM copies beyond the newest few.
    async fn persist_memory(&self, state: &mut StateInfo) -> Result<()> {
        let dir = self.states_dir(&state.vm).join(&state.id);
        let Some(section) = state.memory.clone() else {
            return Ok(());
        };
        let (src, dst) = (
            self.state_ram(&state.vm, &state.id),
            dir.join(&section.file),
        );
        if !src.exists() {
            return Err(HostError::Invalid(format!(
                "state {} lost its memory before it reached the disk: {} is gone (the host restarted?)",
                state.id,
                src.display()
            )));
        }
        let (d2, devices) = (dir.clone(), dir.join(&state.devices.file));
        let sum = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            // Through a temporary name, so a droverd killed mid-copy leaves no file that looks
            // complete, and a write-out begun again (at the next start) starts afresh.
            let tmp = dst.with_extension("bin.tmp");
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // The RAM copy no longer changes (the capture is over; restores map it privately),
            // so it is hashed while it is copied and synced rather than read again after.
            let sum = std::thread::scope(|scope| {
                let hashing = scope.spawn(|| sha256_file(&src));
                let written = (|| {
                    crate::filecopy::copy(&src, &tmp)?;
                    for f in [&tmp, &devices] {
                        std::fs::File::open(f)?.sync_all()?;
                    }
                    Ok::<_, std::io::Error>(())
                })();
                let sum = hashing
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("hashing the memory panicked")));
                written.and(sum)
            })?;
            crate::crashpoint::hit("write-out-copy");
            std::fs::rename(&tmp, &dst)?;
            std::fs::File::open(&d2)?.sync_all()?;
            crate::crashpoint::hit("write-out-renamed");
            Ok(sum)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| io_ctx("writing the state's memory to", &dir, e))?;
        if let Some(m) = state.memory.as_mut() {
            m.sha256 = Some(sum);
        }
        state.phase = StatePhase::Durable;
        self.write_state_kept(state)?;
        self.evict_state_ram(&state.vm);
        Ok(())
    }

    /// Keep RAM copies (for instant restores) of a VM's newest durable states only; older ones
    /// are restored from disk, which costs a copy.
    fn evict_state_ram(&self, vm: &str) {
        let Ok(all) = self.states(vm) else { return };
        let durable: Vec<&StateInfo> = all
            .iter()
            .filter(|s| s.phase == StatePhase::Durable && s.memory.is_some())
            .collect();
        for s in durable.iter().rev().skip(STATES_IN_RAM) {
            let _ = std::fs::remove_file(self.state_ram(vm, &s.id));
        }
    }

    /// Hash the device state into the manifest.
    fn seal_sections(
        &self,
        state: &mut StateInfo,
        devices: &Path,
        _memory: Option<&Path>,
    ) -> Result<()> {
        state.devices.bytes = std::fs::metadata(devices).map(|m| m.len()).unwrap_or(0);
        // Recorded, so the first restore of this state need not hash it again.
        state.devices.sha256 = Some(
            self.s
                .hashes
                .sha256(devices)
                .map_err(|e| io_ctx("hashing", devices, e))?,
        );
        // On disk before the state is called durable (a classic save's memory is in this file).
        let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        sync(devices).map_err(|e| io_ctx("syncing", devices, e))?;
        if let Some(dir) = devices.parent() {
            sync(dir).map_err(|e| io_ctx("syncing", dir, e))?;
        }
        Ok(())
    }

    /// At daemon start (after re-adoption, which cancelled any memory stream the previous
    /// droverd left running and resumed the guest): helpers it left are killed; a capture it
    /// cut off is failed with the reason; a ready state's memory is written to disk again; the
    /// temporary files of interrupted copies go.
    pub(super) async fn recover_states(&self) {
        let adopted = self.adopt_captures().await;
        let killed = self.reap_helpers(None, &adopted);
        if killed > 0 {
            tracing::info!(
                killed,
                "killed helper processes left by the previous droverd"
            );
        }
        // Interrupted restores' partial copies of a state's memory.
        if let Ok(dir) = std::fs::read_dir(self.ram_dir()) {
            for e in dir.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                // ... and RAM files a killed droverd was freeing.
                if n.ends_with(LOADING_SUFFIX)
                    || n.ends_with(COPYING_SUFFIX)
                    || n.ends_with(PROBE_SUFFIX)
                    || n.contains(super::qemu_files::FREEING_SUFFIX)
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        for vm in self.list().into_iter().map(|v| v.name) {
            let run = self.run_paths(&vm).dir;
            if let Ok(dir) = std::fs::read_dir(&run) {
                for e in dir.flatten() {
                    let in_use = adopted
                        .iter()
                        .any(|(_, d)| d.as_path() == e.path().as_path());
                    if e.file_name().to_string_lossy().starts_with("cap-") && !in_use {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let _ = std::fs::remove_file(self.state_ram(&vm, "next"));
            let Ok(all) = self.states(&vm) else { continue };
            let known: Vec<String> = all.iter().map(|s| s.id.clone()).collect();
            self.remove_stray_state_files(&vm, &known);
            for mut st in all {
                match st.phase {
                    // Being finished (captured, then written out) from the receiver adopted
                    // above, whatever phase it has reached by now: a second write-out would
                    // race the first.
                    _ if adopted.iter().any(|(k, _)| *k == format!("{vm}/{}", st.id)) => {}
                    StatePhase::Capturing => {
                        let _ = std::fs::remove_file(self.state_ram(&vm, &st.id));
                        let _ = std::fs::remove_file(
                            self.states_dir(&vm).join(&st.id).join(&st.devices.file),
                        );
                        st.phase = StatePhase::Failed;
                        st.failure = Some(
                            "droverd was stopped while the memory was captured and its receiving QEMU was gone; the VM runs on (save again)".into(),
                        );
                        if let Err(e) = self.write_state(&st) {
                            tracing::warn!("could not record the failure of state {}: {e}", st.id);
                        }
                    }
                    StatePhase::Ready => {
                        let mgr = self.clone();
                        let persist = self.slot(&vm).ok().map(|s| s.persist.clone());
                        tokio::spawn(async move {
                            // A migration of this VM waits for the write-out.
                            let _persisting = match &persist {
                                Some(p) => Some(p.lock().await),
                                None => None,
                            };
                            if let Err(e) = mgr.persist_memory(&mut st).await {
                                tracing::warn!(state = st.id, "writing state memory failed: {e}");
                                st.phase = StatePhase::Failed;
                                st.failure = Some(e.to_string());
                                let _ = mgr.write_state(&st);
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    /// Captures a killed droverd left: the receiving QEMU outlives droverd and its stream ran
    /// on (re-adoption waited for it), so the capture is finished from it, as if droverd had
    /// never stopped. Returns the (`vm/state id`, receiver dir) of each one taken over.
    async fn adopt_captures(&self) -> Vec<(String, PathBuf)> {
        let mut adopted = Vec::new();
        for vm in self.list().into_iter().map(|v| v.name) {
            let Ok(slot) = self.slot(&vm) else { continue };
            let Some(rt) = self.runtime(&slot) else {
                continue;
            };
            let Ok(all) = self.states(&vm) else { continue };
            let Some(st) = all.into_iter().find(|s| s.phase == StatePhase::Capturing) else {
                continue;
            };
            let Ok(helpers) = self.s.store.list_prefix::<super::helpers::HelperRecord>(
                super::helpers::HELPERS,
                &format!("{vm}/"),
            ) else {
                continue;
            };
            for (key, rec) in helpers {
                if process::start_ticks(rec.pid) != Some(rec.start_ticks)
                    || !process::is_alive(rec.pid, &rec.marker)
                {
                    continue;
                }
                let mut paths = RunPaths::new(Path::new(&rec.marker));
                paths.ram = self.state_ram(&vm, &st.id);
                let Ok((qmp, _events)) = self
                    .connect_qmp(&paths.qmp, None, rec.pid, Duration::from_secs(5))
                    .await
                else {
                    continue;
                };
                // The receiver of this capture has taken the whole stream; a standby has none.
                let done = qmp
                    .execute("query-migrate", None)
                    .await
                    .ok()
                    .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_string));
                if done.as_deref() != Some("completed") || !paths.ram.exists() {
                    continue;
                }
                tracing::info!(
                    vm,
                    state = st.id,
                    pid = rec.pid,
                    "finishing a capture the previous droverd left"
                );
                let r = Receiver {
                    qmp,
                    child: None,
                    pid: rec.pid,
                    uri: String::new(),
                    record: (self.clone(), vm.clone(), key.clone()),
                    paths: paths.clone(),
                };
                adopted.push((format!("{vm}/{}", st.id), paths.dir.clone()));
                let mgr = self.clone();
                let (vm_qmp, st, slot) = (rt.qmp.clone(), st.clone(), slot.clone());
                let guard = slot.capture.clone().lock_owned().await;
                let persist = slot.persist.clone();
                tokio::spawn(async move {
                    mgr.finish_capture(st, vm_qmp, r, guard, persist).await;
                });
                break;
            }
        }
        adopted
    }

    /// State directories and RAM copies of VM `vm` that belong to no recorded state: a save cut
    /// off before it was recorded, a delete cut off after it.
    fn remove_stray_state_files(&self, vm: &str, known: &[String]) {
        if let Ok(dir) = std::fs::read_dir(self.states_dir(vm)) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    tracing::info!(vm, dir = name, "removing the files of an unrecorded state");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let prefix = format!("{vm}@");
        if let Ok(dir) = std::fs::read_dir(self.ram_dir()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_prefix(&prefix) {
                    if !known.iter().any(|k| k == id) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }

    /// [`Self::write_state`] for work that ran behind a save's answer (a stream, a write-out, a
    /// failure): a state deleted meanwhile is not written back, and its RAM copy is dropped.
    fn write_state_kept(&self, s: &StateInfo) -> Result<()> {
        if self.state(&s.vm, &s.id).is_err() {
            let _ = std::fs::remove_file(self.state_ram(&s.vm, &s.id));
            return Err(HostError::NotFound(format!(
                "state {} of VM {} was deleted while its memory was being written",
                s.id, s.vm
            )));
        }
        self.write_state(s)
    }

    pub(super) fn write_state(&self, s: &StateInfo) -> Result<()> {
        let dir = self.states_dir(&s.vm).join(&s.id);
        let record = StateRecord::from(s);
        let json = record
            .manifest_json()
            .map_err(|e| HostError::Internal(e.to_string()))?;
        let manifest = dir.join("manifest.json");
        crate::fsutil::replace_file(&manifest, &json)
            .map_err(|e| io_ctx("writing", &manifest, e))?;
        self.s
            .store
            .put(STATES, &format!("{}/{}", s.vm, s.id), &record)?;
        Ok(())
    }

    /// Restore a state (host side: `drover snapshot restore`). A running VM is replaced. With
    /// `req`'s shape options the VM is adapted once it runs, exactly as a resume is
    /// ([`Manager::restore_reshaped`]).
    pub async fn snapshot_restore(
        &self,
        vm: &str,
        which: &str,
        req: &drover_api::ResumeRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        // What the restore changes needs more than the restore itself.
        if super::hibernate::reshapes(req) {
            caller.require(super::Permission::Change)?;
        }
        let op = self.door(vm, VmAction::Restore, caller).await?;
        let info = self
            .restore_reshaped(vm, &op, which, req, "it is as it was", caller)
            .await?;
        self.event(
            vm,
            drover_api::EventKind::Restored,
            serde_json::json!({ "state": which, "from": info.started_from }),
        );
        Ok(info)
    }

    pub(super) async fn restore_locked(
        &self,
        vm: &str,
        op: &OpGuard,
        which: &str,
    ) -> Result<VmInfo> {
        self.restore_locked_as(vm, op, which, &Default::default(), None)
            .await
    }

    /// Restore state `which` into `vm` (the op lock held); NICs named in `macs` get that MAC on
    /// the new QEMU's command line (the guest's driver keeps the saved one until its agent sets
    /// the new one: see `Manager::resume`); `identity`, if any, is recorded pending for the new
    /// run before its QEMU starts (see `manager::identity`).
    pub(super) async fn restore_locked_as(
        &self,
        vm: &str,
        op: &OpGuard,
        which: &str,
        macs: &std::collections::BTreeMap<String, drover_model::MacAddr>,
        identity: Option<&drover_proto::IdentityUpdate>,
    ) -> Result<VmInfo> {
        let begun = Instant::now();
        let slot = op.slot();
        let mut state = self.state(vm, which)?;
        if state.phase == StatePhase::Capturing {
            // Restorable once its memory has streamed out (ready); the capture holds this
            // until then, not until the memory is on disk.
            drop(slot.capture.lock().await);
            state = self.state(vm, which)?;
        }
        if state.phase == StatePhase::Failed {
            return Err(HostError::Invalid(format!(
                "state {} cannot be restored: its capture failed ({})",
                state.id,
                state.failure.as_deref().unwrap_or("reason unknown")
            )));
        }
        if state.format > STATE_FORMAT {
            return Err(HostError::Invalid(format!(
                "state {} has format {}; this droverd reads up to {STATE_FORMAT}",
                state.id, state.format
            )));
        }
        self.check_loads_here(&state)?;
        let dir = self.states_dir(vm).join(&state.id);
        let devices = dir.join(&state.devices.file);
        // A running VM is replaced only by a state known sound, so it is checked before the VM
        // stops. Otherwise the check runs while QEMU loads the state (see `launch`): a classic
        // state holds all of RAM, and reading it twice in a row doubled a restore's time.
        let verify = if lock(&slot.info).state == VmState::Running {
            self.s.hashes.check_devices(&state, &devices)?;
            None
        } else {
            Some(state.clone())
        };
        let memory = self.state_memory_in_ram(vm, &state).await?;
        if state.format < STATE_FORMAT {
            return Err(HostError::Invalid(format!(
                "state {} has format {}, written by an older droverd and not migrated; restart \
                 this droverd to migrate it, or delete it",
                state.id, state.format
            )));
        }
        for d in &state.config.disks {
            let layer = state.layers.get(d.id.as_str()).ok_or_else(|| {
                HostError::Invalid(format!(
                    "state {} is damaged: it records no layer of disk {}",
                    state.id, d.id
                ))
            })?;
            if !layer.exists() {
                return Err(HostError::Invalid(format!(
                    "state {} is damaged: its layer of disk {} ({}) is missing",
                    state.id,
                    d.id,
                    layer.display()
                )));
            }
        }
        self.check_fits(vm, &state.config)?;
        let checked = begun.elapsed();
        let current = lock(&slot.info).state;
        match current {
            VmState::Running => {
                self.stop_to_replace(vm, op).await?;
            }
            // A hibernated VM may come back from any of its states.
            VmState::Stopped | VmState::Hibernated => {}
            s => {
                return Err(HostError::Conflict(format!(
                    "VM {vm} is {s}; wait for that to finish"
                )))
            }
        }
        let stopped = begun.elapsed();
        // The launch puts fresh overlays on the pinned layers: the state is never written to.
        let mut cfg = state.config.clone();
        for n in cfg.nics.iter_mut() {
            if let Some(m) = macs.get(n.id.as_str()) {
                n.mac = *m;
            }
        }
        // The guest must learn it is a copy of its past (vmgenid), before QEMU starts.
        self.regenerate_generation_id(vm, &format!("restore of state {}", state.id))?;
        if let Some(u) = identity {
            self.set_pending_identity(vm, u)?;
        }
        let mapped_ram = state
            .saved_on
            .as_ref()
            .is_some_and(|s| s.ram_stream.as_deref() == Some("mapped-ram"));
        let spec = RestoreSpec {
            devices,
            memory,
            mapped_ram,
            state: state.id.clone(),
            layers: Some(state.layers.clone()),
            verify,
            plugged: state.plugged.clone(),
        };
        let info = self
            .launch(
                vm,
                slot,
                cfg,
                format!("state {} ({})", state.id, state.name),
                LaunchKind::Restore(&spec),
            )
            .await?;
        let launched = begun.elapsed();
        self.set_guest_clock_soon(vm, slot);
        // A VM that goes back to saved states tends to save again.
        if spec.memory.is_some() {
            self.prepare_standby(vm, slot);
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::debug!(
            vm,
            state = state.id,
            checks_ms = ms(checked),
            stop_ms = ms(stopped - checked),
            launch_ms = ms(launched - stopped),
            "restore_phases"
        );
        Ok(info)
    }

    /// Refuse a state this host's QEMU cannot load, naming every reason.
    pub(super) fn check_loads_here(&self, state: &StateInfo) -> Result<()> {
        state
            .plugged
            .check(&state.config)
            .map_err(|e| HostError::Invalid(format!("state {} is damaged: {e}", state.id)))?;
        let facts = self.qemu_facts();
        crate::compat::check_restore(
            &state.id,
            state.saved_on.as_ref(),
            &self.restore_target(facts.as_ref()),
        )
        .map_err(HostError::Conflict)
    }

    /// A restored guest's clock stands where it was saved: once its agent answers, set it to
    /// the host's. Without an agent (or with one older than this) the clock stays as restored.
    pub(super) fn set_guest_clock_soon(&self, vm: &str, slot: &Arc<VmSlot>) {
        let Some(rt) = self.runtime(slot) else {
            return;
        };
        let (agent, vm) = (rt.agent.clone(), vm.to_string());
        tokio::spawn(async move {
            if agent.wait_ready(Duration::from_secs(120)).await.is_err() {
                return;
            }
            let body = drover_proto::Body::SetClock {
                unix_ms: crate::hostfacts::now_ms(),
            };
            match agent.call(body, Duration::from_secs(10)).await {
                Ok(_) => tracing::info!(vm, "set the restored guest's clock to the host's"),
                Err(e) => tracing::info!(vm, "could not set the restored guest's clock: {e}"),
            }
        });
    }

    /// Where a fast state's memory is in RAM for a restore or clone to map (`None` for a
    /// classic state). The RAM copy is mapped as is; without one (evicted, or the host
    /// rebooted), the copy on disk is brought back into RAM first, checked against its checksum.
    pub(super) async fn state_memory_in_ram(
        &self,
        vm: &str,
        state: &StateInfo,
    ) -> Result<Option<PathBuf>> {
        let Some(m) = &state.memory else {
            return Ok(None);
        };
        let ram = self.state_ram(vm, &state.id);
        if !ram.exists() {
            let disk = self.states_dir(vm).join(&state.id).join(&m.file);
            if !disk.exists() {
                return Err(HostError::Invalid(format!(
                    "state {} is damaged: {} is missing",
                    state.id,
                    disk.display()
                )));
            }
            let t = Instant::now();
            let (src, dst, want) = (disk.clone(), ram.clone(), m.sha256.clone());
            let state_id = state.id.clone();
            tokio::task::spawn_blocking(move || {
                load_memory(&src, &dst, want.as_deref(), &state_id)
            })
            .await
            .map_err(|e| HostError::Internal(e.to_string()))??;
            tracing::info!(
                vm,
                state = state.id,
                ms = t.elapsed().as_millis() as u64,
                "state memory loaded from disk"
            );
        }
        Ok(Some(ram))
    }

    /// Delete a state: its manifest, device state and memory. Its disk layers stay while a newer
    /// layer is built on them (they are part of the VM's disk chain), so nothing is corrupted.
    pub async fn snapshot_delete(
        &self,
        vm: &str,
        which: &str,
        caller: &Caller,
    ) -> Result<StateInfo> {
        let op = self.door(vm, VmAction::DropState, caller).await?;
        let slot = op.slot();
        let state = self.state(vm, which)?;
        if let Some(h) = lock(&slot.info)
            .hibernation
            .as_ref()
            .filter(|h| h.state == state.id)
        {
            return Err(HostError::Conflict(format!(
                "VM {vm} is hibernated in state {}: `drover vm resume {vm}` (which then deletes it), or delete the VM",
                h.state
            )));
        }
        self.drop_state_locked(&op, vm, &state.id)
    }

    /// Delete state `which` of `vm` (its operation lock held by the caller).
    pub(super) fn drop_state_locked(
        &self,
        _op: &OpGuard,
        vm: &str,
        which: &str,
    ) -> Result<StateInfo> {
        let state = self.state(vm, which)?;
        self.refuse_if_cloned(
            vm,
            Some(&state.id),
            &format!("delete state {} of VM {vm}", state.id),
        )?;
        // Its layers stop being pinned in the same transaction (a restore overlays them no more).
        let mut writes = self.unpin_writes(vm, &state.id)?;
        writes.push(drover_store::Write::Delete {
            table: STATES.to_string(),
            key: format!("{vm}/{}", state.id),
        });
        self.s.store.apply(writes)?;
        let dir = self.states_dir(vm).join(&state.id);
        let _ = std::fs::remove_dir_all(&dir);
        // A VM restored from it keeps its private mapping of the memory: unlinking is safe.
        let _ = std::fs::remove_file(self.state_ram(vm, &state.id));
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_state_s_id_is_never_issued_again() {
        // s1..s3 exist; s4 and s5 were issued and deleted: next is s6, not s4.
        let ids = ["s1", "s3", "s2", "bogus"];
        assert_eq!(next_state_number(ids.iter().copied(), 5, |_| false), 6);
        // A first save, and one after older droverds (nothing recorded as issued).
        assert_eq!(next_state_number(std::iter::empty(), 0, |_| false), 1);
        assert_eq!(next_state_number(ids.iter().copied(), 0, |_| false), 4);
        // Numbers still in QEMU's node names are skipped.
        assert_eq!(next_state_number(ids.iter().copied(), 0, |n| n < 6), 6);
    }

    #[test]
    fn auto_measures_the_rate_only_when_the_choice_hangs_on_it() {
        let rate = 2_000_000_000;
        let mib = 1u64 << 20;
        // 300 MiB: 0.16 s at the learned rate, 0.63 s at a quarter: a copy either way.
        assert!(!needs_probe(300 * mib, rate));
        // 1 GiB: 0.54 s learned, 2.1 s at a quarter: measured first.
        assert!(needs_probe(1024 * mib, rate));
        // 3 GiB: over the budget already: a stream, nothing to measure.
        assert!(!needs_probe(3 * 1024 * mib, rate));
        // Nothing learned yet (0) never divides by zero and never copies.
        assert!(!needs_probe(mib, 0));
    }

    #[test]
    fn auto_copies_what_fits_the_pause_budget_and_streams_the_rest() {
        let rate = 2_000_000_000;
        let gib = 1u64 << 30;
        // 1.5 GiB touched at 2 GB/s: 0.8 s, a copy.
        assert_eq!(
            choose_capture(Capture::Auto, Some(true), 3 * gib / 2, rate),
            Ok(Capture::Copy)
        );
        // 4 GiB: 2.1 s, over the budget.
        assert_eq!(
            choose_capture(Capture::Auto, Some(true), 4 * gib, rate),
            Ok(Capture::Stream)
        );
        // A slow host streams sooner.
        assert_eq!(
            choose_capture(Capture::Auto, Some(true), gib, rate / 4),
            Ok(Capture::Stream)
        );
        // Memory mapped privately (a restored guest) or not found: stream.
        assert_eq!(
            choose_capture(Capture::Auto, Some(false), 1, rate),
            Ok(Capture::Stream)
        );
        assert_eq!(
            choose_capture(Capture::Auto, None, 1, rate),
            Ok(Capture::Stream)
        );
        assert_eq!(
            choose_capture(Capture::Auto, Some(true), u64::MAX, 0),
            Ok(Capture::Stream)
        );
        // Asked for: as asked, whatever the size; a copy only where one can be made.
        assert_eq!(
            choose_capture(Capture::Copy, Some(true), 64 * gib, rate),
            Ok(Capture::Copy)
        );
        assert_eq!(
            choose_capture(Capture::Stream, Some(true), 1, rate),
            Ok(Capture::Stream)
        );
        let e = choose_capture(Capture::Copy, Some(false), 1, rate).unwrap_err();
        assert!(
            e.contains("restored state") && e.contains("--capture stream"),
            "{e}"
        );
        assert!(choose_capture(Capture::Copy, None, 1, rate).is_err());
    }

    #[test]
    fn an_unchanged_file_is_not_hashed_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("devices.bin");
        std::fs::write(&f, b"device state one").unwrap();
        let hashes = Hashes::default();
        let first = hashes.sha256(&f).unwrap();
        assert_eq!(first, sha256_file(&f).unwrap());
        let recorded = lock(&hashes.0).get(&f).cloned();
        assert_eq!(recorded.map(|r| r.1), Some(first.clone()));

        // A byte flipped in place, size and even mtime kept: the ctime moves, so it is read
        // again and the damage shows.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, b"device state onE").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = hashes.sha256(&f).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, sha256_file(&f).unwrap());
    }
}
