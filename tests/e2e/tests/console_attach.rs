//! `drover vm console NAME --attach` as a user meets it: piped stdin typed into the guest's
//! serial shell, its answer on stdout, the detach key ending the session with the VM still
//! running and the log keeping what was typed; over the unix socket and a TCP remote alike, and
//! refused to a role without vm.exec. One boot of the default image.

use drover_e2e::{bin_dir, free_port, wait_for, Daemon};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Attach with `envs`, type `line`, wait for `expect` on stdout, press the detach key
/// (`detach`, a byte); returns stdout and stderr once the CLI exited 0.
fn attach(
    envs: &[(&str, &str)],
    args: &[&str],
    line: &str,
    expect: &str,
    detach: u8,
) -> (String, String) {
    let mut child = Command::new(bin_dir().join("drover"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run drover vm console --attach");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    // The shell may still be drawing its prompt: type the line until its answer comes.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    'typing: while std::time::Instant::now() < deadline {
        stdin
            .write_all(line.as_bytes())
            .expect("type into the console");
        stdin.flush().expect("flush");
        let round = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < round {
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
                seen.extend(b);
            }
            if String::from_utf8_lossy(&seen).contains(expect) {
                break 'typing;
            }
        }
    }
    let out = String::from_utf8_lossy(&seen).into_owned();
    assert!(out.contains(expect), "no {expect:?} on the console: {out}");
    stdin.write_all(&[detach]).expect("press the detach key");
    stdin.flush().expect("flush");
    let status = wait_for("the CLI to detach", Duration::from_secs(15), || {
        child.try_wait().expect("wait")
    });
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "attach exited {status}: {err}");
    // Keep stdin open until here: its end must not be what detached.
    drop(stdin);
    (out, err)
}

#[test]
fn attach_types_into_the_serial_console_and_detaches() {
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&["--listen", &listen]);
    d.ok(&["vm", "create", "con1", "--memory", "256M"]);
    d.ok(&["vm", "start", "con1", "--wait"]);
    let sock = d.socket().display().to_string();

    // Over the unix socket, with the default detach key (Ctrl-]).
    let args = ["vm", "console", "con1", "--attach"];
    let (out, err) = attach(
        &[("DROVER_SOCKET", &sock)],
        &args,
        "echo hi-$((40+2))\n",
        "hi-42",
        0x1d,
    );
    assert!(err.contains("detached"), "{err}\n{out}");
    assert_eq!(d.json(&["vm", "show", "con1"])["state"], "running");
    assert_eq!(d.sh("con1", "echo still-here").trim(), "still-here");
    let log = d.ok(&["vm", "console", "con1"]);
    assert!(log.contains("hi-42"), "the log keeps the session:\n{log}");

    // Over TCP through a named remote, with another detach key.
    let cfg = d.dir.path().join("cfg");
    let tls = d.state_dir().join("tls");
    let remote_cli = |args: &[&str]| {
        Command::new(bin_dir().join("drover"))
            .args(args)
            .env("DROVER_CONFIG_DIR", &cfg)
            .env("DROVER_SOCKET", "/nonexistent/drover.sock")
            .output()
            .expect("run drover")
    };
    let add = |name: &str, token: &Path| {
        let out = remote_cli(&[
            "remote",
            "add",
            name,
            &format!("https://{listen}"),
            "--ca-file",
            &tls.join("cert.pem").display().to_string(),
            "--token-file",
            &token.display().to_string(),
        ]);
        assert!(out.status.success(), "remote add: {out:?}");
    };
    add("h", &tls.join("admin.token"));
    let cfg_s = cfg.display().to_string();
    let envs = [
        ("DROVER_CONFIG_DIR", cfg_s.as_str()),
        ("DROVER_SOCKET", "/nonexistent/drover.sock"),
    ];
    let args = [
        "--remote",
        "h",
        "vm",
        "console",
        "con1",
        "--attach",
        "--detach-key",
        "ctrl-p",
    ];
    attach(&envs, &args, "echo tcp-$((6*7))\n", "tcp-42", 0x10);
    assert_eq!(d.json(&["vm", "show", "con1"])["state"], "running");

    // A viewer may read the console but not attach: refused with what is missing.
    let viewer = d.json(&[
        "auth", "token", "create", "--role", "viewer", "--name", "watcher",
    ]);
    let vt = d.dir.path().join("viewer.token");
    std::fs::write(&vt, viewer["token"].as_str().expect("token")).expect("write token");
    add("v", &vt);
    let out = remote_cli(&["--remote", "v", "vm", "console", "con1", "--attach"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a viewer attached: {err}");
    assert!(err.contains("vm.exec"), "{err}");
    let out = remote_cli(&["--remote", "v", "vm", "console", "con1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi-42"));

    d.ok(&["vm", "stop", "con1"]);
}
