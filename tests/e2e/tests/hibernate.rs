//! Hibernation (issue 15, item 1): a running VM saved to disk and stopped frees its memory and
//! QEMU, stays hibernated through a droverd restart, and `vm resume` brings it back from that
//! point: the same memory (a marker and a counting process), the same disk.

use drover_e2e::{pids_mentioning, wait_for, Daemon};
use std::time::Duration;

/// The largest file below `dir` (a saved state's memory).
fn largest_file_under(dir: &std::path::Path) -> std::path::PathBuf {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                todo.push(e.path());
            } else if best.as_ref().is_none_or(|(n, _)| m.len() > *n) {
                best = Some((m.len(), e.path()));
            }
        }
    }
    best.expect("a saved state file").1
}

/// The guest's MemTotal, in KiB.
fn mem_kb(d: &Daemon, vm: &str) -> u64 {
    d.sh(vm, "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .trim()
        .parse()
        .expect("MemTotal")
}

/// Wait until the guest sees its second vCPU and the 128M DIMM added to `kb0` KiB.
fn wait_grown(d: &Daemon, vm: &str, kb0: u64) {
    wait_for("the second vCPU online", Duration::from_secs(20), || {
        (d.sh(vm, "grep -c ^processor /proc/cpuinfo").trim() == "2").then_some(())
    });
    wait_for("the new memory online", Duration::from_secs(20), || {
        (mem_kb(d, vm) >= kb0 + 120 * 1024).then_some(())
    });
}

fn counter(d: &Daemon) -> u64 {
    d.sh("h", "cat /tmp/count").trim().parse().unwrap_or(0)
}

#[test]
fn hibernate_frees_the_host_and_resume_brings_back_memory_and_disk() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "h",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", "h", "--wait"]);
    // A process whose progress lives only in memory, a memory marker and a disk marker.
    d.sh(
        "h",
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 &",
    );
    d.sh(
        "h",
        "echo MEM-7f3 > /tmp/mem && echo DISK-a21 | dd of=/dev/vda bs=512 seek=300 conv=notrunc,fsync 2>/dev/null",
    );
    let before = wait_for("the counter", Duration::from_secs(20), || {
        let n = counter(&d);
        (n > 5).then_some(n)
    });

    let out = d.drover(&["vm", "hibernate", "h"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("hibernated") && said.contains("drover vm resume h"),
        "{said}"
    );
    let v = d.json(&["vm", "show", "h"]);
    assert_eq!(v["state"], "hibernated", "{v}");
    assert!(
        v["hibernation"]["bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{v}"
    );
    assert!(v["pid"].is_null(), "{v}");
    // Nothing of it holds the host: no QEMU, no RAM file.
    let run = d.state_dir().join("run/h").display().to_string();
    assert!(
        pids_mentioning(&run).is_empty(),
        "a QEMU still runs for the VM"
    );
    assert!(!d.ram_dir().join("h").exists(), "its RAM file is gone");
    // Starting it afresh is refused, saying how to bring it back.
    let e = d.fails(4, &["vm", "start", "h"]);
    assert!(e.contains("drover vm resume h"), "{e}");

    // droverd killed and started again: still hibernated, nothing lost.
    d.kill9();
    d.spawn();
    assert_eq!(d.json(&["vm", "show", "h"])["state"], "hibernated");

    // A state damaged on disk (one byte of its saved memory) is refused, checked while QEMU
    // reads it: the guest never runs from it, and the VM stays hibernated with its state.
    let saved = largest_file_under(&d.state_dir().join("vms/h/states"));
    let original = std::fs::read(&saved).expect("the saved state");
    let mut damaged = original.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x5a;
    std::fs::write(&saved, &damaged).expect("damaging the state");
    let e = d.fails(1, &["vm", "resume", "h", "--wait"]);
    assert!(e.contains("damaged"), "{e}");
    assert_eq!(d.json(&["vm", "show", "h"])["state"], "hibernated");
    assert!(
        pids_mentioning(&run).is_empty(),
        "the QEMU that loaded the damaged state is gone"
    );
    std::fs::write(&saved, &original).expect("mending the state");

    d.ok(&["vm", "resume", "h", "--wait"]);
    assert_eq!(d.json(&["vm", "show", "h"])["state"], "running");
    assert_eq!(d.sh("h", "cat /tmp/mem").trim(), "MEM-7f3");
    assert_eq!(
        d.sh(
            "h",
            "dd if=/dev/vda bs=512 skip=300 count=1 2>/dev/null | head -c 8"
        ),
        "DISK-a21"
    );
    // The counting process is the same one, going on from where it was.
    let resumed = counter(&d);
    assert!(resumed >= before, "{resumed} < {before}");
    wait_for("the counter to go on", Duration::from_secs(20), || {
        (counter(&d) > resumed).then_some(())
    });
    // The hibernation state was used up.
    let states = d.json(&["snapshot", "list", "h"]);
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["name"].as_str().unwrap_or("").starts_with("hibernate-")),
        "{states}"
    );
    // An ordinary VM again.
    d.ok(&["vm", "stop", "h"]);
    d.ok(&["vm", "start", "h", "--wait"]);
    assert_eq!(
        d.sh(
            "h",
            "dd if=/dev/vda bs=512 skip=300 count=1 2>/dev/null | head -c 8"
        ),
        "DISK-a21"
    );
    let e = d.fails(4, &["vm", "resume", "h"]);
    assert!(e.contains("not hibernated"), "{e}");
}

/// Resumed as another shape (issue 15, item 3): more vCPUs and memory, hot-plugged once the
/// saved state runs, seen by the guest with its memory intact; a shape it cannot grow to is
/// refused before anything changes (it stays hibernated).
#[test]
fn resume_grows_the_vm_to_the_shape_asked_and_refuses_one_it_cannot_reach() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "g",
        "--cpus",
        "1",
        "--memory",
        "256M",
        "--max-memory",
        "512M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", "g", "--wait"]);
    d.sh("g", "echo MEM-shape > /tmp/mem");
    let kb0 = mem_kb(&d, "g");
    d.ok(&["vm", "hibernate", "g"]);
    let hib = d.json(&["vm", "show", "g"]);
    let state = hib["hibernation"]["state"]
        .as_str()
        .expect("a state")
        .to_string();
    // A check first: within the headroom it fits, each aspect named with its verdict.
    let check = d.json(&[
        "snapshot", "check", "g", &state, "--cpus", "2", "--memory", "384M",
    ]);
    assert_eq!(check["fits"], true, "{check}");
    let verdict = |c: &serde_json::Value, what: &str| {
        c["differences"]
            .as_array()
            .and_then(|l| l.iter().find(|d| d["what"] == what))
            .map(|d| d["verdict"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("{what} compared: {c}"))
    };
    for (what, want) in [
        ("qemu", "same"),
        ("machine", "same"),
        ("accelerator", "same"),
        ("host", "same"),
        ("vcpus", "adaptable"),
        ("memory", "adaptable"),
    ] {
        assert_eq!(verdict(&check, what), want, "{what}: {check}");
    }
    // Beyond its hot-plug limit the check says why, and exits 4.
    let out = d.drover(&[
        "--output", "json", "snapshot", "check", "g", &state, "--memory", "1G",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(check["fits"], false, "{check}");
    assert_eq!(verdict(&check, "memory"), "blocking", "{check}");
    // Beyond its hot-plug limit: refused, nothing changed.
    let e = d.fails(4, &["vm", "resume", "g", "--memory", "1G"]);
    assert!(
        e.contains("nothing was changed") && e.contains("512M"),
        "{e}"
    );
    assert_eq!(d.json(&["vm", "show", "g"])["state"], "hibernated");

    d.ok(&[
        "vm", "resume", "g", "--cpus", "2", "--memory", "384M", "--wait",
    ]);
    assert_eq!(
        d.sh("g", "cat /tmp/mem").trim(),
        "MEM-shape",
        "the saved memory"
    );
    wait_grown(&d, "g", kb0);
    let v = d.json(&["vm", "show", "g"]);
    assert_eq!(v["running_config"]["cpus"], 2, "{v}");

    // Grown, it saves and hibernates again: the vCPU and DIMM it gained are made again before
    // its state loads. A droverd restarted in between knows them only from QEMU. Data written
    // past what the boot memory holds (incompressible, so some of it lives in the DIMM) and
    // the vCPU count come back from each.
    d.kill9();
    d.spawn();
    let grown_kb = mem_kb(&d, "g");
    d.sh(
        "g",
        "mkdir -p /big && mount -t tmpfs -o size=300M big /big && \
         dd if=/dev/urandom of=/big/fill bs=1M count=200 2>&1 && sha256sum /big/fill > /tmp/fill.sum",
    );
    let sum = d.sh("g", "cat /tmp/fill.sum");
    // Fast saves both ways (the boot RAM copied as a file, or streamed into a second QEMU that
    // must hold the same devices; the DIMM in the device state either way), then a hibernation
    // (a classic save: all of it in one stream).
    d.ok(&[
        "snapshot",
        "create",
        "g",
        "--name",
        "grown-copy",
        "--capture",
        "copy",
    ]);
    d.ok(&[
        "snapshot",
        "create",
        "g",
        "--name",
        "grown-stream",
        "--capture",
        "stream",
    ]);
    d.ok(&["vm", "hibernate", "g"]);
    d.ok(&["vm", "resume", "g", "--wait"]);
    let same = |what: &str| {
        assert_eq!(d.sh("g", "cat /tmp/mem").trim(), "MEM-shape", "{what}");
        assert_eq!(d.sh("g", "nproc").trim(), "2", "{what}");
        assert_eq!(mem_kb(&d, "g"), grown_kb, "{what}");
        assert_eq!(d.sh("g", "sha256sum /big/fill"), sum, "{what}");
    };
    same("resumed");
    for state in ["grown-copy", "grown-stream"] {
        d.sh("g", "rm /big/fill");
        d.ok(&["snapshot", "restore", "g", state]);
        same(state);
    }
}

/// Resumed as another machine (issue 15, items 3 and 6): more vCPUs and memory, a NIC with a
/// new MAC and a new identity, all checked from inside the guest: nproc, MemTotal, the NIC's
/// address and a working lease, the hostname (the VM's name) and a new machine-id, the
/// `restored.d` hook run exactly once, a listening app told what changed. A NIC the VM lacks
/// is refused first with nothing changed.
#[test]
fn resume_as_another_machine_new_mac_and_identity_checked_from_inside() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "r",
        "--cpus",
        "1",
        "--memory",
        "256M",
        "--max-memory",
        "512M",
        "--nic",
        "user",
    ]);
    d.ok(&["vm", "start", "r", "--wait"]);
    let nic = d.json(&["vm", "show", "r"])["config"]["nics"][0].clone();
    let nic_id = nic["id"].as_str().expect("a NIC id").to_string();
    let old_mac = nic["mac"].as_str().expect("a MAC").to_string();
    let inet = |d: &Daemon| -> String {
        d.sh("r", "ip -4 -o addr show dev eth0 | awk '{print $4}'")
            .trim()
            .to_string()
    };
    wait_for("a DHCP lease before", Duration::from_secs(30), || {
        (!inet(&d).is_empty()).then_some(())
    });
    // A name that is not the VM's, a hook that logs each run, an app listening for events.
    d.sh(
        "r",
        "hostname before-1 && echo before-1 > /etc/hostname && mkdir -p /etc/drover/hooks/restored.d && \
         printf '#!/bin/sh\\necho \"$DROVER_OLD_HOSTNAME>$DROVER_NEW_HOSTNAME [$DROVER_CHANGED]\" >> /tmp/hook.log\\n' > /etc/drover/hooks/restored.d/10-log && \
         chmod +x /etc/drover/hooks/restored.d/10-log && echo MEM-ident > /tmp/mem",
    );
    d.sh(
        "r",
        "(setsid drover-guest listen --app-id watcher > /tmp/events.log 2>&1 &); sleep 0.3",
    );
    let kb0 = mem_kb(&d, "r");
    let old_id = d.sh("r", "cat /etc/machine-id").trim().to_string();
    assert_eq!(d.sh("r", "cat /sys/class/net/eth0/address").trim(), old_mac);
    // The same moment kept as a state, for `snapshot restore` with the same options below.
    d.ok(&["snapshot", "create", "r", "--name", "base"]);
    wait_for("the state to be ready", Duration::from_secs(60), || {
        let s = d.json(&["snapshot", "show", "r", "base"]);
        (s["phase"] != "capturing").then_some(())
    });
    d.ok(&["vm", "hibernate", "r"]);
    assert_eq!(d.json(&["vm", "show", "r"])["hibernation"]["agent"], true);

    // Refused before anything changes: a NIC it does not have.
    let e = d.fails(
        4,
        &[
            "vm",
            "resume",
            "r",
            "--nic",
            "nope,mac=52:54:00:5e:00:42",
            "--new-identity",
        ],
    );
    assert!(
        e.contains("nothing was changed") && e.contains("no NIC nope"),
        "{e}"
    );
    assert_eq!(d.json(&["vm", "show", "r"])["state"], "hibernated");

    let new_mac = "52:54:00:5e:00:42";
    let spec = format!("{nic_id},mac={new_mac}");
    d.ok(&[
        "vm",
        "resume",
        "r",
        "--cpus",
        "2",
        "--memory",
        "384M",
        "--nic",
        &spec,
        "--new-identity",
        "--wait",
    ]);
    assert_eq!(
        d.sh("r", "cat /tmp/mem").trim(),
        "MEM-ident",
        "the saved memory"
    );
    wait_grown(&d, "r", kb0);
    assert_eq!(d.sh("r", "cat /sys/class/net/eth0/address").trim(), new_mac);
    assert_eq!(d.sh("r", "hostname").trim(), "r");
    let new_id = d.sh("r", "cat /etc/machine-id").trim().to_string();
    assert_eq!(new_id.len(), 32, "{new_id}");
    assert_ne!(new_id, old_id);
    // A new lease under the new MAC: an address, and the gateway answers.
    let t0 = std::time::Instant::now();
    loop {
        let ping = d.drover(&[
            "vm",
            "exec",
            "r",
            "--",
            "sh",
            "-c",
            "ping -c 1 -W 2 10.0.2.2 >/dev/null",
        ]);
        if ping.status.success() && !inet(&d).is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(45) {
            panic!(
                "no working address 45 s after the resume: {}\nagent log: {}\nvm: {}",
                d.sh("r", "ip addr; ip route; ps | grep -v grep | grep udhcpc"),
                d.sh(
                    "r",
                    "tail -n 20 /run/drover/agent.log 2>/dev/null; dmesg | tail -n 10"
                ),
                d.json(&["vm", "show", "r"])["identity"]
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let hook = d.sh("r", "cat /tmp/hook.log");
    assert_eq!(hook.lines().count(), 1, "the hook ran once: {hook}");
    assert!(
        hook.contains("before-1>r") && hook.contains("machine-id") && hook.contains("mac:eth0"),
        "{hook}"
    );
    let events = d.sh("r", "cat /tmp/events.log");
    assert!(
        events.contains("restored") && events.contains("hostname") && events.contains("before-1"),
        "the listening app heard what changed: {events}"
    );
    let v = d.json(&["vm", "show", "r"]);
    assert_eq!(v["running_config"]["cpus"], 2, "{v}");
    assert_eq!(v["running_config"]["nics"][0]["mac"], new_mac, "{v}");
    assert!(v["identity"]["error"].is_null(), "{v}");
    let changed = v["identity"]["changed"].to_string();
    assert!(
        changed.contains("hostname")
            && changed.contains("machine-id")
            && changed.contains("mac:eth0"),
        "{v}"
    );

    restore_as_another_machine_survives_a_crash(&mut d, &nic_id, &[&old_id, &new_id], kb0);
}

/// `snapshot restore` with the same options as the resume above (issue 15): a check and a
/// restore refuse the same NIC with nothing changed; then a restore as another shape, cut off
/// by a droverd crash after the restored guest runs and before its agent took the new identity
/// (crash point `restore-identity`, debug builds): the next droverd re-adopts it and sends the
/// identity, which the guest shows (hostname, a third machine-id, the MAC), its hook run once.
fn restore_as_another_machine_survives_a_crash(
    d: &mut Daemon,
    nic_id: &str,
    old_ids: &[&str],
    kb0: u64,
) {
    let bad = ["--nic", "nope,mac=52:54:00:5e:00:43", "--new-identity"];
    let out = d.drover(
        &[
            &["--output", "json", "snapshot", "check", "r", "base"],
            &bad[..],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(check["fits"], false, "{check}");
    let e = d.fails(
        4,
        &[&["snapshot", "restore", "r", "base"], &bad[..]].concat(),
    );
    assert!(
        e.contains("nothing was changed") && e.contains("no NIC nope"),
        "{e}"
    );
    assert_eq!(d.json(&["vm", "show", "r"])["state"], "running");
    assert_eq!(d.sh("r", "hostname").trim(), "r");

    let mac = "52:54:00:5e:00:43";
    let spec = format!("{nic_id},mac={mac}");
    let shape = [
        "--cpus",
        "2",
        "--memory",
        "384M",
        "--nic",
        &spec,
        "--new-identity",
    ];
    let check = d.json(&[&["snapshot", "check", "r", "base"], &shape[..]].concat());
    assert_eq!(check["fits"], true, "{check}");
    d.kill9();
    d.set_env(&[("DROVER_TEST_CRASH_AT", "restore-identity")]);
    d.spawn();
    let out = d.drover(&[&["snapshot", "restore", "r", "base"], &shape[..]].concat());
    assert!(!out.status.success(), "{out:?}");
    assert!(
        d.wait_exit(Duration::from_secs(60)),
        "droverd did not reach restore-identity"
    );
    d.set_env(&[]);
    d.spawn();
    // The restored guest came back as `before-1`; the next droverd sends the identity again.
    wait_for(
        "the identity after the restart",
        Duration::from_secs(90),
        || {
            let o = d.drover(&["vm", "exec", "r", "--", "hostname"]);
            (o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "r").then_some(())
        },
    );
    assert_eq!(
        d.sh("r", "cat /tmp/mem").trim(),
        "MEM-ident",
        "the saved memory"
    );
    let id = d.sh("r", "cat /etc/machine-id").trim().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(!old_ids.contains(&id.as_str()), "a new machine-id: {id}");
    assert_eq!(d.sh("r", "cat /sys/class/net/eth0/address").trim(), mac);
    wait_grown(d, "r", kb0);
    assert_eq!(d.sh("r", "nproc").trim(), "2");
    let hook = d.sh("r", "cat /tmp/hook.log");
    assert_eq!(hook.lines().count(), 1, "the hook ran once: {hook}");
    assert!(hook.contains("before-1>r"), "{hook}");
    let v = d.json(&["vm", "show", "r"]);
    assert_eq!(v["running_config"]["nics"][0]["mac"], mac, "{v}");
    assert!(v["identity"]["error"].is_null(), "{v}");
}
