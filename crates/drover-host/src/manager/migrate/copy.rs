//! The source's copy phase of a live migration, over the backend seam ([`Vmm`]): every disk
//! mirrored into the destination's NBD export until the mirrors are `ready` (they only carry
//! the guest's new writes then), then the memory; with mirrors, QEMU stops before the
//! switch-over so they complete (the destination gets every last write) before the final state
//! is sent; without (no disks, or shared storage) that stop would only add to the downtime. A
//! copy that moves no byte for the stall time, a mirror that vanishes, QEMU's own failure and a
//! cancel each end it with an error; undoing it is the caller's (`undo_outgoing`). Its rules
//! are tested against the fake VMM in `tests` below.

use crate::error::{HostError, Result};
use crate::vmm::Vmm;
use drover_api::MigrateProgress;
use drover_qemu::live_migration::{LiveMigrationError, NbdTarget, Phase, Tuning};
use std::time::Duration;
use tokio::time::Instant;

/// One disk's mirror.
#[derive(Debug, Clone)]
pub(in crate::manager) struct Mirror<'a> {
    /// The job's (and its target node's) name.
    pub job: String,
    /// The block node the guest writes to now.
    pub node: String,
    /// The destination's export for it.
    pub target: NbdTarget<'a>,
}

/// What to copy and how.
#[derive(Debug, Clone)]
pub(in crate::manager) struct LiveCopy<'a> {
    /// The disks to mirror (none with shared storage).
    pub mirrors: Vec<Mirror<'a>>,
    /// Where the destination QEMU listens for the memory.
    pub uri: &'a str,
    /// Bytes/s at most, for the mirrors and the memory.
    pub bandwidth: u64,
    /// The longest planned switch-over pause, ms.
    pub downtime_ms: u64,
    /// The guest's memory, for progress reports.
    pub ram_total: u64,
    /// A copy that moves no byte for this long is given up.
    pub stall: Duration,
}

/// The figures of a finished copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::manager) struct Copied {
    /// The switch-over's pause, ms.
    pub downtime_ms: u64,
    /// Memory bytes sent.
    pub ram_bytes: u64,
    /// Disk bytes mirrored.
    pub disk_bytes: u64,
}

fn cancelled_error() -> HostError {
    HostError::Conflict("cancelled; the VM stays here".into())
}

/// Run the copy phase on `vmm` up to the completed switch-over, reporting `progress` and
/// giving up as soon as `cancelled()`.
pub(in crate::manager) async fn copy_live<V: Vmm>(
    vmm: &V,
    plan: &LiveCopy<'_>,
    cancelled: impl Fn() -> bool,
    progress: &(impl Fn(MigrateProgress) + Send + Sync),
) -> Result<Copied> {
    let mut jobs = Vec::new();
    for m in &plan.mirrors {
        vmm.mirror_disk(&m.job, &m.node, &m.target, plan.bandwidth)
            .await?;
        jobs.push(m.job.clone());
    }
    // Disks first: memory is copied once they only need the guest's new writes.
    let mut disk_bytes;
    let mut last = (Instant::now(), u64::MAX);
    loop {
        if cancelled() {
            return Err(cancelled_error());
        }
        let mine = vmm.block_jobs(&jobs).await?;
        if mine.len() < jobs.len() {
            return Err(LiveMigrationError::MirrorFailed.into());
        }
        let done: u64 = mine.iter().map(|j| j.offset).sum();
        disk_bytes = mine.iter().map(|j| j.len).sum();
        progress(MigrateProgress {
            stage: "disks".into(),
            disk_done: done,
            disk_total: disk_bytes,
            ram_total: plan.ram_total,
            ..Default::default()
        });
        if mine.iter().all(|j| j.ready) {
            break;
        }
        if done != last.1 {
            last = (Instant::now(), done);
        } else if last.0.elapsed() > plan.stall {
            return Err(HostError::Timeout(format!(
                "copying disks made no progress for {} s (is the destination reachable?)",
                plan.stall.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tuning = Tuning {
        pause_before_switchover: !jobs.is_empty(),
        downtime_ms: plan.downtime_ms,
        bandwidth: plan.bandwidth,
    };
    vmm.start_outgoing(plan.uri, &tuning).await?;
    let mut last = (Instant::now(), u64::MAX);
    loop {
        if cancelled() {
            return Err(cancelled_error());
        }
        let m = vmm.migration_progress().await?;
        match m.phase {
            Phase::Completed => {
                return Ok(Copied {
                    downtime_ms: m.downtime_ms,
                    ram_bytes: m.ram_transferred,
                    disk_bytes,
                })
            }
            Phase::Failed(why) => return Err(LiveMigrationError::Failed(why).into()),
            Phase::PreSwitchover => {
                // Paused: finish the disk mirrors (the destination gets every last write),
                // then let QEMU send the final state.
                progress(MigrateProgress {
                    stage: "switch-over".into(),
                    disk_done: disk_bytes,
                    disk_total: disk_bytes,
                    ram_done: m.ram_transferred,
                    ram_total: plan.ram_total,
                    ..Default::default()
                });
                vmm.complete_mirrors(&jobs, Duration::from_secs(60)).await?;
                vmm.continue_switchover().await?;
            }
            _ => {
                let sent = m.ram_transferred;
                progress(MigrateProgress {
                    stage: "memory".into(),
                    disk_done: disk_bytes,
                    disk_total: disk_bytes,
                    ram_done: sent,
                    ram_total: m.ram_total,
                    ram_remaining: m.ram_remaining,
                    dirty_rate: m.dirty_bytes_per_s,
                    expected_downtime_ms: m.expected_downtime_ms,
                });
                if sent != last.1 {
                    last = (Instant::now(), sent);
                } else if last.0.elapsed() > plan.stall {
                    return Err(HostError::Timeout(format!(
                        "the memory copy made no progress for {} s (is the destination \
                         reachable?)",
                        plan.stall.as_secs()
                    )));
                }
            }
        }
        // Every millisecond polled late in `pre-switchover` is a millisecond of downtime.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    //! The rules of the copy phase, against the fake VMM in paused time: memory only after
    //! every mirror is ready, the mirrors complete before the final state is sent, no stop
    //! before the switch-over without mirrors, and every way a copy ends early.

    use super::*;
    use crate::vmm::fake::{test_config, FakeVmm, MIRROR_LEN, RAM};
    use drover_qemu::cmdline::disk_node;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// A running VM with `disks`, and the plan that mirrors each of them.
    fn vm(disks: &[&str]) -> (FakeVmm, LiveCopy<'static>) {
        let cfg = test_config(RAM, disks);
        let mirrors = cfg
            .disks
            .iter()
            .map(|d| Mirror {
                job: format!("mig-{}", d.id),
                node: disk_node(d),
                target: NbdTarget {
                    host: "10.0.0.2",
                    port: 10809,
                    export: "x",
                },
            })
            .collect();
        let plan = LiveCopy {
            mirrors,
            uri: "tcp:10.0.0.2:4444",
            bandwidth: 1 << 30,
            downtime_ms: 20,
            ram_total: RAM,
            stall: Duration::from_secs(20),
        };
        (FakeVmm::running(&cfg, 1), plan)
    }

    /// The stages reported, each once, in order.
    fn stages(seen: &Mutex<Vec<MigrateProgress>>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in seen.lock().unwrap().iter() {
            if out.last() != Some(&p.stage) {
                out.push(p.stage.clone());
            }
        }
        out
    }

    fn position(calls: &[String], call: &str) -> usize {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call} not in {calls:?}"))
    }

    #[tokio::test(start_paused = true)]
    async fn memory_follows_ready_mirrors_and_the_mirrors_complete_before_the_switch_over() {
        let (vmm, plan) = vm(&["vda", "vdb"]);
        let seen = Mutex::new(Vec::new());
        let report = |p: MigrateProgress| seen.lock().unwrap().push(p);
        let copied = copy_live(&vmm, &plan, || false, &report).await.unwrap();
        assert_eq!(
            copied,
            Copied {
                downtime_ms: 12,
                ram_bytes: RAM,
                disk_bytes: 2 * MIRROR_LEN
            }
        );
        let calls = vmm.calls();
        // The memory starts once both mirrors reported ready, never before.
        let migrate = position(&calls, "migrate tcp:10.0.0.2:4444");
        let queries = calls[..migrate]
            .iter()
            .filter(|c| *c == "query-block-jobs")
            .count();
        assert_eq!(queries as u64, MIRROR_LEN / crate::vmm::fake::MIRROR_STEP);
        // Paused before the switch-over: both mirrors complete, then the final state.
        let cont = position(&calls, "migrate-continue");
        assert!(position(&calls, "block-job-cancel mig-vda") < cont);
        assert!(position(&calls, "block-job-cancel mig-vdb") < cont);
        assert_eq!(stages(&seen), ["disks", "memory", "switch-over"]);
        assert_eq!(vmm.status().await.unwrap(), "postmigrate");
    }

    #[tokio::test(start_paused = true)]
    async fn without_mirrors_qemu_does_not_stop_before_the_switch_over() {
        let (vmm, plan) = vm(&[]);
        let seen = Mutex::new(Vec::new());
        let report = |p: MigrateProgress| seen.lock().unwrap().push(p);
        let copied = copy_live(&vmm, &plan, || false, &report).await.unwrap();
        assert_eq!((copied.ram_bytes, copied.disk_bytes), (RAM, 0));
        assert!(!vmm.calls().iter().any(|c| c == "migrate-continue"));
        assert_eq!(stages(&seen), ["disks", "memory"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_mirror_fails_before_any_memory_is_sent() {
        let (vmm, plan) = vm(&["vda", "vdb"]);
        vmm.lose_mirror("mig-vdb");
        let e = copy_live(&vmm, &plan, || false, &|_| {}).await.unwrap_err();
        assert!(e.to_string().contains("copying a disk"), "{e}");
        assert!(!vmm.calls().iter().any(|c| c.starts_with("migrate ")));
    }

    #[tokio::test(start_paused = true)]
    async fn qemus_failure_is_reported_with_its_reason() {
        let (vmm, plan) = vm(&["vda"]);
        let vmm = std::sync::Arc::new(vmm);
        let report = {
            let vmm = vmm.clone();
            move |p: MigrateProgress| {
                if p.stage == "memory" {
                    vmm.fail_migration("Unable to write to socket: Broken pipe");
                }
            }
        };
        let e = copy_live(&*vmm, &plan, || false, &report)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Broken pipe"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_moves_nothing_is_given_up_after_the_stall_time() {
        for stall_disks in [true, false] {
            let (vmm, plan) = vm(&["vda"]);
            if stall_disks {
                vmm.stall_mirrors();
            } else {
                vmm.stall_memory();
            }
            let t0 = tokio::time::Instant::now();
            let e = copy_live(&vmm, &plan, || false, &|_| {}).await.unwrap_err();
            assert!(matches!(e, HostError::Timeout(_)), "{e}");
            let what = if stall_disks { "disks" } else { "memory" };
            assert!(e.to_string().contains(what), "{e}");
            let took = t0.elapsed();
            assert!(took > plan.stall && took < plan.stall * 2, "{took:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_the_copy_in_either_stage() {
        for stage in ["disks", "memory"] {
            let (vmm, plan) = vm(&["vda"]);
            let cancel = AtomicBool::new(false);
            let report = |p: MigrateProgress| {
                if p.stage == stage {
                    cancel.store(true, Ordering::SeqCst);
                }
            };
            let e = copy_live(&vmm, &plan, || cancel.load(Ordering::SeqCst), &report)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("cancelled"), "{stage}: {e}");
            let sent = vmm.calls().iter().any(|c| c.starts_with("migrate "));
            assert_eq!(sent, stage == "memory", "{stage}");
        }
    }
}
