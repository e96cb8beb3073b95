//! Drover's cluster: hosts, services, placement and supervision across hosts.
//!
//! The logic is pure and has no I/O, so it is tested in milliseconds and replayed exactly:
//! - [`inventory`]: what a host offers (registered with its lease) and its status;
//! - [`service`]: service files (TOML), parsed strictly and validated;
//! - [`scheduler`]: filter then score, every rejection explained;
//! - [`reconcile`]: from services, hosts, assignments and observed VMs to actions;
//! - [`scale`]: how many members an app with a scale rule runs, from their load;
//! - [`usage`]: what members used where, and its cost at their hosts' prices.
//!
//! [`etcd`] is the one adapter to the outside: host leases, the controller election and writes
//! fenced by the leader key.

pub mod controller;
pub mod etcd;
pub mod host;
pub mod inventory;
pub mod reconcile;
pub mod scale;
pub mod scheduler;
pub mod service;
pub mod usage;

pub use inventory::{Costs, HostInventory, HostRecord, HostStatus, Needs};
pub use reconcile::{
    reconcile, Action, Assignment, MemberState, ObservedVm, Plan, RestartPolicy, VmState, World,
};
pub use scheduler::{Explanation, NoFit, Rejection, Request, Scheduler};
pub use service::{App, Constraints, MemberId, Scope, Service, ServiceError, Storage, Strategy};
