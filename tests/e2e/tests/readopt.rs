//! droverd dies with `kill -9`; its VMs keep running; the next droverd re-adopts them and learns
//! what happened while it was away.

use drover_e2e::{wait_for, Daemon};
use std::time::Duration;

#[test]
fn kill9_then_readopt_running_and_notice_exited() {
    let mut d = Daemon::start();
    d.ok(&["vm", "create", "a", "--memory", "256M"]);
    d.ok(&["vm", "create", "b", "--memory", "256M"]);
    d.ok(&["vm", "start", "a", "--wait"]);
    d.ok(&["vm", "start", "b", "--wait"]);
    let pid_a = d.json(&["vm", "show", "a"])["pid"].as_u64().expect("pid a");
    let pid_b = d.json(&["vm", "show", "b"])["pid"].as_u64().expect("pid b");
    let boot_a = d.sh("a", "cat /proc/sys/kernel/random/boot_id");

    d.kill9();
    // While droverd is away: a's guest keeps running, b's QEMU dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_b as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill b");
    std::thread::sleep(Duration::from_millis(300));
    let err = d.fails(5, &["vm", "list"]);
    assert!(
        err.contains("Is it running?"),
        "the CLI says how to start the daemon: {err}"
    );

    d.spawn();
    let a = d.json(&["vm", "show", "a"]);
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(
        a["pid"].as_u64(),
        Some(pid_a),
        "the same QEMU, not a new one"
    );
    // The same guest boot, reached through the re-adopted guest channel.
    let st = wait_for("the agent to answer again", Duration::from_secs(20), || {
        let out = d.drover(&[
            "vm",
            "exec",
            "a",
            "--",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert_eq!(st, boot_a);
    let b = d.json(&["vm", "show", "b"]);
    assert_eq!(b["state"], "stopped", "{b}");
    assert_eq!(b["last_exit"]["reason"], "exited-while-daemon-down");
    // Exactly one QEMU: nothing orphaned, nothing started twice.
    assert_eq!(
        drover_e2e::pids_mentioning(&d.state_dir().join("run").display().to_string()).len(),
        1
    );

    // The re-adopted VM is fully managed: a guest power-off is noticed without being its parent.
    let _ = d.drover(&["vm", "exec", "a", "--timeout", "5", "--", "poweroff", "-f"]);
    let a = wait_for("a to stop", Duration::from_secs(20), || {
        let v = d.json(&["vm", "show", "a"]);
        (v["state"] == "stopped").then_some(v)
    });
    assert_eq!(a["last_exit"]["reason"], "guest-poweroff");
    // b starts again after its crash.
    d.ok(&["vm", "start", "b", "--wait"]);
    assert_ne!(d.json(&["vm", "show", "b"])["pid"].as_u64(), Some(pid_b));
}
