//! Persistent runtime configuration: live changes (hot-plug through QMP), changes for the next
//! boot, the config history (generations, promote) and the persistence flag.
//!
//! Every change is checked against the config model first, applied to QEMU second (undone there
//! if a step fails), and journaled durably third, in the same transaction as the VM's new
//! running config: a crash after a change loses nothing, a failed change leaves no trace.
//!
//! The QEMU side ([`live_change`]: plan, apply, undo) runs against the [`Vmm`] trait, so these
//! rules are unit-tested against a fake QEMU (`rules_tests`).

use super::{lock, Manager, OpGuard, VmSlot, HISTORY, HOTPLUG_PORTS};
use crate::action::VmAction;
use crate::auth::{Caller, Permission};
use crate::error::{HostError, Result};
use crate::hostfacts;
use crate::vmm::Vmm;
use drover_api::{
    AttachRequest, ChangeResult, ConfigHistoryView, DetachRequest, GenerationView, NewDevice,
    PersistRequest, SetRequest, VmInfo, VmState,
};
use drover_model::{
    describe, diff, format_size, DiskConfig, ElementId, MacAddr, NicBackend, NicConfig,
    StoredConfig, VmConfig,
};
use drover_qemu::{hotplug, img};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Linux adds memory in blocks of this size on x86-64; a DIMM must be a multiple of it.
const MEMORY_BLOCK: u64 = 128 << 20;
/// How long a guest gets to acknowledge an unplug.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// One change, resolved against the config it applies to.
#[derive(Clone)]
pub(super) enum Change {
    AddDisk(DiskConfig, bool),
    AddNic(NicConfig),
    Remove(String),
    Cpus(u32),
    Memory(u64),
}

impl Manager {
    /// Attach a disk or NIC: live to a running VM, for the next boot with `next_boot`, or to a
    /// stopped VM's next start.
    pub async fn attach_device(
        &self,
        name: &str,
        req: AttachRequest,
        caller: &Caller,
    ) -> Result<ChangeResult> {
        let op = self.door(name, VmAction::Change, caller).await?;
        let id = ElementId::new(&req.id)?;
        let change = match req.device {
            NewDevice::NewDisk { size } => {
                if !(drover_model::MIN_DISK_SIZE..=drover_model::MAX_DISK_SIZE).contains(&size) {
                    return Err(HostError::Invalid(format!(
                        "a disk of {} is out of range ({} to {})",
                        format_size(size),
                        format_size(drover_model::MIN_DISK_SIZE),
                        format_size(drover_model::MAX_DISK_SIZE)
                    )));
                }
                let path = self.vm_dir(name).join("disks").join(format!("{id}.qcow2"));
                Change::AddDisk(
                    DiskConfig::unplaced(
                        id,
                        path,
                        drover_model::DiskFormat::Qcow2,
                        size,
                        false,
                        true,
                    ),
                    true,
                )
            }
            NewDevice::Image { path, readonly } => {
                if !path.is_absolute() {
                    return Err(HostError::Invalid(format!(
                        "the image path {} must be absolute",
                        path.display()
                    )));
                }
                let usage = if readonly {
                    crate::pools::PathUse::DiskReadOnly
                } else {
                    crate::pools::PathUse::DiskReadWrite
                };
                let image = self.s.pools.resolve(caller, &path, usage)?;
                let p = image.clone();
                let info = tokio::task::spawn_blocking(move || img::inspect(&p))
                    .await
                    .map_err(|e| HostError::Internal(e.to_string()))??;
                Change::AddDisk(
                    DiskConfig::unplaced(
                        id,
                        image,
                        info.format,
                        info.virtual_size,
                        readonly,
                        false,
                    ),
                    false,
                )
            }
            NewDevice::Nic { mac, forwards } => {
                for f in &forwards {
                    crate::pools::check_forward(caller, f)?;
                }
                Change::AddNic(NicConfig {
                    id,
                    mac: mac.unwrap_or_else(|| MacAddr::qemu_local(rand::random())),
                    backend: NicBackend::User { forwards },
                    slot: None,
                    addr: None,
                })
            }
        };
        self.change(name, &op, vec![change], req.next_boot, caller)
            .await
    }

    /// Detach a disk or NIC by id.
    pub async fn detach_device(
        &self,
        name: &str,
        req: DetachRequest,
        caller: &Caller,
    ) -> Result<ChangeResult> {
        let op = self.door(name, VmAction::Change, caller).await?;
        self.change(
            name,
            &op,
            vec![Change::Remove(req.id)],
            req.next_boot,
            caller,
        )
        .await
    }

    /// Set vCPUs and/or memory.
    pub async fn set(&self, name: &str, req: SetRequest, caller: &Caller) -> Result<ChangeResult> {
        let op = self.door(name, VmAction::Change, caller).await?;
        let mut changes = Vec::new();
        if let Some(c) = req.cpus {
            changes.push(Change::Cpus(c));
        }
        if let Some(m) = req.memory {
            changes.push(Change::Memory(m));
        }
        if changes.is_empty() {
            return Err(HostError::Invalid(
                "nothing to set: give cpus=N and/or memory=SIZE".into(),
            ));
        }
        self.change(name, &op, changes, req.next_boot, caller).await
    }

    /// Apply changes. The op lock is held by the caller.
    pub(super) async fn change(
        &self,
        name: &str,
        op: &OpGuard,
        changes: Vec<Change>,
        next_boot: bool,
        caller: &Caller,
    ) -> Result<ChangeResult> {
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        match info.state {
            VmState::Running => {}
            VmState::Stopped => {
                if next_boot {
                    return Err(HostError::Invalid(format!(
                        "VM {name} is stopped: a change applies to its next start anyway; drop --next-boot"
                    )));
                }
                return self
                    .change_stopped(name, slot, &info, changes, caller)
                    .await;
            }
            s => {
                return Err(HostError::Conflict(format!(
                    "VM {name} is {s}; wait for that to finish"
                )))
            }
        }
        let running = info.running_config.clone().ok_or_else(|| {
            HostError::Internal(format!("VM {name} is running without a recorded config"))
        })?;
        let next = info.next_config.clone().unwrap_or_else(|| running.clone());
        let host_cpus = hostfacts::cpus();
        if next_boot {
            // Checked against the model only; QEMU is not touched.
            let mut cfg = next.clone();
            for c in &changes {
                apply_to(&mut cfg, c, None, host_cpus)?;
            }
            let lines = describe(&next, &diff(&next, &cfg));
            let for_persist = info.persist;
            let cfg_saved = cfg.clone();
            let vm = self.commit(slot, |i| {
                i.next_config = Some(cfg_saved);
                Ok(vec![self.journal(
                    name,
                    &caller.name,
                    "next-boot",
                    lines.clone(),
                )?])
            })?;
            return Ok(ChangeResult {
                vm: self.with_agent(slot, vm),
                applied: "next-boot".into(),
                changes: lines,
                warning: (!for_persist).then(|| persist_off_warning(name)),
            });
        }
        let rt = self
            .runtime(slot)
            .ok_or_else(|| HostError::Conflict(format!("VM {name} is not running")))?;
        let host = ManagerDisks {
            m: self,
            name,
            rt: &rt,
        };
        let vmm = rt.vmm();
        let (cfg, done) = live_change(name, &vmm, &host, &running, changes, host_cpus).await?;
        // The same changes go into what will be sealed (next-boot changes made earlier stay).
        let mut next_after = next.clone();
        // A hot-plugged device keeps its port on the next boot too.
        for (c, slot_no) in &done {
            let _ = apply_to(&mut next_after, c, *slot_no, host_cpus);
        }
        let lines = describe(&running, &diff(&running, &cfg));
        let (cfg_saved, next_saved) = (cfg.clone(), next_after.clone());
        let vm = self.commit(slot, |i| {
            i.next_config = (next_saved != cfg_saved).then_some(next_saved);
            i.running_config = Some(cfg_saved);
            Ok(vec![self.journal(
                name,
                &caller.name,
                "live",
                lines.clone(),
            )?])
        })?;
        Ok(ChangeResult {
            vm: self.with_agent(slot, vm),
            applied: "live".into(),
            changes: lines,
            warning: (!info.persist).then(|| persist_off_warning(name)),
        })
    }

    fn with_agent(&self, slot: &Arc<VmSlot>, mut vm: VmInfo) -> VmInfo {
        vm.agent = lock(&slot.rt).as_ref().map(|rt| rt.agent.status());
        vm
    }

    /// A change to a stopped VM: stored as a new generation its next start uses (promoted to the
    /// initial config when persistence is off, since a start then boots the initial config).
    async fn change_stopped(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        info: &VmInfo,
        changes: Vec<Change>,
        caller: &Caller,
    ) -> Result<ChangeResult> {
        if !info.persist {
            // The change would be promoted to the initial config (what a start then boots).
            self.authorize_initial_change(name, caller, "change a stopped VM with persistence off")
                .map_err(|e| {
                    HostError::Forbidden(format!(
                        "{e}. With persistence off, a change to stopped VM {name} replaces its \
                         initial config; start it and change it live instead (kept until it stops)"
                    ))
                })?;
        }
        let mut history = self.history(info)?;
        let base_gen = history.latest().filter(|_| info.persist).unwrap_or(0);
        let base = history.resolve(base_gen)?;
        let mut cfg = base.clone();
        let mut created = Vec::new();
        for c in &changes {
            apply_to(&mut cfg, c, None, hostfacts::cpus())?;
            if let Change::AddDisk(d, true) = c {
                created.push(d.clone());
            }
        }
        for d in &created {
            if d.path.exists() {
                return Err(HostError::Conflict(format!(
                    "{} already exists; pick another disk id",
                    d.path.display()
                )));
            }
        }
        for d in &created {
            create_image(d).await?;
        }
        let lines = describe(&base, &diff(&base, &cfg));
        let gen = history.seal(
            &cfg,
            info.persist_mode,
            &caller.name,
            "changed while stopped",
            hostfacts::now_ms(),
        )?;
        let kind = match gen {
            Some(g) if !info.persist => {
                history.promote(g)?;
                format!("config (generation {g}, promoted to initial: persistence is off)")
            }
            Some(g) => format!("config (generation {g})"),
            None => "config (no change)".to_string(),
        };
        let hist = history.clone();
        let result = self.commit(slot, |i| {
            i.config = hist.initial.clone();
            Ok(vec![
                drover_store::put(HISTORY, name, &hist)?,
                self.journal(name, &caller.name, &kind, lines.clone())?,
            ])
        });
        let vm = match result {
            Ok(vm) => vm,
            Err(e) => {
                for d in &created {
                    let _ = std::fs::remove_file(&d.path);
                }
                return Err(e);
            }
        };
        Ok(ChangeResult {
            vm,
            applied: "config".into(),
            changes: lines,
            warning: None,
        })
    }

    // ------------------------------------------------------------ history, persistence

    /// The VM's config history.
    pub fn config_history(&self, name: &str, caller: &Caller) -> Result<ConfigHistoryView> {
        caller.require(Permission::Read)?;
        let slot = self.slot(name)?;
        let info = lock(&slot.info).clone();
        let history = self.history(&info)?;
        let mut generations = vec![GenerationView {
            id: 0,
            created_at_ms: info.created_at_ms,
            who: "-".into(),
            why: if history.initial_version > 1 {
                "initial (promoted)".into()
            } else {
                "initial".into()
            },
            kind: "initial".into(),
            changes: Vec::new(),
            config: history.initial.clone(),
        }];
        for g in &history.generations {
            let config = history.resolve(g.id)?;
            generations.push(GenerationView {
                id: g.id,
                created_at_ms: g.created_at_ms,
                who: g.who.clone(),
                why: g.why.clone(),
                kind: match g.stored {
                    StoredConfig::Snapshot(_) => "snapshot".into(),
                    StoredConfig::Diff(_) => "diff".into(),
                },
                changes: describe(&history.initial, &diff(&history.initial, &config)),
                config,
            });
        }
        Ok(ConfigHistoryView {
            name: info.name.clone(),
            persist: info.persist,
            persist_mode: info.persist_mode,
            default_start: history.latest().filter(|_| info.persist).unwrap_or(0),
            generations,
        })
    }

    /// How generation `to` differs from `from`.
    pub fn config_diff(
        &self,
        name: &str,
        from: u32,
        to: u32,
        caller: &Caller,
    ) -> Result<Vec<String>> {
        caller.require(Permission::Read)?;
        let info = lock(&self.slot(name)?.info).clone();
        let history = self.history(&info)?;
        let (a, b) = (history.resolve(from)?, history.resolve(to)?);
        Ok(describe(&a, &diff(&a, &b)))
    }

    /// The one check for every route that changes what a VM's initial config is or whether
    /// live changes are kept: promote, persistence on/off or mode, and a change to a stopped
    /// VM with persistence off (stored as the new initial config). Needs `config.persist`; a
    /// refusal is written to the VM's audit trail (`drover vm audit`) with who and what.
    pub(super) fn authorize_initial_change(
        &self,
        name: &str,
        caller: &Caller,
        what: &str,
    ) -> Result<()> {
        caller.require(Permission::ConfigPersist).inspect_err(|e| {
            tracing::warn!(vm = name, who = caller.name, what, "refused: {e}");
            self.audit(
                name,
                &caller.name,
                what,
                None,
                None,
                "refused",
                Some(e.to_string()),
            );
        })
    }

    /// Make generation `gen` the initial config; other diffs are rebased.
    pub async fn promote(
        &self,
        name: &str,
        gen: u32,
        caller: &Caller,
    ) -> Result<ConfigHistoryView> {
        // The VM is looked up before the caller's right to change its initial config.
        let op = self.door(name, VmAction::Promote, caller).await?;
        let slot = op.slot();
        self.authorize_initial_change(name, caller, &format!("promote generation {gen}"))?;
        let info = lock(&slot.info).clone();
        let mut history = self.history(&info)?;
        history.promote(gen)?;
        self.commit(slot, |i| {
            i.config = history.initial.clone();
            Ok(vec![
                drover_store::put(HISTORY, name, &history)?,
                self.journal(
                    name,
                    &caller.name,
                    &format!("promoted generation {gen} to initial"),
                    Vec::new(),
                )?,
            ])
        })?;
        self.config_history(name, caller)
    }

    /// Turn persistence on or off, or change its mode; allowed while the VM runs.
    pub async fn set_persist(
        &self,
        name: &str,
        req: PersistRequest,
        caller: &Caller,
    ) -> Result<VmInfo> {
        if req.enabled.is_none() && req.mode.is_none() {
            return Err(HostError::Invalid(
                "give on|off and/or --mode snapshot|diff".into(),
            ));
        }
        let slot = self.slot(name)?;
        self.authorize_initial_change(name, caller, "config persist")?;
        let what = format!(
            "persist {}{}",
            req.enabled
                .map(|e| if e { "on" } else { "off" })
                .unwrap_or("unchanged"),
            req.mode.map(|m| format!(", mode {m}")).unwrap_or_default()
        );
        let vm = self.commit(&slot, |i| {
            if let Some(e) = req.enabled {
                i.persist = e;
            }
            if let Some(m) = req.mode {
                i.persist_mode = m;
            }
            Ok(vec![self.journal(name, &caller.name, &what, Vec::new())?])
        })?;
        Ok(self.with_agent(&slot, vm))
    }

    /// Resolve one generation's config.
    pub fn generation_config(&self, name: &str, gen: u32, caller: &Caller) -> Result<VmConfig> {
        caller.require(Permission::Read)?;
        let info = lock(&self.slot(name)?.info).clone();
        Ok(self.history(&info)?.resolve(gen)?)
    }
}

/// What a live step plugged into QEMU beyond its config element, to take it out again.
#[derive(Debug, Default)]
struct Plugged {
    /// Device ids (vCPUs, a DIMM).
    devices: Vec<String>,
    /// A DIMM's id (its memory backend goes after the device).
    memory: Option<String>,
}

/// The host's part of a live step, what the VMM does not do: a new disk's image and the layer
/// it opens on, and which block node a disk's device writes to now.
pub(super) trait LiveHost: Sync {
    /// Plug disk `d` on hot-plug port `port` of `vmm`, opened on its current layer; when
    /// `owned`, its image is created first (and removed again if the plug fails).
    fn plug_disk<V: Vmm>(
        &self,
        vmm: &V,
        cfg: &VmConfig,
        d: &DiskConfig,
        owned: bool,
        port: u8,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Remove the image created for `d`, whose plug was undone.
    fn discard_disk(&self, d: &DiskConfig);
    /// The block node disk `d`'s guest device writes to now.
    fn active_node(&self, d: &DiskConfig) -> String;
}

/// The manager's [`LiveHost`] for VM `name` running as `rt`.
struct ManagerDisks<'a> {
    m: &'a Manager,
    name: &'a str,
    rt: &'a super::Runtime,
}

impl LiveHost for ManagerDisks<'_> {
    async fn plug_disk<V: Vmm>(
        &self,
        vmm: &V,
        cfg: &VmConfig,
        d: &DiskConfig,
        owned: bool,
        port: u8,
    ) -> Result<()> {
        if owned {
            if d.path.exists() {
                return Err(HostError::Invalid(format!(
                    "{} already exists; pick another disk id",
                    d.path.display()
                )));
            }
            create_image(d).await?;
        }
        // Its current layer: the same image may have been saved before, under this id.
        let mut one = cfg.clone();
        one.disks = vec![d.clone()];
        let slot = self.m.slot(self.name)?;
        let layered = self.m.open_layers(self.name, &slot, &one, None).await?;
        let on_layer = layered.disks.first().unwrap_or(d);
        if let Err(e) = self.m.hotplug_disk(vmm, on_layer, port).await {
            if owned {
                self.discard_disk(d);
            }
            return Err(e);
        }
        Ok(())
    }

    fn discard_disk(&self, d: &DiskConfig) {
        let _ = std::fs::remove_file(&d.path);
    }

    fn active_node(&self, d: &DiskConfig) -> String {
        self.rt.active_node(d)
    }
}

/// Make `changes` to VM `name` running `running` on `vmm`: all planned first, then applied in
/// order, the steps done undone when one fails ([`apply_plan`]). Returns the config it runs
/// now and the steps done, each with the hot-plug port it took.
async fn live_change<V: Vmm, H: LiveHost>(
    name: &str,
    vmm: &V,
    host: &H,
    running: &VmConfig,
    changes: Vec<Change>,
    host_cpus: u32,
) -> Result<(VmConfig, Vec<(Change, Option<u8>)>)> {
    let plan = plan_live(name, running, changes, host_cpus)?;
    apply_plan(name, vmm, host, running, plan, host_cpus).await
}

/// Check every change on a copy of `running` first, in order, so nothing is applied when one
/// is invalid; each added device gets the first free hot-plug port. Returns the steps.
fn plan_live(
    name: &str,
    running: &VmConfig,
    changes: Vec<Change>,
    host_cpus: u32,
) -> Result<Vec<(Change, Option<u8>)>> {
    let mut planned = running.clone();
    let mut plan = Vec::new();
    for c in changes {
        let slot_no = match &c {
            Change::AddDisk(..) | Change::AddNic(_) => Some(free_port(&planned).ok_or_else(|| {
                HostError::Resources(format!(
                    "all {HOTPLUG_PORTS} hot-plug ports of VM {name} are in use; detach a hot-plugged device, or use --next-boot"
                ))
            })?),
            _ => None,
        };
        check_live(name, &planned, &c)?;
        apply_to(&mut planned, &c, slot_no, host_cpus)?;
        plan.push((c, slot_no));
    }
    Ok(plan)
}

/// Apply `plan` to the VMM in order, starting from `running`. When a step fails, the steps
/// done are undone newest first and the step's error returned (with what the guest did not
/// release in time, which stays until the VM stops). Returns the config the VMM now runs and
/// the steps done.
async fn apply_plan<V: Vmm, H: LiveHost>(
    name: &str,
    vmm: &V,
    host: &H,
    running: &VmConfig,
    plan: Vec<(Change, Option<u8>)>,
    host_cpus: u32,
) -> Result<(VmConfig, Vec<(Change, Option<u8>)>)> {
    let mut done: Vec<(Change, Option<u8>, Plugged)> = Vec::new();
    let mut cfg = running.clone();
    for (c, slot_no) in plan {
        let step = apply_live(name, vmm, host, &cfg, &c, slot_no).await;
        match step {
            Ok(plugged) => {
                apply_to(&mut cfg, &c, slot_no, host_cpus)?;
                done.push((c, slot_no, plugged));
            }
            Err(e) => {
                let mut left = Vec::new();
                for (c, _, plugged) in done.iter().rev() {
                    left.extend(undo_live(vmm, host, c, plugged).await);
                }
                if left.is_empty() {
                    return Err(e);
                }
                // Said, not hidden: the VM runs with these until it stops (not journaled).
                return Err(HostError::Conflict(format!(
                    "{e}; the earlier steps were undone except {}, which the guest did not \
                     release within {}s: they stay until VM {name} stops",
                    left.join(", "),
                    UNPLUG_TIMEOUT.as_secs()
                )));
            }
        }
    }
    Ok((cfg, done.into_iter().map(|(c, s, _)| (c, s)).collect()))
}

/// One live step. Returns what it plugged beyond its config element, to undo it.
async fn apply_live<V: Vmm, H: LiveHost>(
    name: &str,
    vmm: &V,
    host: &H,
    cfg: &VmConfig,
    c: &Change,
    slot_no: Option<u8>,
) -> Result<Plugged> {
    let port = slot_no.unwrap_or(0);
    match c {
        Change::AddDisk(d, owned) => {
            host.plug_disk(vmm, cfg, d, *owned, port).await?;
            Ok(Plugged::default())
        }
        Change::AddNic(n) => {
            vmm.add_nic(n, port).await?;
            Ok(Plugged::default())
        }
        Change::Remove(id) => {
            let disk = cfg.disks.iter().find(|d| d.id.as_str() == id).cloned();
            let nic = cfg.nics.iter().find(|n| n.id.as_str() == id).cloned();
            let device = match (&disk, &nic) {
                (Some(d), _) => drover_qemu::cmdline::disk_node(d),
                (_, Some(n)) => drover_qemu::cmdline::nic_node(n.id.as_str()),
                _ => {
                    return Err(HostError::Invalid(format!(
                        "VM {name} has no disk or NIC {id}"
                    )))
                }
            };
            let events = vmm.events();
            vmm.request_unplug(&device).await?;
            let left = wait_deleted(events, std::slice::from_ref(&device), UNPLUG_TIMEOUT).await;
            if !left.is_empty() {
                return Err(HostError::Timeout(format!(
                    "the guest in VM {name} did not release {id} within {}s; it stays attached (try again, or use --next-boot)",
                    UNPLUG_TIMEOUT.as_secs()
                )));
            }
            if let Some(d) = &disk {
                vmm.remove_disk_backend(&host.active_node(d)).await?;
            }
            if let Some(n) = &nic {
                vmm.remove_nic_backend(n).await?;
            }
            Ok(Plugged::default())
        }
        Change::Cpus(n) => Ok(Plugged {
            devices: vmm.add_cpus(*n).await?,
            memory: None,
        }),
        Change::Memory(bytes) => {
            let add = bytes - cfg.memory;
            let id = format!("m{}", hostfacts::now_ms());
            vmm.add_memory(&id, add).await?;
            Ok(Plugged {
                devices: vec![hotplug::dimm_ids(&id).0],
                memory: Some(id),
            })
        }
    }
}

/// Undo a live step after a later step failed. vCPUs and DIMMs go only when the guest
/// releases them; returns what is still in place, for the error the caller reports.
async fn undo_live<V: Vmm, H: LiveHost>(
    vmm: &V,
    host: &H,
    c: &Change,
    plugged: &Plugged,
) -> Vec<String> {
    match c {
        Change::AddDisk(d, owned) => {
            let _ = vmm
                .request_unplug(&drover_qemu::cmdline::disk_node(d))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = vmm.remove_disk_backend(&host.active_node(d)).await;
            if *owned {
                host.discard_disk(d);
            }
            Vec::new()
        }
        Change::AddNic(n) => {
            let _ = vmm
                .request_unplug(&drover_qemu::cmdline::nic_node(n.id.as_str()))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = vmm.remove_nic_backend(n).await;
            Vec::new()
        }
        Change::Cpus(_) | Change::Memory(_) => {
            let events = vmm.events();
            if vmm.request_unplug_all(&plugged.devices).await.is_err() {
                return plugged.devices.clone();
            }
            let left = wait_deleted(events, &plugged.devices, UNPLUG_TIMEOUT).await;
            if let (Some(id), true) = (&plugged.memory, left.is_empty()) {
                if vmm.remove_memory_backend(id).await.is_err() {
                    return vec![format!("memory backend of {id}")];
                }
            }
            left
        }
        // The guest already let go of a removed device; it is not plugged back.
        Change::Remove(_) => Vec::new(),
    }
}

/// Wait until QEMU reports every device in `ids` deleted, at most `timeout`; returns those
/// that are still there.
async fn wait_deleted(
    mut events: tokio::sync::broadcast::Receiver<drover_qemu::qmp::QmpEvent>,
    ids: &[String],
    timeout: Duration,
) -> Vec<String> {
    let mut left: Vec<String> = ids.to_vec();
    let _ = tokio::time::timeout(timeout, async {
        while !left.is_empty() {
            match events.recv().await {
                Ok(ev) if ev.name == "DEVICE_DELETED" => {
                    let dev = ev.data.get("device").and_then(|d| d.as_str());
                    left.retain(|id| Some(id.as_str()) != dev);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    })
    .await;
    left
}

/// Create a new disk's (empty) image, and its directory.
async fn create_image(d: &DiskConfig) -> Result<()> {
    let (p, size) = (d.path.clone(), d.size);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::io_ctx("creating", dir, e))?;
    }
    tokio::task::spawn_blocking(move || img::create_qcow2(&p, size))
        .await
        .map_err(|e| HostError::Internal(e.to_string()))??;
    Ok(())
}

fn persist_off_warning(name: &str) -> String {
    format!(
        "persistence is off for VM {name}: this change lasts until it stops. Keep it with `drover vm config persist {name} on`"
    )
}

/// The first hot-plug port no device of `cfg` uses.
fn free_port(cfg: &VmConfig) -> Option<u8> {
    let used: Vec<u8> = cfg
        .disks
        .iter()
        .filter_map(|d| d.slot)
        .chain(cfg.nics.iter().filter_map(|n| n.slot))
        .collect();
    (0..HOTPLUG_PORTS as u8).find(|p| !used.contains(p))
}

/// What QEMU and the guest cannot do live, refused with the reason and the way out.
fn check_live(name: &str, cfg: &VmConfig, c: &Change) -> Result<()> {
    match c {
        Change::Remove(id) => {
            let slot = cfg
                .disks
                .iter()
                .find(|d| d.id.as_str() == id)
                .map(|d| d.slot)
                .or_else(|| cfg.nics.iter().find(|n| n.id.as_str() == id).map(|n| n.slot));
            match slot {
                None => Err(HostError::Invalid(format!("VM {name} has no disk or NIC {id}"))),
                Some(None) => Err(HostError::Conflict(format!(
                    "{id} was attached when VM {name} started and cannot be unplugged live; remove it for the next boot with --next-boot"
                ))),
                Some(Some(_)) => Ok(()),
            }
        }
        Change::Cpus(n) if *n < cfg.cpus => Err(HostError::Conflict(format!(
            "vCPUs can only be added live ({} now); fewer vCPUs take effect at the next boot: use --next-boot",
            cfg.cpus
        ))),
        Change::Memory(m) if *m < cfg.memory => Err(HostError::Conflict(format!(
            "memory can only grow live ({} now); less memory takes effect at the next boot: use --next-boot",
            format_size(cfg.memory)
        ))),
        Change::Memory(m) if *m > cfg.memory => {
            let Some(max) = cfg.max_memory else {
                return Err(HostError::Conflict(format!(
                    "VM {name} was started without memory hot-plug; set a limit with --max-memory at create, or use --next-boot"
                )));
            };
            if *m > max {
                return Err(HostError::Resources(format!(
                    "VM {name} can grow to {} live (its memory hot-plug limit); use --next-boot for more",
                    format_size(max)
                )));
            }
            if !(m - cfg.memory).is_multiple_of(MEMORY_BLOCK) {
                return Err(HostError::Invalid(format!(
                    "live memory grows in steps of {}: {} -> {} is not one",
                    format_size(MEMORY_BLOCK),
                    format_size(cfg.memory),
                    format_size(*m)
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Check, without touching anything, that `cfg` (a saved state's config) can be grown live to
/// `cpus` vCPUs and `memory` once it runs: what a resume into another shape will do.
pub(super) fn check_reshape(
    name: &str,
    cfg: &VmConfig,
    cpus: Option<u32>,
    memory: Option<u64>,
) -> Result<Vec<Change>> {
    check_reshape_on(name, cfg, cpus, memory, hostfacts::cpus())
}

/// [`check_reshape`] on a host with `host_cpus` CPUs.
pub(super) fn check_reshape_on(
    name: &str,
    cfg: &VmConfig,
    cpus: Option<u32>,
    memory: Option<u64>,
    host_cpus: u32,
) -> Result<Vec<Change>> {
    let mut planned = cfg.clone();
    let mut changes = Vec::new();
    for c in cpus
        .map(Change::Cpus)
        .into_iter()
        .chain(memory.map(Change::Memory))
    {
        check_live(name, &planned, &c)?;
        apply_to(&mut planned, &c, None, host_cpus)?;
        changes.push(c);
    }
    Ok(changes)
}

/// Apply a change to a config in the model, with validation.
/// Apply `c` to `cfg`; an added device goes on hot-plug port `slot_no`, or without one gets the
/// next free PCI slot of the root bus, after the devices already there are pinned to theirs (a
/// VM from before slots were recorded keeps the layout it booted with).
fn apply_to(cfg: &mut VmConfig, c: &Change, slot_no: Option<u8>, host_cpus: u32) -> Result<()> {
    let mut next = cfg.pinned();
    match c {
        Change::AddDisk(d, _) => {
            if next.disks.iter().any(|x| x.id == d.id) || next.nics.iter().any(|n| n.id == d.id) {
                return Err(HostError::Invalid(format!(
                    "VM {} already has an element with id {}",
                    cfg.name, d.id
                )));
            }
            let mut d = d.clone();
            d.index = next.disks.iter().map(|x| x.index + 1).max().unwrap_or(0);
            d.slot = slot_no;
            d.addr = None;
            next.disks.push(d);
        }
        Change::AddNic(n) => {
            if next.disks.iter().any(|x| x.id == n.id) || next.nics.iter().any(|x| x.id == n.id) {
                return Err(HostError::Invalid(format!(
                    "VM {} already has an element with id {}",
                    cfg.name, n.id
                )));
            }
            let mut n = n.clone();
            n.slot = slot_no;
            n.addr = None;
            next.nics.push(n);
        }
        Change::Remove(id) => {
            if let drover_model::Boot::Disk { disk } = &next.boot {
                if disk.as_str() == id {
                    return Err(HostError::Invalid(format!(
                        "cannot remove disk {id}: it is the boot disk"
                    )));
                }
            }
            let before = next.disks.len() + next.nics.len();
            next.disks.retain(|d| d.id.as_str() != id);
            next.nics.retain(|n| n.id.as_str() != id);
            if next.disks.len() + next.nics.len() == before {
                return Err(HostError::Invalid(format!(
                    "VM {} has no disk or NIC {id}",
                    cfg.name
                )));
            }
        }
        Change::Cpus(n) => {
            if *n > host_cpus {
                return Err(HostError::Resources(format!(
                    "{n} vCPUs asked; this host has {host_cpus} CPUs"
                )));
            }
            next.cpus = *n;
        }
        Change::Memory(m) => {
            let total = hostfacts::memory().total;
            if *m > total {
                return Err(HostError::Resources(format!(
                    "{} of memory asked; this host has {} in all",
                    format_size(*m),
                    format_size(total)
                )));
            }
            next.memory = *m;
            if let Some(max) = next.max_memory {
                next.max_memory = Some(max.max(*m));
            }
        }
    }
    next.pin_pci();
    next.validate_config()?;
    *cfg = next;
    Ok(())
}

#[cfg(test)]
mod rules_tests;

#[cfg(test)]
mod tests {
    use super::super::guest::tests::manager;
    use crate::auth::{Caller, Role};
    use crate::error::HostError;
    use drover_api::{PersistRequest, SetRequest};

    /// The undo of a failed change waits for the guest to release each device; what it does
    /// not release in time is reported.
    #[tokio::test]
    async fn undo_waits_for_every_device_and_reports_the_rest() {
        let (tx, _) = tokio::sync::broadcast::channel(8);
        let ids = vec!["vcpu-s1-c0-t0".to_string(), "dimm-m1".to_string()];
        let rx = tx.subscribe();
        for (name, dev) in [("RESET", "x"), ("DEVICE_DELETED", "dimm-m1")] {
            tx.send(drover_qemu::qmp::QmpEvent {
                name: name.into(),
                data: serde_json::json!({ "device": dev }),
            })
            .unwrap();
        }
        let left = super::wait_deleted(rx, &ids, std::time::Duration::from_millis(50)).await;
        assert_eq!(left, ["vcpu-s1-c0-t0"]);
        let rx = tx.subscribe();
        tx.send(drover_qemu::qmp::QmpEvent {
            name: "DEVICE_DELETED".into(),
            data: serde_json::json!({ "device": "vcpu-s1-c0-t0" }),
        })
        .unwrap();
        let left = super::wait_deleted(rx, &ids[..1], std::time::Duration::from_secs(5)).await;
        assert!(left.is_empty());
    }

    fn operator() -> Caller {
        Caller {
            name: "uid 1000".into(),
            role: Some(Role::Operator),
            uid: Some(1000),
        }
    }

    /// Without config.persist no route changes the initial config; each refusal is audited.
    #[tokio::test]
    async fn the_initial_config_needs_config_persist_on_every_route() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path()).await;
        let admin = Caller::daemon();
        m.create(
            drover_model::VmSpec::from_toml("name = \"a1\"\nmemory = \"64M\"").unwrap(),
            &admin,
        )
        .await
        .unwrap();
        let off = PersistRequest {
            enabled: Some(false),
            mode: None,
        };
        m.set_persist("a1", off.clone(), &admin).await.unwrap();
        let set = || SetRequest {
            cpus: None,
            memory: Some(96 << 20),
            next_boot: false,
        };
        let op = operator();
        let refused = [
            m.set("a1", set(), &op).await.unwrap_err(),
            m.promote("a1", 0, &op).await.unwrap_err(),
            m.set_persist("a1", off.clone(), &op).await.unwrap_err(),
        ];
        for e in &refused {
            assert!(matches!(e, HostError::Forbidden(_)), "{e}");
            assert!(e.to_string().contains("config.persist"), "{e}");
        }
        let h = m.config_history("a1", &admin).unwrap();
        assert_eq!(h.generations.len(), 1, "nothing was sealed or promoted");
        assert_eq!(m.get("a1").unwrap().config.memory, 64 << 20);
        let audit = m.guest_audit("a1", &admin).unwrap();
        let refusals: Vec<_> = audit.iter().filter(|a| a.outcome == "refused").collect();
        assert_eq!(refusals.len(), 3, "{audit:?}");
        assert!(refusals.iter().all(|a| a.principal == "uid 1000"));
        // With persistence on, the operator's change is a generation (the initial one stays).
        m.set_persist(
            "a1",
            PersistRequest {
                enabled: Some(true),
                mode: None,
            },
            &admin,
        )
        .await
        .unwrap();
        m.set("a1", set(), &op).await.unwrap();
        let h = m.config_history("a1", &admin).unwrap();
        assert_eq!(h.generations.len(), 2);
        assert_eq!(m.get("a1").unwrap().config.memory, 64 << 20);
    }
}
