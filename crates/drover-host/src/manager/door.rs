//! The one door every verb on a VM goes through: resolve the VM, check the caller's permission
//! and the VM's state (both as data, in `crate::action`), take its operation lock, and hand the
//! feature an [`OpGuard`] — the only way to call the functions that assume the lock is held.

use super::{lock, Manager, VmSlot};
use crate::action::{OpLock, VmAction};
use crate::auth::Caller;
use crate::error::{HostError, Result};
use std::sync::Arc;

/// Proof that this task holds a VM's operation lock (`VmSlot::op`): only [`OpGuard::lock`] and
/// [`OpGuard::try_lock`] build one, so a function taking `&OpGuard` cannot run without it.
/// Dropping it releases the lock.
pub(super) struct OpGuard {
    slot: Arc<VmSlot>,
    _op: tokio::sync::OwnedMutexGuard<()>,
}

impl OpGuard {
    /// Wait for the VM's running operation (if any) to finish, then hold the lock.
    pub(super) async fn lock(slot: &Arc<VmSlot>) -> OpGuard {
        OpGuard {
            _op: slot.op.clone().lock_owned().await,
            slot: slot.clone(),
        }
    }

    /// Hold the lock if no operation runs; `None` if one does.
    pub(super) fn try_lock(slot: &Arc<VmSlot>) -> Option<OpGuard> {
        Some(OpGuard {
            _op: slot.op.clone().try_lock_owned().ok()?,
            slot: slot.clone(),
        })
    }

    /// The VM whose lock this is.
    pub(super) fn slot(&self) -> &Arc<VmSlot> {
        &self.slot
    }
}

impl Manager {
    /// Let `action` on VM `vm` begin: the caller's permission, then the VM, then its operation
    /// lock (waiting or refusing as the action says), then its state — each refused with the
    /// action's one message. Actions that take no lock use [`Manager::look`].
    pub(super) async fn door(
        &self,
        vm: &str,
        action: VmAction,
        caller: &Caller,
    ) -> Result<OpGuard> {
        let slot = self.admit(vm, action, caller)?;
        let op = match action.op_lock() {
            OpLock::Refuse => {
                OpGuard::try_lock(&slot).ok_or_else(|| HostError::Conflict(action.busy(vm)))?
            }
            OpLock::Wait | OpLock::None => OpGuard::lock(&slot).await,
        };
        action
            .check(vm, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        Ok(op)
    }

    /// The door for actions that take no operation lock (`OpLock::None`): permission, VM and
    /// state are checked as by [`Manager::door`].
    pub(super) fn look(&self, vm: &str, action: VmAction, caller: &Caller) -> Result<Arc<VmSlot>> {
        let slot = self.admit(vm, action, caller)?;
        action
            .check(vm, lock(&slot.info).state)
            .map_err(HostError::Conflict)?;
        Ok(slot)
    }

    /// The caller's permission for `action` (first, so a caller without it learns nothing of
    /// the VM), then the VM.
    fn admit(&self, vm: &str, action: VmAction, caller: &Caller) -> Result<Arc<VmSlot>> {
        if let Some(p) = action.permission() {
            caller.require(p)?;
        }
        self.slot(vm)
    }
}
