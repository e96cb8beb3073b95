//! The controller loop against a real etcd and simulated hosts: placement in start order,
//! failover between controllers without doing anything twice, a lost host's members re-placed,
//! never two copies of a member.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use drover_cluster::controller::{Controller, DriverError, HostDriver};
use drover_cluster::etcd::{Etcd, EtcdError, HostLease};
use drover_cluster::{App, HostInventory, MemberId, MemberState, ObservedVm, VmState};

/// Hosts simulated in memory: which member runs where with which token.
#[derive(Clone, Default)]
struct FakeHosts {
    inner: Arc<Mutex<Fake>>,
}

#[derive(Default)]
struct Fake {
    running: BTreeMap<MemberId, (String, i64)>,
    starts: Vec<(MemberId, String, i64)>,
    /// Starts of a member while a copy ran elsewhere.
    doubles: Vec<MemberId>,
    /// Readiness commands run: (member, command).
    checks: Vec<(MemberId, String)>,
    /// Members whose readiness command fails, with what it says.
    not_ready: BTreeMap<MemberId, String>,
    /// The share of its vCPU every member keeps busy (its CPU counter grows at that rate).
    busy: f64,
    /// Each member's CPU counter: (last read, seconds so far).
    cpu: BTreeMap<MemberId, (Instant, f64)>,
}

impl FakeHosts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// A host dies: its VMs are gone (a self-fenced host stops them).
    fn kill(&self, host: &str) {
        self.lock().running.retain(|_, (h, _)| h != host);
    }
}

impl HostDriver for FakeHosts {
    async fn list(
        &self,
        host: &HostInventory,
        _: &[(MemberId, i64)],
    ) -> Result<Vec<ObservedVm>, DriverError> {
        let mut guard = self.lock();
        let f = &mut *guard;
        let now = Instant::now();
        let mut out = Vec::new();
        for (m, (h, t)) in f.running.iter().filter(|(_, (h, _))| *h == host.name) {
            let (at, seconds) = f.cpu.entry(m.clone()).or_insert((now, 0.0));
            *seconds += now.duration_since(*at).as_secs_f64() * f.busy;
            *at = now;
            out.push(ObservedVm {
                host: h.clone(),
                member: m.clone(),
                token: *t,
                state: VmState::Ready,
                cpu_seconds: Some(*seconds),
            });
        }
        Ok(out)
    }
    async fn start(
        &self,
        host: &HostInventory,
        member: &MemberId,
        _: &App,
        token: i64,
    ) -> Result<(), DriverError> {
        let mut f = self.lock();
        if let Some((other, _)) = f.running.get(member) {
            if *other != host.name {
                f.doubles.push(member.clone());
            }
        }
        f.running.insert(member.clone(), (host.name.clone(), token));
        f.cpu.remove(member);
        f.starts.push((member.clone(), host.name.clone(), token));
        Ok(())
    }
    async fn check_ready(
        &self,
        _: &HostInventory,
        member: &MemberId,
        command: &str,
    ) -> Result<Option<String>, DriverError> {
        let mut f = self.lock();
        f.checks.push((member.clone(), command.to_string()));
        Ok(f.not_ready.get(member).cloned())
    }
    async fn stop(&self, host: &HostInventory, member: &MemberId) -> Result<(), DriverError> {
        let mut f = self.lock();
        if f.running.get(member).is_some_and(|(h, _)| *h == host.name) {
            f.running.remove(member);
        }
        Ok(())
    }
}

async fn available(etcd: &Etcd) -> Result<bool> {
    Ok(etcd
        .status("shop")
        .await?
        .is_some_and(|s| s.members.len() == 3 && s.members.iter().all(|(_, st)| st.is_ready())))
}

/// Keep a host's lease alive in the background until the returned sender is dropped.
fn keep_alive(mut lease: HostLease) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if lease.renew().await.is_err() { return; }
                }
            }
        }
    });
    tx
}

#[tokio::test]
async fn controllers_fail_over_without_doing_anything_twice_and_lost_hosts_are_replaced(
) -> Result<()> {
    let server = common::start_etcd().await?;
    let etcd = common::connect(&server).await?;
    let ttl = Duration::from_secs(2);
    let mut alive = BTreeMap::new();
    for name in ["h1", "h2", "h3"] {
        let lease = etcd
            .join(&HostInventory::new(name, 4, 4 << 30, 100 << 30), ttl)
            .await?;
        alive.insert(name, keep_alive(lease));
    }
    etcd.put_service("shop", drover_cluster::service::SHOP_EXAMPLE)
        .await?;
    let hosts = FakeHosts::default();

    // Controller a leads and brings the service up: db first, then the web members.
    let mut a = Controller::new("ctl-a", common::connect(&server).await?, hosts.clone());
    let lead_a = a.etcd.campaign("ctl-a", ttl).await?;
    let first = a.round(&lead_a).await?;
    assert_eq!(
        first.done.len(),
        1,
        "only the db starts first: {:?}",
        first.done
    );
    assert_eq!(hosts.lock().starts[0].0.app, "db");
    let second = a.round(&lead_a).await?;
    assert_eq!(
        second.done.len(),
        2,
        "then both web members: {:?}",
        second.done
    );
    a.round(&lead_a).await?;
    assert!(available(&etcd).await?);
    let web_hosts: Vec<String> = hosts
        .lock()
        .running
        .iter()
        .filter(|(m, _)| m.app == "web")
        .map(|(_, (h, _))| h.clone())
        .collect();
    assert_ne!(web_hosts[0], web_hosts[1], "anti-affinity");

    // a is cut off; b takes over within the TTL and finds nothing to do.
    let b_etcd = common::connect(&server).await?;
    let campaign =
        tokio::spawn(async move { b_etcd.campaign("ctl-b", ttl).await.map(|l| (b_etcd, l)) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = Instant::now();
    lead_a.stop_renewing();
    let (b_etcd, lead_b) = tokio::time::timeout(Duration::from_secs(10), campaign).await???;
    assert!(
        cut.elapsed() < ttl + Duration::from_millis(1500),
        "takeover in {:?}",
        cut.elapsed()
    );
    let mut b = Controller::new("ctl-b", b_etcd, hosts.clone());
    let starts_before = hosts.lock().starts.len();
    let report = b.round(&lead_b).await?;
    assert!(
        report.done.is_empty() && report.failed.is_empty(),
        "b redid work: {report:?}"
    );
    assert_eq!(hosts.lock().starts.len(), starts_before);
    assert!(available(&etcd).await?);

    // The deposed a cannot act: its first write is refused, before any host is touched.
    hosts.kill(&web_hosts[0]);
    match a.round(&lead_a).await {
        Err(EtcdError::NotLeader) => {}
        other => panic!("deposed controller acted: {other:?}"),
    }
    assert_eq!(hosts.lock().starts.len(), starts_before);

    // The host of web-1 dies (its VMs already stopped above; now its lease lapses). While the
    // lease lives the member is restarted in place at most; once it is down the member moves.
    let lost = web_hosts[0].clone();
    alive.remove(lost.as_str());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // A real host that lost its lease has stopped its VMs; the simulated one, too.
        if etcd
            .hosts()
            .await?
            .iter()
            .any(|h| h.inventory.name == lost && h.status == drover_cluster::HostStatus::Down)
        {
            hosts.kill(&lost);
        }
        b.round(&lead_b).await?;
        if available(&etcd).await? && !hosts.lock().running.values().any(|(h, _)| *h == lost) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service not available again after host {lost} was lost"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    {
        let f = hosts.lock();
        assert!(
            f.doubles.is_empty(),
            "members started while a copy ran elsewhere: {:?}",
            f.doubles
        );
        let hosts_now: Vec<&String> = f
            .running
            .iter()
            .filter(|(m, _)| m.app == "web")
            .map(|(_, (h, _))| h)
            .collect();
        assert_ne!(hosts_now[0], hosts_now[1], "anti-affinity after the move");
    }
    // Every start carried the revision of the assignment it was made under: the latest tokens
    // are the ones in etcd now.
    for a in etcd.assignments().await? {
        let (host, token) = hosts.lock().running[&a.member].clone();
        assert_eq!((host, token), (a.host.clone(), a.revision), "{}", a.member);
    }
    Ok(())
}

#[tokio::test]
async fn a_member_is_ready_only_once_its_ready_command_passes_and_its_dependents_wait() -> Result<()>
{
    let server = common::start_etcd().await?;
    let etcd = common::connect(&server).await?;
    let ttl = Duration::from_secs(2);
    let mut alive = Vec::new();
    for name in ["h1", "h2"] {
        let lease = etcd
            .join(&HostInventory::new(name, 4, 4 << 30, 100 << 30), ttl)
            .await?;
        alive.push(keep_alive(lease));
    }
    let file = drover_cluster::service::SHOP_EXAMPLE.replace(
        "name = \"db\"\n",
        "name = \"db\"\nready = \"pg_isready -q\"\n",
    );
    etcd.put_service("shop", &file).await?;
    let hosts = FakeHosts::default();
    let db = MemberId {
        service: "shop".into(),
        app: "db".into(),
        index: 1,
    };
    hosts
        .lock()
        .not_ready
        .insert(db.clone(), "ready command exited 2: no response".into());
    let mut c = Controller::new("ctl", common::connect(&server).await?, hosts.clone());
    let lead = c.etcd.campaign("ctl", ttl).await?;
    for _ in 0..3 {
        c.round(&lead).await?;
    }
    // The db runs with its agent up, but its command fails: not ready, and says why; the web
    // members wait for it.
    let status = etcd.status("shop").await?.expect("status");
    let state = |name: &str| {
        status
            .members
            .iter()
            .find(|(m, _)| m.short() == name)
            .map(|(_, s)| s.clone())
    };
    match state("db-1") {
        Some(MemberState::NotReady { reason, .. }) => assert!(reason.contains("no response")),
        other => panic!("db-1: {other:?}"),
    }
    assert!(
        matches!(state("web-1"), Some(MemberState::Waiting { .. })),
        "{status:?}"
    );
    assert_eq!(hosts.lock().starts.len(), 1, "only the db started");
    assert!(hosts
        .lock()
        .checks
        .iter()
        .all(|(m, cmd)| *m == db && cmd == "pg_isready -q"));
    // The command passes: the db is ready, the web members start, and it is not run again.
    hosts.lock().not_ready.clear();
    for _ in 0..3 {
        c.round(&lead).await?;
    }
    assert!(available(&etcd).await?);
    let checks = hosts.lock().checks.len();
    c.round(&lead).await?;
    assert_eq!(
        hosts.lock().checks.len(),
        checks,
        "a passed command ran again"
    );
    Ok(())
}

/// A scale rule on a real etcd: a busy app gains members one step at a time up to its maximum,
/// an idle one sheds them after a sustained low, and what the members used is billed at their
/// hosts' prices.
#[tokio::test]
async fn busy_apps_scale_out_idle_ones_scale_in_and_usage_is_billed() -> Result<()> {
    let server = common::start_etcd().await?;
    let etcd = common::connect(&server).await?;
    let ttl = Duration::from_secs(5);
    let mut alive = Vec::new();
    for (name, vcpu_hour) in [("h1", 0.04), ("h2", 0.10)] {
        let mut inv = HostInventory::new(name, 8, 8 << 30, 100 << 30);
        inv.cost.vcpu_hour = vcpu_hour;
        inv.cost.gib_hour = 0.01;
        alive.push(keep_alive(etcd.join(&inv, ttl).await?));
    }
    let file = "name = \"batch\"\n[[app]]\nname = \"work\"\ncpus = 1\nmemory = \"1G\"\n\
                [app.scale]\nmetric = \"cpu\"\nthreshold = 0.5\nmax_replicas = 3\n";
    etcd.put_service("batch", file).await?;
    let hosts = FakeHosts::default();
    hosts.lock().busy = 1.0;
    let mut c = Controller::new("ctl", common::connect(&server).await?, hosts.clone());
    c.scale_policy = drover_cluster::scale::Policy {
        out_cooldown_ms: 0,
        in_after_ms: 1500,
        warmup_ms: 0,
    };
    c.usage_flush_ms = 0;
    let lead = c.etcd.campaign("ctl", ttl).await?;
    let members = |h: &FakeHosts| -> Vec<u32> {
        let mut v: Vec<u32> = h.lock().running.keys().map(|m| m.index).collect();
        v.sort();
        v
    };
    let target = |e: &Etcd| {
        let e = e.clone();
        async move {
            Ok::<_, anyhow::Error>(
                e.scale_targets()
                    .await?
                    .get(&("batch".to_string(), "work".to_string()))
                    .map(|t| (t.replicas, t.why.clone())),
            )
        }
    };

    // The file's one member first; its first round only samples its CPU.
    c.round(&lead).await?;
    c.round(&lead).await?;
    assert_eq!(members(&hosts), [1]);
    assert_eq!(target(&etcd).await?, None);
    // Busy: one member more per round (cooldown 0 here), never past max_replicas.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.round(&lead).await?;
    assert_eq!(members(&hosts), [1, 2]);
    let (n, why) = target(&etcd).await?.expect("a target is written");
    assert_eq!(n, 2);
    assert!(why.starts_with("scaled out to 2: cpu 1.0"), "{why}");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.round(&lead).await?;
    }
    assert_eq!(members(&hosts), [1, 2, 3], "stops at max_replicas");
    let status = etcd.status("batch").await?.expect("status");
    assert_eq!(status.members.len(), 3);

    // Idle: nothing changes until the load stayed low for in_after_ms, then one step at a time
    // down to the file's replicas, newest member first.
    hosts.lock().busy = 0.0;
    c.round(&lead).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.round(&lead).await?;
    assert_eq!(members(&hosts), [1, 2, 3], "a short lull changes nothing");
    let deadline = Instant::now() + Duration::from_secs(15);
    while members(&hosts) != [1] {
        assert!(
            Instant::now() < deadline,
            "not scaled in: {:?}",
            members(&hosts)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.round(&lead).await?;
        assert!(!members(&hosts).is_empty());
    }
    let (n, why) = target(&etcd).await?.expect("target");
    assert_eq!(n, 1);
    assert!(why.starts_with("scaled in to 1: cpu 0.00 < 0.50"), "{why}");
    // The stopped member's assignment goes the round after its stop.
    c.round(&lead).await?;
    assert_eq!(
        etcd.assignments().await?.len(),
        1,
        "scaled-in members are unassigned"
    );

    // Usage: every row is the app's, each host's cost follows its own prices.
    let rows = etcd.usage().await?;
    assert!(!rows.is_empty());
    let mut total = 0.0;
    for (k, u) in &rows {
        assert_eq!((k.service.as_str(), k.app.as_str()), ("batch", "work"));
        let per_hour = if k.host == "h1" { 0.05 } else { 0.11 };
        assert!(u.vm_seconds > 0.0 && u.vcpu_seconds == u.vm_seconds);
        assert!((u.gib_seconds - u.vm_seconds).abs() < 1e-9);
        assert!(
            (u.cost - u.vm_seconds * per_hour / 3600.0).abs() < 1e-12,
            "{k:?} {u:?}"
        );
        total += u.vm_seconds;
    }
    // Counted only while seen running: never more than the members could have run.
    assert!(total > 1.0 && total < 3.0 * 20.0, "{total}");

    // The rule removed from the file: its target goes too.
    etcd.put_service(
        "batch",
        "name = \"batch\"\n[[app]]\nname = \"work\"\ncpus = 1\nmemory = \"1G\"\n",
    )
    .await?;
    c.round(&lead).await?;
    assert_eq!(target(&etcd).await?, None);
    drop(alive);
    Ok(())
}
