//! What a guest may learn about where it runs: this host's identity, the VM's generation id
//! (QEMU `vmgenid`), and the `migrated` notice pushed after a live migration lands.
//!
//! The generation id lives in its own table, keyed by VM name, so it moves with the VM's other
//! per-VM records: a new one at create, and a new one on every restore or clone
//! ([`Manager::regenerate_generation_id`]), before QEMU is launched for it, so the `vmgenid`
//! device on the command line carries the new value.
//!
//! A resume's or restore's new identity (hostname, machine-id, MACs) is recorded as pending, with
//! the generation id of the QEMU it is meant for, before that QEMU runs the guest, and cleared
//! once the agent has taken it: a droverd killed in between sends it again when it re-adopts the
//! VM ([`Manager::resend_pending_identities`]), as clones' identities are. The agent applies each
//! token once, so a second send is harmless.

use super::Manager;
use crate::error::{HostError, Result};
use crate::hostfacts;
use drover_api::{IdentityOutcome, VmState};
use drover_proto::{Body, GuestEvent, HostIdentityAnswer, IdentityUpdate, MigratedNotice};
use drover_store::StoreExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Table of generation ids, keyed by VM name.
pub(super) const GENERATIONS: &str = "generations";

/// Table of identities sent to a resumed or restored guest and not yet taken, keyed by VM name.
pub(super) const PENDING_IDENTITIES: &str = "pending-identities";

/// Identity's per-VM tables.
pub(super) const TABLES: &[super::VmTable] = &[
    super::VmTable::by_name(GENERATIONS),
    super::VmTable::by_name(PENDING_IDENTITIES),
];

/// How long [`Manager::notify_migrated`] waits for the agent (it reconnects to the new host).
const NOTIFY_WAIT: Duration = Duration::from_secs(30);

/// A VM's generation id and when and why it last changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Generation {
    id: String,
    since_ms: u64,
    reason: String,
}

/// An identity a resumed or restored VM's agent has not confirmed yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct PendingIdentity {
    /// The generation id of the QEMU run it is for: another run (a later restore, a cold
    /// start) must not get it.
    pub generation: String,
    pub update: IdentityUpdate,
    pub since_ms: u64,
}

/// What a droverd starting up does with a pending identity: send it again only to the run it
/// was meant for (the VM runs, with the generation id it was recorded with), else forget it.
pub(super) fn resend_pending(p: &PendingIdentity, state: VmState, generation: &str) -> bool {
    state == VmState::Running && p.generation == generation
}

/// A random (version 4) UUID.
pub(super) fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A new generation id for `vm` and the store write that records it.
fn new_generation(vm: &str, reason: &str) -> Result<(String, drover_store::Write)> {
    let g = Generation {
        id: new_uuid(),
        since_ms: hostfacts::now_ms(),
        reason: reason.chars().take(200).collect(),
    };
    Ok((g.id.clone(), drover_store::put(GENERATIONS, vm, &g)?))
}

/// The write that gives a VM being created its first generation id.
pub(super) fn generation_write(vm: &str, reason: &str) -> Result<drover_store::Write> {
    new_generation(vm, reason).map(|(_, w)| w)
}

impl Manager {
    /// This host's identity (what guests read, and `GET /v1/host` shows).
    pub fn host_identity(&self) -> &drover_proto::HostIdentity {
        &self.s.cfg.identity
    }

    /// The VM's generation id. A VM recorded before generation ids existed gets one now.
    pub fn generation_id(&self, vm: &str) -> Result<String> {
        match self.s.store.get::<Generation>(GENERATIONS, vm)? {
            Some(g) => Ok(g.id),
            None => self.set_generation(vm, "first use"),
        }
    }

    /// Give VM `vm` a new generation id and return it. Call it on every state restore and every
    /// clone, **before** launching the QEMU that runs the restored or cloned guest: the id is
    /// put on that QEMU's command line (`-device vmgenid,guid=...`), so the guest's vmgenid and the
    /// id its agent reads from the host (`drover-guest host-id`) both change. The agent then runs
    /// its `migrated.d` hooks once. `reason` is logged and kept with the id.
    pub fn regenerate_generation_id(&self, vm: &str, reason: &str) -> Result<String> {
        self.slot(vm)?;
        let id = self.set_generation(vm, reason)?;
        tracing::info!(vm, generation_id = id, reason, "new generation id");
        Ok(id)
    }

    /// Record `update` as pending for VM `vm`'s current run (call it after the restore's new
    /// generation id, before its QEMU runs the guest).
    pub(super) fn set_pending_identity(&self, vm: &str, update: &IdentityUpdate) -> Result<()> {
        let p = PendingIdentity {
            generation: self.generation_id(vm)?,
            update: update.clone(),
            since_ms: hostfacts::now_ms(),
        };
        self.s.store.put(PENDING_IDENTITIES, vm, &p)?;
        Ok(())
    }

    /// Send VM `vm`'s pending identity `update` to its agent; on the agent's answer, record the
    /// outcome in the VM and clear the pending record, in that order (a crash between the two
    /// only sends it once more). Never fails: what went wrong is in the outcome.
    pub(super) async fn apply_identity(
        &self,
        vm: &str,
        slot: &std::sync::Arc<super::VmSlot>,
        update: IdentityUpdate,
    ) -> IdentityOutcome {
        crate::crashpoint::hit("restore-identity");
        let outcome = match self.runtime(slot) {
            Some(rt) => match self
                .send_identity(&format!("VM {vm}"), &rt.agent, update)
                .await
            {
                Ok(a) => IdentityOutcome {
                    error: (!a.errors.is_empty())
                        .then(|| format!("applied only in part: {}", a.errors.join("; "))),
                    changed: a.changed,
                    hooks: a.hooks,
                    renewed: a.renewed,
                },
                Err(e) => IdentityOutcome {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            },
            None => IdentityOutcome {
                error: Some(format!("VM {vm} stopped before its agent answered")),
                ..Default::default()
            },
        };
        if let Some(e) = &outcome.error {
            tracing::warn!(vm, "runs, but its new identity was not applied: {e}");
        }
        let answered = outcome.error.is_none() || !outcome.changed.is_empty();
        if let Err(e) = self.persist(slot, |i| i.identity = Some(outcome.clone())) {
            tracing::warn!(vm, "could not record its identity outcome: {e}");
        } else if answered {
            if let Err(e) = self.s.store.delete(PENDING_IDENTITIES, vm) {
                tracing::warn!(vm, "could not clear its pending identity: {e}");
            }
        }
        outcome
    }

    /// At start: VMs re-adopted before their agent took a resume's or restore's identity get it
    /// again; records for runs that are gone are dropped.
    pub(super) fn resend_pending_identities(&self) {
        let pending = match self.s.store.list::<PendingIdentity>(PENDING_IDENTITIES) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("could not read pending identities: {e}");
                return;
            }
        };
        for (vm, p) in pending {
            let slot = self.slot(&vm).ok();
            let state = slot
                .as_ref()
                .map(|s| super::lock(&s.info).state)
                .unwrap_or(VmState::Stopped);
            let generation = self.generation_id(&vm).unwrap_or_default();
            let (Some(slot), true) = (slot, resend_pending(&p, state, &generation)) else {
                tracing::info!(vm, "dropping a pending identity of a run that is gone");
                if let Err(e) = self.s.store.delete(PENDING_IDENTITIES, &vm) {
                    tracing::warn!(vm, "could not drop its pending identity: {e}");
                }
                continue;
            };
            let mgr = self.clone();
            tokio::spawn(async move {
                let o = mgr.apply_identity(&vm, &slot, p.update).await;
                match o.error {
                    None => tracing::info!(vm, "identity applied after a restart"),
                    Some(e) => tracing::warn!(vm, "identity still not applied: {e}"),
                }
            });
        }
    }

    fn set_generation(&self, vm: &str, reason: &str) -> Result<String> {
        let (id, write) = new_generation(vm, reason)?;
        self.s.store.apply(vec![write])?;
        Ok(id)
    }

    /// The answer to a guest's `host-identity` request.
    pub(super) fn identity_answer(
        &self,
        vm: &str,
    ) -> std::result::Result<HostIdentityAnswer, String> {
        Ok(HostIdentityAnswer {
            host: self.s.cfg.identity.clone(),
            generation_id: self.generation_id(vm).map_err(|e| e.to_string())?,
        })
    }

    /// Tell VM `vm`'s agent that it has just been live-migrated from host `from` to host `to`
    /// (this host), with `downtime_ms` of pause: the agent runs its `migrated.d` hooks (once per
    /// change, however many times it hears of it). Call it on the destination once the migrated
    /// VM runs there. Waits up to 30 s for the agent; recorded in the VM's audit trail either way.
    pub async fn notify_migrated(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        downtime_ms: u64,
    ) -> Result<(), HostError> {
        for id in [from, to] {
            hostfacts::check_host_id(id).map_err(HostError::Invalid)?;
        }
        let slot = self.slot(vm)?;
        let Some(rt) = self.runtime(&slot) else {
            return Err(HostError::Conflict(format!(
                "VM {vm} is not running here; nothing to notify"
            )));
        };
        let notice = MigratedNotice {
            from: from.into(),
            to: to.into(),
            downtime_ms,
        };
        let ticket = format!("m{}", self.next_seq());
        let sent = async {
            rt.agent.wait_ready(NOTIFY_WAIT).await?;
            rt.agent
                .call(
                    Body::Event(GuestEvent::migrated(ticket.clone(), &notice)),
                    Duration::from_secs(10),
                )
                .await
        }
        .await;
        let detail = format!("from {from} to {to}, downtime {downtime_ms} ms");
        let (outcome, detail) = match &sent {
            Ok(_) => ("notified", detail),
            Err(e) => ("not-delivered", format!("{detail}: {e}")),
        };
        self.audit(
            vm,
            "host",
            "migrated",
            None,
            Some(&ticket),
            outcome,
            Some(detail),
        );
        match sent {
            Ok(_) => Ok(()),
            Err(e) => Err(HostError::Agent(format!(
                "could not tell VM {vm}'s agent that it migrated: {e}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_identity_goes_only_to_the_run_it_was_recorded_for() {
        let p = PendingIdentity {
            generation: "g1".into(),
            update: IdentityUpdate {
                token: new_uuid(),
                hostname: Some("web".into()),
                machine_id: None,
                nics: Vec::new(),
                reason: "resume".into(),
            },
            since_ms: 1,
        };
        assert!(resend_pending(&p, VmState::Running, "g1"));
        // Re-adopted, but restored again or cold-started since: another run.
        assert!(!resend_pending(&p, VmState::Running, "g2"));
        // The crash came before its QEMU ran the guest.
        assert!(!resend_pending(&p, VmState::Stopped, "g1"));
        assert!(!resend_pending(&p, VmState::Hibernated, "g1"));
        let back: PendingIdentity =
            serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn uuids_are_version_4() {
        let a = super::new_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(drover_proto::valid_generation_id(&a));
        assert_ne!(a, super::new_uuid());
    }
}
