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
//!
//! A resume may adapt the VM once it runs: more vCPUs and memory (hot-plugged), NICs with new
//! MACs (`--nic ID,mac=MAC`) and a new identity (`--new-identity`). A NIC keeps its device id
//! and PCI address: QEMU starts with the new MAC on its command line, and since the saved device
//! state carries the old one (and a NIC on the root bus cannot be unplugged), the guest's agent
//! sets the new address on the interface (virtio-net tells QEMU through its control queue) and
//! renews its lease. The identity is pushed through the same call as a clone's
//! ([`Manager::send_identity`]). Everything is checked before the state is touched; what needs
//! the agent is refused when the VM had none answering at hibernation.

use super::{lock, Manager};
use crate::action::VmAction;
use crate::auth::{Caller, Permission};
use crate::error::{HostError, Result};
use crate::hostfacts;
use drover_api::{Hibernation, NicMac, VmInfo, VmState};
use drover_model::{MacAddr, VmConfig};
use drover_proto::{IdentityUpdate, NicIdentity};
use std::collections::{BTreeMap, HashSet};

impl Manager {
    /// Save a running VM to disk and stop it (see the module docs).
    pub async fn hibernate(&self, name: &str, caller: &Caller) -> Result<VmInfo> {
        let op = self.door(name, VmAction::Hibernate, caller).await?;
        let slot = op.slot();
        // A resume with a new identity or MACs needs the agent: remember whether there is one.
        let agent = self.runtime(slot).is_some_and(|rt| rt.agent.status().ready);
        let label = format!("hibernate-{}", hostfacts::now_ms());
        let save = self.save_locked(
            name,
            &op,
            Some(label),
            super::state::SaveHow::Classic,
            &caller.name,
            None,
        );
        let state = crate::metrics::timed(crate::metrics::Op::Save, save).await?;
        let dir = self.states_dir(name).join(&state.id);
        let bytes = dir_bytes(&dir);
        // The state is durable (synced) now; the guest ran on for the moments since, into a
        // layer no resume uses.
        if let Err(e) = self.stop_locked(name, &op, 0, true).await {
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
            agent,
        };
        self.persist(slot, |i| {
            i.state = VmState::Hibernated;
            i.hibernation = Some(hibernation.clone());
        })?;
        tracing::info!(vm = name, state = state.id, bytes, "hibernated");
        self.event(
            name,
            drover_api::EventKind::Hibernated,
            serde_json::json!({ "state": state.id, "bytes": bytes }),
        );
        Ok(self.view(slot))
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
        if reshapes(req) {
            caller.require(Permission::Change)?;
        }
        let op = self.door(name, VmAction::Resume, caller).await?;
        let slot = op.slot();
        let info = lock(&slot.info).clone();
        let Some(h) = info.hibernation.clone() else {
            return Err(HostError::Internal(format!(
                "VM {name} is hibernated but its record names no state; `drover snapshot list {name}` shows what can be restored"
            )));
        };
        let back = self
            .restore_reshaped(name, &op, &h.state, req, "it stays hibernated", caller)
            .await;
        if back.is_err() && lock(&slot.info).state == VmState::Hibernated {
            return back;
        }
        // The VM runs on overlays of its own now: the state is no longer needed.
        if let Err(e) = self.drop_state_locked(&op, name, &h.state) {
            tracing::warn!(
                vm = name,
                state = h.state,
                "resumed, but could not delete the hibernation state: {e}"
            );
        }
        self.event(
            name,
            drover_api::EventKind::Resumed,
            serde_json::json!({ "state": h.state }),
        );
        back
    }

    /// Restore state `which` into VM `name` (its op lock held) and adapt it to `req` once it
    /// runs: the one path of `vm resume` and `snapshot restore`. Everything is judged first, by
    /// the same lines `snapshot check` lists ([`Manager::adapt_differences`]): a refusal names
    /// each blocking one and changes nothing (`still` says what the VM is then). After the load:
    /// vCPUs and memory hot-plugged, the new MACs kept in its config, and the new identity sent
    /// to the agent (recorded pending before the guest runs, so a droverd crash does not lose it).
    pub(super) async fn restore_reshaped(
        &self,
        name: &str,
        op: &super::OpGuard,
        which: &str,
        req: &drover_api::ResumeRequest,
        still: &str,
        caller: &Caller,
    ) -> Result<VmInfo> {
        let slot = op.slot();
        let refused = |m: String| {
            HostError::Conflict(format!(
                "VM {name} cannot be brought back as asked, nothing was changed ({still}): {m}"
            ))
        };
        let memory = req.memory;
        let saved = self.state(name, which)?;
        let facts = self.qemu_facts();
        let room = super::check::Room {
            cpus: hostfacts::cpus(),
            memory_available: None,
        };
        let mut diffs = super::check::differences(
            &saved,
            &self.restore_target(facts.as_ref()),
            room,
            req.cpus,
            memory,
        );
        let (adapt, nics) = self.adapt_differences(name, &saved, &req.nics, req.new_identity, true);
        diffs.extend(adapt);
        if let Some(why) = crate::compat::blocking(&saved.id, &diffs) {
            return Err(refused(why));
        }
        let nics = nics.map_err(refused)?;
        let reshape = super::live::check_reshape(name, &saved.config, req.cpus, memory).map_err(
            |e| match e {
                HostError::Conflict(m) | HostError::Resources(m) | HostError::Invalid(m) => {
                    refused(m)
                }
                other => other,
            },
        )?;
        let macs: BTreeMap<String, MacAddr> = nics
            .iter()
            .map(|(id, (_, new))| (id.clone(), *new))
            .collect();
        let update = (!nics.is_empty() || req.new_identity)
            .then(|| identity_update(name, req.new_identity, &nics, &saved.id));
        let started = std::time::Instant::now();
        let restore = self.restore_locked_as(name, op, &saved.id, &macs, update.as_ref());
        crate::metrics::timed(crate::metrics::Op::Restore, restore).await?;
        tracing::info!(
            vm = name,
            state = saved.id,
            ms = started.elapsed().as_millis() as u64,
            "restored"
        );
        if !reshape.is_empty() {
            if let Err(e) = self.change(name, op, reshape, false, caller).await {
                return Err(HostError::Conflict(format!(
                    "VM {name} runs again in its saved shape, but growing it failed: {e}"
                )));
            }
        }
        if !nics.is_empty() {
            let lines: Vec<String> = nics
                .iter()
                .map(|(id, (old, new))| {
                    format!("nic {id}: mac {old} -> {new} (on restore of {})", saved.id)
                })
                .collect();
            self.commit(slot, |i| {
                // A live change like any other: kept past the next stop as persistence says.
                if let Some(next) = i.next_config.as_mut() {
                    set_macs(next, &macs);
                }
                Ok(vec![self.journal(name, &caller.name, "live", lines)?])
            })?;
        }
        if let Some(update) = update {
            self.apply_identity(name, slot, update).await;
        }
        Ok(self.view(slot))
    }

    /// The lines a new identity and new MACs add to a restore's check of `state` (the NIC
    /// exists, the MAC is free here when `here`, the agent answered when the state was saved by a
    /// hibernation), and the NIC plan when they all fit.
    pub(super) fn adapt_differences(
        &self,
        name: &str,
        state: &drover_api::StateInfo,
        asked: &[NicMac],
        new_identity: bool,
        here: bool,
    ) -> (
        Vec<drover_api::Difference>,
        std::result::Result<NicPlan, String>,
    ) {
        use drover_api::{Difference, Verdict};
        let mut out = Vec::new();
        let taken: HashSet<MacAddr> = if here {
            self.list()
                .iter()
                .filter(|v| v.name != name)
                .flat_map(|v| {
                    v.config
                        .nics
                        .iter()
                        .chain(v.running_config.iter().flat_map(|c| c.nics.iter()))
                        .map(|n| n.mac)
                        .collect::<Vec<_>>()
                })
                .collect()
        } else {
            HashSet::new()
        };
        let plan = plan_nics(&state.config, asked, &taken);
        match &plan {
            Ok(p) => out.extend(p.iter().map(|(id, (old, new))| Difference {
                what: format!("nic {id}"),
                saved: old.to_string(),
                target: new.to_string(),
                verdict: Verdict::Adaptable,
                note: "keeps its device; the guest agent sets the new MAC".into(),
            })),
            Err(e) => out.push(Difference {
                what: "nic".into(),
                saved: String::new(),
                target: String::new(),
                verdict: Verdict::Blocking,
                note: e.clone(),
            }),
        }
        if new_identity {
            out.push(Difference {
                what: "identity".into(),
                saved: "as saved".into(),
                target: "new".into(),
                verdict: Verdict::Adaptable,
                note: "hostname, machine-id, SSH host keys set by the guest agent".into(),
            });
        }
        // Only a hibernation records whether the agent answered when it was saved.
        let agent = self.slot(name).ok().and_then(|s| {
            lock(&s.info)
                .hibernation
                .as_ref()
                .filter(|h| h.state == state.id)
                .map(|h| h.agent)
        });
        if (!asked.is_empty() || new_identity) && agent == Some(false) {
            out.push(Difference {
                what: "agent".into(),
                saved: "none answering".into(),
                target: "needed".into(),
                verdict: Verdict::Blocking,
                note: format!(
                    "{} needs the guest agent, and none answered when it was hibernated; resume it without, then `drover vm attach` a NIC with the MAC you want",
                    if new_identity { "--new-identity" } else { "--nic ID,mac=..." }
                ),
            });
        }
        (out, plan)
    }
}

/// Each NIC to give a new MAC, by id: its MAC in the saved state and its new one.
pub(super) type NicPlan = BTreeMap<String, (MacAddr, MacAddr)>;

/// Whether `req` asks for more than bringing the VM back as it was.
pub(super) fn reshapes(req: &drover_api::ResumeRequest) -> bool {
    req.cpus.is_some() || req.memory.is_some() || !req.nics.is_empty() || req.new_identity
}

/// The NICs `asked` names, each with its MAC in `cfg` (the saved state's config) and its new
/// one; refused, saying why, for a NIC the VM lacks, a NIC named twice, a MAC that is not
/// unicast, or one another NIC here has (`taken`, or another NIC of this VM).
pub(super) fn plan_nics(
    cfg: &VmConfig,
    asked: &[NicMac],
    taken: &HashSet<MacAddr>,
) -> std::result::Result<NicPlan, String> {
    let mut out = BTreeMap::new();
    for a in asked {
        let Some(nic) = cfg.nics.iter().find(|n| n.id.as_str() == a.id) else {
            let have: Vec<&str> = cfg.nics.iter().map(|n| n.id.as_str()).collect();
            return Err(format!(
                "it has no NIC {} (its NICs: {})",
                a.id,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ));
        };
        let mac = a.mac;
        if out.insert(a.id.clone(), (nic.mac, mac)).is_some() {
            return Err(format!("NIC {} is named twice", a.id));
        }
    }
    for (id, (_, mac)) in &out {
        let own = cfg
            .nics
            .iter()
            .filter(|n| n.id.as_str() != id && !out.contains_key(n.id.as_str()))
            .any(|n| n.mac == *mac);
        let twice = out.values().filter(|(_, m)| m == mac).count() > 1;
        if taken.contains(mac) || own || twice {
            return Err(format!(
                "MAC {mac} for NIC {id} is already used by another NIC on this host; pick another"
            ));
        }
    }
    Ok(out)
}

/// Give the NICs of `cfg` named in `macs` their new MAC.
fn set_macs(cfg: &mut VmConfig, macs: &BTreeMap<String, MacAddr>) {
    for n in cfg.nics.iter_mut() {
        if let Some(m) = macs.get(n.id.as_str()) {
            n.mac = *m;
        }
    }
}

/// What a resumed or restored VM's agent is sent: with `new_identity` its name as hostname and
/// a new machine-id; the NICs' old and new MACs; a fresh token makes a resend harmless.
fn identity_update(
    vm: &str,
    new_identity: bool,
    nics: &BTreeMap<String, (MacAddr, MacAddr)>,
    state: &str,
) -> IdentityUpdate {
    IdentityUpdate {
        token: super::identity::new_uuid(),
        hostname: new_identity.then(|| vm.to_string()),
        machine_id: new_identity.then(|| super::identity::new_uuid().replace('-', "")),
        nics: nics
            .values()
            .map(|(old, new)| NicIdentity {
                old_mac: old.to_string(),
                mac: new.to_string(),
            })
            .collect(),
        reason: format!("VM {vm} back from state {state}"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::{ElementId, NicBackend, NicConfig, VmName};

    fn cfg() -> VmConfig {
        let nic = |id: &str, last: u8| NicConfig {
            id: ElementId::new(id).unwrap(),
            mac: MacAddr::qemu_local([0, 0, last]),
            backend: NicBackend::User { forwards: vec![] },
            slot: None,
            addr: None,
        };
        VmConfig {
            name: VmName::new("web").unwrap(),
            cpus: 1,
            memory: 256 << 20,
            disks: Vec::new(),
            nics: vec![nic("net0", 1), nic("net1", 2)],
            boot: drover_model::Boot::Default { cmdline: None },
            accel: None,
            max_memory: None,
        }
    }

    fn ask(id: &str, mac: &str) -> NicMac {
        NicMac {
            id: id.into(),
            mac: mac.parse().unwrap(),
        }
    }

    #[test]
    fn new_macs_are_planned_against_the_saved_nics() {
        let none = HashSet::new();
        let p = plan_nics(&cfg(), &[ask("net1", "52:54:00:aa:bb:cc")], &none).unwrap();
        assert_eq!(
            p["net1"],
            (
                MacAddr::qemu_local([0, 0, 2]),
                "52:54:00:aa:bb:cc".parse().unwrap()
            )
        );
        assert!(plan_nics(&cfg(), &[], &none).unwrap().is_empty());
        // Two NICs may swap their MACs.
        let swap = [
            ask("net0", "52:54:00:00:00:02"),
            ask("net1", "52:54:00:00:00:01"),
        ];
        assert_eq!(plan_nics(&cfg(), &swap, &none).unwrap().len(), 2);
    }

    #[test]
    fn a_nic_or_mac_that_cannot_be_is_refused_by_name() {
        let none = HashSet::new();
        let e = plan_nics(&cfg(), &[ask("net7", "52:54:00:aa:bb:cc")], &none).unwrap_err();
        assert!(e.contains("no NIC net7") && e.contains("net0, net1"), "{e}");
        // A MAC that is not one, or not unicast, does not get past the request's parsing.
        let body = |mac: &str| format!(r#"{{"id": "net0", "mac": "{mac}"}}"#);
        let e = serde_json::from_str::<NicMac>(&body("01:00:5e:00:00:01")).unwrap_err();
        assert!(
            e.to_string().contains("01:00:5e:00:00:01"),
            "multicast: {e}"
        );
        let e = serde_json::from_str::<NicMac>(&body("zz")).unwrap_err();
        assert!(e.to_string().contains("zz"), "{e}");
        let twice = [
            ask("net0", "52:54:00:aa:bb:cc"),
            ask("net0", "52:54:00:aa:bb:cd"),
        ];
        assert!(plan_nics(&cfg(), &twice, &none)
            .unwrap_err()
            .contains("twice"));
        // The other NIC of the VM keeps its MAC: the new one may not be it.
        let e = plan_nics(&cfg(), &[ask("net0", "52:54:00:00:00:02")], &none).unwrap_err();
        assert!(e.contains("already used"), "{e}");
        let taken: HashSet<MacAddr> = ["52:54:00:aa:bb:cc".parse().unwrap()].into();
        let e = plan_nics(&cfg(), &[ask("net0", "52:54:00:aa:bb:cc")], &taken).unwrap_err();
        assert!(e.contains("already used"), "{e}");
    }

    #[test]
    fn the_update_carries_a_name_and_machine_id_only_for_a_new_identity() {
        let nics = plan_nics(&cfg(), &[ask("net0", "52:54:00:aa:bb:cc")], &HashSet::new()).unwrap();
        let u = identity_update("web", false, &nics, "s4");
        assert!(u.hostname.is_none() && u.machine_id.is_none());
        assert_eq!(u.nics[0].old_mac, "52:54:00:00:00:01");
        assert_eq!(u.nics[0].mac, "52:54:00:aa:bb:cc");
        u.check().unwrap();
        let u = identity_update("web", true, &BTreeMap::new(), "s4");
        assert_eq!(u.hostname.as_deref(), Some("web"));
        assert!(drover_proto::valid_machine_id(
            u.machine_id.as_deref().unwrap()
        ));
        u.check().unwrap();
    }
}
