//! What each feature hands the lifecycle: its subscriber to VM events and the store tables in
//! which it keeps rows of a VM. A new feature adds its entry here, next to the others, and
//! declares both in its own module; the lifecycle itself names no feature.
//!
//! - [`SUBSCRIBERS`]: called in this order for every [`VmEvent`] (see [`crate::vm_events`]).
//! - [`VM_TABLES`]: every table with rows that belong to one VM. A delete removes all of them
//!   in one transaction, a migration carries them to the other host (all but [`super::VMS`],
//!   which it rewrites), and an arriving migration accepts rows in these tables only.

use super::Manager;
use crate::vm_events::{Subscriber, VmEvent};

/// Every feature's subscription, in the order they run. The saved states' comes first: a VM's
/// standby receiver is gone before anything else hears of its exit.
pub(super) static SUBSCRIBERS: [Subscriber<Manager>; 4] = [
    super::state::SUBSCRIBER,
    crate::events::SUBSCRIBER,
    super::guest::SUBSCRIBER,
    super::migrate::SUBSCRIBER,
];

/// How a table's rows of VM `n` are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keyed {
    /// One row, keyed `n`.
    ByName,
    /// Any number of rows, keyed `n/...`.
    ByPrefix,
}

/// A table that holds rows of single VMs.
#[derive(Debug, Clone, Copy)]
pub(super) struct VmTable {
    /// The table's name in the store.
    pub name: &'static str,
    /// How its rows name their VM.
    pub keyed: Keyed,
}

impl VmTable {
    /// A table with one row per VM, keyed by its name.
    pub const fn by_name(name: &'static str) -> Self {
        VmTable {
            name,
            keyed: Keyed::ByName,
        }
    }

    /// A table whose rows of VM `n` are keyed `n/...`.
    pub const fn by_prefix(name: &'static str) -> Self {
        VmTable {
            name,
            keyed: Keyed::ByPrefix,
        }
    }

    /// Whether row `key` of this table belongs to VM `vm`.
    pub fn owns(&self, key: &str, vm: &str) -> bool {
        match self.keyed {
            Keyed::ByName => key == vm,
            Keyed::ByPrefix => key.strip_prefix(vm).is_some_and(|r| r.starts_with('/')),
        }
    }
}

/// Each feature's per-VM tables (each declared in the feature's own module).
pub(super) static VM_TABLES: &[&[VmTable]] = &[
    super::TABLES,
    super::identity::TABLES,
    super::guest::TABLES,
    super::state::TABLES,
    super::layers::TABLES,
];

/// Every per-VM table: the record first, then those keyed by name, then those keyed by prefix.
pub(super) fn vm_tables() -> impl Iterator<Item = &'static VmTable> {
    let all = || VM_TABLES.iter().flat_map(|t| t.iter());
    all()
        .filter(|t| t.keyed == Keyed::ByName)
        .chain(all().filter(|t| t.keyed == Keyed::ByPrefix))
}

/// Whether `table`/`key` is a row of VM `vm` (what an arriving migration may write).
pub(super) fn owns(table: &str, key: &str, vm: &str) -> bool {
    vm_tables().any(|t| t.name == table && t.owns(key, vm))
}

impl Manager {
    /// Tell every feature what happened to a VM; returns once each has reacted.
    pub(super) async fn publish(&self, event: VmEvent) {
        self.s.bus.publish(self, &event).await;
    }
}

