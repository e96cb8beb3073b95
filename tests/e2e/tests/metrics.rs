//! `/metrics` as an operator meets it: a real Prometheus (Debian's `prometheus`) scrapes droverd
//! over TLS with a viewer token, and its query API answers with what the host really runs.

use drover_e2e::{free_port, wait_for, Daemon};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `prometheus` binary (`DROVER_PROMETHEUS`, else Debian's).
fn prometheus_bin() -> PathBuf {
    let bin = std::env::var_os("DROVER_PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
    assert!(
        bin.exists(),
        "{} is missing: install it with `scripts/install-deps.sh --tests` (Debian's prometheus package)",
        bin.display()
    );
    bin
}

/// A Prometheus server of this test's own (its own config, storage and port); killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, config: &str) -> Prometheus {
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).expect("prometheus config");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The values of an instant query (`/api/v1/query`), each series' labels with its value;
    /// `None` while Prometheus does not answer yet.
    fn query(&self, q: &str) -> Option<Vec<(serde_json::Value, f64)>> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let req = format!(
            "GET /api/v1/query?query={} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
            percent_encode(q)
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let body = out.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        if v["status"] != "success" {
            return None;
        }
        v["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect()
    }

    /// The one value of `q`, once Prometheus has it.
    fn value(&self, q: &str) -> Option<f64> {
        match self.query(q)?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_vm_states_and_per_vm_io_with_a_viewer_token() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--listen", &listen]);
    let token = d.ok(&[
        "auth", "token", "create", "--role", "viewer", "--name", "prom",
    ]);
    let token_file = d.dir.path().join("prometheus.token");
    std::fs::write(&token_file, token.trim()).expect("token file");
    #[rustfmt::skip]
    d.ok(&["vm", "create", "m1", "--memory", "256M", "--disk", "size=64M,id=data"]);
    d.ok(&["vm", "start", "m1", "--wait"]);

    // As the README says: a viewer token in `authorization: credentials_file`, droverd's
    // certificate as the CA. A second job without a token shows droverd refuses it; it scrapes
    // rarely, as 10 wrong tokens a minute would block the address (127.0.0.1) for both jobs.
    let ca = d.state_dir().join("tls").join("cert.pem");
    let config = format!(
        r#"global:
  # Longer than droverd's 1 s bound on a QMP call, so a scrape is never cut off.
  scrape_interval: 2s
  scrape_timeout: 2s
scrape_configs:
  - job_name: drover
    scheme: https
    tls_config:
      ca_file: {ca}
      server_name: localhost
    authorization:
      credentials_file: {token}
    static_configs:
      - targets: ["{listen}"]
  - job_name: anonymous
    scrape_interval: 20s
    scrape_timeout: 5s
    scheme: https
    tls_config:
      ca_file: {ca}
      server_name: localhost
    static_configs:
      - targets: ["{listen}"]
"#,
        ca = ca.display(),
        token = token_file.display(),
    );
    let p = Prometheus::start(&d.dir.path().join("prometheus"), &config);
    let within = Duration::from_secs(90);

    let running = wait_for("Prometheus to see 1 running VM", within, || {
        p.value(r#"drover_vms{state="running"}"#)
    });
    assert_eq!(running, 1.0, "prometheus log:\n{}", p.log());
    assert_eq!(
        p.value(r#"drover_vms{state="stopped"}"#),
        Some(0.0),
        "every state is exported, zeros included"
    );
    assert_eq!(p.value(r#"up{job="drover"}"#), Some(1.0));
    // Its own first scrape may come later in the interval.
    let anonymous = wait_for("the anonymous job's first scrape", within, || {
        p.value(r#"up{job="anonymous"}"#)
    });
    assert_eq!(anonymous, 0.0, "a scrape without a token is refused");
    let cpu = wait_for("the VM's CPU time", within, || {
        p.value(r#"drover_vm_cpu_seconds_total{vm="m1"}"#)
    });
    assert!(cpu > 0.0, "a booted guest has used CPU: {cpu}");
    let rss = wait_for("the VM's resident memory", within, || {
        p.value(r#"drover_vm_memory_resident_bytes{vm="m1"}"#)
    });
    assert!(rss > (16 << 20) as f64, "QEMU's RSS {rss}");

    // The guest writes 8 MiB to its data disk: the disk's write counter grows by as much.
    let written = r#"drover_vm_block_written_bytes_total{vm="m1",disk="data"}"#;
    let before = wait_for("the data disk's write counter", within, || p.value(written));
    let dev = d.sh(
        "m1",
        "for b in /sys/block/vd*; do [ \"$(cat $b/serial)\" = data ] && echo ${b##*/}; done",
    );
    let dev = dev.trim();
    assert!(dev.starts_with("vd"), "the data disk in the guest: {dev:?}");
    d.sh(
        "m1",
        &format!("dd if=/dev/urandom of=/dev/{dev} bs=1M count=8 conv=fsync 2>/dev/null"),
    );
    let after = wait_for("the write counter to grow by 8 MiB", within, || {
        p.value(written).filter(|v| *v >= before + (8 << 20) as f64)
    });
    assert!(after - before < (64 << 20) as f64, "{before} -> {after}");

    // An app's request, and one with a wrong secret: by op and outcome.
    #[rustfmt::skip]
    let g = d.json(&["vm", "guest-access", "grant", "m1", "--principal", "app", "--ops", "host-info"]);
    let secret = g["secret"].as_str().expect("secret");
    d.sh(
        "m1",
        &format!("DROVER_PRINCIPAL=app DROVER_SECRET={secret} drover-guest host-info >/dev/null"),
    );
    let wrong = "DROVER_PRINCIPAL=app DROVER_SECRET=wrong drover-guest host-info";
    let out = d.drover(&["vm", "exec", "m1", "--", "sh", "-c", wrong]);
    assert!(!out.status.success(), "a wrong secret is refused");
    for outcome in ["accepted", "completed", "refused"] {
        let q = format!(r#"drover_guest_requests_total{{op="host-info",outcome="{outcome}"}}"#);
        let n = wait_for(&format!("a {outcome} guest request"), within, || {
            p.value(&q)
        });
        assert_eq!(n, 1.0, "{q}");
    }

    // A save shows up in its duration histogram.
    d.ok(&["snapshot", "create", "m1", "--name", "s1"]);
    let saves = wait_for("the save in its histogram", within, || {
        p.value(r#"drover_save_duration_seconds_count{outcome="ok"}"#)
            .filter(|n| *n >= 1.0)
    });
    assert_eq!(saves, 1.0);
    d.ok(&["snapshot", "restore", "m1", "s1"]);
    let restores = wait_for("the restore in its histogram", within, || {
        p.value(r#"drover_restore_duration_seconds_count{outcome="ok"}"#)
    });
    assert_eq!(restores, 1.0);
    eprintln!(
        "seen by Prometheus: cpu {cpu:.2} s, rss {:.0} MiB, data disk written {before} -> {after} bytes, save took {:?} s, restore {:?} s",
        rss / (1 << 20) as f64,
        p.value(r#"drover_save_duration_seconds_sum{outcome="ok"}"#),
        p.value(r#"drover_restore_duration_seconds_sum{outcome="ok"}"#)
    );
    // Stopped: the state gauge follows and the VM's series end.
    d.ok(&["vm", "stop", "m1", "--force"]);
    wait_for("Prometheus to see the VM stopped", within, || {
        p.value(r#"drover_vms{state="stopped"}"#)
            .filter(|n| *n == 1.0)
    });
    wait_for("the VM's CPU series to end", within, || {
        p.query(r#"drover_vm_cpu_seconds_total{vm="m1"}"#)
            .filter(|r| r.is_empty())
    });
    // No scrape of the token's job failed meanwhile (none timed out, none refused).
    assert_eq!(
        p.value(r#"min_over_time(up{job="drover"}[10m])"#),
        Some(1.0),
        "prometheus log:\n{}",
        p.log()
    );
}
