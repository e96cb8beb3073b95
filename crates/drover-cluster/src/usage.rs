//! Usage and cost: what each service's members used, where, and what that cost at the prices
//! their hosts registered.
//!
//! The leading controller counts between two of its rounds: a member seen running on its
//! assigned host at both ends of an interval used its app's vCPUs and memory for that long, at
//! that host's prices ([`crate::Costs::per_hour`]). Rows are kept in etcd
//! (`usage/<service>/<app>/<host>`) and flushed, fenced, every [`FLUSH_EVERY_MS`]. What is
//! counted is therefore a lower bound: time no controller led, the first interval of a new
//! leader and at most one unflushed interval at a leader change are not counted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inventory::{HostRecord, Needs};
use crate::reconcile::{Assignment, ObservedVm, VmState};
use crate::service::Service;

/// How often the leading controller writes what it counted.
pub const FLUSH_EVERY_MS: u64 = 10_000;
/// An interval longer than this between two rounds (a stalled controller) counts as this long:
/// what happened in between was not seen.
pub const MAX_INTERVAL_MS: u64 = 30_000;

/// Where one row's usage was: a service's app on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageKey {
    /// The service.
    pub service: String,
    /// The app.
    pub app: String,
    /// The host.
    pub host: String,
}

impl UsageKey {
    /// Its key under the cluster's prefix.
    pub fn path(&self) -> String {
        format!("usage/{}/{}/{}", self.service, self.app, self.host)
    }
}

/// What was used, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Member-seconds (one VM running one second).
    pub vm_seconds: f64,
    /// vCPU-seconds given.
    pub vcpu_seconds: f64,
    /// GiB-seconds of memory given.
    pub gib_seconds: f64,
    /// What it cost, in the hosts' currency.
    pub cost: f64,
    /// Since when it was counted (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
}

impl Usage {
    /// Add another row's figures (keeping the earlier start).
    pub fn add(&mut self, o: &Usage) {
        self.vm_seconds += o.vm_seconds;
        self.vcpu_seconds += o.vcpu_seconds;
        self.gib_seconds += o.gib_seconds;
        self.cost += o.cost;
        self.since_ms = match (self.since_ms, o.since_ms) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
    }

    fn count(&mut self, needs: &Needs, seconds: f64, per_hour: f64, now_ms: u64) {
        self.vm_seconds += seconds;
        self.vcpu_seconds += f64::from(needs.cpus) * seconds;
        self.gib_seconds += needs.memory as f64 / (1u64 << 30) as f64 * seconds;
        self.cost += per_hour * seconds / 3600.0;
        if self.since_ms == 0 {
            self.since_ms = now_ms.saturating_sub((seconds * 1000.0) as u64);
        }
    }
}

/// Usage counted since the last flush, and which members ran at the last round.
#[derive(Debug, Default, Clone)]
pub struct Meter {
    last_ms: Option<u64>,
    running: BTreeMap<(crate::service::MemberId, String), ()>,
    /// Counted, not yet written.
    pub pending: BTreeMap<UsageKey, Usage>,
    /// When it was last written.
    pub flushed_ms: u64,
}

impl Meter {
    /// Count one round: members running on their assigned host now and at the last round
    /// used their needs for the time in between.
    pub fn round(
        &mut self,
        now_ms: u64,
        services: &[Service],
        hosts: &[HostRecord],
        assignments: &[Assignment],
        observed: &[ObservedVm],
    ) {
        let running: BTreeMap<_, ()> = observed
            .iter()
            .filter(|vm| vm.state != VmState::Stopped)
            .filter(|vm| {
                assignments
                    .iter()
                    .any(|a| a.member == vm.member && a.host == vm.host)
            })
            .map(|vm| ((vm.member.clone(), vm.host.clone()), ()))
            .collect();
        if let Some(last) = self.last_ms {
            let seconds = now_ms.saturating_sub(last).min(MAX_INTERVAL_MS) as f64 / 1000.0;
            for (member, host) in running.keys() {
                if !self.running.contains_key(&(member.clone(), host.clone())) {
                    continue;
                }
                let Some(app) = crate::service::app_of(services, member) else {
                    continue;
                };
                let per_hour = hosts
                    .iter()
                    .find(|h| h.inventory.name == *host)
                    .map_or(0.0, |h| h.inventory.cost.per_hour(&app.needs));
                let key = UsageKey {
                    service: member.service.clone(),
                    app: member.app.clone(),
                    host: host.clone(),
                };
                self.pending
                    .entry(key)
                    .or_default()
                    .count(&app.needs, seconds, per_hour, now_ms);
            }
        }
        self.last_ms = Some(now_ms);
        self.running = running;
    }

    /// Is it time to write what was counted (`every_ms` after the last write)?
    pub fn due(&self, now_ms: u64, every_ms: u64) -> bool {
        !self.pending.is_empty() && now_ms.saturating_sub(self.flushed_ms) >= every_ms
    }
}

/// How a report groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One row per service.
    Service,
    /// One row per service and app.
    App,
    /// One row per host.
    Host,
}

/// Rows summed by `by`, in key order; the key's parts not grouped on are empty.
pub fn report(rows: &[(UsageKey, Usage)], by: GroupBy) -> Vec<(UsageKey, Usage)> {
    let mut out: BTreeMap<UsageKey, Usage> = BTreeMap::new();
    for (k, u) in rows {
        let key = match by {
            GroupBy::Service => UsageKey {
                service: k.service.clone(),
                app: String::new(),
                host: String::new(),
            },
            GroupBy::App => UsageKey {
                host: String::new(),
                ..k.clone()
            },
            GroupBy::Host => UsageKey {
                service: String::new(),
                app: String::new(),
                host: k.host.clone(),
            },
        };
        out.entry(key).or_default().add(u);
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Costs, HostInventory, HostStatus};
    use crate::service::MemberId;

    fn world() -> (Vec<Service>, Vec<HostRecord>) {
        let svc = Service::from_toml(
            "name = \"shop\"\n[[app]]\nname = \"web\"\ncpus = 2\nmemory = \"1G\"\nreplicas = 2\n",
        )
        .expect("service");
        let host = |name: &str, vcpu_hour: f64| {
            let mut inv = HostInventory::new(name, 8, 16 << 30, 100 << 30);
            inv.cost = Costs {
                vcpu_hour,
                gib_hour: 0.5,
                disk_gib_month: 0.0,
            };
            HostRecord {
                inventory: inv,
                status: HostStatus::Up,
            }
        };
        (vec![svc], vec![host("a", 1.0), host("b", 3.0)])
    }

    fn member(i: u32) -> MemberId {
        MemberId {
            service: "shop".into(),
            app: "web".into(),
            index: i,
        }
    }

    fn assigned(i: u32, host: &str) -> Assignment {
        Assignment {
            member: member(i),
            host: host.into(),
            revision: 1,
            attempt: 1,
            started_ms: 0,
            avoid: vec![],
        }
    }

    fn seen(i: u32, host: &str, state: VmState) -> ObservedVm {
        ObservedVm {
            host: host.into(),
            member: member(i),
            token: 1,
            state,
            cpu_seconds: None,
        }
    }

    #[test]
    fn members_are_billed_at_their_hosts_prices_for_the_time_seen_running() {
        let (services, hosts) = world();
        let assignments = [assigned(1, "a"), assigned(2, "b")];
        let both = [seen(1, "a", VmState::Ready), seen(2, "b", VmState::Running)];
        let mut m = Meter::default();
        m.round(1_000_000, &services, &hosts, &assignments, &both);
        assert!(
            m.pending.is_empty(),
            "the first round only starts the count"
        );
        m.round(1_360_000, &services, &hosts, &assignments, &both);
        // 360 s = 0.1 h. web: 2 vCPUs, 1 GiB. On a: 2*1.0 + 0.5 = 2.5/h; on b: 2*3.0 + 0.5 = 6.5/h.
        // The 360 s interval is capped at MAX_INTERVAL_MS (30 s).
        let a = m.pending[&UsageKey {
            service: "shop".into(),
            app: "web".into(),
            host: "a".into(),
        }];
        assert_eq!(a.vm_seconds, 30.0);
        assert_eq!(a.vcpu_seconds, 60.0);
        assert_eq!(a.gib_seconds, 30.0);
        assert!((a.cost - 2.5 * 30.0 / 3600.0).abs() < 1e-12);
        let rows: Vec<_> = m.pending.clone().into_iter().collect();
        let by_service = report(&rows, GroupBy::Service);
        assert_eq!(by_service.len(), 1);
        assert!((by_service[0].1.cost - (2.5 + 6.5) * 30.0 / 3600.0).abs() < 1e-12);
        assert_eq!(report(&rows, GroupBy::Host).len(), 2);
    }

    #[test]
    fn a_member_counts_only_while_running_where_it_is_assigned() {
        let (services, hosts) = world();
        let assignments = [assigned(1, "a")];
        let mut m = Meter::default();
        // A stray copy on b and a stopped member count for nothing.
        let stray = [seen(1, "b", VmState::Ready), seen(2, "a", VmState::Stopped)];
        m.round(0, &services, &hosts, &assignments, &stray);
        m.round(10_000, &services, &hosts, &assignments, &stray);
        assert!(m.pending.is_empty());
        // Started between two rounds: counted from the first round that saw it.
        let up = [seen(1, "a", VmState::Running)];
        m.round(20_000, &services, &hosts, &assignments, &up);
        assert!(m.pending.is_empty());
        m.round(25_000, &services, &hosts, &assignments, &up);
        assert_eq!(m.pending.values().map(|u| u.vm_seconds).sum::<f64>(), 5.0);
        assert!(m.due(25_000, FLUSH_EVERY_MS) && !Meter::default().due(25_000, 0));
    }
}
