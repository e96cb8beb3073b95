//! The backend seam: what droverd's coordination code asks of one running VMM.
//!
//! [`Vmm`] names only the operations the host's rules are written against (hot-plug and unplug
//! of disks, NICs, vCPUs and memory, and the device-deleted events an unplug waits for; the run
//! state, resuming, quitting and letting a capture end, for re-adoption after a restart),
//! typed, with QEMU's own error type. [`QemuVmm`] is the real one over QMP; a test-only
//! `FakeVmm` (in `vmm::fake`) models the QEMU behaviour those rules depend on, so they are
//! tested in milliseconds rather than only by booting guests.

use drover_model::{DiskConfig, NicConfig};
use drover_qemu::hotplug;
use drover_qemu::qmp::{Qmp, QmpError, QmpEvent};
use serde_json::Value;
use std::future::Future;
use std::os::fd::BorrowedFd;
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
    /// Ask QEMU to exit, waiting at most `timeout` for its answer.
    fn quit(&self, timeout: Duration) -> impl Future<Output = Result<(), QmpError>> + Send;
    /// Let an outgoing migration or background snapshot still under way end by itself,
    /// cancelling it only after `timeout`; returns how it ended (`None`: none was running).
    fn settle_capture(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<String>, QmpError>> + Send;
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

    async fn quit(&self, timeout: Duration) -> Result<(), QmpError> {
        self.qmp
            .execute_timeout("quit", None, timeout)
            .await
            .map(|_| ())
    }

    async fn settle_capture(&self, timeout: Duration) -> Result<Option<String>, QmpError> {
        drover_qemu::migrate::settle_migration(&self.qmp, timeout).await
    }

    fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
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
