//! A host's side of the cluster: join with its inventory, keep the lease alive, and fence
//! itself: a host that cannot renew its lease stops its cluster VMs before the lease can
//! expire, so by the time the controller sees the host down (and places its members
//! elsewhere) they are known dead.
//!
//! Timing: each renewal is measured from when it was *sent*. etcd restarts the lease's TTL when
//! it receives the renewal, which is after it was sent, so the lease cannot expire before
//! `sent + ttl`. The host fences at `sent + ttl - margin` if no later renewal succeeded:
//! `margin` is what stopping the VMs may take.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::etcd::Etcd;
use crate::inventory::HostInventory;
use crate::{Assignment, MemberId};

/// When a host must have stopped its cluster VMs if no renewal succeeds meanwhile.
pub fn fence_deadline(renewal_sent: Instant, ttl: Duration, margin: Duration) -> Instant {
    renewal_sent + ttl.saturating_sub(margin)
}

/// What the membership loop does with the host's VMs.
pub trait LocalVms {
    /// Stop these cluster VMs now (forcefully: the deadline is near). Called once per lost lease,
    /// and for members found running here that the cluster has placed elsewhere.
    fn fence(&self, vms: Vec<String>) -> impl Future<Output = ()>;
    /// The cluster members running on this host, with the token of their last start.
    fn members(&self) -> impl Future<Output = Vec<LocalMember>>;
    /// The lease was (re)newed: unless it is renewed again, this host's cluster VMs must be
    /// gone by `stop_by`, even if this process dies or hangs meanwhile (a watchdog outside
    /// it keeps that promise). `stop_by` is before the lease can expire.
    fn lease_renewed(&self, stop_by: Instant) -> impl Future<Output = ()> {
        let _ = stop_by;
        async {}
    }
}

/// The latest a silent host's cluster VMs may still run: halfway between its own fence and
/// the earliest the lease can expire, so the in-process fence comes first while it lives.
pub fn watchdog_deadline(fence_at: Instant, margin: Duration) -> Instant {
    fence_at + margin / 2
}

/// A cluster member running on this host, as droverd recorded its last start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMember {
    /// Its VM.
    pub vm: String,
    /// The member.
    pub member: MemberId,
    /// The fencing token it was started with.
    pub token: i64,
}

/// The members running here that must not: none of their assignments is to `host` at the token
/// they started with (re-placed while this host was cut off, or while its droverd was down).
pub fn stale(local: &[LocalMember], assignments: &[Assignment], host: &str) -> Vec<String> {
    local
        .iter()
        .filter(|l| {
            !assignments
                .iter()
                .any(|a| a.member == l.member && a.host == host && a.revision == l.token)
        })
        .map(|l| l.vm.clone())
        .collect()
}

/// Join settings.
#[derive(Debug, Clone)]
pub struct Membership {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// What the host registers.
    pub inventory: HostInventory,
    /// Lease TTL: the controller sees the host down at most this long after it was cut off.
    pub ttl: Duration,
    /// Time kept for stopping the VMs before the lease can expire.
    pub margin: Duration,
}

impl Membership {
    /// Settings with a margin of a third of the TTL.
    pub fn new(etcd: Vec<String>, inventory: HostInventory, ttl: Duration) -> Self {
        Membership {
            etcd,
            inventory,
            ttl,
            margin: ttl / 3,
        }
    }
}

/// Run the host's membership for ever: join, renew every third of the margin, keep the list of
/// cluster VMs assigned here fresh, fence on a missed deadline, join again once etcd answers.
pub async fn run(m: Membership, vms: impl LocalVms) {
    let name = m.inventory.name.clone();
    let period = (m.margin / 2).max(Duration::from_millis(100));
    loop {
        let sent = Instant::now();
        let joined = async {
            let etcd = Etcd::connect(&m.etcd, "/drover", m.margin).await?;
            let lease = etcd.join(&m.inventory, m.ttl).await?;
            Ok::<_, crate::etcd::EtcdError>((etcd, lease))
        };
        let (mut etcd, mut lease) = match tokio::time::timeout(m.margin, joined).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(host = %name, error = %e, "cannot join the cluster; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(host = %name, "joining the cluster timed out; retrying");
                continue;
            }
        };
        tracing::info!(host = %name, lease = lease.id(), "joined the cluster");
        let mut deadline = fence_deadline(sent, m.ttl, m.margin);
        vms.lease_renewed(watchdog_deadline(deadline, m.margin))
            .await;
        let mut mine: BTreeSet<String> = BTreeSet::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(host = %name, vms = ?mine, "lease not renewed in time: stopping this host's cluster VMs (self-fencing)");
                vms.fence(mine.iter().cloned().collect()).await;
                break;
            }
            tokio::time::sleep(period.min(deadline - now)).await;
            let sent = Instant::now();
            if sent >= deadline {
                continue;
            }
            match tokio::time::timeout(deadline - sent, lease.renew()).await {
                Ok(Ok(_)) => {
                    deadline = fence_deadline(sent, m.ttl, m.margin);
                    vms.lease_renewed(watchdog_deadline(deadline, m.margin))
                        .await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(host = %name, error = %e, "lease renewal failed");
                    continue;
                }
                Err(_) => continue,
            }
            // Which cluster VMs are this host's: fenced if the lease is lost. A member running
            // here that the cluster placed elsewhere (or restarted since) is stopped now.
            let list = match tokio::time::timeout(period, etcd.assignments()).await {
                Ok(Ok(list)) => Some(list),
                _ => {
                    // Its etcd member may be the one that is gone: the next read goes to one
                    // that answers (the lease's keep-alive moves on by itself).
                    let again = Etcd::connect(&m.etcd, "/drover", m.margin);
                    if let Ok(Ok(e)) = tokio::time::timeout(period, again).await {
                        etcd = e;
                    }
                    None
                }
            };
            if let Some(list) = list {
                let gone = stale(&vms.members().await, &list, &name);
                if !gone.is_empty() {
                    tracing::warn!(host = %name, vms = ?gone, "cluster members running here are assigned elsewhere or were restarted since: stopping them (fencing)");
                    vms.fence(gone).await;
                }
                mine = list
                    .into_iter()
                    .filter(|a| a.host == name)
                    .map(|a| a.member.vm_name())
                    .collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(index: u32) -> MemberId {
        MemberId {
            service: "shop".into(),
            app: "web".into(),
            index,
        }
    }

    fn assigned(index: u32, host: &str, revision: i64) -> Assignment {
        Assignment {
            member: member(index),
            host: host.into(),
            revision,
            attempt: 1,
            started_ms: 0,
            avoid: vec![],
        }
    }

    fn running(index: u32, token: i64) -> LocalMember {
        LocalMember {
            vm: member(index).vm_name(),
            member: member(index),
            token,
        }
    }

    #[test]
    fn members_run_only_where_and_as_the_cluster_assigns_them() {
        let list = [
            assigned(1, "h1", 10),
            assigned(2, "h2", 11),
            assigned(3, "h1", 20),
        ];
        let local = [running(1, 10), running(2, 7), running(3, 12), running(4, 3)];
        assert_eq!(
            stale(&local, &list, "h1"),
            vec![
                "shop-web-2".to_string(), // placed on h2 meanwhile
                "shop-web-3".to_string(), // restarted since (a newer assignment)
                "shop-web-4".to_string(), // no assignment any more
            ]
        );
        assert!(stale(&[running(1, 10)], &list, "h1").is_empty());
    }

    #[test]
    fn the_fence_comes_before_the_lease_can_expire() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(3);
        let d = fence_deadline(sent, ttl, Duration::from_secs(1));
        assert_eq!(d - sent, Duration::from_secs(2));
        // A margin larger than the TTL fences at once rather than never.
        assert_eq!(fence_deadline(sent, ttl, Duration::from_secs(5)), sent);
        // The watchdog outside the daemon comes after the daemon's own fence, and still
        // before the lease can expire (sent + ttl).
        let w = watchdog_deadline(d, Duration::from_secs(1));
        assert!(w > d && w < sent + ttl);
    }
}
