//! Moving VMs between hosts, each droverd in its own network namespace: live migration with a
//! guest busy on memory and disk, what the guest sees (host id, scan, hooks), failures of every
//! kind leaving the VM on exactly one host, offline migration and bad input.

use drover_e2e::{pids_mentioning, wait_for, Cli, Fleet};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A VM with a data disk on host 1, booted, with a memory counter and a disk writer running.
fn busy_vm(src: &Cli, vm: &str) {
    src.ok(&[
        "vm",
        "create",
        vm,
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    src.ok(&["vm", "start", vm, "--wait"]);
    // Memory: a counter in a shell variable, written out (atomically: a reader never sees an
    // empty file); disk: block k holds "blk<k>".
    src.sh(
        vm,
        "touch /run/go; \
         (i=0; while [ -f /run/go ]; do i=$((i+1)); echo $i > /run/count.t; mv /run/count.t /run/count; done) >/dev/null 2>&1 & \
         (k=0; while [ -f /run/go ]; do k=$((k+1)); echo blk$k | dd of=/dev/vda bs=512 seek=$k \
            conv=notrunc,fsync 2>/dev/null; echo $k > /run/disk-count.t; mv /run/disk-count.t /run/disk-count; done) >/dev/null 2>&1 & \
         sleep 0.5",
    );
}

fn count(h: &Cli, vm: &str, file: &str) -> u64 {
    h.sh(vm, &format!("cat {file}")).trim().parse().unwrap_or(0)
}

/// `drover vm migrate` in the background (for failure injection mid-way).
fn migrate_in_background(f: &Fleet, from: usize, vm: &str, args: &[&str]) -> std::process::Child {
    let cli = f.host(from);
    Command::new(drover_e2e::bin_dir().join("drover"))
        .args(["vm", "migrate", vm])
        .args(args)
        .envs(cli.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover vm migrate")
}

fn has_vm(f: &Fleet, i: usize, vm: &str) -> Option<String> {
    f.vms(i)
        .into_iter()
        .find(|(n, _)| n == vm)
        .map(|(_, state)| state)
}

/// Exactly one host has the VM, it runs there, and its guest answers.
fn runs_only_on(f: &Fleet, on: usize, other: usize, vm: &str) {
    wait_for(
        &format!("{vm} running on host {on} only"),
        Duration::from_secs(90),
        || {
            (has_vm(f, on, vm).as_deref() == Some("running") && has_vm(f, other, vm).is_none())
                .then_some(())
        },
    );
    assert_eq!(f.host(on).sh(vm, "echo alive").trim(), "alive");
}

#[test]
fn live_migration_keeps_memory_disk_and_records_and_the_guest_notices() {
    let Some(f) = Fleet::up("ma", "10.81.0", 2, &[]) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    busy_vm(&h1, "mover");
    let g = h1.json(&[
        "vm",
        "guest-access",
        "grant",
        "mover",
        "--principal",
        "app",
        "--ops",
        "list",
    ]);
    assert!(g["secret"].is_string());
    h1.ok(&["vm", "set", "mover", "cpus=2", "--next-boot"]);
    let boot_id = h1.sh("mover", "cat /proc/sys/kernel/random/boot_id");
    // A scan that brackets the migration (its two host-id reads straddle it), and a hook.
    h1.sh(
        "mover",
        "mkdir -p /etc/drover/hooks/migrated.d; \
         printf '#!/bin/sh\\necho \"$DROVER_OLD_HOST_ID->$DROVER_NEW_HOST_ID\" >> /run/hook.log\\n' \
           > /etc/drover/hooks/migrated.d/10-test; chmod +x /etc/drover/hooks/migrated.d/10-test; \
         (drover-guest scan --pause-between 6000 --repeat-if-migrated --notify-if-migrated \
            > /run/scan.json 2> /run/scan.err; echo $? > /run/scan.rc) >/dev/null 2>&1 & sleep 1",
    );
    // A saved state travels too (its memory, device state and the disk layer it pins).
    h1.sh("mover", "echo before > /run/marker");
    h1.ok(&["snapshot", "create", "mover", "--name", "before"]);
    h1.sh("mover", "echo after > /run/marker");
    let c1 = count(&h1, "mover", "/run/count");

    let r = h1.json(&["vm", "migrate", "mover", "--to", &f.remote(2)]);
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("ma1"), Some("ma2")),
        "{r}"
    );
    assert!(r["downtime_ms"].as_u64().unwrap_or(9999) < 1000, "{r}");

    // Exactly one host has it; the guest kept running (same boot, counter went on).
    assert!(has_vm(&f, 1, "mover").is_none(), "the source forgot it");
    assert_eq!(has_vm(&f, 2, "mover").as_deref(), Some("running"));
    assert_eq!(
        h2.sh("mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    let c2 = count(&h2, "mover", "/run/count");
    assert!(c2 > c1, "the memory counter went on: {c1} -> {c2}");
    // Every block the guest wrote, before and after the switch, is on the disk it now has.
    h2.sh("mover", "rm /run/go; sleep 0.5");
    let n = count(&h2, "mover", "/run/disk-count");
    assert!(n > 0);
    let bad = h2.sh(
        "mover",
        &format!(
            "bad=0; k=1; while [ $k -le {n} ]; do \
               v=$(dd if=/dev/vda bs=512 skip=$k count=1 2>/dev/null | head -n1); \
               [ \"$v\" = blk$k ] || bad=$((bad+1)); k=$((k+1)); done; echo $bad"
        ),
    );
    assert_eq!(
        bad.trim(),
        "0",
        "{n} blocks written, some missing after the move"
    );

    // Records moved: principals, next-boot change, and the host the guest sees.
    let principals = h2.json(&["vm", "guest-access", "list", "mover"]);
    assert!(principals.to_string().contains("\"app\""), "{principals}");
    let shown = h2.json(&["vm", "show", "mover"]);
    assert_eq!(shown["next_config"]["cpus"], 2, "{shown}");
    assert_eq!(shown["migration"]["phase"], "committed", "{shown}");
    let ident: serde_json::Value =
        serde_json::from_str(&h2.sh("mover", "drover-guest host-id")).expect("host-id json");
    assert_eq!(ident["host"]["id"], "ma2", "{ident}");

    // The scan saw the move, discarded its first pass, and the hook ran once for it.
    wait_for("the scan to finish", Duration::from_secs(60), || {
        let rc = h2.sh("mover", "cat /run/scan.rc 2>/dev/null || true");
        (!rc.trim().is_empty()).then_some(())
    });
    assert_eq!(h2.sh("mover", "cat /run/scan.rc").trim(), "0");
    let scan = h2.sh("mover", "cat /run/scan.json");
    assert!(
        scan.contains("\"cpus\"") || scan.contains("\"kernel\""),
        "{scan}"
    );
    wait_for("the hook", Duration::from_secs(30), || {
        (h2.sh("mover", "cat /run/hook.log 2>/dev/null || true")
            .trim()
            == "ma1->ma2")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h2.sh("mover", "cat /run/hook.log").trim(),
        "ma1->ma2",
        "hook ran exactly once"
    );
    let audit = h2.ok(&["vm", "audit", "mover"]);
    assert!(audit.contains("migrated"), "{audit}");

    // The saved state restores on the new host.
    let states = h2.json(&["snapshot", "list", "mover"]);
    assert_eq!(states[0]["name"], "before", "{states}");
    h2.ok(&["snapshot", "restore", "mover", "before"]);
    assert_eq!(h2.sh("mover", "cat /run/marker").trim(), "before");
    h2.sh("mover", "touch /run/go; sleep 0.2");

    // And back, live, with the data intact.
    h2.ok(&["vm", "migrate", "mover", "--to", &f.remote(1)]);
    runs_only_on(&f, 1, 2, "mover");
    assert_eq!(
        h1.sh(
            "mover",
            "dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -n1"
        )
        .trim(),
        "blk1"
    );
}

#[test]
fn failures_leave_the_vm_running_on_exactly_one_host() {
    let Some(f) = Fleet::up("mb", "10.82.0", 2, &[("DROVER_MIGRATION_STALL_SECS", "4")]) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    busy_vm(&h1, "fragile");
    // Slow enough (2 MiB/s) that each failure lands mid-copy.
    let slow = ["--to", "mb2", "--bandwidth", "2M"];
    let arriving = || {
        wait_for(
            "the destination to prepare",
            Duration::from_secs(30),
            || has_vm(&f, 2, "fragile").map(|_| ()),
        )
    };

    // 1. Cancel.
    let m = migrate_in_background(&f, 1, "fragile", &slow);
    arriving();
    std::thread::sleep(Duration::from_secs(1));
    h1.ok(&["vm", "migrate", "fragile", "--cancel"]);
    let out = m.wait_with_output().expect("migrate");
    assert!(
        !out.status.success(),
        "a cancelled migration reports failure"
    );
    runs_only_on(&f, 1, 2, "fragile");

    // 2. The destination's QEMU dies.
    let m = migrate_in_background(&f, 1, "fragile", &slow);
    arriving();
    std::thread::sleep(Duration::from_secs(1));
    let dest_run = f.state_dir(2).join("run/fragile").display().to_string();
    wait_for("the destination QEMU", Duration::from_secs(20), || {
        let pids = pids_mentioning(&dest_run);
        for p in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        (!pids.is_empty()).then_some(())
    });
    let out = m.wait_with_output().expect("migrate");
    assert!(!out.status.success());
    runs_only_on(&f, 1, 2, "fragile");

    // 3. The network is cut (the destination's veth drops).
    let m = migrate_in_background(&f, 1, "fragile", &slow);
    arriving();
    std::thread::sleep(Duration::from_secs(1));
    let veth = f.veth(2);
    assert!(Command::new("ip")
        .args(["link", "set", &veth, "down"])
        .status()
        .expect("ip")
        .success());
    let out = m.wait_with_output().expect("migrate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no progress"), "{err}");
    assert!(h1.sh("fragile", "echo ok").contains("ok"));
    Command::new("ip")
        .args(["link", "set", &veth, "up"])
        .status()
        .expect("ip");
    // Once reachable again, the destination is told to drop its copy.
    runs_only_on(&f, 1, 2, "fragile");

    // 4. The source droverd is killed mid-way; restarted, it takes the VM back.
    let m = migrate_in_background(&f, 1, "fragile", &slow);
    arriving();
    std::thread::sleep(Duration::from_secs(1));
    f.kill9(1);
    let _ = m.wait_with_output();
    f.restart();
    runs_only_on(&f, 1, 2, "fragile");

    // 5. The destination droverd is killed mid-way; the source cannot hand over, keeps the
    // VM paused (never on two hosts), and settles once the destination is back.
    let m = migrate_in_background(&f, 1, "fragile", &["--to", "mb2", "--bandwidth", "20M"]);
    arriving();
    f.kill9(2);
    std::thread::sleep(Duration::from_secs(3));
    f.restart();
    let _ = m.wait_with_output();
    wait_for("the two hosts to agree", Duration::from_secs(120), || {
        let on1 = has_vm(&f, 1, "fragile");
        let on2 = has_vm(&f, 2, "fragile");
        match (on1.as_deref(), on2.as_deref()) {
            (Some("running"), None) | (None, Some("running")) => Some(()),
            _ => None,
        }
    });
    let owner = if has_vm(&f, 1, "fragile").is_some() {
        1
    } else {
        2
    };
    let cli = f.host(owner);
    assert!(cli
        .sh("fragile", "cat /run/count")
        .trim()
        .parse::<u64>()
        .is_ok());
    let n = count(&cli, "fragile", "/run/disk-count");
    assert_eq!(
        cli.sh(
            "fragile",
            &format!("dd if=/dev/vda bs=512 skip={n} count=1 2>/dev/null | head -n1")
        )
        .trim(),
        format!("blk{n}")
    );
    drop(h2);
}

#[test]
fn offline_migration_and_bad_input() {
    let Some(f) = Fleet::up("mc", "10.83.0", 2, &[]) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    h1.ok(&[
        "vm",
        "create",
        "cold",
        "--memory",
        "128M",
        "--disk",
        "size=16M,id=data",
    ]);

    // Bad input: nothing changes anywhere.
    let e = h1.fails(2, &["vm", "migrate", "cold", "--to", "nowhere"]);
    assert!(
        e.contains("mc1") && e.contains("mc2"),
        "names the known remotes: {e}"
    );
    let e = h1.fails(4, &["vm", "migrate", "cold", "--to", "mc2"]);
    assert!(e.contains("--offline"), "{e}");
    let e = h1.fails(4, &["vm", "migrate", "cold", "--to", "mc1", "--offline"]);
    assert!(e.contains("host id"), "{e}");
    h1.fails(3, &["vm", "migrate", "ghost", "--to", "mc2"]);
    let cfg = f.dir.path().join("cfg").display().to_string();
    let ca = f.state_dir(2).join("tls/cert.pem").display().to_string();
    let tok = f.state_dir(2).join("tls/admin.token").display().to_string();
    let add = Command::new(drover_e2e::bin_dir().join("drover"))
        .args([
            "remote",
            "add",
            "dead",
            "https://10.83.0.99:7443",
            "--token-file",
            &tok,
            "--ca-file",
            &ca,
            "--no-check",
        ])
        .env("DROVER_CONFIG_DIR", &cfg)
        .output()
        .expect("remote add");
    assert!(add.status.success(), "{add:?}");
    let e = h1.fails(5, &["vm", "migrate", "cold", "--to", "dead", "--offline"]);
    assert!(e.contains("reach"), "{e}");
    // A name taken on the destination.
    h2.ok(&["vm", "create", "cold", "--memory", "64M"]);
    h1.fails(4, &["vm", "migrate", "cold", "--to", "mc2", "--offline"]);
    h2.ok(&["vm", "delete", "cold"]);
    assert_eq!(has_vm(&f, 1, "cold").as_deref(), Some("stopped"));

    // Offline: data written before arrives; the VM is stopped there and boots.
    h1.ok(&["vm", "start", "cold", "--wait"]);
    h1.sh(
        "cold",
        "echo cold-data | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null",
    );
    // Two migrations of one VM at once: the second is refused.
    let m = migrate_in_background(&f, 1, "cold", &["--to", "mc2", "--bandwidth", "1M"]);
    wait_for("the first migration", Duration::from_secs(30), || {
        has_vm(&f, 2, "cold").map(|_| ())
    });
    h1.fails(4, &["vm", "migrate", "cold", "--to", "mc2"]);
    h1.ok(&["vm", "migrate", "cold", "--cancel"]);
    let _ = m.wait_with_output();
    runs_only_on(&f, 1, 2, "cold");
    h1.ok(&["vm", "stop", "cold"]);
    let r = h1.json(&["vm", "migrate", "cold", "--to", "mc2", "--offline"]);
    assert_eq!(r["offline"], true, "{r}");
    assert!(has_vm(&f, 1, "cold").is_none());
    assert_eq!(has_vm(&f, 2, "cold").as_deref(), Some("stopped"));
    h2.ok(&["vm", "start", "cold", "--wait"]);
    assert_eq!(
        h2.sh(
            "cold",
            "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1"
        )
        .trim(),
        "cold-data"
    );

    // Hibernated here, resumed on the other host: memory and disk as they were, the state
    // checked there first, and the VM on exactly one host.
    h2.sh(
        "cold",
        "echo warm-$(cat /proc/sys/kernel/random/boot_id) > /run/m",
    );
    let mark = h2.sh("cold", "cat /run/m");
    h2.ok(&["vm", "hibernate", "cold"]);
    let e = h2.fails(4, &["vm", "migrate", "cold", "--to", "mc1"]);
    assert!(e.contains("--offline") && e.contains("resume"), "{e}");
    // More vCPUs than it can hot-plug: refused there, nothing moved.
    let e = h2.fails(4, &["vm", "resume", "cold", "--on", "mc1", "--cpus", "64"]);
    assert!(e.contains("nothing was moved") && e.contains("mc1"), "{e}");
    assert_eq!(has_vm(&f, 2, "cold").as_deref(), Some("hibernated"));
    assert!(has_vm(&f, 1, "cold").is_none());
    h2.ok(&["vm", "resume", "cold", "--on", "mc1", "--wait"]);
    runs_only_on(&f, 1, 2, "cold");
    assert_eq!(h1.sh("cold", "cat /run/m"), mark, "the guest's memory");
    assert_eq!(
        h1.sh(
            "cold",
            "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1"
        )
        .trim(),
        "cold-data"
    );
    assert!(
        h1.json(&["snapshot", "list", "cold"])
            .as_array()
            .is_some_and(|l| l.is_empty()),
        "the hibernation state is gone once resumed"
    );
}

/// `snapshot restore --on REMOTE` (issue 15, items 2 and 6): a saved state of a running VM is
/// brought back on the other host with the memory and disk of the save (not what the guest wrote
/// after it); then, hibernated there, `vm resume --on` the first host with `--new-identity`
/// gives it its name as hostname and a new machine-id, with its memory intact.
#[test]
fn snapshot_restore_on_another_host_and_resume_there_as_a_new_machine() {
    let Some(f) = Fleet::up("rsh", "10.149.0", 2, &[]) else {
        return;
    };
    let (h1, h2) = (f.host(1), f.host(2));
    h1.ok(&[
        "vm",
        "create",
        "st",
        "--memory",
        "128M",
        "--max-memory",
        "384M",
        "--disk",
        "size=16M,id=data",
        "--nic",
        "user",
    ]);
    h1.ok(&["vm", "start", "st", "--wait"]);
    let mem_total_kb = |h: &Cli| -> u64 {
        h.sh("st", "awk '/MemTotal/ {print $2}' /proc/meminfo")
            .trim()
            .parse()
            .expect("MemTotal")
    };
    let kb_at_save = mem_total_kb(&h1);
    h1.sh(
        "st",
        "echo MEM-at-save > /run/m && echo disk-at-save | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null",
    );
    h1.ok(&["snapshot", "create", "st", "--name", "point"]);
    wait_for("the state to be durable", Duration::from_secs(60), || {
        (h1.json(&["snapshot", "show", "st", "point"])["phase"] == "durable").then_some(())
    });
    // After the save both change: the restore must bring back the saved point.
    h1.sh(
        "st",
        "echo MEM-after > /run/m && echo disk-after | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null",
    );
    h1.ok(&["snapshot", "restore", "st", "point", "--on", &f.remote(2)]);
    runs_only_on(&f, 2, 1, "st");
    assert_eq!(h2.sh("st", "cat /run/m").trim(), "MEM-at-save");
    assert_eq!(
        h2.sh("st", "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1")
            .trim(),
        "disk-at-save"
    );

    // Hibernated there, resumed back on host 1 as a new machine.
    h2.sh("st", "hostname other && echo other > /etc/hostname");
    let old_id = h2.sh("st", "cat /etc/machine-id").trim().to_string();
    h2.ok(&["vm", "hibernate", "st"]);
    h2.ok(&[
        "vm",
        "resume",
        "st",
        "--on",
        &f.remote(1),
        "--new-identity",
        "--wait",
    ]);
    runs_only_on(&f, 1, 2, "st");
    assert_eq!(h1.sh("st", "cat /run/m").trim(), "MEM-at-save");
    assert_eq!(h1.sh("st", "hostname").trim(), "st");
    let new_id = h1.sh("st", "cat /etc/machine-id").trim().to_string();
    assert_eq!(new_id.len(), 32, "{new_id}");
    assert_ne!(new_id, old_id);

    // Back to the saved point on host 2 once more, as a bigger machine, then live to host 1
    // as it is now (grown: vCPU and DIMM hot-plugged, which host 1's QEMU must make again).
    // Checked against host 2 first: beyond the memory headroom it is blocking, and a restore
    // asking for it is refused there with nothing changed.
    let out = h1.drover(&[
        "--output",
        "json",
        "snapshot",
        "check",
        "st",
        "point",
        "--on",
        &f.remote(2),
        "--memory",
        "1G",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(check["fits"], false, "{check}");
    let e = h1.fails(
        4,
        &[
            "snapshot",
            "restore",
            "st",
            "point",
            "--on",
            &f.remote(2),
            "--memory",
            "1G",
        ],
    );
    assert!(e.contains("nothing was moved") && e.contains("384M"), "{e}");
    runs_only_on(&f, 1, 2, "st");
    assert_eq!(h1.sh("st", "cat /run/m").trim(), "MEM-at-save");
    // Restored there as a bigger machine: two vCPUs and 128M more, seen from inside.
    h1.ok(&[
        "snapshot",
        "restore",
        "st",
        "point",
        "--on",
        &f.remote(2),
        "--cpus",
        "2",
        "--memory",
        "256M",
    ]);
    runs_only_on(&f, 2, 1, "st");
    assert_eq!(h2.sh("st", "cat /run/m").trim(), "MEM-at-save");
    wait_for(
        "2 vCPUs online in the guest",
        Duration::from_secs(30),
        || (h2.sh("st", "nproc").trim() == "2").then_some(()),
    );
    wait_for(
        "the hot-plugged memory online",
        Duration::from_secs(30),
        || {
            let kb = mem_total_kb(&h2);
            (kb >= kb_at_save + 100 * 1024).then_some(kb)
        },
    );
    let grown_kb = mem_total_kb(&h2);
    let out = h2.drover(&["vm", "migrate", "st", "--to", &f.remote(1)]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        eprintln!("the grown VM migrated live to host 1");
        runs_only_on(&f, 1, 2, "st");
        assert_eq!(h1.sh("st", "cat /run/m").trim(), "MEM-at-save");
        assert_eq!(h1.sh("st", "nproc").trim(), "2");
        assert_eq!(mem_total_kb(&h1), grown_kb, "the DIMM came along");
    } else {
        // QEMU 7.2 under TCG loses writes to hot-plugged memory while migrating: refused,
        // saying so, and the VM runs on where it was, unharmed.
        assert!(
            said.contains("QEMU 7.2") && said.contains("memory added"),
            "{said}"
        );
        eprintln!("the grown VM was refused a live migration: {said}");
        runs_only_on(&f, 2, 1, "st");
        assert_eq!(h2.sh("st", "cat /run/m").trim(), "MEM-at-save");
    }
}
