//! What a host offers the cluster: its inventory (registered with its lease) and its status.
//!
//! Pure data. The inventory is written by the host itself when it joins; the status is derived by
//! the controller from the host's lease (a lost lease is `Down`) and the operator (`Draining`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::service::valid_label;

/// Hours in a month, to turn a disk's cost per GiB-month into a cost per hour (365.25 * 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.5;

/// What one unit of each resource costs on a host, in the operator's currency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Costs {
    /// One vCPU for one hour.
    #[serde(default)]
    pub vcpu_hour: f64,
    /// One GiB of memory for one hour.
    #[serde(default)]
    pub gib_hour: f64,
    /// One GiB of disk for one month.
    #[serde(default)]
    pub disk_gib_month: f64,
}

impl Costs {
    /// What a member with these needs costs per hour on a host with these prices.
    pub fn per_hour(&self, needs: &Needs) -> f64 {
        let gib = (1u64 << 30) as f64;
        needs.cpus as f64 * self.vcpu_hour
            + needs.memory as f64 / gib * self.gib_hour
            + needs.disk as f64 / gib * self.disk_gib_month / HOURS_PER_MONTH
    }

    fn valid(&self) -> bool {
        [self.vcpu_hour, self.gib_hour, self.disk_gib_month]
            .iter()
            .all(|c| c.is_finite() && *c >= 0.0)
    }
}

/// Resources a member needs (or a host has free).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disk in bytes.
    pub disk: u64,
    /// Network bandwidth in Mbit/s.
    pub bandwidth_mbps: u32,
}

/// A host's inventory, as it registers it when it joins the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInventory {
    /// The host's name in the cluster (a DNS label, unique).
    pub name: String,
    /// Where the controller reaches the host's API (`https://10.0.0.2:7443`).
    #[serde(default)]
    pub api_url: String,
    /// vCPUs the host gives to VMs.
    pub cpus: u32,
    /// Memory in bytes the host gives to VMs.
    pub memory: u64,
    /// Disk in bytes the host gives to VMs.
    pub disk: u64,
    /// Network bandwidth in Mbit/s; 0 when not declared (no bandwidth accounting on this host).
    #[serde(default)]
    pub bandwidth_mbps: u32,
    /// `kvm` or `tcg`.
    #[serde(default)]
    pub accel: String,
    /// The QEMU version the host runs (`7.2.19`).
    #[serde(default)]
    pub qemu_version: String,
    /// The CPU model the host's VMs get (`max`, `host`, ...).
    #[serde(default)]
    pub cpu_model: String,
    /// The site (rack, room, zone) for anti-affinity by site.
    #[serde(default)]
    pub site: String,
    /// Free-form labels (`ssd=yes`), for pinning.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How trusted the host is; a service may ask for a minimum.
    #[serde(default)]
    pub security_level: u8,
    /// Prices of the host's resources.
    #[serde(default)]
    pub cost: Costs,
}

/// Why an inventory cannot be registered.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InventoryError {
    /// The host name breaks the naming rule.
    #[error("invalid host name {0:?}: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit")]
    BadName(String),
    /// The host offers nothing.
    #[error("host {0}: it must offer at least one vCPU and some memory")]
    Empty(String),
    /// A cost is negative or not a number.
    #[error("host {0}: costs must be finite numbers >= 0")]
    BadCost(String),
}

impl HostInventory {
    /// A host with these resources and defaults for everything else (for tests and examples).
    pub fn new(name: &str, cpus: u32, memory: u64, disk: u64) -> Self {
        HostInventory {
            name: name.to_string(),
            api_url: String::new(),
            cpus,
            memory,
            disk,
            bandwidth_mbps: 0,
            accel: String::new(),
            qemu_version: String::new(),
            cpu_model: String::new(),
            site: String::new(),
            labels: BTreeMap::new(),
            security_level: 0,
            cost: Costs::default(),
        }
    }

    /// Check what the scheduler relies on.
    pub fn validate(&self) -> Result<(), InventoryError> {
        if !valid_label(&self.name) {
            return Err(InventoryError::BadName(self.name.clone()));
        }
        if self.cpus == 0 || self.memory == 0 {
            return Err(InventoryError::Empty(self.name.clone()));
        }
        if !self.cost.valid() {
            return Err(InventoryError::BadCost(self.name.clone()));
        }
        Ok(())
    }

    /// Everything the host offers.
    pub fn capacity(&self) -> Needs {
        Needs {
            cpus: self.cpus,
            memory: self.memory,
            disk: self.disk,
            bandwidth_mbps: self.bandwidth_mbps,
        }
    }
}

/// A host's status as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    /// Its lease is alive; it takes new members.
    Up,
    /// Its lease is alive, but an operator is emptying it: it keeps what it runs, takes nothing new.
    Draining,
    /// Its lease expired: it has stopped its cluster VMs itself (self-fencing), so its members are
    /// known dead.
    Down,
}

impl std::fmt::Display for HostStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostStatus::Up => "up",
            HostStatus::Draining => "draining",
            HostStatus::Down => "down",
        })
    }
}

/// A host with its status: one entry of the scheduler's and reconciler's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// What the host registered.
    pub inventory: HostInventory,
    /// Up, draining or down.
    pub status: HostStatus,
}
