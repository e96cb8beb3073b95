//! The scheduler and reconciler against their rules: examples a user would check, and properties
//! over random clusters (never a broken hard rule, never an over-committed host, deterministic).

use std::collections::BTreeMap;

use drover_cluster::*;
use proptest::prelude::*;
use proptest::strategy::Strategy as _;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn host(name: &str, cpus: u32, memory: u64) -> HostRecord {
    HostRecord {
        inventory: HostInventory::new(name, cpus, memory, 100 * GIB),
        status: HostStatus::Up,
    }
}

fn shop() -> Service {
    Service::from_toml(drover_cluster::service::SHOP_EXAMPLE).unwrap()
}

fn member(service: &str, app: &str, index: u32) -> MemberId {
    MemberId {
        service: service.into(),
        app: app.into(),
        index,
    }
}

fn explain_all(hosts: &[HostRecord], service: &Service) -> Vec<Explanation> {
    let mut s = Scheduler::new(hosts);
    let mut out = Vec::new();
    for (m, app) in service.members() {
        let req = Request::new(&m, app);
        out.push(s.explain(&req));
        let _ = s.place(&req);
    }
    out
}

#[test]
fn anti_affinity_keeps_web_members_apart_and_says_so() {
    let hosts = [host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    let e = explain_all(&hosts, &shop());
    assert_eq!(e[0].chosen.as_deref(), Some("h1"));
    assert_eq!(e[1].chosen.as_deref(), Some("h1"), "binpack fills h1 first");
    assert_eq!(e[2].chosen.as_deref(), Some("h2"));
    assert_eq!(e[2].rejected.len(), 1);
    assert_eq!(e[2].rejected[0].0, "h1");
    assert_eq!(e[2].rejected[0].1.to_string(), "anti-affinity with web-1");
}

#[test]
fn rejections_read_as_the_issue_writes_them() {
    let mut low = host("low", 8, 8 * GIB);
    low.inventory.security_level = 2;
    let mut dear = host("dear", 8, 8 * GIB);
    dear.inventory.security_level = 3;
    dear.inventory.cost.vcpu_hour = 0.31;
    let mut small = host("small", 8, 512 * MIB);
    small.inventory.security_level = 3;
    let service = Service::from_toml(
        "name = \"s\"\n[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"1G\"\nmin_security = 3\nmax_cost_per_hour = 0.25\n",
    )
    .unwrap();
    let e = &explain_all(&[low, dear, small], &service)[0];
    assert_eq!(e.chosen, None);
    let why: BTreeMap<String, String> = e
        .rejected
        .iter()
        .map(|(h, r)| (h.clone(), r.to_string()))
        .collect();
    assert_eq!(why["low"], "security 2 < 3");
    assert_eq!(why["dear"], "cost 0.31/h > 0.25/h");
    assert_eq!(why["small"], "memory short by 512 MiB");
}

#[test]
fn nothing_fits_stays_pending_with_the_reason_until_a_host_appears() {
    let service = shop();
    let hosts = vec![host("h1", 4, 4 * GIB)];
    let mut assignments = Vec::new();
    let mut observed = Vec::new();
    let round = |hosts: &[HostRecord],
                 assignments: &mut Vec<Assignment>,
                 observed: &mut Vec<ObservedVm>| {
        let plan = reconcile(&World {
            services: std::slice::from_ref(&service),
            hosts,
            assignments,
            observed,
            now_ms: 1000,
            policy: RestartPolicy::default(),
            unobserved: &[],
        });
        // Carry out the plan as a controller would, with every VM ready at once.
        for a in &plan.actions {
            if let Action::Place { member, host, .. } = a {
                let rev = 10 + assignments.len() as i64;
                assignments.retain(|x: &Assignment| &x.member != member);
                assignments.push(Assignment {
                    member: member.clone(),
                    host: host.clone(),
                    revision: rev,
                    attempt: 1,
                    started_ms: 1000,
                    avoid: vec![],
                });
                observed.push(ObservedVm {
                    host: host.clone(),
                    member: member.clone(),
                    token: rev,
                    state: VmState::Ready,
                    cpu_seconds: None,
                });
            }
        }
        plan
    };
    // Round 1: only the db starts (web waits for it).
    let p = round(&hosts, &mut assignments, &mut observed);
    assert_eq!(p.actions.len(), 1);
    assert!(
        matches!(&p.members[1].1, MemberState::Waiting { reason } if reason.starts_with("waiting for db-1"))
    );
    // Round 2: web-1 fits on h1, web-2 cannot (anti-affinity): pending with the reason.
    let p = round(&hosts, &mut assignments, &mut observed);
    assert_eq!(p.actions.len(), 1);
    match &p.members[2].1 {
        MemberState::Pending { reason } => assert_eq!(reason, "anti-affinity with web-1"),
        other => panic!("web-2 should be pending, is {other:?}"),
    }
    // Not available: web-1 only just started, web-2 has no host.
    assert_eq!(p.unavailable("shop").count(), 2);
    // A second host joins: web-2 goes there; the service is available in the next round.
    let hosts = vec![host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    let p = round(&hosts, &mut assignments, &mut observed);
    assert!(matches!(&p.actions[..], [Action::Place { host, .. }] if host == "h2"));
    let p = round(&hosts, &mut assignments, &mut observed);
    assert!(p.actions.is_empty());
    assert_eq!(p.unavailable("shop").count(), 0);
}

fn assignment(m: &MemberId, host: &str, attempt: u32, started_ms: u64) -> Assignment {
    Assignment {
        member: m.clone(),
        host: host.into(),
        revision: 7,
        attempt,
        started_ms,
        avoid: vec![],
    }
}

/// Service `l`: one app with local disks.
fn local_app() -> Service {
    Service::from_toml(
        "name = \"l\"\n[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"64M\"\nstorage = \"local\"\n",
    )
    .unwrap()
}

fn one_app(extra: &str) -> Service {
    Service::from_toml(&format!(
        "name = \"s\"\n[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"64M\"\n{extra}"
    ))
    .unwrap()
}

#[test]
fn an_exited_member_restarts_in_place_with_back_off_then_moves() {
    let service = one_app("");
    let hosts = [host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    let m = member("s", "a", 1);
    let policy = RestartPolicy::default();
    let run = |a: Assignment, now_ms: u64| {
        reconcile(&World {
            services: std::slice::from_ref(&service),
            hosts: &hosts,
            assignments: &[a],
            observed: &[],
            now_ms,
            policy,
            unobserved: &[],
        })
    };
    // Exited right after start 1: wait 1 s.
    let p = run(assignment(&m, "h1", 1, 10_000), 10_500);
    assert!(p.actions.is_empty());
    assert!(matches!(
        p.members[0].1,
        MemberState::BackingOff {
            next_ms: 11_000,
            ..
        }
    ));
    let p = run(assignment(&m, "h1", 1, 10_000), 11_000);
    assert_eq!(
        p.actions,
        [Action::Restart {
            member: m.clone(),
            host: "h1".into(),
            attempt: 2
        }]
    );
    // After start 2 the wait doubles.
    assert!(run(assignment(&m, "h1", 2, 10_000), 11_999)
        .actions
        .is_empty());
    assert_eq!(
        run(assignment(&m, "h1", 2, 10_000), 12_000).actions.len(),
        1
    );
    // After the last start in place: elsewhere, never back to h1.
    let p = run(assignment(&m, "h1", 3, 10_000), 100_000);
    match &p.actions[..] {
        [Action::Place { host, avoid, .. }] => {
            assert_eq!(host, "h2");
            assert_eq!(avoid, &["h1".to_string()]);
        }
        other => panic!("expected a placement elsewhere, got {other:?}"),
    }
}

#[test]
fn a_lost_host_moves_stateless_members_and_keeps_local_ones_waiting() {
    let stateless = one_app("");
    let local = local_app();
    let mut hosts = vec![host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    hosts[0].status = HostStatus::Down;
    let (ms, ml) = (member("s", "a", 1), member("l", "a", 1));
    let p = reconcile(&World {
        services: &[stateless, local],
        hosts: &hosts,
        assignments: &[assignment(&ms, "h1", 1, 0), assignment(&ml, "h1", 1, 0)],
        // A down host's report is stale; it is ignored (the host fenced itself).
        observed: &[ObservedVm {
            host: "h1".into(),
            member: ms.clone(),
            token: 7,
            state: VmState::Ready,
            cpu_seconds: None,
        }],
        now_ms: 1,
        policy: RestartPolicy::default(),
        unobserved: &[],
    });
    assert_eq!(p.actions.len(), 1);
    assert!(
        matches!(&p.actions[0], Action::Place { member, host, why, .. }
        if *member == ms && host == "h2" && why == "host h1 lost")
    );
    assert!(
        matches!(&p.members[0].1, MemberState::WaitingForHost { host, reason } if host == "h1" && reason == "local disks")
    );
}

#[test]
fn members_moved_off_a_lost_host_keep_the_start_order() {
    let shop = Service::from_toml(drover_cluster::service::SHOP_EXAMPLE).unwrap();
    let mut hosts = vec![
        host("h1", 4, 4 * GIB),
        host("h2", 4, 4 * GIB),
        host("h3", 4, 4 * GIB),
    ];
    hosts[0].status = HostStatus::Down;
    let (db, web1, web2) = (
        member("shop", "db", 1),
        member("shop", "web", 1),
        member("shop", "web", 2),
    );
    let ready_web2 = ObservedVm {
        host: "h2".into(),
        member: web2.clone(),
        token: 3,
        state: VmState::Ready,
        cpu_seconds: None,
    };
    let round = |assignments: &[Assignment], observed: &[ObservedVm]| {
        reconcile(&World {
            services: std::slice::from_ref(&shop),
            hosts: &hosts,
            assignments,
            observed,
            now_ms: 1,
            policy: RestartPolicy::default(),
            unobserved: &[],
        })
    };
    // db-1 and web-1 were on h1: the db moves first; web-1 waits for it.
    let lost = [
        assignment(&db, "h1", 1, 0),
        assignment(&web1, "h1", 1, 0),
        assignment(&web2, "h2", 1, 0),
    ];
    let p = round(&lost, std::slice::from_ref(&ready_web2));
    assert!(
        matches!(&p.actions[..], [Action::Place { member, .. }] if *member == db),
        "{:?}",
        p.actions
    );
    assert!(
        matches!(&p.members[1].1, MemberState::Waiting { reason } if reason.contains("db-1")),
        "{:?}",
        p.members
    );
    // Once the db is ready on its new host, web-1 moves, away from web-2 (anti-affinity).
    let moved = [
        assignment(&db, "h3", 1, 0),
        assignment(&web1, "h1", 1, 0),
        assignment(&web2, "h2", 1, 0),
    ];
    let db_ready = ObservedVm {
        host: "h3".into(),
        member: db.clone(),
        token: 4,
        state: VmState::Ready,
        cpu_seconds: None,
    };
    let p = round(&moved, &[db_ready, ready_web2.clone()]);
    assert!(
        matches!(&p.actions[..], [Action::Place { member, host, .. }] if *member == web1 && host == "h3"),
        "{:?}",
        p.actions
    );
}

#[test]
fn a_copy_on_the_wrong_host_is_stopped_and_deleted_members_are_cleaned_up() {
    let service = one_app("");
    let hosts = [host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    let m = member("s", "a", 1);
    let gone = member("s", "old", 1);
    let vm = |host: &str, member: &MemberId| ObservedVm {
        host: host.into(),
        member: member.clone(),
        token: 1,
        state: VmState::Ready,
        cpu_seconds: None,
    };
    let p = reconcile(&World {
        services: std::slice::from_ref(&service),
        hosts: &hosts,
        assignments: &[assignment(&m, "h2", 1, 0), assignment(&gone, "h1", 1, 0)],
        observed: &[vm("h1", &m), vm("h2", &m), vm("h1", &gone)],
        now_ms: 1,
        policy: RestartPolicy::default(),
        unobserved: &[],
    });
    assert_eq!(
        p.actions,
        [
            Action::Stop {
                host: "h1".into(),
                member: m.clone(),
                why: "the member is assigned to another host".into()
            },
            Action::Stop {
                host: "h1".into(),
                member: gone.clone(),
                why: "the member is no longer in its service".into()
            },
        ]
    );
    assert!(p.members[0].1.is_ready());
    // Once its copy is gone, the old member's assignment is deleted.
    let p = reconcile(&World {
        services: std::slice::from_ref(&service),
        hosts: &hosts,
        assignments: &[assignment(&m, "h2", 1, 0), assignment(&gone, "h1", 1, 0)],
        observed: &[vm("h2", &m)],
        now_ms: 1,
        policy: RestartPolicy::default(),
        unobserved: &[],
    });
    assert_eq!(p.actions, [Action::Unassign { member: gone }]);
}

#[test]
fn a_live_host_that_does_not_answer_is_left_alone() {
    let service = one_app("");
    let hosts = [host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    let (m, gone) = (member("s", "a", 1), member("s", "old", 1));
    let p = reconcile(&World {
        services: std::slice::from_ref(&service),
        hosts: &hosts,
        assignments: &[assignment(&m, "h1", 1, 0), assignment(&gone, "h1", 1, 0)],
        observed: &[],
        unobserved: &["h1".to_string()],
        now_ms: 1_000_000,
        policy: RestartPolicy::default(),
    });
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.members[0].1, MemberState::Unknown { host: "h1".into() });
}

#[test]
fn pinning_to_a_host_and_to_a_label() {
    let mut hosts = vec![
        host("h1", 4, 4 * GIB),
        host("h2", 4, 4 * GIB),
        host("h3", 4, 4 * GIB),
    ];
    hosts[2].inventory.labels.insert("ssd".into(), "yes".into());
    let e = explain_all(&hosts, &one_app("pin_host = \"h2\"\n"));
    assert_eq!(e[0].chosen.as_deref(), Some("h2"));
    assert_eq!(e[0].rejected[0].1.to_string(), "pinned to host h2");
    let e = explain_all(&hosts, &one_app("pin_label = \"ssd=yes\"\n"));
    assert_eq!(e[0].chosen.as_deref(), Some("h3"));
    assert_eq!(e[0].rejected[0].1.to_string(), "no label ssd=yes");
}

#[test]
fn strategies_rank_as_named() {
    let mut hosts = vec![
        host("a", 8, 8 * GIB),
        host("b", 4, 4 * GIB),
        host("c", 16, 16 * GIB),
    ];
    hosts[2].inventory.cost.vcpu_hour = 0.01;
    hosts[0].inventory.cost.vcpu_hour = 0.05;
    hosts[1].inventory.cost.vcpu_hour = 0.05;
    let chosen = |s: &str| {
        explain_all(&hosts, &one_app(&format!("strategy = \"{s}\"\n")))[0]
            .chosen
            .clone()
    };
    assert_eq!(chosen("binpack").as_deref(), Some("b"));
    assert_eq!(chosen("spread").as_deref(), Some("c"));
    assert_eq!(chosen("cheapest").as_deref(), Some("c"));
}

#[test]
fn site_anti_affinity() {
    let mut hosts = vec![
        host("a1", 8, 8 * GIB),
        host("a2", 8, 8 * GIB),
        host("b1", 8, 8 * GIB),
    ];
    hosts[0].inventory.site = "a".into();
    hosts[1].inventory.site = "a".into();
    hosts[2].inventory.site = "b".into();
    let e = explain_all(&hosts, &one_app("replicas = 3\nanti_affinity = \"site\"\n"));
    assert_eq!(e[0].chosen.as_deref(), Some("a1"));
    assert_eq!(e[1].chosen.as_deref(), Some("b1"));
    assert_eq!(e[2].chosen, None);
    assert_eq!(
        e[2].rejected[1].1.to_string(),
        "anti-affinity with a-1 (same site)"
    );
}

// ---- properties ----

fn arb_hosts() -> impl proptest::strategy::Strategy<Value = Vec<HostRecord>> {
    prop::collection::vec(
        (
            1u32..16,
            1u64..32,
            0u8..4,
            0u8..3,
            0u8..3,
            0u32..4,
            any::<bool>(),
            0u8..10,
        ),
        1..12,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (cpus, gib, sec, site, label, cost, up, disk))| {
                let mut h = host(&format!("h{i}"), cpus, gib * 512 * MIB);
                h.inventory.disk = disk as u64 * GIB;
                h.inventory.security_level = sec;
                h.inventory.site = format!("s{site}");
                h.inventory
                    .labels
                    .insert("tier".into(), format!("t{label}"));
                h.inventory.cost.vcpu_hour = cost as f64 * 0.05;
                h.inventory.cost.gib_hour = 0.01;
                if !up {
                    h.status = HostStatus::Down;
                }
                h
            })
            .collect()
    })
}

fn arb_app(i: usize) -> impl proptest::strategy::Strategy<Value = String> {
    (
        1u32..6,
        1u64..8,
        1u32..5,
        0u8..3,
        0u8..5,
        0u8..4,
        0u8..3,
        0u8..3,
        0u8..4,
    )
        .prop_map(move |(cpus, mem, replicas, anti, pin, sec, cost, strat, disk)| {
            let mut s = format!(
                "[[app]]\nname = \"a{i}\"\ncpus = {cpus}\nmemory = \"{}M\"\nreplicas = {replicas}\nmin_security = {sec}\n",
                mem * 256
            );
            if disk > 0 {
                s += &format!("disk = \"{disk}G\"\n");
            }
            match anti {
                1 => s += "anti_affinity = \"host\"\n",
                2 => s += "anti_affinity = \"site\"\n",
                _ => {}
            }
            match pin {
                1 if anti == 0 || replicas == 1 => s += &format!("pin_host = \"h{}\"\n", i % 3),
                2 => s += &format!("pin_label = \"tier=t{}\"\n", i % 3),
                _ => {}
            }
            if cost > 0 {
                s += &format!("max_cost_per_hour = {}\n", cost as f64 * 0.12);
            }
            s += ["strategy = \"binpack\"\n", "strategy = \"spread\"\n", "strategy = \"cheapest\"\n"][strat as usize];
            s
        })
}

fn arb_service() -> impl proptest::strategy::Strategy<Value = Service> {
    prop::collection::vec(0usize..1, 1..6)
        .prop_flat_map(|v| (0..v.len()).map(arb_app).collect::<Vec<_>>())
        .prop_map(|apps| Service::from_toml(&format!("name = \"p\"\n{}", apps.concat())).unwrap())
}

fn place_all(hosts: &[HostRecord], service: &Service) -> Vec<(MemberId, Result<String, NoFit>)> {
    let mut s = Scheduler::new(hosts);
    service
        .members()
        .map(|(m, app)| {
            let r = s.place(&Request::new(&m, app));
            (m, r)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn placements_keep_every_hard_rule_and_never_overcommit(hosts in arb_hosts(), service in arb_service()) {
        let by_name: BTreeMap<&str, &HostRecord> = hosts.iter().map(|h| (h.inventory.name.as_str(), h)).collect();
        let placed = place_all(&hosts, &service);
        let mut used: BTreeMap<&str, Needs> = BTreeMap::new();
        let mut taken: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
        for (m, r) in &placed {
            let app = service.app(&m.app).unwrap();
            let c = &app.constraints;
            let Ok(h) = r else { continue };
            let inv = &by_name[h.as_str()].inventory;
            prop_assert_eq!(by_name[h.as_str()].status, HostStatus::Up);
            prop_assert!(inv.security_level >= c.min_security);
            if let Some(p) = &c.pin_host { prop_assert_eq!(p, h); }
            if let Some((k, v)) = &c.pin_label { prop_assert_eq!(inv.labels.get(k), Some(v)); }
            if let Some(max) = c.max_cost_per_hour { prop_assert!(inv.cost.per_hour(&app.needs) <= max + 1e-9); }
            let u = used.entry(h.as_str()).or_default();
            u.cpus += app.needs.cpus;
            u.memory += app.needs.memory;
            u.disk += app.needs.disk;
            prop_assert!(u.cpus <= inv.cpus && u.memory <= inv.memory && u.disk <= inv.disk, "over-committed {}", h);
            let others = taken.entry((m.service.clone(), m.app.clone())).or_default();
            match c.anti_affinity {
                Some(Scope::Host) => prop_assert!(others.iter().all(|(oh, _)| oh != h)),
                Some(Scope::Site) => prop_assert!(others.iter().all(|(_, os)| *os != inv.site)),
                None => {}
            }
            others.push((h.clone(), inv.site.clone()));
        }
    }

    #[test]
    fn placement_is_deterministic_whatever_the_host_order(hosts in arb_hosts(), service in arb_service()) {
        let mut reversed = hosts.clone();
        reversed.reverse();
        prop_assert_eq!(place_all(&hosts, &service), place_all(&reversed, &service));
    }

    #[test]
    fn a_rejected_member_had_a_true_reason_on_every_host(hosts in arb_hosts(), service in arb_service()) {
        let by_name: BTreeMap<&str, &HostRecord> = hosts.iter().map(|h| (h.inventory.name.as_str(), h)).collect();
        for (m, r) in place_all(&hosts, &service) {
            let Err(nofit) = r else { continue };
            prop_assert_eq!(nofit.rejected.len(), hosts.len());
            let app = service.app(&m.app).unwrap();
            for (h, why) in &nofit.rejected {
                let rec = by_name[h.as_str()];
                match why {
                    Rejection::HostDown => prop_assert_eq!(rec.status, HostStatus::Down),
                    Rejection::Security { host, need } => prop_assert!(host < need && *host == rec.inventory.security_level),
                    Rejection::CpusShort { by } | Rejection::BandwidthShort { by } => prop_assert!(*by > 0),
                    Rejection::MemoryShort { by } | Rejection::DiskShort { by } => prop_assert!(*by > 0),
                    Rejection::Cost { per_hour, max } => prop_assert!(per_hour > max),
                    Rejection::PinnedTo { host } => prop_assert_ne!(host, h),
                    Rejection::MissingLabel { .. } => prop_assert!(app.constraints.pin_label.is_some()),
                    Rejection::AntiAffinity { .. } => prop_assert!(app.constraints.anti_affinity.is_some()),
                    other => prop_assert!(false, "unexpected reason {:?}", other),
                }
            }
        }
    }

    #[test]
    fn the_scan_and_the_explanation_agree(hosts in arb_hosts(), service in arb_service()) {
        // `place` uses a fast check, `explain` the reasoned one: a host that fits for one fits
        // for the other.
        let mut s = Scheduler::new(&hosts);
        for (m, app) in service.members() {
            let req = Request::new(&m, app);
            let e = s.explain(&req);
            let placed = s.place(&req).ok();
            prop_assert_eq!(&e.chosen, &placed);
            let fits = e.rejected.iter().filter(|(_, r)| matches!(r, Rejection::RankedLower { .. })).count();
            if placed.is_none() {
                prop_assert_eq!(fits, 0);
                prop_assert_eq!(e.rejected.len(), hosts.len());
            } else {
                prop_assert_eq!(e.rejected.len() + 1, hosts.len());
            }
        }
    }

    #[test]
    fn reconciling_twice_gives_the_same_plan(hosts in arb_hosts(), service in arb_service(), now in 0u64..100_000) {
        let world = World { services: std::slice::from_ref(&service), hosts: &hosts, assignments: &[], observed: &[], now_ms: now, policy: RestartPolicy::default(), unobserved: &[] };
        prop_assert_eq!(reconcile(&world), reconcile(&world));
    }
}

fn ready_on(host: &str, m: &MemberId) -> ObservedVm {
    ObservedVm {
        host: host.into(),
        member: m.clone(),
        token: 7,
        state: VmState::Ready,
        cpu_seconds: None,
    }
}

#[test]
fn a_draining_host_is_emptied_one_member_per_app_at_a_time_break_before_make() {
    let web = one_app("replicas = 3\nanti_affinity = \"host\"\n");
    let local = local_app();
    let mut hosts = vec![
        host("h1", 4, 4 * GIB),
        host("h2", 4, 4 * GIB),
        host("h3", 4, 4 * GIB),
        host("h4", 4, 4 * GIB),
    ];
    hosts[0].status = HostStatus::Draining;
    let (w1, w2, w3, l1) = (
        member("s", "a", 1),
        member("s", "a", 2),
        member("s", "a", 3),
        member("l", "a", 1),
    );
    let assigned = [
        assignment(&w1, "h1", 1, 0),
        assignment(&w2, "h2", 1, 0),
        assignment(&w3, "h3", 1, 0),
        assignment(&l1, "h1", 1, 0),
    ];
    let services = [web, local];
    let round = |assignments: &[Assignment], observed: &[ObservedVm]| {
        reconcile(&World {
            services: &services,
            hosts: &hosts,
            assignments,
            observed,
            now_ms: 1,
            policy: RestartPolicy::default(),
            unobserved: &[],
        })
    };
    // While another member of the app is not ready, nothing moves.
    let mut w2_starting = ready_on("h2", &w2);
    w2_starting.state = VmState::Running;
    let all = [
        ready_on("h1", &w1),
        w2_starting,
        ready_on("h3", &w3),
        ready_on("h1", &l1),
    ];
    assert_eq!(round(&assigned, &all).actions, []);
    // All ready: web-1 is stopped first (no second copy is started in the same round); the
    // member with local disks stays.
    let all = [
        ready_on("h1", &w1),
        ready_on("h2", &w2),
        ready_on("h3", &w3),
        ready_on("h1", &l1),
    ];
    let p = round(&assigned, &all);
    assert!(
        matches!(&p.actions[..], [Action::Stop { host, member, why }]
            if host == "h1" && *member == w1 && why.contains("draining")),
        "{:?}",
        p.actions
    );
    // Once it is gone from h1 it is placed elsewhere, on the one host anti-affinity leaves.
    let p = round(&assigned, &all[1..]);
    assert!(
        matches!(&p.actions[..], [Action::Place { member, host, why, .. }]
            if *member == w1 && host == "h4" && why == "host h1 draining"),
        "{:?}",
        p.actions
    );
    // With nowhere else to go (h4 gone), the member keeps running where it is.
    let three = &hosts[..3];
    let p = reconcile(&World {
        services: &services,
        hosts: three,
        assignments: &assigned,
        observed: &all,
        now_ms: 1,
        policy: RestartPolicy::default(),
        unobserved: &[],
    });
    assert_eq!(p.actions, []);
    assert!(p.members.iter().any(|(m, s)| *m == w1 && s.is_ready()));
}

#[test]
fn two_members_of_one_app_on_a_draining_host_move_one_at_a_time() {
    let app = one_app("replicas = 2\n");
    let mut hosts = vec![host("h1", 4, 4 * GIB), host("h2", 4, 4 * GIB)];
    hosts[0].status = HostStatus::Draining;
    let (w1, w2) = (member("s", "a", 1), member("s", "a", 2));
    let p = reconcile(&World {
        services: std::slice::from_ref(&app),
        hosts: &hosts,
        assignments: &[assignment(&w1, "h1", 1, 0), assignment(&w2, "h1", 1, 0)],
        observed: &[ready_on("h1", &w1), ready_on("h1", &w2)],
        now_ms: 1,
        policy: RestartPolicy::default(),
        unobserved: &[],
    });
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::Stop { .. }))
            .count(),
        1,
        "{:?}",
        p.actions
    );
}
