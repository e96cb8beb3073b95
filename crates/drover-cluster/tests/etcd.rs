//! The etcd adapter against a real etcd (Debian's `etcd-server`), started by each test on
//! loopback with free ports and a temporary data dir, killed at the end.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{connect, free_port, start_etcd};
use drover_cluster::etcd::{Etcd, EtcdError};
use drover_cluster::{Assignment, HostInventory, HostStatus, MemberId};

fn member(index: u32) -> MemberId {
    MemberId {
        service: "shop".into(),
        app: "web".into(),
        index,
    }
}

fn assignment(host: &str) -> Assignment {
    Assignment {
        member: member(1),
        host: host.into(),
        revision: 0,
        attempt: 1,
        started_ms: 0,
        avoid: vec![],
    }
}

#[tokio::test]
async fn a_second_controller_takes_over_within_the_ttl_and_the_deposed_one_cannot_write(
) -> Result<()> {
    let server = start_etcd().await?;
    let (a, b) = (connect(&server).await?, connect(&server).await?);
    let ttl = Duration::from_secs(2);
    let lead_a = a.campaign("ctl-a", ttl).await?;
    assert_eq!(a.leader().await?.as_deref(), Some("ctl-a"));
    let token_a = lead_a.assign(&assignment("h1")).await?;
    assert!(a.check_token(&member(1), "h1", token_a).await?);

    let campaign_b = tokio::spawn(async move { b.campaign("ctl-b", ttl).await.map(|l| (b, l)) });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !campaign_b.is_finished(),
        "b must not lead while a renews its lease"
    );

    // a is cut off: its lease runs out and b leads within the TTL (etcd checks expiry every
    // 500 ms, so allow that much over).
    let cut = Instant::now();
    lead_a.stop_renewing();
    let (b, lead_b) = tokio::time::timeout(Duration::from_secs(10), campaign_b).await???;
    let takeover = cut.elapsed();
    assert!(
        takeover <= ttl + Duration::from_millis(1500),
        "takeover took {takeover:?}"
    );
    assert_eq!(b.leader().await?.as_deref(), Some("ctl-b"));

    // a still holds its old leader key, but etcd refuses its writes.
    match lead_a.assign(&assignment("h3")).await {
        Err(EtcdError::NotLeader) => {}
        other => panic!("the deposed leader's write must be refused, got {other:?}"),
    }
    match lead_a.unassign(&member(1)).await {
        Err(EtcdError::NotLeader) => {}
        other => panic!("the deposed leader's delete must be refused, got {other:?}"),
    }
    let stored = b.assignments().await?;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].host, "h1");

    // The new leader re-places the member: the old token is stale, the new one is h2's only.
    let token_b = lead_b.assign(&assignment("h2")).await?;
    assert!(token_b > token_a);
    assert!(
        !b.check_token(&member(1), "h1", token_a).await?,
        "stale token accepted"
    );
    assert!(
        !b.check_token(&member(1), "h1", token_b).await?,
        "another host's token accepted"
    );
    assert!(b.check_token(&member(1), "h2", token_b).await?);
    assert!(
        !b.check_token(&member(2), "h2", token_b).await?,
        "a member without assignment"
    );
    assert_eq!(b.assignments().await?[0].revision, token_b);

    // Resigning hands over at once.
    let c = connect(&server).await?;
    let campaign_c = tokio::spawn(async move { c.campaign("ctl-c", ttl).await.map(|l| (c, l)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resigned = Instant::now();
    lead_b.resign().await?;
    let (c, _lead_c) = tokio::time::timeout(Duration::from_secs(5), campaign_c).await???;
    assert!(resigned.elapsed() < Duration::from_secs(1));
    assert_eq!(c.leader().await?.as_deref(), Some("ctl-c"));
    Ok(())
}

#[tokio::test]
async fn a_host_whose_lease_lapses_is_down_and_cannot_renew() -> Result<()> {
    let server = start_etcd().await?;
    let e = connect(&server).await?;
    let mut inv = HostInventory::new("h1", 4, 4 << 30, 100 << 30);
    inv.labels.insert("ssd".into(), "yes".into());
    inv.cost.vcpu_hour = 0.02;
    let mut lease = e.join(&inv, Duration::from_secs(2)).await?;
    let hosts = e.hosts().await?;
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        hosts[0].inventory, inv,
        "the inventory comes back as registered"
    );
    assert_eq!(hosts[0].status, HostStatus::Up);

    // Renewing keeps it up past its TTL.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(lease.renew().await? > Duration::ZERO);
    }
    assert_eq!(e.hosts().await?[0].status, HostStatus::Up);
    e.set_draining("h1", true).await?;
    assert_eq!(e.hosts().await?[0].status, HostStatus::Draining);
    e.set_draining("h1", false).await?;

    // It stops renewing: down within the TTL (plus etcd's 500 ms expiry check); the inventory stays.
    let stopped = Instant::now();
    loop {
        if e.hosts().await?[0].status == HostStatus::Down {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(4),
            "host still up after its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match lease.renew().await {
        Err(EtcdError::LeaseLost(_)) => {}
        other => panic!("renewing an expired lease must fail, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn services_round_trip_and_an_unreachable_etcd_says_so() -> Result<()> {
    let server = start_etcd().await?;
    let e = connect(&server).await?;
    let shop = "name = \"shop\"\n[[app]]\nname = \"db\"\ncpus = 1\nmemory = \"256M\"\n";
    e.put_service("shop", shop).await?;
    let services = e.services().await?;
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].name, "shop");
    assert!(e.delete_service("shop").await?);
    assert!(!e.delete_service("shop").await?);
    assert!(e.services().await?.is_empty());

    let port = free_port()?;
    let err = match Etcd::connect(
        &[format!("http://127.0.0.1:{port}")],
        "/d",
        Duration::from_millis(500),
    )
    .await
    {
        Ok(dead) => dead.hosts().await.map(|_| ()).unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("etcd"), "{err}");

    // A member of the list that is down is passed over, wherever it is in the list.
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    for endpoints in [
        vec![dead.clone(), server.url.clone()],
        vec![server.url.clone(), dead.clone()],
    ] {
        let e = Etcd::connect(&endpoints, "/d", Duration::from_millis(500)).await?;
        e.put_service("shop", shop).await?;
        assert_eq!(e.services().await?.len(), 1, "{endpoints:?}");
    }
    Ok(())
}

/// Simulated VMs: when the fence came and what it stopped; the members running here.
#[derive(Clone, Default)]
struct Fenced(
    std::sync::Arc<std::sync::Mutex<FenceLog>>,
    std::sync::Arc<std::sync::Mutex<Vec<drover_cluster::host::LocalMember>>>,
);

/// Each fence: when, and the VMs it stopped.
type FenceLog = Vec<(Instant, Vec<String>)>;

impl drover_cluster::host::LocalVms for Fenced {
    async fn fence(&self, vms: Vec<String>) {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|m| !vms.contains(&m.vm));
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), vms));
    }

    async fn members(&self) -> Vec<drover_cluster::host::LocalMember> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A droverd that comes back (restarted, or after a partition) with a member still running
/// that the controller has meanwhile placed on another host stops it at its first look at the
/// assignments; the member assigned here at its token keeps running.
#[tokio::test]
async fn a_member_placed_elsewhere_meanwhile_is_stopped_when_the_host_is_back() -> Result<()> {
    let server = start_etcd().await?;
    let e = connect(&server).await?;
    let ttl = Duration::from_secs(3);
    let lead = e.campaign("ctl", ttl).await?;
    let moved = lead
        .assign(&Assignment {
            host: "h2".into(),
            ..assignment("h1")
        })
        .await?;
    let mut here = assignment("h1");
    here.member = member(2);
    let kept = lead.assign(&here).await?;
    let fenced = Fenced::default();
    *fenced.1.lock().unwrap() = vec![
        drover_cluster::host::LocalMember {
            vm: member(1).vm_name(),
            member: member(1),
            token: moved - 1,
        },
        drover_cluster::host::LocalMember {
            vm: member(2).vm_name(),
            member: member(2),
            token: kept,
        },
    ];
    let membership = drover_cluster::host::Membership::new(
        vec![server.url.clone()],
        HostInventory::new("h1", 4, 4 << 30, 100 << 30),
        ttl,
    );
    let task = tokio::spawn(drover_cluster::host::run(membership, fenced.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fenced.0.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stale member was never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let log = fenced.0.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].1, vec!["shop-web-1".to_string()]);
    let left: Vec<String> = fenced
        .1
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.vm.clone())
        .collect();
    assert_eq!(
        left,
        vec!["shop-web-2".to_string()],
        "the member assigned here runs on"
    );
    Ok(())
}

#[tokio::test]
async fn a_host_cut_off_from_etcd_stops_its_cluster_vms_before_its_lease_can_expire() -> Result<()>
{
    let server = start_etcd().await?;
    let e = connect(&server).await?;
    let ttl = Duration::from_secs(3);
    let membership = drover_cluster::host::Membership::new(
        vec![server.url.clone()],
        HostInventory::new("h1", 4, 4 << 30, 100 << 30),
        ttl,
    );
    let margin = membership.margin;
    let fenced = Fenced::default();
    let task = tokio::spawn(drover_cluster::host::run(membership, fenced.clone()));
    // Joined, and a member assigned here (as a controller would).
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.hosts().await?.first().map(|h| h.status) != Some(HostStatus::Up) {
        assert!(Instant::now() < deadline, "the host did not join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lead = e.campaign("ctl", ttl).await?;
    lead.assign(&assignment("h1")).await?;
    tokio::time::sleep(ttl).await;
    assert!(
        fenced.0.lock().unwrap().is_empty(),
        "fenced while etcd answered"
    );

    // etcd freezes (as if the host were partitioned from it): no renewal gets through.
    let pid = server.pid().to_string();
    let frozen = Instant::now();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()?;
    let limit = frozen + ttl;
    while fenced.0.lock().unwrap().is_empty() && Instant::now() < limit + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()?;
    task.abort();
    let log = fenced.0.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "fenced once: {log:?}");
    let (at, vms) = &log[0];
    assert_eq!(
        vms,
        &["shop-web-1".to_string()],
        "it stops the cluster VMs assigned to it"
    );
    // The last renewal was sent before the freeze, so the lease lives at least until
    // `frozen + ttl - renewal period`; the fence must come within `ttl - margin` of the freeze.
    let after = *at - frozen;
    assert!(
        after <= ttl - margin + Duration::from_millis(300),
        "fenced {after:?} after the cut"
    );
    Ok(())
}
