//! Helper processes droverd starts besides a VM's own QEMU (the QEMU that receives a save's
//! memory, the one kept ready for the next save): each is recorded durably (pid, start time,
//! the directory its command line names) right after it starts and before it is given work,
//! and killed when droverd starts again or its VM is deleted, so none outlives what it was
//! for. A helper started but not recorded yet (droverd killed in between) is still found: every
//! helper's command line names a directory `run/<vm>/cap-*`, which a scan of /proc finds.
//! The one exception: the receiver of a capture still streaming when droverd died is taken over
//! to finish it (see `state::adopt_captures`).

use super::Manager;
use crate::error::Result;
use drover_qemu::process;
use drover_store::StoreExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Helper processes, keyed `<vm>/<dir name>`.
pub(super) const HELPERS: &str = "helpers";

/// One recorded helper process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct HelperRecord {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot): a recycled pid does not match.
    pub start_ticks: u64,
    /// A path its command line contains.
    pub marker: String,
}

impl Manager {
    /// Record helper `name` of VM `vm` (pid `pid`, run dir `dir`) before it is given work.
    pub(super) fn record_helper(&self, vm: &str, name: &str, pid: u32, dir: &Path) -> Result<()> {
        let rec = HelperRecord {
            pid,
            start_ticks: process::start_ticks(pid).unwrap_or(0),
            marker: dir.display().to_string(),
        };
        self.s.store.put(HELPERS, &format!("{vm}/{name}"), &rec)?;
        Ok(())
    }

    /// Forget a helper that has exited.
    pub(super) fn forget_helper(&self, vm: &str, name: &str) {
        if let Err(e) = self.s.store.delete(HELPERS, &format!("{vm}/{name}")) {
            tracing::warn!(
                vm,
                helper = name,
                "could not drop the record of a helper: {e}"
            );
        }
    }

    /// Kill every helper of VM `vm` (of every VM with `None`), recorded or found by a scan,
    /// and drop their records. Returns how many were killed.
    /// `keep`: receivers taken over (by their run dir), left alone.
    pub(super) fn reap_helpers(&self, vm: Option<&str>, keep: &[(String, PathBuf)]) -> usize {
        let mut killed = 0;
        let prefix = vm.map(|v| format!("{v}/")).unwrap_or_default();
        if let Ok(rows) = self.s.store.list_prefix::<HelperRecord>(HELPERS, &prefix) {
            for (key, rec) in rows {
                if keep
                    .iter()
                    .any(|(_, d)| d.display().to_string() == rec.marker)
                {
                    continue;
                }
                let same = process::start_ticks(rec.pid) == Some(rec.start_ticks)
                    && process::is_alive(rec.pid, &rec.marker);
                if same {
                    process::signal(rec.pid, nix::sys::signal::Signal::SIGKILL);
                    killed += 1;
                    tracing::info!(
                        helper = key,
                        pid = rec.pid,
                        "killed a helper left by an earlier droverd"
                    );
                }
                let _ = self.s.store.delete(HELPERS, &format!("{prefix}{key}"));
            }
        }
        let run = self.s.cfg.state_dir.join("run");
        for (pid, rest) in process::with_path_under(&run) {
            let mut parts = rest.splitn(3, '/');
            let (Some(owner), Some(sub)) = (parts.next(), parts.next()) else {
                continue;
            };
            // The QEMU probe of a droverd killed while it probed (this one's probe is over).
            if vm.is_none() && owner == super::PROBE_DIR {
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                killed += 1;
                tracing::info!(pid, "killed the QEMU probe of an earlier droverd");
                continue;
            }
            if vm.is_some_and(|v| v != owner) || !sub.starts_with("cap-") {
                continue;
            }
            let dir = self.s.cfg.state_dir.join("run").join(owner).join(sub);
            if keep.iter().any(|(_, d)| *d == dir) {
                continue;
            }
            process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            killed += 1;
            tracing::info!(vm = owner, helper = sub, pid, "killed an unrecorded helper");
        }
        // qemu-nbd servers of an incoming offline migration: their droverd (and its record of
        // them) is gone, so nobody will stop them.
        if vm.is_none() {
            for (pid, _) in process::with_path_under(&self.s.cfg.state_dir) {
                if process::comm(pid).as_deref() == Some("qemu-nbd") {
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                    killed += 1;
                    tracing::info!(pid, "killed a qemu-nbd left by an earlier droverd");
                }
            }
        }
        killed
    }
}
