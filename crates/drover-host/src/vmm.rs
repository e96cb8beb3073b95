//! The backend seam: what droverd's coordination code asks of one running VMM.
//!
//! [`Vmm`] names only the operations the host's rules are written against (hot-plug and unplug
//! of disks, NICs, vCPUs and memory, and the device-deleted events an unplug waits for; the run
//! state, resuming, quitting and letting a capture end, for re-adoption after a restart; the
//! paused moment of a save: pausing, layering a disk, writing or streaming the device state;
//! the source's side of a live migration: disk mirrors, the memory copy and its switch-over),
//! typed, with QEMU's own error type. [`QemuVmm`] is the real one over QMP; a test-only
//! `FakeVmm` (in `vmm::fake`) models the QEMU behaviour those rules depend on, so they are
//! tested in milliseconds rather than only by booting guests.

use drover_model::{DiskConfig, NicConfig};
use drover_qemu::live_migration::{
    self, BlockJob, LiveMigrationError, NbdTarget, Progress, Tuning,
};
use drover_qemu::qmp::{Qmp, QmpError, QmpEvent};
use drover_qemu::{hotplug, migrate};
use serde_json::Value;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::Duration;
use tokio::sync::broadcast;

#[cfg(test)]
pub mod fake;

/// One running VMM, as the host's coordination code uses it. Each add is all-or-nothing: a
/// failed add leaves the VMM as it was (QEMU's hot-plug helpers undo their own first steps).
pub trait Vmm: Send + Sync {
    /// QEMU's run state (`running`, `paused`, `postmigrate`, `inmigrate`, `io-error`, ...).
    fn status(&self) -> impl Future<Output = Result<String, QmpError>> + Send;
    /// Resume the vCPUs.
    fn cont(&self) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Pause the vCPUs.
    fn pause(&self) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Put the qcow2 overlay `overlay` (opened as block node `new_node`) on top of block node
    /// `node`: the guest writes to the overlay from then on, `node` stays below it, read-only.
    fn snapshot_disk(
        &self,
        node: &str,
        overlay: &Path,
        new_node: &str,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Write the device state into `file`, with the RAM unless `shared_ram` (guest RAM that is
    /// a shared file is then left out); waits until it is written.
    fn save_state(
        &self,
        file: &Path,
        shared_ram: bool,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Write the device state and RAM into `file` with `mapped-ram` (QEMU >= 9.0).
    fn save_state_mapped(&self, file: &Path) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Start a background snapshot into `uri` (a receiving QEMU): the device state now, the
    /// RAM streamed while the guest runs on.
    fn background_snapshot(&self, uri: &str) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Wait until a background snapshot has taken the device state (the moment the guest may
    /// run again); `keeps_run_state`: this QEMU leaves a paused VM paused then (>= 9.0).
    fn wait_device_state(
        &self,
        keeps_run_state: bool,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Ask QEMU to exit, waiting at most `timeout` for its answer.
    fn quit(&self, timeout: Duration) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Let an outgoing migration or background snapshot still under way end by itself,
    /// cancelling it only after `timeout`; returns how it ended (`None`: none was running).
    fn settle_capture(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<String>, QmpError>> + Send;
    /// Mirror block node `node` into the destination's NBD export `target` as job `job`, at
    /// most `speed` bytes/s.
    fn mirror_disk(
        &self,
        job: &str,
        node: &str,
        target: &NbdTarget<'_>,
        speed: u64,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// The block jobs among `ids` still running.
    fn block_jobs(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<BlockJob>, QmpError>> + Send;
    /// Complete mirror jobs `jobs` (the destination then holds every write) and drop their
    /// target nodes, waiting at most `timeout`.
    fn complete_mirrors(
        &self,
        jobs: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<(), LiveMigrationError>> + Send;
    /// Start sending memory and device state to `uri`, tuned by `tuning`.
    fn start_outgoing(
        &self,
        uri: &str,
        tuning: &Tuning,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Where the outgoing migration is.
    fn migration_progress(&self) -> impl Future<Output = Result<Progress, QmpError>> + Send;
    /// Past the pause before the switch-over: send the final state.
    fn continue_switchover(&self) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Undo an outgoing migration that will not finish: cancel it and its mirrors, run the
    /// guest again, drop the mirror target nodes `nodes`. Best effort.
    fn abandon_outgoing(&self, nodes: &[String]) -> impl Future<Output = ()> + Send;
    /// Every event from now on: an unplug subscribes before it asks, so no `DEVICE_DELETED`
    /// is missed.
    fn events(&self) -> broadcast::Receiver<QmpEvent>;
    /// Pass `fd` into fd set `set` (a new one when `None`) under `opaque`; returns the set.
    fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        opaque: &str,
        set: Option<u64>,
    ) -> impl Future<Output = Result<Option<u64>, QmpError>> + Send;
    /// Hot-plug disk `d` on root port `port`, opened as `blockdev` says when given, else
    /// from its path.
    fn add_disk(
        &self,
        d: &DiskConfig,
        port: u8,
        blockdev: Option<Value>,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Hot-plug NIC `n` on root port `port`.
    fn add_nic(&self, n: &NicConfig, port: u8)
        -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Ask the guest to release device `id`; it is gone once a `DEVICE_DELETED` names it.
    fn request_unplug(&self, id: &str) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Ask the guest to release each of `ids`, newest (last) first.
    fn request_unplug_all(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<(), QmpError>> + Send {
        async move {
            for id in ids.iter().rev() {
                self.request_unplug(id).await?;
            }
            Ok(())
        }
    }
    /// Free block node `node` once no device uses it.
    fn remove_disk_backend(&self, node: &str) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Free NIC `n`'s netdev once its device is gone.
    fn remove_nic_backend(
        &self,
        n: &NicConfig,
    ) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Plug vCPUs until `target` are present; returns the device ids plugged, in order.
    fn add_cpus(&self, target: u32) -> impl Future<Output = Result<Vec<String>, QmpError>> + Send;
    /// Plug a DIMM of `bytes` named `id` (device and backend ids from [`hotplug::dimm_ids`]).
    fn add_memory(&self, id: &str, bytes: u64)
        -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Drop DIMM `id`'s memory backend once its device is gone.
    fn remove_memory_backend(&self, id: &str) -> impl Future<Output = Result<(), QmpError>> + Send;
}

/// The real VMM: one QEMU over its QMP connection, with the daemon's copy of its events.
#[derive(Clone, Debug)]
pub struct QemuVmm {
    qmp: Qmp,
    events: broadcast::Sender<QmpEvent>,
}

impl QemuVmm {
    /// A VMM over `qmp`, whose events the daemon re-broadcasts on `events`.
    pub fn new(qmp: Qmp, events: broadcast::Sender<QmpEvent>) -> Self {
        QemuVmm { qmp, events }
    }
}

impl Vmm for QemuVmm {
    async fn status(&self) -> Result<String, QmpError> {
        self.qmp.status().await
    }

    async fn cont(&self) -> Result<(), QmpError> {
        self.qmp.execute("cont", None).await.map(|_| ())
    }

    async fn pause(&self) -> Result<(), QmpError> {
        self.qmp.execute("stop", None).await.map(|_| ())
    }

    async fn snapshot_disk(
        &self,
        node: &str,
        overlay: &Path,
        new_node: &str,
    ) -> Result<(), QmpError> {
        migrate::snapshot_disk(&self.qmp, node, overlay, new_node).await
    }

    async fn save_state(&self, file: &Path, shared_ram: bool) -> Result<(), QmpError> {
        migrate::save_state(&self.qmp, file, shared_ram).await
    }

    async fn save_state_mapped(&self, file: &Path) -> Result<(), QmpError> {
        migrate::save_state_mapped(&self.qmp, file).await
    }

    async fn background_snapshot(&self, uri: &str) -> Result<(), QmpError> {
        migrate::background_snapshot(&self.qmp, uri).await
    }

    async fn wait_device_state(
        &self,
        keeps_run_state: bool,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        migrate::wait_device_state(&self.qmp, keeps_run_state, timeout).await
    }

    async fn quit(&self, timeout: Duration) -> Result<(), QmpError> {
        self.qmp
            .execute_timeout("quit", None, timeout)
            .await
            .map(|_| ())
    }

    async fn settle_capture(&self, timeout: Duration) -> Result<Option<String>, QmpError> {
        migrate::settle_migration(&self.qmp, timeout).await
    }

    fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    async fn mirror_disk(
        &self,
        job: &str,
        node: &str,
        target: &NbdTarget<'_>,
        speed: u64,
    ) -> Result<(), QmpError> {
        live_migration::mirror_to_nbd(&self.qmp, job, node, target, speed).await
    }

    async fn block_jobs(&self, ids: &[String]) -> Result<Vec<BlockJob>, QmpError> {
        live_migration::block_jobs(&self.qmp, ids).await
    }

    async fn complete_mirrors(
        &self,
        jobs: &[String],
        timeout: Duration,
    ) -> Result<(), LiveMigrationError> {
        live_migration::complete_mirrors(&self.qmp, jobs, timeout).await
    }

    async fn start_outgoing(&self, uri: &str, tuning: &Tuning) -> Result<(), QmpError> {
        live_migration::start_outgoing(&self.qmp, uri, tuning).await
    }

    async fn migration_progress(&self) -> Result<Progress, QmpError> {
        live_migration::progress(&self.qmp).await
    }

    async fn continue_switchover(&self) -> Result<(), QmpError> {
        live_migration::continue_switchover(&self.qmp).await
    }

    async fn abandon_outgoing(&self, nodes: &[String]) {
        live_migration::abandon_outgoing(&self.qmp, nodes).await
    }

    async fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        opaque: &str,
        set: Option<u64>,
    ) -> Result<Option<u64>, QmpError> {
        let mut args = serde_json::json!({ "opaque": opaque });
        if let Some(s) = set {
            args["fdset-id"] = s.into();
        }
        let r = self.qmp.execute_with_fd("add-fd", Some(args), fd).await?;
        Ok(r.get("fdset-id").and_then(Value::as_u64).or(set))
    }

    async fn add_disk(
        &self,
        d: &DiskConfig,
        port: u8,
        blockdev: Option<Value>,
    ) -> Result<(), QmpError> {
        hotplug::add_disk(&self.qmp, d, port, blockdev).await
    }

    async fn add_nic(&self, n: &NicConfig, port: u8) -> Result<(), QmpError> {
        hotplug::add_nic(&self.qmp, n, port).await
    }

    async fn request_unplug(&self, id: &str) -> Result<(), QmpError> {
        hotplug::request_unplug(&self.qmp, id).await
    }

    async fn remove_disk_backend(&self, node: &str) -> Result<(), QmpError> {
        hotplug::remove_disk_backend(&self.qmp, node).await
    }

    async fn remove_nic_backend(&self, n: &NicConfig) -> Result<(), QmpError> {
        hotplug::remove_nic_backend(&self.qmp, n).await
    }

    async fn add_cpus(&self, target: u32) -> Result<Vec<String>, QmpError> {
        hotplug::add_cpus(&self.qmp, target).await
    }

    async fn add_memory(&self, id: &str, bytes: u64) -> Result<(), QmpError> {
        hotplug::add_memory(&self.qmp, id, bytes).await
    }

    async fn remove_memory_backend(&self, id: &str) -> Result<(), QmpError> {
        hotplug::remove_memory_backend(&self.qmp, id).await
    }
}
