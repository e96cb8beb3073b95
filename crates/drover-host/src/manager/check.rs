//! Whether a saved state fits a target before anything changes: the platform it was saved on
//! (QEMU, machine type, CPU model, accelerator, host) against the target's, and the shape asked
//! for (vCPUs, memory) against the state's headroom and the target's resources. `drover snapshot
//! check` shows the list; `vm resume` and `snapshot restore` refuse with every blocking line.

use super::Manager;
use crate::auth::{Caller, Permission};
use crate::compat::{self, Target};
use crate::error::Result;
use drover_api::{Difference, StateCheck, StateCheckRequest, StateInfo, StatePhase, Verdict};
use drover_model::VmConfig;

/// What a target offers for a state's shape: CPUs, and memory free for it (`None`: not judged,
/// e.g. this host, where the VM's own memory is counted as used while it runs).
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    pub cpus: u32,
    pub memory_available: Option<u64>,
}

impl Manager {
    /// This host as a restore target.
    pub(super) fn restore_target<'a>(
        &'a self,
        facts: Option<&'a drover_api::QemuFacts>,
    ) -> Target<'a> {
        Target {
            name: "this host",
            qemu: facts,
            accel: self.s.accel.accel,
            host: Some(self.s.cfg.identity.id.as_str()),
        }
    }

    /// Check state `which` of VM `vm` against the target in `req` (default: this host).
    pub fn check_state(
        &self,
        vm: &str,
        which: &str,
        req: &StateCheckRequest,
        caller: &Caller,
    ) -> Result<StateCheck> {
        caller.require(Permission::Read)?;
        let state = self.state(vm, which)?;
        let memory = req.memory;
        let facts = self.qemu_facts();
        let (target, room) = match &req.target {
            Some(h) => (
                Target {
                    name: req.target_name.as_deref().unwrap_or(&h.hostname),
                    qemu: h.qemu.as_ref(),
                    accel: h.accel,
                    host: h.identity.as_ref().map(|i| i.id.as_str()),
                },
                Room {
                    cpus: h.cpus,
                    memory_available: Some(h.memory_available),
                },
            ),
            None => (
                self.restore_target(facts.as_ref()),
                Room {
                    cpus: crate::hostfacts::cpus(),
                    memory_available: None,
                },
            ),
        };
        let mut differences = differences(&state, &target, room, req.cpus, memory);
        // The same lines a restore or resume judges a new identity and MACs by.
        let (adapt, _) = self.adapt_differences(
            vm,
            &state,
            &req.nics,
            req.new_identity,
            req.target.is_none(),
        );
        differences.extend(adapt);
        Ok(StateCheck {
            vm: vm.to_string(),
            state: state.id.clone(),
            target: target.name.to_string(),
            fits: compat::blocking(&state.id, &differences).is_none(),
            differences,
        })
    }
}
/// Every difference between `state` and restoring it on `target` as `cpus`/`memory`.
pub(super) fn differences(
    state: &StateInfo,
    target: &Target,
    room: Room,
    cpus: Option<u32>,
    memory: Option<u64>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    match state.phase {
        StatePhase::Failed => out.push(Difference {
            what: "state".into(),
            saved: "failed".into(),
            target: "restorable".into(),
            verdict: Verdict::Blocking,
            note: format!(
                "its capture failed ({})",
                state.failure.as_deref().unwrap_or("reason unknown")
            ),
        }),
        StatePhase::Capturing => out.push(Difference {
            what: "state".into(),
            saved: "capturing".into(),
            target: "restorable".into(),
            verdict: Verdict::Adaptable,
            note: "its memory is still streaming out: a restore waits for it".into(),
        }),
        StatePhase::Ready | StatePhase::Durable => {}
    }
    if state.format > drover_api::STATE_FORMAT {
        out.push(Difference {
            what: "format".into(),
            saved: state.format.to_string(),
            target: drover_api::STATE_FORMAT.to_string(),
            verdict: Verdict::Blocking,
            note: format!(
                "format {} is newer than this droverd reads; upgrade droverd",
                state.format
            ),
        });
    }
    out.extend(compat::platform_differences(
        state.saved_on.as_ref(),
        target,
    ));
    out.extend(shape_differences(
        &state.config,
        target.name,
        room,
        cpus,
        memory,
    ));
    out
}

/// The shape asked for against the state's: grown live after the restore within the headroom it
/// was saved with; never shrunk (the guest would have to give vCPUs and memory back).
fn shape_differences(
    cfg: &VmConfig,
    them: &str,
    room: Room,
    cpus: Option<u32>,
    memory: Option<u64>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let want_cpus = cpus.unwrap_or(cfg.cpus);
    let grow = |c, m| super::live::check_reshape_on(cfg.name.as_str(), cfg, c, m, room.cpus);
    out.push(match (want_cpus == cfg.cpus, grow(cpus, None)) {
        (true, _) if want_cpus <= room.cpus => same("vcpus", cfg.cpus.to_string()),
        (true, _) => Difference {
            what: "vcpus".into(),
            saved: cfg.cpus.to_string(),
            target: room.cpus.to_string(),
            verdict: Verdict::Blocking,
            note: format!("it has {} vCPUs; {them} has {} CPUs", cfg.cpus, room.cpus),
        },
        (false, Ok(_)) => Difference {
            what: "vcpus".into(),
            saved: cfg.cpus.to_string(),
            target: want_cpus.to_string(),
            verdict: Verdict::Adaptable,
            note: format!(
                "loaded with {} vCPUs, then {} hot-plugged",
                cfg.cpus,
                want_cpus - cfg.cpus
            ),
        },
        (false, Err(e)) => Difference {
            what: "vcpus".into(),
            saved: cfg.cpus.to_string(),
            target: want_cpus.to_string(),
            verdict: Verdict::Blocking,
            note: e.to_string(),
        },
    });
    let want_mem = memory.unwrap_or(cfg.memory);
    out.push(match (want_mem == cfg.memory, grow(None, memory)) {
        (true, _) => same("memory", size(cfg.memory)),
        (false, Ok(_)) => Difference {
            what: "memory".into(),
            saved: size(cfg.memory),
            target: size(want_mem),
            verdict: Verdict::Adaptable,
            note: format!(
                "loaded with {}, then {} hot-plugged",
                size(cfg.memory),
                size(want_mem.saturating_sub(cfg.memory))
            ),
        },
        (false, Err(e)) => Difference {
            what: "memory".into(),
            saved: size(cfg.memory),
            target: size(want_mem),
            verdict: Verdict::Blocking,
            note: e.to_string(),
        },
    });
    if let Some(free) = room.memory_available {
        out.push(Difference {
            what: "host-memory".into(),
            saved: size(want_mem),
            target: size(free),
            verdict: if want_mem <= free {
                Verdict::Same
            } else {
                Verdict::Blocking
            },
            note: if want_mem <= free {
                format!("{them} has the memory free")
            } else {
                format!(
                    "it needs {} and {them} has {} available",
                    size(want_mem),
                    size(free)
                )
            },
        });
    }
    out
}

fn same(what: &str, v: String) -> Difference {
    Difference {
        what: what.into(),
        saved: v.clone(),
        target: v,
        verdict: Verdict::Same,
        note: "as saved".into(),
    }
}

fn size(b: u64) -> String {
    drover_model::format_size(b)
}
