//! Re-adoption after a restart: what droverd does with a VM whose QEMU it finds alive, decided
//! from what its record says (a migration under way, a recorded config) and QEMU's run state.
//!
//! - A start or restore cut off before its QEMU ran the guest (QEMU still `inmigrate`, loading
//!   a saved state, or no config recorded yet) is not adopted: its QEMU is stopped.
//! - Otherwise a state capture the previous droverd left streaming is let end (its receiver
//!   outlives droverd; cancelling it leaves QEMU 7.2's vCPUs stuck), unless a migration is
//!   recorded: the migration's own recovery owns that QEMU.
//! - The VM is recorded `starting` while it still arrives by migration, `paused` after an I/O
//!   error, else `running`; one left `paused`/`postmigrate` by a save that was cut off (Drover
//!   pauses a VM only inside a save) is resumed, once recorded, unless a migration owns it.

use super::*;
use crate::vmm::Vmm;
use drover_api::VmState;
use std::time::Duration;

/// What a restarted droverd's record says of a VM whose QEMU it found alive.
#[derive(Clone, Copy, Debug)]
pub(super) struct Found {
    /// A migration is recorded and not committed.
    pub migrating: bool,
    /// The config QEMU was started with is recorded.
    pub has_config: bool,
}

/// What the first look at a live QEMU decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum FirstLook {
    /// Not adopted, for this reason: its QEMU is stopped.
    CutOff(&'static str),
    /// Adopted; `settle`: let a capture left streaming end first.
    Adopt { settle: bool },
}

/// Decide from the record and QEMU's run state as first read.
pub(super) fn first_look(found: Found, status: Option<&str>) -> FirstLook {
    if found.migrating {
        return FirstLook::Adopt { settle: false };
    }
    if status == Some("inmigrate") {
        FirstLook::CutOff("droverd was stopped while the VM's saved state was being loaded")
    } else if !found.has_config {
        FirstLook::CutOff(
            "droverd was stopped while the VM was starting, before its config was recorded",
        )
    } else {
        FirstLook::Adopt { settle: true }
    }
}

/// The state an adopted VM is recorded in: `arriving` when an incoming migration of it is not
/// committed yet; `status` is QEMU's run state once any capture ended.
pub(super) fn adopted_state(arriving: bool, status: Option<&str>) -> VmState {
    if arriving {
        VmState::Starting
    } else if status == Some("io-error") {
        VmState::Paused
    } else {
        VmState::Running
    }
}

/// Whether an adopted VM in run state `status` was left paused by a save that was cut off, and
/// is resumed.
pub(super) fn resumes(found: Found, status: Option<&str>) -> bool {
    !found.migrating && matches!(status, Some("paused" | "postmigrate"))
}

/// What settling a live QEMU came to.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Settled {
    /// Not adopted, for this reason; its QEMU was asked to quit.
    CutOff(&'static str),
    /// To be adopted; QEMU's run state now.
    Adopt { status: Option<String> },
}

/// Take the first look at VM `name`'s live QEMU and act on it: ask a cut-off one to quit, or
/// let a capture left streaming end and read the run state again.
pub(super) async fn settle<V: Vmm>(name: &str, vmm: &V, found: Found) -> Settled {
    let status = vmm.status().await.ok();
    match first_look(found, status.as_deref()) {
        FirstLook::CutOff(why) => {
            tracing::warn!(vm = name, "{why}; stopping its QEMU");
            let _ = vmm.quit(Duration::from_secs(2)).await;
            return Settled::CutOff(why);
        }
        FirstLook::Adopt { settle: true } => {
            match vmm.settle_capture(Duration::from_secs(300)).await {
                Ok(Some(end)) => tracing::info!(
                    vm = name,
                    "a state capture the previous droverd left running ended: {end}"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    vm = name,
                    "a state capture the previous droverd left running did not end: {e}"
                ),
            }
        }
        FirstLook::Adopt { settle: false } => {}
    }
    Settled::Adopt {
        status: vmm.status().await.ok().or(status),
    }
}

/// Resume an adopted VM that [`resumes`] says a cut-off save left paused.
pub(super) async fn resume_if_left_paused<V: Vmm>(
    name: &str,
    vmm: &V,
    found: Found,
    status: Option<&str>,
) {
    if resumes(found, status) {
        tracing::warn!(
            vm = name,
            "VM was left paused by an interrupted save; resuming it"
        );
        let _ = vmm.cont().await;
    }
}

impl Manager {
    pub(super) async fn readopt(&self, name: &str, slot: &Arc<VmSlot>) -> Result<()> {
        let paths = self.run_paths(name);
        let marker = paths.dir.display().to_string();
        let pid = process::read_pidfile(&paths.pidfile).or(lock(&slot.info).pid);
        if let Some(pid) = pid.filter(|&p| process::is_alive(p, &marker)) {
            match self
                .connect_qmp(&paths.qmp, None, pid, Duration::from_secs(5))
                .await
            {
                Ok((qmp, events)) => {
                    let found = {
                        let i = lock(&slot.info);
                        adopt::Found {
                            migrating: i
                                .migration
                                .as_ref()
                                .is_some_and(|m| m.phase != drover_api::MigrationPhase::Committed),
                            has_config: i.running_config.is_some(),
                        }
                    };
                    // No one waits on its events before it is attached.
                    let vmm = crate::vmm::QemuVmm::new(qmp.clone(), broadcast::channel(1).0);
                    let status = match adopt::settle(name, &vmm, found).await {
                        adopt::Settled::Adopt { status } => status,
                        adopt::Settled::CutOff(why) => {
                            let deadline = Instant::now() + Duration::from_secs(5);
                            while process::is_alive(pid, &marker) && Instant::now() < deadline {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if process::is_alive(pid, &marker) {
                                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                            }
                            let _ = std::fs::remove_file(&paths.ram);
                            self.record_stopped(
                                slot,
                                exit(
                                    "start-interrupted",
                                    Some(format!("{why}; its QEMU was stopped: start it again")),
                                ),
                            )?;
                            self.publish(VmEvent::Readopted {
                                vm: name.into(),
                                outcome: Adoption::StartCutOff,
                            })
                            .await;
                            return Ok(());
                        }
                    };
                    let io_error = status.as_deref() == Some("io-error");
                    self.commit_or_defer(slot, |i| {
                        // One still arriving by migration does not run until it is committed.
                        let arriving = i.migration.as_ref().is_some_and(|m| {
                            m.role == drover_api::MigrationRole::Incoming
                                && m.phase != drover_api::MigrationPhase::Committed
                        });
                        i.state = adopt::adopted_state(arriving, status.as_deref());
                        i.paused_reason = io_error.then(|| io_error_pause(name, None));
                        i.pid = Some(pid);
                        Ok(Vec::new())
                    })?;
                    let launched = {
                        let i = lock(&slot.info);
                        i.running_config.clone().unwrap_or_else(|| i.config.clone())
                    };
                    let (nodes, files) = block_nodes(&qmp).await;
                    if let Err(e) = self.reconcile_layers(name, slot, &launched, &files) {
                        tracing::warn!(vm = name, "cannot check the disks' layers: {e}");
                    }
                    adopt::resume_if_left_paused(name, &vmm, found, status.as_deref()).await;
                    self.attach(name, slot, qmp, events, None, pid, Instant::now(), launched);
                    if let Some(rt) = self.runtime(slot) {
                        *lock(&rt.nodes) = nodes;
                    }
                    tracing::info!(vm = name, pid, "re-adopted running VM");
                    self.publish(VmEvent::Readopted {
                        vm: name.into(),
                        outcome: Adoption::Running,
                    })
                    .await;
                    return Ok(());
                }
                Err(e) => {
                    // Alive but unreachable: QEMU is wedged. Do not leave an unmanaged VM behind.
                    tracing::warn!(
                        vm = name,
                        pid,
                        "QEMU alive but QMP unreachable ({e}); killing it"
                    );
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        // Its memory file outlived it (QEMU was not around to see it removed).
        let _ = std::fs::remove_file(&paths.ram);
        let detail = format!(
            "QEMU exited while droverd was not running; {}",
            log_tail(&paths.qemu_log)
        );
        self.record_stopped(slot, exit("exited-while-daemon-down", Some(detail.clone())))?;
        self.publish(VmEvent::Readopted {
            vm: name.into(),
            outcome: Adoption::ExitedWhileDown,
        })
        .await;
        tracing::info!(
            vm = name,
            "was running before droverd restarted and has since exited"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::fake::FakeVmm;

    const LOADING: &str = "droverd was stopped while the VM's saved state was being loaded";
    const STARTING: &str =
        "droverd was stopped while the VM was starting, before its config was recorded";

    /// One VM found alive after a restart.
    struct Row {
        what: &'static str,
        /// None: no migration recorded; Some(true): an incoming one, Some(false): outgoing.
        migration: Option<bool>,
        has_config: bool,
        status: &'static str,
        /// A capture under way: how it ends and the run state it leaves.
        capture: Option<(&'static str, &'static str)>,
        /// Recorded state and resumed, or cut off with this reason.
        expect: Result<(VmState, bool), &'static str>,
    }

    fn row(
        what: &'static str,
        migration: Option<bool>,
        has_config: bool,
        status: &'static str,
        capture: Option<(&'static str, &'static str)>,
        expect: Result<(VmState, bool), &'static str>,
    ) -> Row {
        Row {
            what,
            migration,
            has_config,
            status,
            capture,
            expect,
        }
    }

    /// Every case re-adoption tells apart, run against a fake QEMU: what is recorded, and
    /// which of quit, letting a capture end and resume QEMU was asked for.
    #[tokio::test]
    async fn what_a_restarted_droverd_does_with_a_live_qemu() {
        use VmState::*;
        let (inc, out) = (Some(true), Some(false));
        let rows = [
            row("running", None, true, "running", None, Ok((Running, false))),
            row(
                "a fast save cut off while paused",
                None,
                true,
                "paused",
                None,
                Ok((Running, true)),
            ),
            row(
                "a classic save cut off after its device state",
                None,
                true,
                "postmigrate",
                None,
                Ok((Running, true)),
            ),
            row(
                "a copying save left streaming",
                None,
                true,
                "running",
                Some(("completed", "postmigrate")),
                Ok((Running, true)),
            ),
            row(
                "a background snapshot left streaming",
                None,
                true,
                "running",
                Some(("completed", "running")),
                Ok((Running, false)),
            ),
            row(
                "an I/O error",
                None,
                true,
                "io-error",
                None,
                Ok((Paused, false)),
            ),
            row(
                "a restore cut off while loading",
                None,
                true,
                "inmigrate",
                None,
                Err(LOADING),
            ),
            row(
                "a start cut off before its config",
                None,
                false,
                "running",
                None,
                Err(STARTING),
            ),
            row(
                "an outgoing migration, switched over",
                out,
                true,
                "postmigrate",
                None,
                Ok((Running, false)),
            ),
            row(
                "an outgoing migration, paused",
                out,
                true,
                "paused",
                None,
                Ok((Running, false)),
            ),
            row(
                "an incoming migration, arriving",
                inc,
                true,
                "inmigrate",
                None,
                Ok((Starting, false)),
            ),
            row(
                "an incoming migration before its config",
                inc,
                false,
                "inmigrate",
                None,
                Ok((Starting, false)),
            ),
        ];
        for r in rows {
            let vmm = FakeVmm::bare();
            vmm.set_status(r.status);
            if let Some((end, then)) = r.capture {
                vmm.capturing(end, then);
            }
            let found = Found {
                migrating: r.migration.is_some(),
                has_config: r.has_config,
            };
            let got = match settle("web", &vmm, found).await {
                Settled::CutOff(why) => Err(why),
                Settled::Adopt { status } => {
                    let state = adopted_state(r.migration == inc, status.as_deref());
                    resume_if_left_paused("web", &vmm, found, status.as_deref()).await;
                    Ok((state, vmm.calls().iter().any(|c| c == "cont")))
                }
            };
            assert_eq!(got, r.expect, "{}", r.what);
            let calls = vmm.calls();
            let asked = |c: &str| calls.iter().any(|x| x == c);
            assert_eq!(asked("quit"), r.expect.is_err(), "{}: {calls:?}", r.what);
            // A capture is let end only when no migration owns the QEMU and it is adopted.
            let settles = r.migration.is_none() && r.expect.is_ok();
            assert_eq!(asked("query-migrate"), settles, "{}: {calls:?}", r.what);
        }
    }
}
