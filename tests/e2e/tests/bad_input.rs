//! Bad input gets a clear error, a distinct exit code, and changes nothing.

use drover_e2e::Daemon;

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let d = Daemon::start();
    d.ok(&["vm", "create", "ok1"]);

    // Invalid names and shapes.
    assert!(d
        .fails(1, &["vm", "create", "Bad_Name"])
        .contains("invalid VM name"));
    assert!(d
        .fails(1, &["vm", "create", "x", "--cpus", "0"])
        .contains("invalid vCPU count 0"));
    assert!(d
        .fails(1, &["vm", "create", "x", "--memory", "1M"])
        .contains("invalid memory"));
    assert!(d
        .fails(1, &["vm", "create", "x", "--memory", "lots"])
        .contains("invalid size"));
    // More than the host can give: exit 7.
    assert!(d
        .fails(7, &["vm", "create", "x", "--cpus", "200"])
        .contains("this host has"));
    assert!(d
        .fails(7, &["vm", "create", "x", "--memory", "100T"])
        .contains("this host has"));
    // Duplicate name: exit 4.
    assert!(d
        .fails(4, &["vm", "create", "ok1"])
        .contains("already exists"));
    // Missing and corrupt disk images.
    assert!(d
        .fails(
            1,
            &[
                "vm",
                "create",
                "x",
                "--disk",
                "image=/nonexistent/disk.qcow2"
            ]
        )
        .contains("does not exist"));
    let corrupt = d.dir.path().join("corrupt.qcow2");
    std::fs::write(&corrupt, b"QFI\xfbthis is not really a qcow2 image").expect("write");
    let err = d.fails(
        1,
        &[
            "vm",
            "create",
            "x",
            "--disk",
            &format!("image={}", corrupt.display()),
        ],
    );
    assert!(err.contains("not usable"), "{err}");
    assert!(d
        .fails(
            1,
            &[
                "vm",
                "create",
                "x",
                "--disk",
                "size=1G,id=a",
                "--disk",
                "size=1G,id=a"
            ]
        )
        .contains("duplicate id"));
    assert!(d
        .fails(
            1,
            &["vm", "create", "x", "--nic", "user,forward=tcp:99999-:22"]
        )
        .contains("invalid port forward"));
    assert!(d
        .fails(
            1,
            &["vm", "create", "x", "--kernel", "/nonexistent/vmlinux"]
        )
        .contains("does not exist"));
    // A TOML file with an unknown field.
    let toml = d.dir.path().join("vm.toml");
    std::fs::write(&toml, "name = \"t1\"\nmemroy = \"1G\"\n").expect("write");
    assert!(d
        .fails(1, &["vm", "create", "--file", &toml.display().to_string()])
        .contains("unknown field"));

    // Nothing was created by any of that, and no disk was left behind.
    let list = d.json(&["vm", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["ok1"]);
    let vms_dir: Vec<_> = std::fs::read_dir(d.state_dir().join("vms"))
        .expect("vms dir")
        .collect();
    assert_eq!(vms_dir.len(), 1);

    // Unknown VM: exit 3. Wrong state: exit 4.
    assert!(d
        .fails(3, &["vm", "show", "nope"])
        .contains("does not exist"));
    assert!(d
        .fails(3, &["vm", "start", "nope"])
        .contains("does not exist"));
    assert!(d.fails(4, &["vm", "stop", "ok1"]).contains("not running"));
    assert!(d
        .fails(4, &["vm", "exec", "ok1", "--", "true"])
        .contains("not running"));

    // JSON errors carry a stable code.
    let out = d.drover(&["--output", "json", "vm", "show", "nope"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json error");
    assert_eq!(v["error"]["code"], "not_found");

    // Usage errors are clap's exit code 2.
    assert_eq!(d.drover(&["vm", "frobnicate"]).status.code(), Some(2));
}

#[test]
fn cli_without_daemon_says_how_to_start_it() {
    let out = std::process::Command::new(drover_e2e::bin_dir().join("drover"))
        .args(["vm", "list"])
        .env("DROVER_SOCKET", "/tmp/drover-no-such-daemon.sock")
        .output()
        .expect("run drover");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach droverd") && err.contains("droverd --socket"),
        "{err}"
    );
}

#[test]
fn second_daemon_on_same_state_dir_or_socket_is_refused() {
    let d = Daemon::start();
    let out = std::process::Command::new(drover_e2e::bin_dir().join("droverd"))
        .arg("--state-dir")
        .arg(d.state_dir())
        .arg("--socket")
        .arg(d.dir.path().join("other.sock"))
        .output()
        .expect("run droverd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    let out = std::process::Command::new(drover_e2e::bin_dir().join("droverd"))
        .arg("--state-dir")
        .arg(d.dir.path().join("other-state"))
        .arg("--socket")
        .arg(d.socket())
        .output()
        .expect("run droverd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first daemon is unharmed.
    d.ok(&["vm", "list"]);
}
