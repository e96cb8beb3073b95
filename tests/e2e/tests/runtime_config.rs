//! Persistent runtime configuration, checked from inside real guests: live changes survive a
//! stop/start (diff and snapshot modes), persistence off restores the initial config, promote and
//! composed starts, a droverd crash right after a change, refusals that change nothing, guest-asked
//! changes, and who may flip persistence.

use drover_e2e::{wait_for, Daemon};
use std::time::Duration;

/// Serials of the guest's disks, in order.
fn disks(d: &Daemon, vm: &str) -> Vec<String> {
    d.sh(vm, "for b in /sys/block/vd*; do cat $b/serial; echo; done")
        .lines()
        .map(str::to_string)
        .collect()
}

fn nics(d: &Daemon, vm: &str) -> usize {
    d.sh(vm, "ls -d /sys/class/net/eth* 2>/dev/null | wc -l")
        .trim()
        .parse()
        .expect("count")
}

/// Wait until the guest sees `n` disks (hot-plug is asynchronous in the guest).
fn wait_disks(d: &Daemon, vm: &str, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} disks in {vm}"),
        Duration::from_secs(15),
        || {
            let v = disks(d, vm);
            (v.len() == n).then_some(v)
        },
    )
}

#[test]
fn live_changes_persist_in_both_modes_then_promote_and_compose() {
    let d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "pc",
        "--memory",
        "256M",
        "--max-memory",
        "768M",
        "--disk",
        "size=32M,id=data",
        "--nic",
        "user",
    ]);
    d.ok(&["vm", "start", "pc", "--wait"]);

    // Live: a disk and a NIC; the guest sees them at once; write to the new disk.
    let r = d.json(&[
        "vm", "attach", "pc", "disk", "--id", "data2", "--size", "16M",
    ]);
    assert_eq!(r["applied"], "live");
    d.json(&["vm", "attach", "pc", "nic", "--id", "net1"]);
    assert_eq!(wait_disks(&d, "pc", 2), ["data", "data2"]);
    wait_for("the second NIC", Duration::from_secs(15), || {
        (nics(&d, "pc") == 2).then_some(())
    });
    d.sh("pc", "echo kept-on-data2 > /tmp/m && dd if=/tmp/m of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null");
    // Memory grows live (128M steps) and the guest uses it.
    let mem_kb = || -> u64 {
        d.sh("pc", "awk '/MemTotal/ {print $2}' /proc/meminfo")
            .trim()
            .parse()
            .expect("MemTotal")
    };
    let kb0 = mem_kb();
    d.json(&["vm", "set", "pc", "memory=384M"]);
    wait_for("the new memory online", Duration::from_secs(15), || {
        (mem_kb() >= kb0 + 120 * 1024).then_some(())
    });

    // Stop: sealed as generation 1 (diff mode by default).
    d.ok(&["vm", "stop", "pc"]);
    let h = d.json(&["vm", "config", "list", "pc"]);
    assert_eq!(h["generations"][1]["kind"], "diff", "{h}");
    assert_eq!(h["default_start"], 1);
    d.ok(&["vm", "start", "pc", "--wait"]);
    assert_eq!(wait_disks(&d, "pc", 2), ["data", "data2"]);
    assert_eq!(d.sh("pc", "head -c 13 /dev/vdb"), "kept-on-data2");
    assert_eq!(nics(&d, "pc"), 2);
    assert!(mem_kb() >= kb0 + 120 * 1024, "384M at boot");

    // Snapshot mode, and a change for the next boot only.
    d.ok(&["vm", "config", "persist", "pc", "--mode", "snapshot"]);
    let r = d.json(&["vm", "detach", "pc", "net1", "--next-boot"]);
    assert_eq!(r["applied"], "next-boot");
    assert_eq!(
        nics(&d, "pc"),
        2,
        "a next-boot change leaves the running guest alone"
    );
    d.ok(&["vm", "stop", "pc"]);
    let h = d.json(&["vm", "config", "list", "pc"]);
    assert_eq!(h["generations"][2]["kind"], "snapshot", "{h}");
    d.ok(&["vm", "start", "pc", "--wait"]);
    assert_eq!(nics(&d, "pc"), 1);
    assert_eq!(wait_disks(&d, "pc", 2), ["data", "data2"]);
    d.ok(&["vm", "stop", "pc", "--force"]);

    // The initial config is still there.
    d.ok(&["vm", "start", "pc", "--config", "0", "--wait"]);
    assert_eq!(disks(&d, "pc"), ["data"]);
    d.ok(&["vm", "stop", "pc", "--force"]);

    // A composed start: generation 2 without data2, the NIC taken from generation 1, less memory.
    d.ok(&[
        "vm",
        "start",
        "pc",
        "--config",
        "2",
        "--without",
        "disk:data2",
        "--with",
        "1:nic:net1",
        "--set",
        "memory=320M",
        "--wait",
    ]);
    assert_eq!(disks(&d, "pc"), ["data"]);
    assert_eq!(nics(&d, "pc"), 2);
    assert_eq!(
        d.json(&["vm", "show", "pc"])["running_config"]["memory"],
        320u64 << 20
    );
    d.ok(&["vm", "stop", "pc", "--force"]);

    // Promote generation 1: it becomes the initial config; the others still yield what they did.
    let before: Vec<serde_json::Value> = (1..=2)
        .map(|g| d.json(&["vm", "config", "show", "pc", &g.to_string()]))
        .collect();
    d.ok(&["vm", "config", "promote", "pc", "1"]);
    for (g, b) in (1..=2).zip(before) {
        assert_eq!(
            d.json(&["vm", "config", "show", "pc", &g.to_string()]),
            b,
            "generation {g}"
        );
    }
    assert_eq!(
        d.json(&["vm", "config", "show", "pc", "0"]),
        d.json(&["vm", "config", "show", "pc", "1"])
    );
    let diff = d.ok(&["vm", "config", "diff", "pc", "0", "2"]);
    assert!(diff.contains("- nic:net1"), "{diff}");
    let journal = d.ok(&["vm", "config", "journal", "pc"]);
    assert!(
        journal.contains("promoted generation 1") && journal.contains("live"),
        "{journal}"
    );
}

#[test]
fn crash_after_change_refusals_guest_requests_and_persistence_off() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "po",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", "po", "--wait"]);

    // kill -9 of droverd right after a live change: the change was journaled before the answer,
    // so the next shutdown seals it.
    d.json(&[
        "vm", "attach", "po", "disk", "--id", "late", "--size", "16M",
    ]);
    d.kill9();
    d.spawn();
    wait_for(
        "the agent after the restart",
        Duration::from_secs(20),
        || {
            d.drover(&["vm", "exec", "po", "--", "true"])
                .status
                .success()
                .then_some(())
        },
    );
    d.ok(&["vm", "stop", "po"]);
    d.ok(&["vm", "start", "po", "--wait"]);
    assert_eq!(wait_disks(&d, "po", 2), ["data", "late"]);

    // Refusals change nothing.
    assert!(d
        .fails(4, &["vm", "detach", "po", "data"])
        .contains("--next-boot"));
    assert!(d
        .fails(
            1,
            &["vm", "attach", "po", "disk", "--id", "data", "--size", "16M"]
        )
        .contains("already has an element"));
    assert!(d
        .fails(4, &["vm", "set", "po", "memory=512M"])
        .contains("memory hot-plug"));
    assert!(d
        .fails(4, &["vm", "set", "po", "cpus=1", "memory=128M"])
        .contains("--next-boot"));
    assert!(d.fails(7, &["vm", "set", "po", "cpus=64"]).contains("CPUs"));
    // `late`, hot-plugged before the restart, is back on its port (the guest finds it where it
    // was): three of the four hot-plug ports are free.
    for i in 0..3 {
        d.json(&[
            "vm",
            "attach",
            "po",
            "disk",
            "--id",
            &format!("p{i}"),
            "--size",
            "8M",
        ]);
    }
    let err = d.fails(
        7,
        &["vm", "attach", "po", "disk", "--id", "p3", "--size", "8M"],
    );
    assert!(err.contains("hot-plug ports"), "{err}");
    assert!(
        !d.state_dir().join("vms/po/disks/p3.qcow2").exists(),
        "no disk left behind"
    );
    assert_eq!(wait_disks(&d, "po", 5).len(), 5);
    // Hot-unplug of a hot-plugged disk: the guest releases it; `late` too, since it sits on
    // its port again.
    let r = d.json(&["vm", "detach", "po", "p2"]);
    assert_eq!(r["applied"], "live");
    let r = d.json(&["vm", "detach", "po", "late"]);
    assert_eq!(r["applied"], "live");
    assert_eq!(wait_disks(&d, "po", 3).len(), 3);

    // Changes asked for from inside the guest.
    let g = d.json(&[
        "vm",
        "guest-access",
        "grant",
        "po",
        "--principal",
        "app",
        "--ops",
        "reconfigure",
    ]);
    let secret = g["secret"].as_str().expect("secret").to_string();
    let ask = |s: &str, args: &str| {
        d.drover(&[
            "vm",
            "exec",
            "po",
            "--",
            "sh",
            "-c",
            &format!("DROVER_PRINCIPAL=app DROVER_SECRET={s} drover-guest {args}"),
        ])
    };
    let out = ask(&secret, "reconfigure --add-disk g1:16M --wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).expect("event");
    assert_eq!(ev["status"], "completed", "{ev}");
    assert!(wait_disks(&d, "po", 4).contains(&"g1".to_string()));
    assert_eq!(
        ask("wrong", "reconfigure --add-disk g2:16M").status.code(),
        Some(2),
        "wrong secret refused"
    );
    assert_eq!(
        ask(&secret, "host-info").status.code(),
        Some(2),
        "op not granted"
    );
    let audit = d.ok(&["vm", "audit", "po"]);
    assert!(
        audit.contains("completed")
            && audit.contains("wrong secret")
            && audit.contains("op not granted"),
        "{audit}"
    );

    // Persistence off: the next start boots the initial config.
    d.ok(&["vm", "config", "persist", "po", "off"]);
    let gens = d.json(&["vm", "config", "list", "po"])["generations"]
        .as_array()
        .map(|a| a.len());
    d.ok(&["vm", "stop", "po"]);
    assert_eq!(
        d.json(&["vm", "config", "list", "po"])["generations"]
            .as_array()
            .map(|a| a.len()),
        gens,
        "nothing sealed"
    );
    d.ok(&["vm", "start", "po", "--wait"]);
    assert_eq!(disks(&d, "po"), ["data"]);
    d.ok(&["vm", "stop", "po", "--force"]);

    // Bad picks at start: clear errors, VM stays stopped.
    assert!(d
        .fails(1, &["vm", "start", "po", "--config", "99"])
        .contains("99"));
    assert!(d
        .fails(1, &["vm", "start", "po", "--without", "disk:nope"])
        .contains("nope"));
    assert!(d
        .fails(
            1,
            &[
                "vm",
                "start",
                "po",
                "--without",
                "disk:data",
                "--with",
                "1:disk:data"
            ]
        )
        .contains("disk:data"));
    assert_eq!(d.json(&["vm", "show", "po"])["state"], "stopped");

    // A new VM of the same name starts clean: no principals, history or journal of the old one.
    d.ok(&["vm", "delete", "po"]);
    d.ok(&["vm", "create", "po"]);
    assert_eq!(
        d.json(&["vm", "guest-access", "list", "po"]),
        serde_json::json!([])
    );
    assert_eq!(
        d.json(&["vm", "config", "list", "po"])["generations"]
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
    assert_eq!(
        d.json(&["vm", "config", "journal", "po"]),
        serde_json::json!([])
    );
}

#[test]
fn only_authorised_callers_change_persistence() {
    let d = Daemon::start_with(&["--socket-mode", "666"]);
    // Let an unprivileged user reach the socket; the roles decide the rest.
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    d.ok(&["vm", "create", "a"]);
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(drover_e2e::bin_dir().join("drover"))
            .args(args)
            .env("DROVER_SOCKET", d.socket())
            .output()
            .expect("setpriv")
    };
    let out = as_nobody(&["vm", "list"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "no role, no access: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.ok(&["auth", "grant", "--uid", "65534", "--role", "operator"]);
    assert!(as_nobody(&["vm", "list"]).status.success());
    let out = as_nobody(&["vm", "config", "persist", "a", "off"]);
    assert_eq!(out.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.persist"));
    assert!(
        as_nobody(&["vm", "config", "promote", "a", "0"])
            .status
            .code()
            == Some(8)
    );
    assert_eq!(d.json(&["vm", "show", "a"])["persist"], true, "unchanged");
    d.ok(&["vm", "config", "persist", "a", "off"]);
    assert_eq!(d.json(&["vm", "show", "a"])["persist"], false);
    // With persistence off a change to the stopped VM would become its initial config: the
    // operator (config.change, not config.persist) is refused, and the refusal is audited.
    let generations = d.json(&["vm", "config", "list", "a"])["generations"].clone();
    let out = as_nobody(&["vm", "set", "a", "memory=768M"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.persist"));
    assert_eq!(
        d.json(&["vm", "config", "list", "a"])["generations"],
        generations
    );
    let audit = d.json(&["vm", "audit", "a"]);
    let refused: Vec<_> = audit
        .as_array()
        .expect("audit list")
        .iter()
        .filter(|a| a["outcome"] == "refused" && a["principal"] == "uid 65534")
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "persist, promote and set refused: {audit}"
    );
    d.ok(&["auth", "grant", "--uid", "65534", "--role", "viewer"]);
    assert_eq!(
        as_nobody(&["vm", "attach", "a", "disk", "--id", "x", "--size", "8M"])
            .status
            .code(),
        Some(8)
    );
    assert_eq!(
        as_nobody(&["auth", "grant", "--uid", "65534", "--role", "admin"])
            .status
            .code(),
        Some(8)
    );
}
