//! QEMU 7.2 and 10.0 side by side: what droverd probes and pins, and VMs moving between hosts
//! that run different QEMU versions (7.2 → 10.0 works with the machine type pinned; 10.0 → 7.2
//! is refused before anything changes).

use drover_e2e::{qemu10_dir, wait_for, Cli, Daemon, Fleet};
use std::time::Duration;

/// The QEMU command line of a running VM, from its pid.
fn qemu_cmdline(h: &Cli, vm: &str) -> String {
    let v = h.json(&["vm", "show", vm]);
    let pid = v["pid"].as_u64().expect("a running VM has a pid");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Wait until the VM's agent runs commands again (after a restore).
fn agent_answers(h: &Cli, vm: &str) {
    wait_for("the agent after a restore", Duration::from_secs(60), || {
        h.drover(&["vm", "exec", vm, "--", "true"])
            .status
            .success()
            .then_some(())
    });
}

#[test]
fn droverd_probes_its_qemu_and_pins_new_vms_to_what_it_found() {
    let d = Daemon::start();
    let host = d.json(&["host", "info"]);
    let q = &host["qemu"];
    let version = q["version"]
        .as_str()
        .expect("host info has the probe")
        .to_string();
    let machine = q["machine_aliases"]["q35"]
        .as_str()
        .expect("q35 resolves")
        .to_string();
    // `q35` means pc-q35-<major>.<minor> of the QEMU that runs.
    let release: Vec<&str> = version.split('.').take(2).collect();
    assert_eq!(machine, format!("pc-q35-{}", release.join(".")), "{q}");
    assert!(
        q["machines"].as_array().is_some_and(|m| m.len() > 10),
        "{q}"
    );
    assert!(
        q["cpu_models"]
            .as_array()
            .is_some_and(|c| c.iter().any(|m| m == "Westmere")),
        "{q}"
    );
    assert!(q["qmp_commands"].as_u64().unwrap_or(0) > 100, "{q}");
    let major: u32 = release[0].parse().unwrap_or(0);
    assert_eq!(q["new_vm_platform"]["ram_pad"], major < 9, "{q}");
    let text = d.ok(&["host", "info"]);
    assert!(text.contains(&format!("q35 = {machine}")), "{text}");

    d.ok(&["vm", "create", "pin", "--memory", "256M"]);
    let v = d.json(&["vm", "show", "pin"]);
    assert_eq!(v["platform"]["machine"], machine.as_str(), "{v}");
    assert_eq!(v["platform"]["cpu"], "Westmere", "{v}");
    d.ok(&["vm", "start", "pin", "--wait"]);
    let cmd = qemu_cmdline(&d.cli(), "pin");
    assert!(
        cmd.contains(&format!("-machine {machine} ")) && cmd.contains("-cpu Westmere "),
        "{cmd}"
    );
    // The guest sees the named model, not the emulator's `max`.
    let cpuinfo = d.sh("pin", "grep -m1 'model name' /proc/cpuinfo");
    assert!(cpuinfo.contains("Westmere"), "{cpuinfo}");
    let ram = d.sh("pin", "grep MemTotal /proc/meminfo");
    assert!(!ram.is_empty());

    // A fast save answers and the guest runs on (QEMU >= 9 leaves the VM paused after a
    // background snapshot unless Drover resumes it), and the state restores.
    d.sh("pin", "echo one > /run/mark");
    d.ok(&["snapshot", "create", "pin", "--name", "s1"]);
    assert_eq!(d.sh("pin", "echo running").trim(), "running");
    d.sh("pin", "echo two > /run/mark");
    wait_for("state s1 ready", Duration::from_secs(60), || {
        let s = d.json(&["snapshot", "show", "pin", "s1"]);
        matches!(s["phase"].as_str(), Some("ready" | "durable")).then_some(())
    });
    let s = d.json(&["snapshot", "show", "pin", "s1"]);
    assert_eq!(s["saved_on"]["machine"], machine.as_str(), "{s}");
    assert_eq!(s["saved_on"]["qemu_version"], version.as_str(), "{s}");
    d.ok(&["snapshot", "restore", "pin", "s1"]);
    agent_answers(&d.cli(), "pin");
    assert_eq!(d.sh("pin", "cat /run/mark").trim(), "one");
    d.ok(&["vm", "stop", "pin", "--force"]);
}

#[test]
fn a_vm_moves_from_qemu_7_2_to_10_and_not_back() {
    if drover_e2e::qemu_dir().is_some() {
        // Each host's QEMU is set here; the pass with every droverd on QEMU 10 would repeat it.
        eprintln!("skipped: runs in the pass on the system's QEMU");
        return;
    }
    let Some(q10) = qemu10_dir() else {
        eprintln!("skipped: no QEMU 10 installation (scripts/install-deps.sh --qemu-prefix target/qemu-10)");
        return;
    };
    let q10 = q10.display().to_string();
    let Some(f) = Fleet::up(
        "qv",
        "10.89.0",
        2,
        &[
            ("DROVER_NETNS_QEMU_DIR_1", "system"),
            ("DROVER_NETNS_QEMU_DIR_2", &q10),
        ],
    ) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    let v1 = h1.json(&["host", "info"])["qemu"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let v2 = h2.json(&["host", "info"])["qemu"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !v1.starts_with("7.") {
        eprintln!("skipped: the system QEMU is {v1}, not 7.2");
        return;
    }
    assert!(v2.starts_with("10."), "host 2 runs {v2}");

    // 7.2 → 10.0: pinned to pc-q35-7.2, the VM keeps running, memory and all.
    h1.ok(&["vm", "create", "up", "--memory", "256M"]);
    h1.ok(&["vm", "start", "up", "--wait"]);
    h1.sh(
        "up",
        "touch /run/go; (i=0; while [ -f /run/go ]; do i=$((i+1)); echo $i > /run/c.t; \
         mv /run/c.t /run/c; done) >/dev/null 2>&1 & sleep 0.3",
    );
    let boot_id = h1.sh("up", "cat /proc/sys/kernel/random/boot_id");
    h1.sh("up", "echo saved-on-7.2 > /run/mark");
    h1.ok(&["snapshot", "create", "up", "--name", "on72"]);
    h1.sh("up", "echo after > /run/mark");
    let r = h1.json(&["vm", "migrate", "up", "--to", &f.remote(2)]);
    assert_eq!(r["to"].as_str(), Some("qv2"), "{r}");
    let cmd = qemu_cmdline(&h2, "up");
    assert!(
        cmd.contains("/usr/bin/qemu-system-x86_64") && cmd.contains(&q10),
        "host 2 runs it on its own QEMU: {cmd}"
    );
    assert!(cmd.contains("-machine pc-q35-7.2 "), "{cmd}");
    assert_eq!(h2.sh("up", "cat /proc/sys/kernel/random/boot_id"), boot_id);
    assert_eq!(h2.sh("up", "cat /run/mark").trim(), "after");
    let c1: u64 = h2.sh("up", "cat /run/c").trim().parse().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    let c2: u64 = h2.sh("up", "cat /run/c").trim().parse().unwrap_or(0);
    assert!(
        c2 > c1 && c1 > 0,
        "the guest runs on QEMU 10: {c1} then {c2}"
    );
    // A state saved under 7.2 restores under 10.0, and a fast save works there too.
    h2.ok(&["snapshot", "restore", "up", "on72"]);
    agent_answers(&h2, "up");
    assert_eq!(h2.sh("up", "cat /run/mark").trim(), "saved-on-7.2");
    h2.ok(&["snapshot", "create", "up", "--name", "on10"]);
    assert_eq!(h2.sh("up", "echo running").trim(), "running");

    // 10.0 → 7.2: a VM created on 10 is pinned to pc-q35-10.0, which 7.2 cannot load. Refused
    // before anything changes: it keeps running on host 2, host 1 never hears of it.
    h2.ok(&["vm", "create", "down", "--memory", "256M"]);
    h2.ok(&["vm", "start", "down", "--wait"]);
    let err = h2.fails(4, &["vm", "migrate", "down", "--to", &f.remote(1)]);
    assert!(
        err.contains("pc-q35-10.0") && err.contains("7.2"),
        "the refusal says why: {err}"
    );
    let v = h2.json(&["vm", "show", "down"]);
    assert_eq!(v["state"], "running", "{v}");
    assert!(v.get("migration").is_none(), "nothing was recorded: {v}");
    assert!(
        f.vms(1).iter().all(|(n, _)| n != "down"),
        "host 1 has no copy"
    );
    assert_eq!(h2.sh("down", "echo alive").trim(), "alive");
}
