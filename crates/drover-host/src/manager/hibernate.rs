//! Hibernation: a running VM saved to disk and stopped, holding no host memory or CPUs, and
//! brought back from that point (`drover vm hibernate` / `vm resume`).
//!
//! Hibernating is a classic save (memory and device state in one file on disk, written with
//! `mapped-ram` where QEMU has it; synced before it counts as durable), then QEMU is stopped and
//! the VM is recorded `hibernated` with the state that holds it, in one write. The guest is
//! paused for the whole save, which a guest that is going down does not mind, and nothing of it
//! stays in RAM (a fast save's memory would live in /dev/shm). Resuming restores that state
//! (fresh overlays on the layers it pins, so the disks are as they were at the save) and deletes
//! it. A droverd restart or a host reboot finds the VM hibernated and the state on disk.

use super::{lock, Manager};
use crate::auth::{Caller, Permission};
use crate::error::{HostError, Result};
use crate::hostfacts;
use drover_api::{Hibernation, VmInfo, VmState};

impl Manager {
    /// Save a running VM to disk and stop it (see the module docs).
    pub async fn hibernate(&self, name: &str, caller: &Caller) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        let slot = self.slot(name)?;
        let _op = slot.op.lock().await;
        crate::action::VmAction::Hibernate
            .check(name, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        let label = format!("hibernate-{}", hostfacts::now_ms());
        let save = self.save_locked(name, &slot, Some(label), true, &caller.name, None);
        let state = crate::metrics::timed(crate::metrics::Op::Save, save).await?;
        let dir = self.states_dir(name).join(&state.id);
        let bytes = dir_bytes(&dir);
        // The state is durable (synced) now; the guest ran on for the moments since, into a
        // layer no resume uses.
        if let Err(e) = self.stop_locked(name, &slot, 0, true).await {
            return Err(HostError::Internal(format!(
                "VM {name} was saved as state {} but did not stop ({e}); it is still running, and `drover snapshot restore {name} {}` brings back the saved point",
                state.id, state.id
            )));
        }
        let hibernation = Hibernation {
            state: state.id.clone(),
            bytes,
            dir,
            at_ms: hostfacts::now_ms(),
        };
        self.persist(&slot, |i| {
            i.state = VmState::Hibernated;
            i.hibernation = Some(hibernation.clone());
        })?;
        tracing::info!(vm = name, state = state.id, bytes, "hibernated");
        self.event(
            name,
            drover_api::EventKind::Hibernated,
            serde_json::json!({ "state": state.id, "bytes": bytes }),
        );
        Ok(self.view(&slot))
    }

    /// Bring a hibernated VM back, running from the point it was hibernated at; with `req`'s
    /// `cpus`/`memory`, grown to that shape once it runs (vCPUs and DIMMs hot-plugged, within
    /// the headroom it was started with). A shape it cannot grow to is refused before anything
    /// changes; a growth that fails once it runs leaves it running in its saved shape, and says so.
    pub async fn resume(
        &self,
        name: &str,
        req: &drover_api::ResumeRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        caller.require(Permission::Lifecycle)?;
        if req.cpus.is_some() || req.memory.is_some() {
            caller.require(Permission::Change)?;
        }
        let slot = self.slot(name)?;
        let _op = slot.op.lock().await;
        let info = lock(&slot.info).clone();
        crate::action::VmAction::Resume
            .check(name, info.state)
            .map_err(HostError::Conflict)?;
        let Some(h) = info.hibernation.clone() else {
            return Err(HostError::Internal(format!(
                "VM {name} is hibernated but its record names no state; `drover snapshot list {name}` shows what can be restored"
            )));
        };
        let memory = super::check::parse_memory(req.memory.as_deref())?;
        let saved = self.state(name, &h.state)?;
        // Everything that differs is judged before anything changes; a refusal names each.
        let facts = self.qemu_facts();
        let room = super::check::Room {
            cpus: hostfacts::cpus(),
            memory_available: None,
        };
        let diffs = super::check::differences(
            &saved,
            &self.restore_target(facts.as_ref()),
            room,
            req.cpus,
            memory,
        );
        if let Some(why) = crate::compat::blocking(&saved.id, &diffs) {
            return Err(HostError::Conflict(format!(
                "VM {name} cannot resume as asked, nothing was changed (it stays hibernated): {why}"
            )));
        }
        let reshape = super::live::check_reshape(name, &saved.config, req.cpus, memory)
            .map_err(|e| match e {
                HostError::Conflict(m) | HostError::Resources(m) | HostError::Invalid(m) => {
                    HostError::Conflict(format!(
                        "VM {name} cannot resume as asked, nothing was changed (it stays hibernated): {m}"
                    ))
                }
                other => other,
            })?;
        let started = std::time::Instant::now();
        let restore = self.restore_locked(name, &slot, &h.state);
        let info = crate::metrics::timed(crate::metrics::Op::Restore, restore).await?;
        tracing::info!(
            vm = name,
            state = h.state,
            ms = started.elapsed().as_millis() as u64,
            "resumed"
        );
        if !reshape.is_empty() {
            if let Err(e) = self.change(name, &slot, reshape, false, caller).await {
                let _ = self.drop_state_locked(name, &h.state);
                return Err(HostError::Conflict(format!(
                    "VM {name} resumed in its saved shape, but growing it failed: {e}"
                )));
            }
        }
        // The VM runs on overlays of its own now: the state is no longer needed.
        if let Err(e) = self.drop_state_locked(name, &h.state) {
            tracing::warn!(
                vm = name,
                state = h.state,
                "resumed, but could not delete the hibernation state: {e}"
            );
        }
        let _ = info;
        self.event(
            name,
            drover_api::EventKind::Resumed,
            serde_json::json!({ "state": h.state }),
        );
        Ok(self.view(&slot))
    }
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
