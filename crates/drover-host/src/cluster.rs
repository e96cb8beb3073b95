//! droverd in a cluster (`droverd --cluster ETCD_URLS`): registers this host's inventory with a
//! lease, keeps it alive, and fences itself — if the lease cannot be renewed, the cluster VMs
//! assigned here are stopped before the lease can expire (see `drover_cluster::host`). VMs
//! that are not the cluster's are never touched.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use drover_cluster::host::{LocalMember, LocalVms, Membership};
use drover_cluster::{Costs, HostInventory, MemberId};
use serde::Deserialize;

use crate::manager::Manager;

/// `--cluster-config FILE`: what the host says about itself beyond what droverd measures.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The host's cluster name (default: its host id).
    #[serde(default)]
    pub name: Option<String>,
    /// Site, for anti-affinity by site.
    #[serde(default)]
    pub site: String,
    /// Labels for pinning (`ssd = "yes"`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Security level.
    #[serde(default)]
    pub security_level: u8,
    /// Prices.
    #[serde(default)]
    pub cost: Costs,
    /// Lease TTL in seconds (default 3).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Network bandwidth in Mbit/s offered to VMs.
    #[serde(default)]
    pub bandwidth_mbps: u32,
    /// vCPUs offered to cluster members (default: the host's CPU count; more overcommits).
    #[serde(default)]
    pub cpus: Option<u32>,
}

impl ClusterConfig {
    /// Read the file, or the defaults when there is none.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(ClusterConfig::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("parsing the cluster config {}", path.display()))
    }
}

struct ManagerVms(Manager);

impl LocalVms for ManagerVms {
    async fn members(&self) -> Vec<LocalMember> {
        self.0
            .list()
            .into_iter()
            .filter(|v| {
                !matches!(
                    v.state,
                    drover_api::VmState::Stopped | drover_api::VmState::Hibernated
                )
            })
            .filter_map(|v| {
                let f = v.fence?;
                Some(LocalMember {
                    vm: v.name,
                    member: MemberId {
                        service: f.service,
                        app: f.app,
                        index: f.index,
                    },
                    token: f.token,
                })
            })
            .collect()
    }

    async fn lease_renewed(&self, stop_by: tokio::time::Instant) {
        let within = stop_by.saturating_duration_since(tokio::time::Instant::now());
        let state_dir = self.0.state_dir().to_path_buf();
        // Off the runtime's threads: the lease loop must not wait on the disk.
        let armed = tokio::task::spawn_blocking(move || {
            std::env::current_exe()
                .context("finding droverd's binary for the fence watchdog")
                .and_then(|bin| crate::fence_watchdog::arm(&state_dir, within, &bin))
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the fence watchdog's arming failed: {e}")));
        if let Err(e) = armed {
            // Without the watchdog a dead droverd's members would outlive the lease.
            tracing::error!(error = format!("{e:#}"), "cannot arm the fence watchdog");
        }
    }

    async fn fence(&self, vms: Vec<String>) {
        for name in vms {
            let running = self.0.get(&name).is_ok_and(|v| {
                !matches!(
                    v.state,
                    drover_api::VmState::Stopped | drover_api::VmState::Hibernated
                )
            });
            if running {
                if let Err(e) = self
                    .0
                    .stop(&name, 0, true, &crate::auth::Caller::daemon())
                    .await
                {
                    tracing::error!(vm = %name, error = %e, "self-fencing: could not stop the VM");
                }
            }
        }
    }
}

/// Join the cluster in the background; `api_url` is where the controller reaches this host.
pub fn spawn(
    mgr: Manager,
    etcd: Vec<String>,
    cfg: ClusterConfig,
    api_url: String,
) -> anyhow::Result<()> {
    let info = mgr.host_info();
    let name = match cfg.name.clone() {
        Some(n) => n,
        None => info
            .identity
            .as_ref()
            .map(|i| i.id.clone())
            .unwrap_or_else(|| info.hostname.clone()),
    };
    let inventory = HostInventory {
        name,
        api_url,
        cpus: cfg.cpus.unwrap_or(info.cpus),
        memory: info.memory_total,
        disk: info.disk_free,
        bandwidth_mbps: cfg.bandwidth_mbps,
        accel: info.accel.to_string(),
        qemu_version: info.qemu_version.clone(),
        cpu_model: "max".into(),
        site: cfg.site,
        labels: cfg.labels,
        security_level: cfg.security_level,
        cost: cfg.cost,
    };
    inventory
        .validate()
        .context("this host cannot join the cluster (set name = \"...\" in --cluster-config)")?;
    let ttl = Duration::from_secs(cfg.ttl_s.unwrap_or(3).max(1));
    // A controller's start carries its assignment's revision: checked against etcd right
    // before QEMU starts, failing closed.
    let (endpoints, host) = (etcd.clone(), inventory.name.clone());
    mgr.set_fence_check(std::sync::Arc::new(move |f: drover_api::Fence| {
        let (endpoints, host) = (endpoints.clone(), host.clone());
        Box::pin(async move {
            let etcd =
                drover_cluster::etcd::Etcd::connect(&endpoints, "/drover", Duration::from_secs(2))
                    .await
                    .map_err(|e| e.to_string())?;
            let member = MemberId {
                service: f.service,
                app: f.app,
                index: f.index,
            };
            etcd.check_token(&member, &host, f.token)
                .await
                .map_err(|e| e.to_string())
        })
    }));
    // Members started by an older droverd carry no mark yet; the watchdog must know them too.
    for v in mgr.list().into_iter().filter(|v| v.fence.is_some()) {
        crate::fence_watchdog::mark_member(mgr.state_dir(), &v.name)
            .with_context(|| format!("marking VM {} as a cluster member", v.name))?;
    }
    tracing::info!(host = %inventory.name, etcd = ?etcd, ttl_s = ttl.as_secs(), "joining the cluster");
    tokio::spawn(drover_cluster::host::run(
        Membership::new(etcd, inventory, ttl),
        ManagerVms(mgr),
    ));
    Ok(())
}
