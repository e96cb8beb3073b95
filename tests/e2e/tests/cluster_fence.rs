//! Fencing tokens on a real etcd (Debian's `etcd-server`) and a real droverd `--cluster`: a
//! controller's start of a member runs only if the member's assignment is, right now, to this
//! host at exactly the token it carries; a member the cluster placed elsewhere is stopped by the
//! host itself, and an operator cannot start it here again; a member whose droverd dies is
//! killed (by the fence watchdog droverd left behind) before the host's lease can expire.

use drover_e2e::{free_port, wait_for, Daemon};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// etcd on loopback with a private data dir, killed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (url, peer) = (
            format!("http://127.0.0.1:{}", free_port()),
            format!("http://127.0.0.1:{}", free_port()),
        );
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--name",
                "e",
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("e={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (scripts/install-deps.sh installs etcd-server)");
        let e = Etcd {
            child,
            url,
            _dir: dir,
        };
        wait_for("etcd", Duration::from_secs(20), || {
            e.ctl(&["endpoint", "health"]).map(|_| ())
        });
        e
    }

    /// `etcdctl ARGS` (v3 API); stdout on success.
    fn ctl(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Assign member shop/web-1 to `host` as a controller would; returns its revision (the
    /// fencing token).
    fn assign(&self, host: &str) -> i64 {
        let value = serde_json::json!({
            "member": {"service": "shop", "app": "web", "index": 1},
            "host": host, "revision": 0, "attempt": 1, "started_ms": 0, "avoid": []
        });
        self.ctl(&["put", "/drover/assign/shop/web-1", &value.to_string()])
            .expect("etcdctl put");
        let got = self
            .ctl(&["get", "/drover/assign/shop/web-1", "-w", "json"])
            .expect("etcdctl get");
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        v["kvs"][0]["mod_revision"].as_i64().expect("mod_revision")
    }
}

/// A daemon of host `h1` in the cluster at `etcd`, with a lease of 3 s.
fn cluster_daemon(etcd: &Etcd) -> (Daemon, tempfile::NamedTempFile) {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "name = \"h1\"\nttl_s = 3\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&[
        "--listen",
        &listen,
        "--cluster",
        &etcd.url,
        "--cluster-config",
        cfg.path().to_str().unwrap(),
    ]);
    (d, cfg)
}

/// Whether process `pid` runs (a zombie does not).
fn runs(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

/// POST a start of `vm` with a fencing token over droverd's unix socket: (HTTP status, body).
fn fenced_start(d: &Daemon, vm: &str, token: i64) -> (u16, String) {
    let body = serde_json::json!({
        "fence": {"service": "shop", "app": "web", "index": 1, "token": token}
    });
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(d.socket())
        .args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("http://d/v1/vms/{vm}/start"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn a_member_starts_only_with_its_current_token_and_stops_once_placed_elsewhere() {
    let etcd = Etcd::start();
    let (d, _cfg) = cluster_daemon(&etcd);
    d.ok(&["vm", "create", "shop-web-1", "--memory", "128M"]);
    let token = etcd.assign("h1");

    // An older token (a deposed controller's, or a start ordered before a re-placement).
    let (code, body) = fenced_start(&d, "shop-web-1", token - 1);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not assigned to this host"), "{body}");
    assert_eq!(d.json(&["vm", "show", "shop-web-1"])["state"], "stopped");

    // The current one: it starts, and droverd records which member it is.
    let (code, body) = fenced_start(&d, "shop-web-1", token);
    assert_eq!(code, 200, "{body}\n{}", drover_e2e::tail(&d.log(), 20));
    let v = d.json(&["vm", "show", "shop-web-1"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["fence"]["token"], token, "{v}");

    // The controller places the member on h2: this host stops its copy by itself.
    etcd.assign("h2");
    wait_for(
        "the copy here to be stopped",
        Duration::from_secs(20),
        || (d.json(&["vm", "show", "shop-web-1"])["state"] == "stopped").then_some(()),
    );
    assert!(
        d.log().contains("assigned elsewhere"),
        "{}",
        drover_e2e::tail(&d.log(), 20)
    );
    // ... and an operator cannot start it here again while it is assigned elsewhere.
    let e = d.fails(4, &["vm", "start", "shop-web-1"]);
    assert!(e.contains("not assigned to this host"), "{e}");
    // A VM that is not the cluster's is not touched by any of this.
    d.ok(&["vm", "create", "mine", "--memory", "128M"]);
    d.ok(&["vm", "start", "mine", "--wait"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.json(&["vm", "show", "mine"])["state"], "running");
    d.ok(&["vm", "stop", "mine", "--force"]);
}

#[test]
fn a_killed_droverds_members_die_before_its_lease_can_expire_and_other_vms_run_on() {
    let etcd = Etcd::start();
    let (mut d, _cfg) = cluster_daemon(&etcd);
    d.ok(&["vm", "create", "shop-web-1", "--memory", "128M"]);
    d.ok(&["vm", "create", "mine", "--memory", "128M"]);
    let token = etcd.assign("h1");
    let (code, body) = fenced_start(&d, "shop-web-1", token);
    assert_eq!(code, 200, "{body}\n{}", drover_e2e::tail(&d.log(), 20));
    d.ok(&["vm", "start", "mine"]);
    let member = d.json(&["vm", "show", "shop-web-1"])["pid"]
        .as_i64()
        .expect("pid");
    let mine = d.json(&["vm", "show", "mine"])["pid"]
        .as_i64()
        .expect("pid");
    let watchdog_log = d.state_dir().join("fence-watchdog.log");
    wait_for("the fence watchdog", Duration::from_secs(10), || {
        std::fs::read_to_string(&watchdog_log)
            .ok()
            .filter(|l| l.contains("running"))
    });
    // The host is alive in etcd until its lease expires: nobody renews it once droverd is gone.
    let alive = || {
        etcd.ctl(&["get", "/drover/alive/h1", "--print-value-only"])
            .is_some_and(|v| !v.trim().is_empty())
    };
    assert!(alive(), "h1 is alive in etcd");

    d.kill9();
    let killed = Instant::now();
    let (mut member_gone, mut lease_gone) = (None, None);
    while killed.elapsed() < Duration::from_secs(15) && lease_gone.is_none() {
        if member_gone.is_none() && !runs(member) {
            member_gone = Some(killed.elapsed());
        }
        if !alive() {
            lease_gone = Some(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (Some(member_gone), Some(lease_gone)) = (member_gone, lease_gone) else {
        panic!(
            "after droverd's kill: member gone {member_gone:?}, lease gone {lease_gone:?}\n{}",
            std::fs::read_to_string(&watchdog_log).unwrap_or_default()
        );
    };
    eprintln!(
        "after droverd's kill -9: member dead at {member_gone:?}, lease expired at {lease_gone:?}"
    );
    // Before the controller can see the host down, its member is dead: never two copies.
    assert!(
        member_gone < lease_gone,
        "member died {member_gone:?} after the kill, the lease expired at {lease_gone:?}"
    );
    assert!(
        std::fs::read_to_string(&watchdog_log)
            .unwrap_or_default()
            .contains("killing member shop-web-1"),
        "the watchdog says what it did"
    );
    // A VM that is not the cluster's runs on without droverd, as every VM does.
    assert!(runs(mine), "VM mine was killed too");

    // droverd comes back into the same truth: the member stopped, mine re-adopted.
    d.spawn();
    assert_eq!(d.json(&["vm", "show", "shop-web-1"])["state"], "stopped");
    assert_eq!(d.json(&["vm", "show", "mine"])["state"], "running");
    d.ok(&["vm", "stop", "mine", "--force"]);
}
