//! A service on a real cluster (`scripts/cluster.sh up 3`: a 3-member etcd, three droverd hosts in
//! network namespaces, two controllers), with real guests: the issue's `shop` file applied as
//! written becomes `available`; its start order is checked from inside the guests; its web
//! members are on different hosts; a killed host's members run elsewhere; a killed leading
//! controller is replaced and nothing is started twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_e2e::{tail, wait_for, Cli, Fleet};
use serde_json::Value;

/// The issue's file, as written.
const SHOP: &str = r#"name = "shop"
[[app]]
name = "db"
cpus = 1
memory = "256M"
[[app]]
name = "web"
cpus = 1
memory = "256M"
replicas = 2
after = ["db"]
anti_affinity = "host"
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `drover service show shop --output json`, whether it exits 0 (available) or 4.
fn show(cli: &Cli) -> Value {
    let out = cli.drover(&["--output", "json", "service", "show", "shop"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Member name → host, from `service show`.
fn hosts_of(v: &Value) -> BTreeMap<String, String> {
    v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["host"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Wait until the service is available; its `service show --output json`.
fn wait_available(f: &Fleet, what: &str, timeout: Duration) -> Value {
    let cli = f.cli();
    let start = Instant::now();
    loop {
        let out = cli.drover(&["service", "show", "shop"]);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.contains("available"), "{text}");
            return show(&cli);
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: shop not available after {timeout:?}:\n{}\n{}\ncontroller logs:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&ctl_log(f, 1), 30),
                tail(&ctl_log(f, 2), 30),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn ctl_log(f: &Fleet, j: usize) -> String {
    std::fs::read_to_string(
        f.dir
            .path()
            .join(format!("drover-{}-cluster/ctl-{j}.log", f.set)),
    )
    .unwrap_or_default()
}

/// Host index of a host name like `cs2`.
fn index(f: &Fleet, host: &str) -> usize {
    host.strip_prefix(&f.set)
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("host {host:?} is not of set {}", f.set))
}

/// `started` events of each cluster VM on host `i`.
fn starts(f: &Fleet, i: usize) -> BTreeMap<String, usize> {
    let out = f.host(i).ok(&["events"]);
    let mut n = BTreeMap::new();
    for line in out.lines() {
        let e: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if e["kind"] == "started" {
            *n.entry(e["vm"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    n
}

#[test]
fn shop_runs_in_order_apart_and_survives_a_lost_host_and_a_lost_controller() {
    let Some(f) = Fleet::cluster("cs", "10.86.0", 3) else {
        return;
    };
    let cli = f.cli();
    let file = f.dir.path().join("shop.toml");
    std::fs::write(&file, SHOP).unwrap();
    let hosts = cli.json(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(3), "{hosts}");
    cli.ok(&["service", "apply", "-f", file.to_str().unwrap()]);

    // Available, with each member's name, host and state.
    let v = wait_available(&f, "first start", Duration::from_secs(180));
    let placed = hosts_of(&v);
    assert_eq!(
        placed.keys().collect::<Vec<_>>(),
        ["db-1", "web-1", "web-2"],
        "{v}"
    );
    for m in v["members"].as_array().unwrap() {
        assert_eq!(m["state"], "ready", "{v}");
    }
    // Anti-affinity by host.
    assert_ne!(placed["web-1"], placed["web-2"], "{v}");

    // Start order, from inside the guests: each web guest booted (its kernel's uptime counted
    // back from before we asked) after the db's agent was ready.
    let db_host = index(&f, &placed["db-1"]);
    let db = f.host(db_host).json(&["vm", "show", "shop-db-1"]);
    let db_ready = db["started_at_ms"].as_u64().unwrap()
        + db["agent"]["ready_after_ms"]
            .as_u64()
            .expect("db agent ready");
    for web in ["web-1", "web-2"] {
        let h = f.host(index(&f, &placed[web]));
        let asked = now_ms();
        let up = h.sh(&format!("shop-{web}"), "cut -d' ' -f1 /proc/uptime");
        let up_ms = (up.trim().parse::<f64>().expect("uptime") * 1000.0) as u64;
        let booted = asked - up_ms;
        assert!(
            booted > db_ready,
            "{web} booted at {booted}, before db-1 was ready at {db_ready}"
        );
    }

    // A host lost: a host with a web member, so the anti-affinity rule must hold on the rest.
    let lost = placed["web-1"].clone();
    let out = f.script(&["kill-host", &lost]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lost_at = Instant::now();
    let v = wait_for(
        "the lost host's members to move",
        Duration::from_secs(120),
        || {
            let v = show(&cli);
            let moved = hosts_of(&v).values().all(|h| *h != lost);
            (moved && v["available"] == true).then_some(v)
        },
    );
    eprintln!(
        "available again {:?} after the host was lost",
        lost_at.elapsed()
    );
    let now = hosts_of(&v);
    assert_ne!(now["web-1"], now["web-2"], "{v}");
    let down = cli.json(&["host", "list"]);
    let status: BTreeMap<String, String> = down
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["inventory"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                h["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(status[&lost], "down", "{down}");

    // The leading controller lost: the other leads, and does nothing that was done.
    let status = cli.json(&["cluster", "status"]);
    let leader = status["leader"].as_str().expect("a leader").to_string();
    let live: Vec<usize> = (1..=3).filter(|i| f.remote(*i) != lost).collect();
    let before: Vec<_> = live.iter().map(|i| starts(&f, *i)).collect();
    let out = f.script(&["kill-controller", &leader]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = wait_for(
        "the other controller to lead",
        Duration::from_secs(30),
        || {
            let s = cli.json(&["cluster", "status"]);
            s["leader"]
                .as_str()
                .filter(|l| *l != leader)
                .map(str::to_string)
        },
    );
    // Let it run some rounds, then check it reported and changed nothing.
    wait_for("the new leader to report", Duration::from_secs(30), || {
        (show(&cli)["reported_by"] == other.as_str()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let v = wait_available(&f, "after takeover", Duration::from_secs(10));
    assert_eq!(hosts_of(&v), now, "the new leader moved members: {v}");
    let after: Vec<_> = live.iter().map(|i| starts(&f, *i)).collect();
    assert_eq!(
        before, after,
        "a member was started again after the takeover"
    );
    // Over the whole run, each member was started once per host it was placed on: once for
    // the members that stayed, and once more for the one that moved.
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for m in &after {
        for (vm, n) in m {
            *total.entry(vm.clone()).or_default() += n;
        }
    }
    for (member, host) in &now {
        let vm = format!("shop-{member}");
        let on_live = total.get(&vm).copied().unwrap_or(0);
        assert_eq!(
            on_live, 1,
            "{vm} started {on_live} times on the live hosts ({host})"
        );
    }
}
