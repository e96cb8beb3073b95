//! droverd on TCP (TLS + bearer tokens) and the CLI's named remotes, as a user meets them. No VM
//! is booted: everything here is about who gets in.

use drover_e2e::{bin_dir, workspace, Daemon};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A droverd listening on 127.0.0.1 at a free port, and a private CLI config dir.
struct Remote {
    d: Daemon,
    url: String,
    cfg: PathBuf,
}

impl Remote {
    fn start() -> Remote {
        // Ask the kernel for a free port, then hand it to droverd (a tiny race, fine for tests).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let d = Daemon::start_with(&["--listen", &listen]);
        let cfg = d.dir.path().join("cfg");
        Remote {
            url: format!("https://{listen}"),
            d,
            cfg,
        }
    }

    fn tls(&self, f: &str) -> PathBuf {
        self.d.state_dir().join("tls").join(f)
    }

    /// The CLI with this test's remotes file and no usable local socket, so nothing can pass by
    /// accident through the unix socket.
    fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bin_dir().join("drover"))
            .args(args)
            .env("DROVER_CONFIG_DIR", &self.cfg)
            .env("DROVER_SOCKET", "/nonexistent/drover.sock")
            .env_remove("DROVER_REMOTE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run drover")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args, &[]);
        assert!(
            out.status.success(),
            "drover {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.cli(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "drover {args:?}: expected exit {code}; stdout: {} stderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    fn add(&self, name: &str, token: Option<&Path>, ca: &Path, check: bool) -> Output {
        let ca = ca.display().to_string();
        let token = token.map(|t| t.display().to_string());
        let mut a = vec!["remote", "add", name, &self.url, "--ca-file", &ca];
        if let Some(t) = &token {
            a.extend(["--token-file", t]);
        }
        if !check {
            a.push("--no-check");
        }
        self.cli(&a, &[])
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

#[test]
fn remote_with_tokens_roles_and_tls_trust() {
    let r = Remote::start();
    let admin = r.tls("admin.token");
    let cert = r.tls("cert.pem");
    let log = r.d.log();
    assert!(
        log.contains("admin.token"),
        "droverd logs the admin token's path:\n{log}"
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&admin), 0o600);
    assert_eq!(mode(&r.tls("key.pem")), 0o600);

    // Add with the admin token: checked over TLS, then any command goes there.
    let out = r.add("h", Some(&admin), &cert, true);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&r.cfg.join("remotes.toml")), 0o600);
    let host = json(&r.ok(&["--remote", "h", "-o", "json", "host", "info"]));
    assert!(host["daemon_version"].is_string(), "{host}");
    // The environment variable works as the flag does.
    let out = r.cli(&["vm", "list"], &[("DROVER_REMOTE", "h")]);
    assert!(out.status.success(), "{out:?}");
    let list = json(&r.ok(&["-o", "json", "remote", "list"]));
    assert_eq!(list[0]["name"], "h");
    assert_eq!(list[0]["url"], r.url.as_str());
    // The token is not shown.
    let token = std::fs::read_to_string(&admin).expect("token");
    assert!(!r.ok(&["remote", "list"]).contains(token.trim()));

    // No token: refused, exit 8, the message says what is missing.
    assert!(r.add("anon", None, &cert, true).status.code() == Some(8));
    assert!(r.add("anon", None, &cert, false).status.success());
    let err = r.fails(8, &["--remote", "anon", "host", "info"]);
    assert!(err.contains("needs a bearer token"), "{err}");
    // A wrong token: refused the same way, and the JSON error carries the code.
    let bad = r.d.dir.path().join("bad.token");
    std::fs::write(&bad, "drv_not-a-real-token\n").expect("write");
    assert!(r.add("bad", Some(&bad), &cert, false).status.success());
    let err = r.fails(8, &["--remote", "bad", "vm", "list"]);
    assert!(err.contains("does not know the bearer token"), "{err}");
    let out = r.cli(&["--remote", "bad", "-o", "json", "vm", "list"], &[]);
    assert_eq!(out.status.code(), Some(8));
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout))["error"]["code"],
        "unauthenticated"
    );

    // A viewer token (made by an admin over TCP) reads but cannot create a VM.
    let viewer = json(&r.ok(&[
        "--remote", "h", "-o", "json", "auth", "token", "create", "--role", "viewer", "--name",
        "watcher",
    ]));
    let vt = r.d.dir.path().join("viewer.token");
    std::fs::write(&vt, viewer["token"].as_str().expect("token")).expect("write");
    assert!(r.add("v", Some(&vt), &cert, true).status.success());
    r.ok(&["--remote", "v", "vm", "list"]);
    let err = r.fails(8, &["--remote", "v", "vm", "create", "nope"]);
    assert!(
        err.contains("token watcher") && err.contains("vm.lifecycle"),
        "{err}"
    );
    // Nor manage tokens.
    r.fails(8, &["--remote", "v", "auth", "token", "list"]);
    // The token file keeps only hashes.
    let tokens = std::fs::read_to_string(r.d.state_dir().join("tokens")).expect("tokens");
    assert!(
        tokens.contains("watcher") && !tokens.contains(viewer["token"].as_str().unwrap_or("?"))
    );
    // Revoked: refused from the next request on (through the local socket, as root).
    let listed = r.d.json(&["auth", "token", "list"]);
    assert_eq!(listed.as_array().map(|a| a.len()), Some(2), "{listed}");
    r.d.ok(&["auth", "token", "revoke", "watcher"]);
    let err = r.fails(8, &["--remote", "v", "vm", "list"]);
    assert!(err.contains("does not know"), "{err}");

    // A CA file that is not the server's certificate: TLS refuses, exit 5, says what to check.
    let other = Daemon::start_with(&["--listen", "127.0.0.1:0"]);
    let wrong_ca = other.state_dir().join("tls/cert.pem");
    let out = r.add("wrongca", Some(&admin), &wrong_ca, true);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate is not trusted") && err.contains("--ca-file"),
        "{err}"
    );
    assert!(r
        .add("wrongca", Some(&admin), &wrong_ca, false)
        .status
        .success());
    r.fails(5, &["--remote", "wrongca", "host", "info"]);
    drop(other);

    // Unknown remote: exit 2, the known ones listed.
    let err = r.fails(2, &["--remote", "nope", "vm", "list"]);
    assert!(
        err.contains("unknown remote \"nope\"") && err.contains("h, "),
        "{err}"
    );
    // Remove, then it is unknown.
    r.ok(&["remote", "remove", "bad"]);
    r.fails(2, &["--remote", "bad", "vm", "list"]);
    // Name taken without --replace.
    assert_eq!(
        r.add("h", Some(&admin), &cert, false).status.code(),
        Some(1)
    );

    // A restart keeps the certificate and makes no new admin token.
    let cert_before = std::fs::read(&cert).expect("cert");
    let mut d = r.d;
    d.kill9();
    d.spawn();
    assert_eq!(std::fs::read(&cert).expect("cert"), cert_before);
    assert_eq!(std::fs::read_to_string(&admin).expect("token"), token);
    let r = Remote {
        d,
        url: r.url,
        cfg: r.cfg,
    };
    r.ok(&["--remote", "h", "host", "info"]);
    // Unreachable once it is gone: exit 5.
    let mut d = r.d;
    d.kill9();
    let r = Remote {
        d,
        url: r.url,
        cfg: r.cfg,
    };
    let err = r.fails(5, &["--remote", "h", "host", "info"]);
    assert!(err.contains("cannot reach droverd at https://"), "{err}");
}

#[test]
fn operator_token_runs_vms_but_not_persistence() {
    let r = Remote::start();
    let op = r.d.dir.path().join("op.token");
    // `auth token create` prints only the token on stdout, for `> file`.
    let t = r.d.ok(&["auth", "token", "create", "--role", "operator"]);
    assert!(t.trim().starts_with("drv_"), "{t}");
    std::fs::write(&op, t).expect("write");
    assert!(r
        .add("op", Some(&op), &r.tls("cert.pem"), true)
        .status
        .success());
    // Creating a VM boots nothing.
    r.ok(&["--remote", "op", "vm", "create", "remote1"]);
    let v = json(&r.ok(&["--remote", "op", "-o", "json", "vm", "show", "remote1"]));
    assert_eq!(v["state"], "stopped");
    let err = r.fails(
        8,
        &[
            "--remote", "op", "vm", "config", "persist", "remote1", "off",
        ],
    );
    assert!(err.contains("config.persist"), "{err}");
    r.ok(&["--remote", "op", "vm", "delete", "remote1"]);

    // Without a CA file the CLI insists on an explicit trust-on-first-use, then pins what the
    // server presents and prints the fingerprint droverd logs.
    let opf = op.display().to_string();
    let err = r.fails(2, &["remote", "add", "tofu", &r.url, "--token-file", &opf]);
    assert!(err.contains("--ca-file"), "{err}");
    let out = r.cli(
        &[
            "remote",
            "add",
            "tofu",
            &r.url,
            "--token-file",
            &opf,
            "--trust-first-use",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    let fp = said
        .split("SHA-256 ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .unwrap_or_else(|| panic!("no fingerprint in {said}"));
    assert!(
        r.d.log().contains(&format!("sha256={fp}")),
        "{fp} not in the log"
    );
    r.ok(&["--remote", "tofu", "vm", "list"]);
}

/// `scripts/netns-hosts.sh up 2`: two droverd's in their own network namespaces, registered as
/// remotes and answering over the veth; `down` leaves no namespace. Needs root and iproute2.
#[test]
fn netns_hosts_answer_over_veth() {
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    if !nix::unistd::geteuid().is_root() || !has_ip {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("drv-ns-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let script = workspace().join("scripts/netns-hosts.sh");
    let run = |args: &[&str]| {
        let out = Command::new(&script)
            .args(args)
            .env("DROVER_BIN_DIR", bin_dir())
            .env("DROVER_NETNS_ROOT", tmp.path())
            .env("DROVER_CONFIG_DIR", tmp.path().join("cfg"))
            .env("DROVER_IMAGE_DIR", drover_e2e::image_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run netns-hosts.sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let namespaces = || {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("drover-h"))
            .count()
    };
    let (ok, out) = run(&["up", "2"]);
    // Tear down whatever happened before asserting, so a failure leaves nothing behind.
    let host = Command::new(bin_dir().join("drover"))
        .args(["--remote", "h2", "-o", "json", "host", "info"])
        .env("DROVER_CONFIG_DIR", tmp.path().join("cfg"))
        .output()
        .expect("drover");
    let from_h1 = Command::new("ip")
        .args(["netns", "exec", "drover-h1"])
        .arg(bin_dir().join("drover"))
        .args(["--remote", "h2", "vm", "list"])
        .env("DROVER_CONFIG_DIR", tmp.path().join("cfg"))
        .output()
        .expect("drover in h1");
    let (down_ok, down_out) = run(&["down", "--purge"]);
    let (again_ok, _) = run(&["down"]);
    assert!(ok, "up 2 failed:\n{out}");
    assert!(
        out.contains("https://10.77.0.12:7443") && out.contains("/run/drover/h2.sock"),
        "{out}"
    );
    assert!(host.status.success(), "{host:?}");
    let h = json(&String::from_utf8_lossy(&host.stdout));
    assert!(h["daemon_version"].is_string(), "{h}");
    if let Some(id) = h.get("identity").and_then(|i| i.get("id")) {
        assert_eq!(id, "h2", "{h}");
    }
    assert!(from_h1.status.success(), "h1 reaches h2: {from_h1:?}");
    assert!(down_ok, "down failed:\n{down_out}");
    assert!(again_ok, "down is idempotent");
    assert_eq!(namespaces(), 0, "down left namespaces");
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("drover-br0") && !links.contains("drv-h"),
        "{links}"
    );
}
