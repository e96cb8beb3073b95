//! Saved VM states: device state + memory + pinned disk layers + the config the VM ran with.
//!
//! Fast path (PLATFORM.md): guest RAM lives in a shared file, so a save is: pause, put a fresh
//! qcow2 overlay on every disk (the old layer is now the state's, read-only), write the device
//! state with `x-ignore-shared` (milliseconds), copy the RAM file (a reflink where the filesystem
//! has them, else a sparse in-kernel copy), resume. A restore starts QEMU with a copy of the RAM
//! file and new overlays on the pinned layers, and loads the device state (`-incoming defer`).

use super::{lock, LaunchKind, Manager, QemuMode, RestoreSpec, VmSlot};
use crate::auth::{Caller, Permission};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use drover_api::{
    GuestSaveNote, StateInfo, StatePhase, StateSection, VmInfo, VmState, STATE_FORMAT,
};
use drover_model::DiskFormat;
use drover_qemu::cmdline::RunPaths;
use drover_qemu::qmp::Qmp;
use drover_qemu::{img, migrate, process};
use drover_store::StoreExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const STATES: &str = "states";

/// How many of a VM's newest states keep a copy of their memory in RAM for instant restores.
const STATES_IN_RAM: usize = 2;

/// The QEMU that receives a fast save's memory stream.
pub(super) struct Receiver {
    qmp: Qmp,
    child: tokio::process::Child,
    pid: u32,
    paths: RunPaths,
    /// Where it listens for the stream.
    uri: String,
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
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            process::signal(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
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
        let mut v: Vec<StateInfo> = self.vm_records(STATES, vm)?;
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
        caller: &Caller,
    ) -> Result<StateInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(vm)?;
        let _op = slot.op.lock().await;
        self.save_locked(vm, &slot, name, classic, &caller.name, None)
            .await
    }

    pub(super) async fn save_locked(
        &self,
        vm: &str,
        slot: &Arc<VmSlot>,
        name: Option<String>,
        classic: bool,
        who: &str,
        guest: Option<GuestSaveNote>,
    ) -> Result<StateInfo> {
        let info = lock(&slot.info).clone();
        if info.state != VmState::Running {
            return Err(HostError::Conflict(format!(
                "VM {vm} is {}; only a running VM's state can be saved",
                info.state
            )));
        }
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
        if running.cpus != rt.launched.cpus || running.memory != rt.launched.memory {
            return Err(HostError::Conflict(format!(
                "VM {vm} was resized live ({} vCPU, {} now); restart it before saving its state",
                running.cpus,
                drover_model::format_size(running.memory)
            )));
        }
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
                drover_model::format_size(need),
                self.vm_dir(vm).display(),
                drover_model::format_size(free)
            )));
        }
        let n = self
            .states(vm)?
            .iter()
            .filter_map(|s| s.id.trim_start_matches('s').parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let id = format!("s{n}");
        let dir = self.states_dir(vm).join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io_ctx("creating", &dir, e))?;
        let devices = dir.join("devices.bin");
        // Overlays for the running VM, made before pausing (they only name their backing file).
        let mut overlays = Vec::new();
        for d in &running.disks {
            let overlay = self.vm_dir(vm).join("disks").join(format!(
                "{}.{id}-{}.qcow2",
                d.id,
                hostfacts::now_ms()
            ));
            let (o, b, size) = (overlay.clone(), d.path.clone(), d.size);
            let made = tokio::task::spawn_blocking(move || img::create_overlay(&o, &b, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))?;
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            overlays.push(overlay);
        }
        // The fast path streams memory into a second QEMU that waits, paused, with the state's
        // RAM file as its memory; it must be listening before the VM is paused.
        let capture_guard = slot.capture.clone().lock_owned().await;
        let receiver = if classic {
            None
        } else {
            match self.take_receiver(vm, slot, &id, &running, &rt).await {
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
        // The state's config: disks at the layers it pins. The running VM moves to new overlays.
        let mut state_cfg = running.clone();
        let mut new_running = running.clone();
        let mapped_ram = classic
            && self
                .s
                .probe
                .as_ref()
                .is_some_and(|p| p.has_capability("mapped-ram"));
        let t0 = Instant::now();
        rt.qmp.execute("stop", None).await?;
        let saved = async {
            for (i, d) in running.disks.iter().enumerate() {
                let node = rt.active_node(d);
                let new_node = format!("disk-{}-{id}", d.id);
                migrate::snapshot_disk(&rt.qmp, &node, &overlays[i], &new_node).await?;
                lock(&rt.nodes).insert(d.id.to_string(), new_node);
                new_running.disks[i].path = overlays[i].clone();
                state_cfg.disks[i].path = d.path.clone();
            }
            match &receiver {
                // QEMU takes the device state, write-protects RAM and runs the guest again.
                Some(r) => {
                    migrate::background_snapshot(&rt.qmp, &r.uri).await?;
                    let keeps = self
                        .s
                        .probe
                        .as_ref()
                        .is_some_and(|p| p.background_snapshot_keeps_run_state());
                    migrate::wait_device_state(&rt.qmp, keeps, Duration::from_secs(120)).await?;
                }
                // Faster than the exec stream where QEMU has it (bench/mapped_ram.py).
                None if mapped_ram => migrate::save_state_mapped(&rt.qmp, &devices).await?,
                None => migrate::save_state(&rt.qmp, &devices, false).await?,
            }
            Ok::<_, HostError>(())
        }
        .await;
        // Resume whatever happened: a failed save must not leave the guest paused.
        let resumed = match rt.qmp.execute("query-status", None).await {
            Ok(v) if v.get("running").and_then(|r| r.as_bool()) == Some(true) => Ok(()),
            _ => rt.qmp.execute("cont", None).await.map(|_| ()),
        };
        let paused_ms = t0.elapsed().as_millis() as u64;
        // The running VM now writes to the overlays that were plugged, even if a later step failed.
        let (nr, nn) = (new_running.clone(), info.next_config.clone());
        let moved: Vec<(String, PathBuf)> = new_running
            .disks
            .iter()
            .map(|d| (d.id.to_string(), d.path.clone()))
            .collect();
        self.commit(slot, |i| {
            i.running_config = Some(nr);
            if let Some(mut next) = nn {
                for d in next.disks.iter_mut() {
                    if let Some((_, p)) = moved.iter().find(|(id, _)| id == d.id.as_str()) {
                        d.path = p.clone();
                    }
                }
                i.next_config = Some(next);
            }
            Ok(Vec::new())
        })?;
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
            devices: StateSection {
                file: "devices.bin".into(),
                bytes: 0,
                sha256: None,
            },
            memory: (!classic).then(|| StateSection {
                file: "memory.bin".into(),
                bytes: running.memory,
                sha256: None,
            }),
            paused_ms,
            phase: StatePhase::Capturing,
            failure: None,
            guest_save: guest,
            saved_on: self.saved_on(&info.platform).map(|mut on| {
                on.ram_stream = mapped_ram.then(|| "mapped-ram".to_string());
                on
            }),
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
                    let _capturing = capture_guard;
                    mgr.finish_capture(st, a_qmp, r).await;
                    mgr.prepare_standby(&vm2, &slot2);
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
        Ok(state)
    }

    /// The QEMU and machine a state saved now belongs to (`None` without a probe).
    fn saved_on(&self, platform: &drover_model::Platform) -> Option<drover_api::SavedOn> {
        let p = self.s.probe.as_ref()?;
        Some(drover_api::SavedOn {
            qemu_version: p.version.to_string(),
            machine: match &platform.machine {
                Some(m) => m.clone(),
                None => p.resolve_machine("q35")?.to_string(),
            },
            cpu: platform.cpu_arg().to_string(),
            ram_stream: None,
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
        rt: &super::Runtime,
    ) -> Result<Receiver> {
        let ready = slot.standby.lock().await.take();
        if let Some((cfg, r)) = ready {
            if cfg == *config && process::is_alive(r.pid, &r.paths.dir.display().to_string()) {
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
        self.spawn_receiver(vm, id, config, rt).await
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
            match mgr.spawn_receiver(&vm, "next", &cfg, &rt).await {
                // Only while the VM it was made for still runs.
                Ok(r) if mgr.runtime(&slot).is_some_and(|now| now.pid == rt.pid) => {
                    *standby = Some((cfg, r));
                }
                Ok(r) => r.discard().await,
                Err(e) => tracing::debug!(vm, "no receiver kept ready: {e}"),
            }
        });
    }

    /// Stop the receiver kept ready for a VM (it stopped, or its QEMU was replaced).
    pub(super) async fn drop_standby(&self, slot: &Arc<VmSlot>) {
        if let Some((_, r)) = slot.standby.lock().await.take() {
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
        rt: &super::Runtime,
    ) -> Result<Receiver> {
        let mut paths = RunPaths::new(&self.run_paths(vm).dir.join(format!("cap-{id}")));
        paths.ram = self.state_ram(vm, id);
        let need = config.memory + (64 << 20);
        let (_, free) = hostfacts::disk(&self.ram_dir());
        if free < need {
            return Err(HostError::Resources(format!(
                "saving VM {vm} needs about {} free in {} for its memory; {} is free",
                drover_model::format_size(need),
                self.ram_dir().display(),
                drover_model::format_size(free)
            )));
        }
        let _ = std::fs::remove_dir_all(&paths.dir);
        let _ = std::fs::remove_file(&paths.ram);
        std::fs::create_dir_all(&paths.dir).map_err(|e| io_ctx("creating", &paths.dir, e))?;
        let kernel = self.kernel_boot(&rt.launched).await?;
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
            QemuMode {
                incoming: true,
                stopped: true,
                ram_private: None,
                detached: true,
            },
        )?;
        let mut child = self.spawn_qemu(&args, &paths.qemu_log)?;
        let pid = child.id().unwrap_or(0);
        let qmp = match self
            .connect_qmp(&paths.qmp, Some(&mut child), pid, Duration::from_secs(15))
            .await
        {
            Ok((q, _events)) => q,
            Err(why) => {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let _ = std::fs::remove_file(&paths.ram);
                return Err(HostError::Internal(format!(
                    "QEMU could not start to receive VM {vm}'s memory: {why}"
                )));
            }
        };
        let uri = format!("unix:{}", paths.dir.join("mig.sock").display());
        let r = Receiver {
            qmp,
            child,
            pid,
            paths,
            uri,
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
    async fn finish_capture(&self, mut state: StateInfo, vm_qmp: Qmp, r: Receiver) {
        let dir = self.states_dir(&state.vm).join(&state.id);
        let devices = dir.join(&state.devices.file);
        let shm = self.state_ram(&state.vm, &state.id);
        let streamed = async {
            migrate::wait_migration(&vm_qmp, Duration::from_secs(3600)).await?;
            migrate::wait_migration(&r.qmp, Duration::from_secs(60)).await?;
            migrate::save_state(&r.qmp, &devices, true).await?;
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
                    self.write_state(&state)?;
                    let ready_ms = t.elapsed().as_millis();
                    self.persist_memory(&mut state).await?;
                    tracing::info!(
                        vm = state.vm,
                        state = state.id,
                        ready_ms,
                        "state memory captured and on disk"
                    );
                    Ok::<_, HostError>(())
                }
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(vm = state.vm, state = state.id, "state capture failed: {e}");
            let _ = std::fs::remove_file(&shm);
            state.phase = StatePhase::Failed;
            state.failure = Some(e.to_string());
            if let Err(e) = self.write_state(&state) {
                tracing::warn!("could not record the failure of state {}: {e}", state.id);
            }
        }
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
        let (d2, devices) = (dir.clone(), dir.join(&state.devices.file));
        let sum = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            crate::filecopy::copy(&src, &dst)?;
            for f in [&dst, &devices] {
                std::fs::File::open(f)?.sync_all()?;
            }
            std::fs::File::open(&d2)?.sync_all()?;
            sha256_file(&dst)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| io_ctx("writing the state's memory to", &dir, e))?;
        if let Some(m) = state.memory.as_mut() {
            m.sha256 = Some(sum);
        }
        state.phase = StatePhase::Durable;
        self.write_state(state)?;
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
        state.devices.sha256 =
            Some(sha256_file(devices).map_err(|e| io_ctx("hashing", devices, e))?);
        Ok(())
    }

    /// At daemon start: a capture cut off by a droverd restart is failed (its stream went with
    /// the receiving QEMU, which is stopped); a ready state's memory is written to disk again.
    pub(super) async fn recover_states(&self) {
        for vm in self.list().into_iter().map(|v| v.name) {
            // A receiver kept ready by the previous droverd: nobody holds it now.
            let next = self.run_paths(&vm).dir.join("cap-next");
            if let Some(pid) = std::fs::read_to_string(next.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                if process::is_alive(pid, &next.display().to_string()) {
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(&next);
            let _ = std::fs::remove_file(self.state_ram(&vm, "next"));
            let Ok(all) = self.states(&vm) else { continue };
            for mut st in all {
                match st.phase {
                    StatePhase::Capturing => {
                        let cap = self.run_paths(&vm).dir.join(format!("cap-{}", st.id));
                        if let Some(pid) = std::fs::read_to_string(cap.join("qemu.pid"))
                            .ok()
                            .and_then(|p| p.trim().parse::<u32>().ok())
                        {
                            if process::is_alive(pid, &cap.display().to_string()) {
                                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                            }
                        }
                        let _ = std::fs::remove_dir_all(&cap);
                        let _ = std::fs::remove_file(self.state_ram(&vm, &st.id));
                        st.phase = StatePhase::Failed;
                        st.failure = Some("droverd restarted while the memory was captured".into());
                        if let Err(e) = self.write_state(&st) {
                            tracing::warn!("could not record the failure of state {}: {e}", st.id);
                        }
                    }
                    StatePhase::Ready => {
                        let mgr = self.clone();
                        tokio::spawn(async move {
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

    pub(super) fn write_state(&self, s: &StateInfo) -> Result<()> {
        let dir = self.states_dir(&s.vm).join(&s.id);
        let json = serde_json::to_vec_pretty(s).map_err(|e| HostError::Internal(e.to_string()))?;
        let tmp = dir.join("manifest.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io_ctx("writing", &tmp, e))?;
        std::fs::rename(&tmp, dir.join("manifest.json")).map_err(|e| io_ctx("writing", &tmp, e))?;
        self.s.store.put(STATES, &format!("{}/{}", s.vm, s.id), s)?;
        Ok(())
    }

    /// Restore a state (host side: `drover snapshot restore`). A running VM is replaced.
    pub async fn snapshot_restore(&self, vm: &str, which: &str, caller: &Caller) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(vm)?;
        let _op = slot.op.try_lock().map_err(|_| {
            HostError::Conflict(format!(
                "another operation is running on VM {vm}; restore when it has finished"
            ))
        })?;
        self.restore_locked(vm, &slot, which).await
    }

    pub(super) async fn restore_locked(
        &self,
        vm: &str,
        slot: &Arc<VmSlot>,
        which: &str,
    ) -> Result<VmInfo> {
        let mut state = self.state(vm, which)?;
        if state.phase == StatePhase::Capturing {
            // Restorable once its memory has streamed out; the capture holds this until then.
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
        crate::compat::check_restore(
            &state.id,
            state.saved_on.as_ref(),
            self.qemu_facts().as_ref(),
        )
        .map_err(HostError::Conflict)?;
        let dir = self.states_dir(vm).join(&state.id);
        let devices = dir.join(&state.devices.file);
        let sum = sha256_file(&devices).map_err(|e| io_ctx("reading", &devices, e))?;
        if state.devices.sha256.as_deref() != Some(sum.as_str()) {
            return Err(HostError::Invalid(format!(
                "state {} is damaged: its device state does not match its checksum",
                state.id
            )));
        }
        let memory = match &state.memory {
            None => None,
            Some(m) => {
                // The RAM copy is mapped as is; without one (evicted, or the host rebooted),
                // the copy on disk is brought back into RAM first.
                let ram = self.state_ram(vm, &state.id);
                if !ram.exists() {
                    let disk = dir.join(&m.file);
                    if !disk.exists() {
                        return Err(HostError::Invalid(format!(
                            "state {} is damaged: {} is missing",
                            state.id,
                            disk.display()
                        )));
                    }
                    let t = Instant::now();
                    let (src, dst) = (disk.clone(), ram.clone());
                    tokio::task::spawn_blocking(move || crate::filecopy::copy(&src, &dst))
                        .await
                        .map_err(|e| HostError::Internal(e.to_string()))?
                        .map_err(|e| io_ctx("loading the saved memory into", &ram, e))?;
                    tracing::info!(
                        vm,
                        state = state.id,
                        ms = t.elapsed().as_millis() as u64,
                        "state memory loaded from disk"
                    );
                }
                Some(ram)
            }
        };
        for d in &state.config.disks {
            if !d.path.exists() {
                return Err(HostError::Invalid(format!(
                    "state {} is damaged: its layer of disk {} ({}) is missing",
                    state.id,
                    d.id,
                    d.path.display()
                )));
            }
        }
        self.check_fits(vm, &state.config)?;
        let current = lock(&slot.info).state;
        match current {
            VmState::Running => {
                self.stop_locked(vm, slot, 0, true).await?;
            }
            VmState::Stopped => {}
            s => {
                return Err(HostError::Conflict(format!(
                    "VM {vm} is {s}; wait for that to finish"
                )))
            }
        }
        // Fresh overlays on the pinned layers: the state itself is never written to.
        let stamp = hostfacts::now_ms();
        let mut cfg = state.config.clone();
        for d in cfg.disks.iter_mut() {
            let overlay = self
                .vm_dir(vm)
                .join("disks")
                .join(format!("{}.r{stamp}.qcow2", d.id));
            let (o, b, size) = (overlay.clone(), d.path.clone(), d.size);
            tokio::task::spawn_blocking(move || img::create_overlay(&o, &b, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??;
            d.path = overlay;
        }
        // The guest must learn it is a copy of its past (vmgenid), before QEMU starts.
        self.regenerate_generation_id(vm, &format!("restore of state {}", state.id))?;
        let mapped_ram = state
            .saved_on
            .as_ref()
            .is_some_and(|s| s.ram_stream.as_deref() == Some("mapped-ram"));
        let spec = RestoreSpec {
            devices,
            memory,
            mapped_ram,
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
        // A VM that goes back to saved states tends to save again.
        if spec.memory.is_some() {
            self.prepare_standby(vm, slot);
        }
        Ok(info)
    }

    /// Delete a state: its manifest, device state and memory. Its disk layers stay while a newer
    /// layer is built on them (they are part of the VM's disk chain), so nothing is corrupted.
    pub async fn snapshot_delete(
        &self,
        vm: &str,
        which: &str,
        caller: &Caller,
    ) -> Result<StateInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(vm)?;
        let _op = slot.op.lock().await;
        let state = self.state(vm, which)?;
        self.s.store.delete(STATES, &format!("{vm}/{}", state.id))?;
        let dir = self.states_dir(vm).join(&state.id);
        let _ = std::fs::remove_dir_all(&dir);
        // A VM restored from it keeps its private mapping of the memory: unlinking is safe.
        let _ = std::fs::remove_file(self.state_ram(vm, &state.id));
        Ok(state)
    }
}
