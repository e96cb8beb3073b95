//! A service on a real cluster (`scripts/cluster.sh up 3`: a 3-member etcd, three droverd hosts in
//! network namespaces, two controllers), with real guests: the issue's `shop` file applied as
//! written becomes `available`; its start order is checked from inside the guests; its web
//! members are on different hosts; a killed host's members run elsewhere; a killed leading
//! controller is replaced and nothing is started twice; a readiness command holds its member
//! back until it passes; a host cut off by its veth never leaves two copies of a member running.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_e2e::{tail, wait_for, Cli, Fleet};
use serde_json::Value;

/// The file, as written (the crate keeps it as its example, and its unit tests parse it).
const SHOP: &str = drover_cluster::service::SHOP_EXAMPLE;

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
fn shop_runs_in_order_apart_and_survives_a_lost_host_a_lost_controller_and_a_partition() {
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
            // Exit 4 (and leader null) while no controller leads.
            let out = cli.drover(&["--output", "json", "cluster", "status"]);
            let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
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

    // An etcd member lost: the cluster goes on with the other two (hosts keep their leases,
    // the controller places what follows). `up 3` below starts it again.
    let out = f.script(&["kill-etcd", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A readiness command: run through the agent until it exits 0; until then the member is
    // not ready and `service show` says why. Pinned to a live host: it runs there.
    let pinned = f.remote(live[live.len() - 1]);
    let probe = f.dir.path().join("probe.toml");
    std::fs::write(
        &probe,
        format!(
            "name = \"probe\"\n[[app]]\nname = \"app\"\ncpus = 1\nmemory = \"256M\"\n\
             pin_host = \"{pinned}\"\n\
             ready = \"test -e /tmp/ok || {{ echo no /tmp/ok yet >&2; exit 3; }}\"\n"
        ),
    )
    .unwrap();
    // If e1 led etcd, the other two elect a new leader first (a second or so): until then a
    // write times out.
    let killed = Instant::now();
    wait_for(
        "etcd to take a write again",
        Duration::from_secs(20),
        || {
            cli.drover(&["service", "apply", "-f", probe.to_str().unwrap()])
                .status
                .success()
                .then_some(())
        },
    );
    eprintln!(
        "a write went through {:?} after etcd e1 was killed",
        killed.elapsed()
    );
    let member = wait_for("probe to run, not ready", Duration::from_secs(120), || {
        let out = cli.drover(&["--output", "json", "service", "show", "probe"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let m = v["members"][0].clone();
        (m["state"] == "not_ready").then_some(m)
    });
    assert_eq!(
        out_code(&cli, "probe"),
        Some(4),
        "not available while not ready"
    );
    assert_eq!(member["host"], pinned.as_str(), "pinned: {member}");
    let detail = member["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("ready command exited 3: no /tmp/ok yet"),
        "{member}"
    );
    let text = cli.drover(&["service", "show", "probe"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("not ready: ready command exited 3"), "{text}");
    let h = f.host(index(&f, member["host"].as_str().unwrap()));
    h.sh("probe-app-1", "touch /tmp/ok");
    wait_for("probe to be available", Duration::from_secs(30), || {
        (out_code(&cli, "probe") == Some(0)).then_some(())
    });
    cli.ok(&["service", "delete", "probe"]);

    // A partition: the lost host comes back, then another host's veth goes down while a
    // checker polls every host's QEMU processes. The cut-off host stops its members itself
    // before its lease can expire, so they run elsewhere and never twice at any poll.
    // Every shop member ran on through the etcd member's loss.
    assert_eq!(
        hosts_of(&wait_available(
            &f,
            "with etcd e1 down",
            Duration::from_secs(10)
        )),
        now
    );
    let out = f.script(&["up", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the lost host to be up again",
        Duration::from_secs(60),
        || {
            let hosts = cli.json(&["host", "list"]);
            hosts
                .as_array()?
                .iter()
                .all(|h| h["status"] == "up")
                .then_some(())
        },
    );
    let v = wait_available(&f, "before the partition", Duration::from_secs(60));
    let before = hosts_of(&v);
    let cut = index(&f, &before["web-2"]);
    let checker = Checker::start(&f);
    let veth = f.veth(cut);
    let ip = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["link", "set", &veth, state])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set {veth} {state}");
    };
    ip("down");
    let v = wait_for(
        "the cut-off host's members to move",
        Duration::from_secs(120),
        || {
            let v = show(&cli);
            let moved = hosts_of(&v).values().all(|h| *h != f.remote(cut));
            (moved && v["available"] == true).then_some(v)
        },
    );
    let after = hosts_of(&v);
    assert_ne!(after["web-1"], after["web-2"], "{v}");
    ip("up");
    // Once back, the host finds nothing of the service to run: its copies stay stopped.
    std::thread::sleep(Duration::from_secs(4));
    let polls = checker.stop();
    assert!(
        polls.checked > 20,
        "the checker polled only {} times",
        polls.checked
    );
    assert!(
        polls.doubles.is_empty(),
        "two copies of a member ran at once: {:?}",
        polls.doubles
    );
    assert_eq!(
        hosts_of(&wait_available(
            &f,
            "after the partition",
            Duration::from_secs(30)
        )),
        after
    );

    // A host drained: its members (all stateless here) are stopped there, then started
    // elsewhere one per app at a time (the checker never sees two copies); the host shows
    // draining and takes nothing new.
    let drained = after["web-2"].clone();
    let checker = Checker::start(&f);
    cli.ok(&["host", "drain", &drained]);
    let v = wait_for(
        "the members to move off the drained host",
        Duration::from_secs(180),
        || {
            let v = show(&cli);
            let off = hosts_of(&v).values().all(|h| *h != drained);
            (off && v["available"] == true).then_some(v)
        },
    );
    let moved = hosts_of(&v);
    assert_ne!(moved["web-1"], moved["web-2"], "{v}");
    let polls = checker.stop();
    assert!(
        polls.doubles.is_empty(),
        "two copies of a member ran at once while draining: {:?}",
        polls.doubles
    );
    let hosts = cli.json(&["host", "list"]);
    let status = hosts
        .as_array()
        .and_then(|hs| {
            hs.iter()
                .find(|h| h["inventory"]["name"] == drained.as_str())
        })
        .map(|h| h["status"].clone());
    assert_eq!(status, Some(Value::from("draining")), "{hosts}");
    cli.ok(&["host", "undrain", &drained]);

    // A scale rule on real guests: a member kept busy inside its guest makes the controller
    // (reading each host's /metrics) add a second member, which becomes ready.
    let burn = f.dir.path().join("burn.toml");
    std::fs::write(
        &burn,
        "name = \"burn\"\n[[app]]\nname = \"app\"\ncpus = 1\nmemory = \"256M\"\n\
         [app.scale]\nmetric = \"cpu\"\nthreshold = 0.3\nmax_replicas = 2\n",
    )
    .unwrap();
    cli.ok(&["service", "apply", "-f", burn.to_str().unwrap()]);
    let first = wait_for("burn-1 to be ready", Duration::from_secs(120), || {
        let out = cli.drover(&["--output", "json", "service", "show", "burn"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["available"] == true).then_some(v)
    });
    assert_eq!(
        first["members"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    assert_eq!(
        first["scale"][0]["replicas"], 1,
        "idle: not scaled: {first}"
    );
    let h = f.host(index(&f, first["members"][0]["host"].as_str().unwrap()));
    h.sh(
        "burn-app-1",
        // Its own session: exec's process group is killed when the command returns.
        "setsid sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null &",
    );
    let v = wait_for(
        "a second member for the busy app",
        Duration::from_secs(120),
        || {
            let out = cli.drover(&["--output", "json", "service", "show", "burn"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let two = v["members"].as_array().map(Vec::len) == Some(2);
            (two && v["available"] == true).then_some(v)
        },
    );
    let why = v["scale"][0]["why"].as_str().unwrap_or_default();
    assert!(why.starts_with("scaled out to 2: cpu "), "{v}");
    cli.ok(&["service", "delete", "burn"]);

    // Usage: what the members used, per app, at their hosts' prices (cluster.sh registers
    // prices on every host), with a total in the text form.
    let usage = cli.json(&["cluster", "usage", "--by", "app"]);
    let rows = usage.as_array().cloned().unwrap_or_default();
    let web = rows
        .iter()
        .find(|r| r["service"] == "shop" && r["app"] == "web")
        .unwrap_or_else(|| panic!("no usage row for shop/web: {usage}"));
    let hours = web["vm_hours"].as_f64().unwrap_or_default();
    assert!(hours > 0.0 && hours < 1.0, "{web}");
    assert!(web["cost"].as_f64().unwrap_or_default() > 0.0, "{web}");
    let text = cli.drover(&["cluster", "usage"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("VM-HOURS") && text.contains("total"),
        "{text}"
    );
}

/// Polls every host's QEMU processes (by the `-name guest=VM` of QEMUs under the host's state
/// dir) in the background and records any VM seen on two hosts in one poll.
struct Checker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Polls>,
}

#[derive(Debug, Default)]
struct Polls {
    checked: usize,
    doubles: Vec<(String, Vec<usize>)>,
}

impl Checker {
    fn start(f: &Fleet) -> Checker {
        let dirs: Vec<(usize, String)> = (1..=3)
            .map(|i| (i, format!("{}/", f.state_dir(i).display())))
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut polls = Polls::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
                for (i, dir) in &dirs {
                    for pid in drover_e2e::pids_mentioning(dir) {
                        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        let cmd = String::from_utf8_lossy(&cmd);
                        if let Some(name) = cmd
                            .split('\0')
                            .find_map(|a| a.strip_prefix("guest="))
                            .and_then(|a| a.split(',').next())
                        {
                            seen.entry(name.to_string()).or_default().push(*i);
                        }
                    }
                }
                polls.checked += 1;
                polls
                    .doubles
                    .extend(seen.into_iter().filter(|(_, hosts)| hosts.len() > 1));
                std::thread::sleep(Duration::from_millis(50));
            }
            polls
        });
        Checker { stop, thread }
    }

    fn stop(self) -> Polls {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// `drover service show NAME`'s exit code: 0 available, 4 not.
fn out_code(cli: &Cli, name: &str) -> Option<i32> {
    cli.drover(&["service", "show", name]).status.code()
}
