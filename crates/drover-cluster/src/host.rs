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

/// When a host must have stopped its cluster VMs if no renewal succeeds meanwhile.
pub fn fence_deadline(renewal_sent: Instant, ttl: Duration, margin: Duration) -> Instant {
    renewal_sent + ttl.saturating_sub(margin)
}

/// What the membership loop does with the host's VMs.
pub trait LocalVms {
    /// Stop these cluster VMs now (forcefully: the deadline is near). Called once per lost lease.
    fn fence(&self, vms: Vec<String>) -> impl Future<Output = ()>;
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
        let (etcd, mut lease) = match tokio::time::timeout(m.margin, joined).await {
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
                Ok(Ok(_)) => deadline = fence_deadline(sent, m.ttl, m.margin),
                Ok(Err(e)) => {
                    tracing::warn!(host = %name, error = %e, "lease renewal failed");
                    continue;
                }
                Err(_) => continue,
            }
            // Which cluster VMs are this host's: fenced if the lease is lost.
            if let Ok(Ok(list)) = tokio::time::timeout(period, etcd.assignments()).await {
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

    #[test]
    fn the_fence_comes_before_the_lease_can_expire() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(3);
        let d = fence_deadline(sent, ttl, Duration::from_secs(1));
        assert_eq!(d - sent, Duration::from_secs(2));
        // A margin larger than the TTL fences at once rather than never.
        assert_eq!(fence_deadline(sent, ttl, Duration::from_secs(5)), sent);
    }
}
