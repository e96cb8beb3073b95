//! The API document and the event stream as a client meets them: real answers of a droverd
//! running a real guest validate against the document it serves (errors included), and
//! `drover events --follow` sees a VM's life in order, with a viewer token, while a revoked
//! token is refused.

use drover_e2e::{bin_dir, tail, Daemon};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../../crates/drover-host/src/openapi_check.rs"]
#[allow(dead_code)]
mod openapi_check;

/// One HTTP/1.0 request on droverd's unix socket: the status and the body.
fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Vec<u8>) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to droverd");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: droverd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    (status, out[split + 4..].to_vec())
}

#[test]
fn recorded_answers_validate_against_the_served_document() {
    let d = Daemon::start();
    let sock = d.socket();
    let (status, doc) = call(&sock, "GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&doc).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");

    d.ok(&[
        "vm",
        "create",
        "doc1",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", "doc1", "--wait"]);
    d.ok(&["snapshot", "create", "doc1", "--name", "s1"]);
    let exec = json!({"argv": ["sh", "-c", "echo hi"]});
    let bad_create = json!({"name": "doc2", "memory": 5});
    // (method, path as sent, route as documented, body, status expected)
    let calls: Vec<(&str, &str, &str, Option<&Value>, u16)> = vec![
        ("GET", "/v1/host", "/v1/host", None, 200),
        ("GET", "/v1/vms", "/v1/vms", None, 200),
        ("GET", "/v1/vms/doc1", "/v1/vms/{name}", None, 200),
        (
            "GET",
            "/v1/vms/doc1/agent?wait_s=60",
            "/v1/vms/{name}/agent",
            None,
            200,
        ),
        (
            "POST",
            "/v1/vms/doc1/exec",
            "/v1/vms/{name}/exec",
            Some(&exec),
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/states",
            "/v1/vms/{name}/states",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/states/s1",
            "/v1/vms/{name}/states/{state}",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/config",
            "/v1/vms/{name}/config",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/config/0",
            "/v1/vms/{name}/config/{gen}",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/journal",
            "/v1/vms/{name}/journal",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/audit",
            "/v1/vms/{name}/audit",
            None,
            200,
        ),
        (
            "GET",
            "/v1/vms/doc1/guest-access",
            "/v1/vms/{name}/guest-access",
            None,
            200,
        ),
        ("GET", "/v1/image", "/v1/image", None, 200),
        ("GET", "/v1/auth/roles", "/v1/auth/roles", None, 200),
        ("GET", "/v1/vms/nosuch", "/v1/vms/{name}", None, 404),
        (
            "GET",
            "/v1/vms/doc1/states/nosuch",
            "/v1/vms/{name}/states/{state}",
            None,
            404,
        ),
        (
            "POST",
            "/v1/vms/doc1/start",
            "/v1/vms/{name}/start",
            None,
            409,
        ),
        ("POST", "/v1/vms", "/v1/vms", Some(&bad_create), 400),
        (
            "GET",
            "/v1/vms/doc1/config/diff?from=x",
            "/v1/vms/{name}/config/diff",
            None,
            400,
        ),
    ];
    for (method, path, route, body, want) in calls {
        let (status, bytes) = call(&sock, method, path, body);
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(status, want, "{method} {path}: {answer}");
        openapi_check::validate(&doc, method, route, status, &answer).unwrap_or_else(|e| {
            panic!("{method} {path} ({status}) does not match the document: {e}")
        });
    }
    // A running VM's answer has the fields a stopped one lacks (pid, agent, running_config):
    // they are in the document too.
    let (_, vm) = call(&sock, "GET", "/v1/vms/doc1", None);
    let vm: Value = serde_json::from_slice(&vm).expect("json");
    assert!(vm["pid"].is_u64() && vm["agent"]["ready"] == true, "{vm}");
    // The same answer with a field renamed is refused: the check is not vacuous.
    let mut renamed = vm.clone();
    let obj = renamed.as_object_mut().expect("an object");
    let pid = obj.remove("pid").expect("pid");
    obj.insert("qemu_pid".into(), pid);
    assert!(openapi_check::validate(&doc, "GET", "/v1/vms/{name}", 200, &renamed).is_err());
    d.ok(&["vm", "stop", "doc1", "--force"]);
}

/// Lines of a running `drover events --follow`, read on a thread.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Follower {
        let mut child = Command::new(bin_dir().join("drover"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run drover events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The events until one of `last` kind arrives (or the timeout).
    fn until(&self, last: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let e: Value = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"));
            let done = e["kind"] == last;
            got.push(e);
            if done {
                break;
            }
        }
        got
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_follow_a_vms_life_in_order_for_a_viewer() {
    let port = drover_e2e::free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--listen", &listen]);
    let cfg = d.dir.path().join("cfg");
    let cert = d.state_dir().join("tls/cert.pem");
    let token_file = |name: &str| {
        let t = d.ok(&[
            "auth", "token", "create", "--role", "viewer", "--name", name,
        ]);
        let f = d.dir.path().join(format!("{name}.token"));
        std::fs::write(&f, t.trim()).expect("token file");
        f
    };
    let remote = |name: &str, token: &Path| {
        let out = Command::new(bin_dir().join("drover"))
            .args(["remote", "add", name, &format!("https://{listen}")])
            .arg("--token-file")
            .arg(token)
            .arg("--ca-file")
            .arg(&cert)
            .arg("--no-check")
            .env("DROVER_CONFIG_DIR", &cfg)
            .output()
            .expect("remote add");
        assert!(out.status.success(), "{out:?}");
    };
    remote("viewer", &token_file("viewer"));
    remote("gone", &token_file("gone"));
    d.ok(&["auth", "token", "revoke", "gone"]);

    // A token that is no longer any role's: refused (exit 8), nothing streamed.
    let out = Command::new(bin_dir().join("drover"))
        .args(["--remote", "gone", "events", "--follow"])
        .env("DROVER_CONFIG_DIR", &cfg)
        .output()
        .expect("drover events");
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    assert!(out.stdout.is_empty());

    let follow = Follower::start(
        &["--remote", "viewer", "events", "--follow", "--vm", "ev1"],
        &[("DROVER_CONFIG_DIR", &cfg)],
    );
    // Another VM's events are filtered out of this follower.
    let all = Follower::start(&["events", "--follow"], &[("DROVER_SOCKET", &d.socket())]);
    // Give both streams a moment to be open before anything happens.
    std::thread::sleep(Duration::from_millis(500));
    d.ok(&["vm", "create", "other", "--memory", "128M"]);
    d.ok(&["vm", "create", "ev1", "--memory", "256M"]);
    d.ok(&["vm", "start", "ev1", "--wait"]);
    d.ok(&["snapshot", "create", "ev1", "--name", "before"]);
    d.ok(&["snapshot", "restore", "ev1", "before"]);
    d.ok(&["vm", "hibernate", "ev1"]);
    d.ok(&["vm", "resume", "ev1"]);
    d.ok(&["vm", "stop", "ev1"]);
    // QEMU killed behind droverd's back: the VM exited by itself.
    d.ok(&["vm", "start", "ev1"]);
    let pid = d.json(&["vm", "show", "ev1"])["pid"]
        .as_i64()
        .expect("a pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let mut got = follow.until("exited", Duration::from_secs(60));
    d.ok(&["vm", "delete", "ev1"]);
    got.extend(follow.until("deleted", Duration::from_secs(60)));
    let kinds: Vec<&str> = got
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "started",
            "state-saved",
            // A restore replaces the running QEMU: it stops, then runs from the state.
            "stopped",
            "restored",
            // A hibernation saves, stops, and is recorded hibernated.
            "state-saved",
            "stopped",
            "hibernated",
            "resumed",
            "stopped",
            "started",
            "exited",
            "deleted"
        ],
        "{got:?}\ndaemon log:\n{}",
        tail(&d.log(), 30)
    );
    assert!(got.iter().all(|e| e["vm"] == "ev1"), "{got:?}");
    assert!(got
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    assert_eq!(got[2]["details"]["name"], "before");
    assert_eq!(got[4]["details"]["state"], "before");
    assert_eq!(got[9]["details"]["reason"], "operator-stop");
    assert_eq!(got[11]["details"]["reason"], "crashed", "{got:?}");
    let everything = all.until("deleted", Duration::from_secs(30));
    assert_eq!(everything[0]["vm"], "other", "{everything:?}");
    assert_eq!(everything.len(), got.len() + 1, "{everything:?}");

    // Without --follow: the recent events, then it exits.
    let recent = d.ok(&["events", "--vm", "ev1"]);
    let recent: Vec<Value> = recent
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(recent, got);
    // Catching up from a seq gives what came after it.
    let since = got[got.len() - 3]["seq"].to_string();
    let after = d.ok(&["events", "--since", &since]);
    assert_eq!(after.lines().count(), 2, "{after}");
}

/// A migration is an event on both hosts: `migrated` with `direction` out on the source and in
/// on the destination, naming the other host.
#[test]
fn a_migration_is_an_event_on_both_hosts() {
    let Some(f) = drover_e2e::Fleet::up("oapi", "10.97.0", 2, &[]) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    h1.ok(&["vm", "create", "mig1", "--memory", "128M"]);
    h1.ok(&["vm", "migrate", "mig1", "--to", &f.remote(2), "--offline"]);
    let events = |h: &drover_e2e::Cli| -> Vec<Value> {
        h.ok(&["events", "--vm", "mig1"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let (out, arrived) = (events(&h1), events(&h2));
    let migrated = |list: &[Value]| {
        list.iter()
            .find(|e| e["kind"] == "migrated")
            .cloned()
            .unwrap_or_else(|| panic!("no migrated event: {list:?}"))
    };
    let (o, i) = (migrated(&out), migrated(&arrived));
    assert_eq!(o["details"]["direction"], "out", "{o}");
    assert_eq!(i["details"]["direction"], "in", "{i}");
    assert_eq!(
        o["details"]["id"], i["details"]["id"],
        "one migration: {o} {i}"
    );
    assert_eq!(out[0]["kind"], "created", "{out:?}");
}
