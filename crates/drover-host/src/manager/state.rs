//! Saved VM states: device state + memory + pinned disk layers + the config the VM ran with.
//!
//! Fast path (PLATFORM.md): guest RAM lives in a shared file, so a save is: pause, put a fresh
//! qcow2 overlay on every disk (the old layer is now the state's, read-only), write the device
//! state with `x-ignore-shared` (milliseconds), copy the RAM file (a reflink where the filesystem
//! has them, else a sparse in-kernel copy), resume. A restore starts QEMU with a copy of the RAM
//! file and new overlays on the pinned layers, and loads the device state (`-incoming defer`).

use super::{lock, Manager, RestoreSpec, VmSlot};
use crate::auth::{Caller, Permission};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use drover_api::{GuestSaveNote, StateInfo, StateSection, VmInfo, VmState, STATE_FORMAT};
use drover_model::DiskFormat;
use drover_qemu::{img, migrate};
use drover_store::StoreExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub(super) const STATES: &str = "states";

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
    fn states_dir(&self, vm: &str) -> PathBuf {
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
        let paths = self.run_paths(vm);
        let devices = dir.join("devices.bin");
        let memory = dir.join("memory.bin");
        let staging = paths.ram.with_extension(format!("save-{id}"));
        let _ = std::fs::remove_file(&staging);
        // The state's config: disks at the layers it pins. The running VM moves to new overlays.
        let mut state_cfg = running.clone();
        let mut new_running = running.clone();
        let t0 = Instant::now();
        rt.qmp.execute("stop", None).await?;
        let saved = async {
            for (i, d) in running.disks.iter().enumerate() {
                let overlay = self.vm_dir(vm).join("disks").join(format!(
                    "{}.{id}-{}.qcow2",
                    d.id,
                    hostfacts::now_ms()
                ));
                let (o, b, size) = (overlay.clone(), d.path.clone(), d.size);
                tokio::task::spawn_blocking(move || img::create_overlay(&o, &b, size))
                    .await
                    .map_err(|e| HostError::Internal(e.to_string()))??;
                let node = rt.active_node(d);
                let new_node = format!("disk-{}-{id}", d.id);
                migrate::snapshot_disk(&rt.qmp, &node, &overlay, &new_node).await?;
                lock(&rt.nodes).insert(d.id.to_string(), new_node);
                new_running.disks[i].path = overlay;
                state_cfg.disks[i].path = d.path.clone();
            }
            migrate::save_state(&rt.qmp, &devices, !classic).await?;
            if !classic {
                // While paused, copy only as far as the fastest place: beside the RAM file (in
                // memory when that is /dev/shm). The trip to disk happens after the guest runs on.
                let (src, dst) = (paths.ram.clone(), staging.clone());
                let kind = tokio::task::spawn_blocking(move || crate::filecopy::copy(&src, &dst))
                    .await
                    .map_err(|e| HostError::Internal(e.to_string()))?
                    .map_err(|e| io_ctx("copying guest memory to", &staging, e))?;
                tracing::debug!(vm, ?kind, "memory copied");
            }
            Ok::<_, HostError>(())
        }
        .await;
        // Resume whatever happened: a failed save must not leave the guest paused.
        let resumed = rt.qmp.execute("cont", None).await;
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
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
        resumed?;
        if !classic {
            let (src, dst) = (staging.clone(), memory.clone());
            let moved = tokio::task::spawn_blocking(move || {
                // Same filesystem: a rename; else a copy.
                std::fs::rename(&src, &dst)
                    .or_else(|_| crate::filecopy::copy(&src, &dst).map(|_| ()))
            })
            .await
            .map_err(|e| HostError::Internal(e.to_string()))?;
            let _ = std::fs::remove_file(&staging);
            if let Err(e) = moved {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(io_ctx("storing guest memory in", &memory, e));
            }
        }
        // Durable before acknowledged, but after the guest runs again.
        for f in [&devices, &memory] {
            if f.exists() {
                std::fs::File::open(f)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io_ctx("syncing", f, e))?;
            }
        }
        let dev_bytes = std::fs::metadata(&devices).map(|m| m.len()).unwrap_or(0);
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
                bytes: dev_bytes,
                sha256: Some(sha256_file(&devices).map_err(|e| io_ctx("hashing", &devices, e))?),
            },
            memory: (!classic).then(|| StateSection {
                file: "memory.bin".into(),
                bytes: std::fs::metadata(&memory).map(|m| m.len()).unwrap_or(0),
                sha256: None,
            }),
            paused_ms,
            guest_save: guest,
        };
        self.write_state(&state)?;
        tracing::info!(vm, state = id, paused_ms, mode = state.mode, "state saved");
        if !classic {
            // Hashing gigabytes of memory must not delay the answer: done in the background.
            let mgr = self.clone();
            let st = state.clone();
            tokio::spawn(async move {
                let file = memory.clone();
                if let Ok(Ok(sum)) = tokio::task::spawn_blocking(move || sha256_file(&file)).await {
                    let mut st = st;
                    if let Some(m) = st.memory.as_mut() {
                        m.sha256 = Some(sum);
                    }
                    if let Err(e) = mgr.write_state(&st) {
                        tracing::warn!("could not record the memory checksum of {}: {e}", st.id);
                    }
                }
            });
            state.memory.as_mut().map(|m| m.sha256.take());
        }
        Ok(state)
    }

    fn write_state(&self, s: &StateInfo) -> Result<()> {
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
        let state = self.state(vm, which)?;
        if state.format > STATE_FORMAT {
            return Err(HostError::Invalid(format!(
                "state {} has format {}; this droverd reads up to {STATE_FORMAT}",
                state.id, state.format
            )));
        }
        let dir = self.states_dir(vm).join(&state.id);
        let devices = dir.join(&state.devices.file);
        let sum = sha256_file(&devices).map_err(|e| io_ctx("reading", &devices, e))?;
        if state.devices.sha256.as_deref() != Some(sum.as_str()) {
            return Err(HostError::Invalid(format!(
                "state {} is damaged: its device state does not match its checksum",
                state.id
            )));
        }
        let memory = state.memory.as_ref().map(|m| dir.join(&m.file));
        if let Some(m) = &memory {
            if !m.exists() {
                return Err(HostError::Invalid(format!(
                    "state {} is damaged: {} is missing",
                    state.id,
                    m.display()
                )));
            }
        }
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
        let spec = RestoreSpec { devices, memory };
        self.launch(
            vm,
            slot,
            cfg,
            format!("state {} ({})", state.id, state.name),
            Some(&spec),
        )
        .await
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
        Ok(state)
    }
}
