//! Instant clones: new VMs started from a saved state of a running template
//! (`drover vm clone VM/STATE NEW [--count N]`).
//!
//! A clone is a restore into a new VM: its QEMU maps the state's memory file **privately**
//! (`share=off`, as every fast restore does), so all clones share the template's pages until
//! each writes its own; its disks are its own thin qcow2 overlays on the layers the state pins.
//! Nothing of a clone writes into the state: the memory is a private mapping, the layers stay
//! read-only under the overlays. Once it runs, droverd pushes it a new identity through its agent
//! (hostname = its name, a new machine-id, its own MACs; [`drover_proto::IdentityUpdate`]); the
//! agent runs `restored.d` hooks, and `migrated.d` ones for the new generation id.
//!
//! Invariants:
//! - Everything is checked for all N clones (state restorable, names free, host memory and
//!   CPUs, no host port forwards to share) before the first is made.
//! - A clone's record (with `clone_of`) is durable before its QEMU starts, and the identity it
//!   is to get is in it: a droverd killed before the agent confirmed sends it again at start
//!   (the agent applies a token once).
//! - The template's state and the template itself cannot be deleted while a clone of it exists
//!   (the refusal names the clones): the clones' overlays read its layers. Refusing, rather
//!   than keeping orphan layers until the last clone goes, keeps one owner per file and makes
//!   no file outlive every record that names it.

use super::records::VmRecord;
use super::{lock, LaunchKind, Manager, OpGuard, RestoreSpec, VmSlot, HOST_RESERVE, VMS};
use crate::action::VmAction;
use crate::auth::{Caller, Permission};
use crate::error::{io_ctx, HostError, Result};
use crate::hostfacts;
use drover_api::{
    CloneOrigin, CloneOutcome, CloneRequest, CloneResult, StateInfo, StatePhase, VmInfo, VmState,
    STATE_FORMAT,
};
use drover_model::{format_size, ConfigHistory, MacAddr, NicBackend, VmConfig, VmName};
use drover_proto::{Body, IdentityApplied, IdentityUpdate, NicIdentity};
use drover_qemu::{cmdline, img};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most clones one request makes.
pub const MAX_CLONES: u32 = 64;
/// How long a clone's agent has to answer after its QEMU runs.
const AGENT_WAIT: Duration = Duration::from_secs(30);
/// How long the agent has to apply the identity (its hooks included).
const IDENTITY_WAIT: Duration = Duration::from_secs(70);

/// The names `clone` makes: `name` alone, or `name-1` .. `name-N` with a count.
pub fn clone_names(name: &str, count: Option<u32>) -> std::result::Result<Vec<String>, String> {
    let names: Vec<String> = match count {
        None => vec![name.to_string()],
        Some(n) if (1..=MAX_CLONES).contains(&n) => {
            (1..=n).map(|i| format!("{name}-{i}")).collect()
        }
        Some(n) => {
            return Err(format!(
                "--count {n}: make 1 to {MAX_CLONES} clones at a time"
            ))
        }
    };
    for n in &names {
        VmName::new(n).map_err(|e| format!("clone name {n}: {e}"))?;
    }
    Ok(names)
}

/// Why state `state` of `vm` cannot be cloned now, if it cannot.
pub fn check_cloneable(vm: &str, state: &StateInfo) -> std::result::Result<(), String> {
    match state.phase {
        StatePhase::Ready | StatePhase::Durable => {}
        StatePhase::Capturing => {
            return Err(format!(
                "state {} of VM {vm} is not restorable yet (its memory is still being captured); clone it once `drover snapshot show {vm} {}` says ready",
                state.id, state.id
            ))
        }
        StatePhase::Failed => {
            return Err(format!(
                "state {} of VM {vm} cannot be cloned: its capture failed ({})",
                state.id,
                state.failure.as_deref().unwrap_or("reason unknown")
            ))
        }
    }
    if state.memory.is_none() {
        return Err(format!(
            "state {} of VM {vm} is a classic save (its memory is in the device stream, not a file clones can share); save a fast state (`drover snapshot create {vm}` without --classic) and clone that",
            state.id
        ));
    }
    if state.format != STATE_FORMAT {
        return Err(format!(
            "state {} of VM {vm} has format {} (this droverd clones format {STATE_FORMAT}); save a new state",
            state.id, state.format
        ));
    }
    for n in &state.config.nics {
        match &n.backend {
            NicBackend::User { forwards } if !forwards.is_empty() => {
                return Err(format!(
                    "NIC {} of VM {vm} forwards host ports ({}); clones cannot all have them — save a state of a template without forwards",
                    n.id,
                    forwards
                        .iter()
                        .map(|f| f.host_port.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            NicBackend::Tap { ifname } => {
                return Err(format!(
                    "NIC {} of VM {vm} is on host interface {ifname}; clones would share it — clone a template with user networking",
                    n.id
                ));
            }
            NicBackend::User { .. } => {}
        }
    }
    Ok(())
}

/// Whether `count` clones of a `memory`-byte, `cpus`-vCPU VM fit a host with `available` bytes
/// of memory and `host_cpus` CPUs. Each clone is charged its whole memory, as any VM: its pages
/// are shared with the template only until it writes them, and nothing stops it writing all.
pub fn check_clone_room(
    count: usize,
    memory: u64,
    cpus: u32,
    available: u64,
    host_cpus: u32,
) -> std::result::Result<(), String> {
    let need = memory.saturating_mul(count as u64);
    let room = available.saturating_sub(HOST_RESERVE);
    if need > room {
        return Err(format!(
            "{count} clone(s) of {} each need {} of memory; {} is available on this host now ({} kept for the host); make fewer",
            format_size(memory),
            format_size(need),
            format_size(available),
            format_size(HOST_RESERVE)
        ));
    }
    if cpus > host_cpus {
        return Err(format!(
            "the template has {cpus} vCPUs; this host has {host_cpus} CPUs"
        ));
    }
    Ok(())
}

/// The clones (names) in `vms` that came from `template` (and from its state `state`, if given).
pub fn clones_of<'a>(
    vms: impl IntoIterator<Item = &'a VmInfo>,
    template: &str,
    state: Option<&str>,
) -> Vec<String> {
    vms.into_iter()
        .filter(|v| {
            v.clone_of
                .as_ref()
                .is_some_and(|c| c.vm == template && state.is_none_or(|s| c.state == s))
        })
        .map(|v| v.name.clone())
        .collect()
}

/// New MACs for `n` NICs, none of them in `taken`.
fn fresh_macs(n: usize, taken: &mut HashSet<MacAddr>) -> Vec<MacAddr> {
    (0..n)
        .map(|_| loop {
            let m = MacAddr::qemu_local(rand::random());
            if taken.insert(m) {
                break m;
            }
        })
        .collect()
}

impl Manager {
    /// Refuse when a clone depends on `vm` (on its state `state`, if given); `what` says what was
    /// asked (`delete state s1 of web`).
    pub(super) fn refuse_if_cloned(&self, vm: &str, state: Option<&str>, what: &str) -> Result<()> {
        let all = self.list();
        let clones = clones_of(&all, vm, state);
        if clones.is_empty() {
            return Ok(());
        }
        Err(HostError::Conflict(format!(
            "cannot {what}: clone(s) {} read its disk layers; delete them first (`drover vm delete --force {}`)",
            clones.join(", "),
            clones[0]
        )))
    }

    /// Make clones of `template`'s state `which` (see the module docs), reporting each clone
    /// through `progress` as it lands.
    pub async fn clone_state(
        &self,
        template: &str,
        which: &str,
        req: CloneRequest,
        caller: &Caller,
        progress: impl Fn(String) + Send + Sync,
    ) -> Result<CloneResult> {
        caller.require(Permission::Lifecycle)?;
        let t0 = Instant::now();
        let names = clone_names(&req.name, req.count).map_err(HostError::Invalid)?;
        // The state cannot go (nor the template change its states) while clones are made.
        let op = self.door(template, VmAction::Clone, caller).await?;
        let tslot = op.slot();
        let state = self.state(template, which)?;
        check_cloneable(template, &state).map_err(HostError::Conflict)?;
        self.check_loads_here(&state)?;
        let sdir = self.states_dir(template).join(&state.id);
        let devices = sdir.join(&state.devices.file);
        self.s.hashes.check_devices(&state, &devices)?;
        for d in &state.config.disks {
            match state.layers.get(d.id.as_str()) {
                Some(l) if l.exists() => {}
                _ => {
                    return Err(HostError::Invalid(format!(
                        "state {} of VM {template} is damaged: its layer of disk {} is missing",
                        state.id, d.id
                    )))
                }
            }
        }
        let _create = self.s.create_lock.lock().await;
        {
            let vms = lock(&self.s.vms);
            let taken: Vec<&String> = names.iter().filter(|n| vms.contains_key(*n)).collect();
            if !taken.is_empty() {
                return Err(HostError::AlreadyExists(
                    taken
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                ));
            }
        }
        for n in &names {
            let paths = self.run_paths(n);
            let p = paths.longest_socket();
            if p.as_os_str().len() > cmdline::MAX_SOCKET_PATH {
                return Err(HostError::Invalid(format!(
                    "clone {n}: the socket path {} is longer than the {}-byte limit; use a shorter name",
                    p.display(),
                    cmdline::MAX_SOCKET_PATH
                )));
            }
        }
        check_clone_room(
            names.len(),
            state.config.memory,
            state.config.cpus,
            hostfacts::memory().available,
            hostfacts::cpus(),
        )
        .map_err(HostError::Resources)?;
        let template_info = lock(&tslot.info).clone();
        if req.dry_run {
            return Ok(CloneResult {
                template: template.to_string(),
                state: state.id,
                clones: Vec::new(),
                checked: names,
                total_ms: t0.elapsed().as_millis() as u64,
            });
        }
        // Every clone maps the same file; brought back into RAM once if it was evicted.
        let memory = self.state_memory_in_ram(template, &state).await?;
        let mut taken: HashSet<MacAddr> = state.config.nics.iter().map(|n| n.mac).collect();
        for v in self.list() {
            taken.extend(v.config.nics.iter().map(|n| n.mac));
        }
        let mut clones = Vec::new();
        let total = names.len();
        for (i, name) in names.iter().enumerate() {
            let started = Instant::now();
            let made = self
                .clone_one(
                    name,
                    &template_info,
                    &state,
                    &devices,
                    memory.clone(),
                    &mut taken,
                    started,
                )
                .await;
            match made {
                Ok(c) => {
                    progress(format!(
                        "{name} ({}/{total}): running after {} ms, {}",
                        i + 1,
                        c.running_ms,
                        match (c.agent_ms, &c.identity_error) {
                            (Some(ms), None) =>
                                format!("agent answered with its new identity after {ms} ms"),
                            (_, Some(e)) => format!("identity not applied: {e}"),
                            (None, None) => "no agent".to_string(),
                        }
                    ));
                    clones.push(c);
                }
                Err(e) => {
                    let made: Vec<&str> = clones
                        .iter()
                        .map(|c: &CloneOutcome| c.name.as_str())
                        .collect();
                    return Err(match e {
                        HostError::Resources(m) => HostError::Resources(m),
                        other => HostError::Internal(format!(
                            "clone {name} failed ({other}); {} nothing more was made",
                            if made.is_empty() {
                                "no clone was made, and".to_string()
                            } else {
                                format!("made and running: {};", made.join(", "))
                            }
                        )),
                    });
                }
            }
        }
        tracing::info!(
            template,
            state = state.id,
            count = clones.len(),
            ms = t0.elapsed().as_millis() as u64,
            "cloned"
        );
        Ok(CloneResult {
            template: template.to_string(),
            state: state.id,
            clones,
            checked: Vec::new(),
            total_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Make, start and re-identify one clone. On failure nothing of it stays.
    #[allow(clippy::too_many_arguments)]
    async fn clone_one(
        &self,
        name: &str,
        template: &VmInfo,
        state: &StateInfo,
        devices: &std::path::Path,
        memory: Option<std::path::PathBuf>,
        taken: &mut HashSet<MacAddr>,
        started: Instant,
    ) -> Result<CloneOutcome> {
        let vm_dir = self.vm_dir(name);
        std::fs::create_dir_all(vm_dir.join("disks"))
            .map_err(|e| io_ctx("creating", &vm_dir, e))?;
        let made = self.clone_record(name, template, state, taken).await;
        let info = match made {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vm_dir);
                return Err(e);
            }
        };
        let slot = super::VmSlot::new(info.clone());
        lock(&self.s.vms).insert(name.to_string(), slot.clone());
        let spec = RestoreSpec {
            devices: devices.to_path_buf(),
            memory,
            mapped_ram: false,
            state: state.id.clone(),
            // The clone's own overlays, in its config already.
            layers: None,
            // Checked before the clone was made.
            verify: None,
            plugged: state.plugged.clone(),
        };
        let launched = {
            let _op = OpGuard::lock(&slot).await;
            self.launch(
                name,
                &slot,
                info.config.clone(),
                format!("clone of state {} of {}", state.id, template.name),
                LaunchKind::Restore(&spec),
            )
            .await
        };
        if let Err(e) = launched {
            if let Err(d) = self.delete(name, true, true, &Caller::daemon()).await {
                tracing::warn!(vm = name, "could not remove the failed clone: {d}");
            }
            return Err(e);
        }
        let running_ms = started.elapsed().as_millis() as u64;
        // The template's clock stood still in its state, like any restore's.
        self.set_guest_clock_soon(name, &slot);
        crate::crashpoint::hit("clone-identity");
        let mut out = CloneOutcome {
            name: name.to_string(),
            pid: lock(&slot.info).pid,
            macs: info
                .config
                .nics
                .iter()
                .map(|n| (n.id.to_string(), n.mac.to_string()))
                .collect(),
            machine_id: info
                .clone_of
                .as_ref()
                .map(|c| c.machine_id.clone())
                .unwrap_or_default(),
            running_ms,
            agent_ms: None,
            hooks: Vec::new(),
            identity_error: None,
        };
        match self.push_identity(name, &slot).await {
            Ok(hooks) => {
                out.agent_ms = Some(started.elapsed().as_millis() as u64);
                out.hooks = hooks;
            }
            Err(e) => {
                tracing::warn!(
                    vm = name,
                    "clone runs, but its identity was not applied: {e}"
                );
                out.identity_error = Some(e.to_string());
            }
        }
        Ok(out)
    }

    /// The clone's disks (overlays on the state's layers), config and record, durable.
    async fn clone_record(
        &self,
        name: &str,
        template: &VmInfo,
        state: &StateInfo,
        taken: &mut HashSet<MacAddr>,
    ) -> Result<VmInfo> {
        let mut config: VmConfig = state.config.clone();
        config.name = VmName::new(name)?;
        for d in config.disks.iter_mut() {
            let layer = state.layers.get(d.id.as_str()).cloned().ok_or_else(|| {
                HostError::Invalid(format!(
                    "state {} records no layer of disk {}",
                    state.id, d.id
                ))
            })?;
            let overlay = self
                .vm_dir(name)
                .join("disks")
                .join(format!("{}.qcow2", d.id));
            let (o, size) = (overlay.clone(), d.size);
            tokio::task::spawn_blocking(move || img::create_overlay(&o, &layer, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??;
            // The clone's own file from here on: deleted with it, never written back anywhere.
            d.path = overlay;
            d.owned = true;
            d.format = drover_model::DiskFormat::Qcow2;
        }
        for (n, mac) in config
            .nics
            .iter_mut()
            .zip(fresh_macs(state.config.nics.len(), taken))
        {
            n.mac = mac;
        }
        config.validate_config()?;
        // The state loads only into the machine it was saved from.
        let mut info = self.new_record(config, template.platform.clone());
        info.clone_of = Some(CloneOrigin {
            vm: template.name.clone(),
            state: state.id.clone(),
            at_ms: hostfacts::now_ms(),
            machine_id: super::identity::new_uuid().replace('-', ""),
            identity_applied_ms: None,
        });
        self.s.store.apply(vec![
            drover_store::put(VMS, name, &VmRecord::from(&info))?,
            drover_store::put(
                super::HISTORY,
                name,
                &ConfigHistory::new(info.config.clone()),
            )?,
            super::identity::generation_write(
                name,
                &format!("clone of state {} of {}", state.id, template.name),
            )?,
        ])?;
        Ok(info)
    }

    /// Send clone `name` its identity through its agent and record that it took it; returns the
    /// hooks that ran. Waits for the agent to answer first.
    async fn push_identity(&self, name: &str, slot: &Arc<VmSlot>) -> Result<Vec<String>> {
        let info = lock(&slot.info).clone();
        let Some(origin) = info.clone_of.clone() else {
            return Ok(Vec::new());
        };
        let rt = self
            .runtime(slot)
            .ok_or_else(|| HostError::Conflict(format!("clone {name} is not running")))?;
        let template_nics: BTreeMap<String, String> = self
            .state(&origin.vm, &origin.state)
            .map(|s| {
                s.config
                    .nics
                    .iter()
                    .map(|n| (n.id.to_string(), n.mac.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let update = IdentityUpdate {
            token: self.generation_id(name)?,
            hostname: Some(name.to_string()),
            machine_id: Some(origin.machine_id.clone()),
            nics: info
                .config
                .nics
                .iter()
                .filter_map(|n| {
                    template_nics.get(n.id.as_str()).map(|old| NicIdentity {
                        old_mac: old.clone(),
                        mac: n.mac.to_string(),
                    })
                })
                .collect(),
            reason: format!("clone of state {} of {}", origin.state, origin.vm),
        };
        let applied = self
            .send_identity(&format!("clone {name}"), &rt.agent, update)
            .await?;
        self.persist(slot, |i| {
            if let Some(c) = i.clone_of.as_mut() {
                c.identity_applied_ms = Some(hostfacts::now_ms());
            }
        })?;
        if !applied.errors.is_empty() {
            return Err(HostError::Agent(format!(
                "clone {name}'s agent applied its identity only in part: {}",
                applied.errors.join("; ")
            )));
        }
        Ok(applied.hooks)
    }

    /// Send `update` to a VM's agent (waiting for it to answer first) and return what it did:
    /// the one door for a clone's identity and a resume's new identity or MACs. `who` names the
    /// VM in errors (`clone web-2`, `VM web`).
    pub(super) async fn send_identity(
        &self,
        who: &str,
        agent: &crate::agent_link::AgentLink,
        update: IdentityUpdate,
    ) -> Result<IdentityApplied> {
        let t = Instant::now();
        agent
            .wait_ready(AGENT_WAIT)
            .await
            .map_err(|e| HostError::Agent(format!("{who}'s agent: {e}")))?;
        let ready_ms = t.elapsed().as_millis() as u64;
        let answer = agent
            .call(Body::SetIdentity(update), IDENTITY_WAIT)
            .await
            .map_err(|e| HostError::Agent(format!("{who}'s agent: {e}")))?;
        let applied = match answer {
            Body::IdentitySet(a) => a,
            Body::Error { code, message } => {
                return Err(HostError::Agent(format!(
                    "{who}'s agent refused its identity ({code}: {message}); an agent older than this droverd cannot take one"
                )))
            }
            other => {
                return Err(HostError::Agent(format!(
                    "{who}'s agent answered {} to its identity",
                    other.name()
                )))
            }
        };
        tracing::debug!(
            who,
            ready_ms,
            applied_ms = t.elapsed().as_millis() as u64 - ready_ms,
            changed = ?applied.changed,
            "the agent answered, and took its identity"
        );
        Ok(applied)
    }

    /// At start: clones re-adopted before their agent confirmed their identity get it again
    /// (the agent applies each token once, so a repeat is harmless); so do resumed and
    /// restored VMs whose new identity was not confirmed.
    pub(super) fn resume_pending_identities(&self) {
        self.resend_pending_identities();
        for v in self.list() {
            let pending = v.state == VmState::Running
                && v.clone_of
                    .as_ref()
                    .is_some_and(|c| c.identity_applied_ms.is_none());
            if !pending {
                continue;
            }
            let Ok(slot) = self.slot(&v.name) else {
                continue;
            };
            let mgr = self.clone();
            tokio::spawn(async move {
                match mgr.push_identity(&v.name, &slot).await {
                    Ok(_) => tracing::info!(vm = v.name, "clone identity applied after a restart"),
                    Err(e) => tracing::warn!(vm = v.name, "clone identity still not applied: {e}"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_name_or_numbered_stems() {
        assert_eq!(clone_names("web", None).unwrap(), vec!["web"]);
        assert_eq!(
            clone_names("web", Some(3)).unwrap(),
            vec!["web-1", "web-2", "web-3"]
        );
        assert_eq!(clone_names("web", Some(64)).unwrap().len(), 64);
        for bad in [Some(0), Some(65)] {
            let e = clone_names("web", bad).unwrap_err();
            assert!(e.contains("1 to 64"), "{e}");
        }
        assert!(clone_names("Web", None).unwrap_err().contains("Web"));
        // A stem that is valid alone but not once numbered past the 63-character label limit.
        let long = "a".repeat(62);
        assert!(clone_names(&long, None).is_ok());
        assert!(clone_names(&long, Some(2)).is_err());
    }

    #[test]
    fn room_is_every_clone_s_whole_memory() {
        let g = 1u64 << 30;
        assert!(check_clone_room(4, g / 2, 1, 2 * g + HOST_RESERVE, 2).is_ok());
        let e = check_clone_room(5, g / 2, 1, 2 * g + HOST_RESERVE, 2).unwrap_err();
        assert!(e.contains("5 clone(s)") && e.contains("make fewer"), "{e}");
        assert!(check_clone_room(1, g / 2, 4, 8 * g, 2)
            .unwrap_err()
            .contains("4 vCPUs"));
    }

    fn state(phase: StatePhase, memory: bool) -> StateInfo {
        let config = VmConfig {
            name: VmName::new("web").unwrap(),
            cpus: 1,
            memory: 256 << 20,
            disks: Vec::new(),
            nics: Vec::new(),
            boot: drover_model::Boot::Default { cmdline: None },
            accel: None,
            max_memory: None,
        };
        StateInfo {
            format: STATE_FORMAT,
            id: "s1".into(),
            name: "s1".into(),
            vm: "web".into(),
            created_at_ms: 0,
            created_by: "root".into(),
            mode: "fast".into(),
            config,
            layers: Default::default(),
            devices: drover_api::StateSection {
                file: "devices.bin".into(),
                bytes: 1,
                sha256: None,
            },
            memory: memory.then(|| drover_api::StateSection {
                file: "memory.bin".into(),
                bytes: 1,
                sha256: None,
            }),
            paused_ms: 1,
            capture: None,
            phase,
            failure: None,
            guest_save: None,
            saved_on: None,
            plugged: Default::default(),
        }
    }

    #[test]
    fn only_captured_fast_states_without_shared_host_ports_clone() {
        assert!(check_cloneable("web", &state(StatePhase::Ready, true)).is_ok());
        assert!(check_cloneable("web", &state(StatePhase::Durable, true)).is_ok());
        let e = check_cloneable("web", &state(StatePhase::Capturing, true)).unwrap_err();
        assert!(e.contains("not restorable yet"), "{e}");
        assert!(check_cloneable("web", &state(StatePhase::Failed, true))
            .unwrap_err()
            .contains("capture failed"));
        assert!(check_cloneable("web", &state(StatePhase::Durable, false))
            .unwrap_err()
            .contains("classic"));
        let mut s = state(StatePhase::Durable, true);
        s.config.nics.push(drover_model::NicConfig {
            id: drover_model::ElementId::new("net0").unwrap(),
            mac: MacAddr::qemu_local([1, 2, 3]),
            backend: NicBackend::User {
                forwards: vec!["tcp:127.0.0.1:8080-:80".parse().unwrap()],
            },
            slot: None,
            addr: None,
        });
        assert!(check_cloneable("web", &s).unwrap_err().contains("8080"));
        s.config.nics[0].backend = NicBackend::User { forwards: vec![] };
        assert!(check_cloneable("web", &s).is_ok());
    }

    #[test]
    fn clones_are_found_by_template_and_state() {
        let mut vms = Vec::new();
        for (name, from) in [("a", None), ("c1", Some("s1")), ("c2", Some("s2"))] {
            let mut v: VmInfo = serde_json::from_value(serde_json::json!({
                "name": name, "state": "stopped", "created_at_ms": 0,
                "config": serde_json::to_value(state(StatePhase::Ready, true).config).unwrap(),
            }))
            .unwrap();
            v.clone_of = from.map(|s| CloneOrigin {
                vm: "a".into(),
                state: s.into(),
                at_ms: 0,
                machine_id: String::new(),
                identity_applied_ms: None,
            });
            vms.push(v);
        }
        assert_eq!(clones_of(&vms, "a", None), vec!["c1", "c2"]);
        assert_eq!(clones_of(&vms, "a", Some("s2")), vec!["c2"]);
        assert!(clones_of(&vms, "c1", None).is_empty());
    }

    #[test]
    fn fresh_macs_avoid_each_other_and_what_is_taken() {
        let mut taken = HashSet::new();
        taken.insert(MacAddr::qemu_local([0, 0, 1]));
        let macs = fresh_macs(50, &mut taken);
        let distinct: HashSet<_> = macs.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert_eq!(taken.len(), 51);
        assert!(!macs.contains(&MacAddr::qemu_local([0, 0, 1])));
    }
}
