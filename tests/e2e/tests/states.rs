//! Saved VM states, asked for from inside the guest and from the host: an app saves, changes
//! things, restores with data, and its counterpart in the restored state gets the data; host-side
//! snapshots (fast and classic); credentials; memory reconfiguration that needs a restart; a
//! droverd killed while a guest request is queued.

use drover_e2e::{wait_for, Daemon};
use std::time::Duration;

/// Run a script in the guest with the app's credentials loaded.
fn app(d: &Daemon, vm: &str, script: &str) -> std::process::Output {
    d.drover(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!(". /tmp/cred; {script}"),
    ])
}

/// The app's events so far; empty while the VM is between states.
fn events(d: &Daemon, vm: &str) -> Vec<serde_json::Value> {
    let out = d.drover(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "cat /tmp/events.log 2>/dev/null || true",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn guest_save_restore_with_data_and_host_snapshots() {
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "st",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
    ]);
    d.ok(&["vm", "start", "st", "--wait"]);
    let g = d.json(&[
        "vm",
        "guest-access",
        "grant",
        "st",
        "--principal",
        "app",
        "--ops",
        "save,list,restore,reconfigure",
    ]);
    let secret = g["secret"].as_str().expect("secret").to_string();
    d.sh(
        "st",
        &format!("echo 'export DROVER_PRINCIPAL=app DROVER_SECRET={secret}' > /tmp/cred"),
    );
    // The app listens for its events, then saves.
    d.sh(
        "st",
        "(drover-guest listen --app-id app1 > /tmp/events.log 2>&1 &) ; sleep 0.3",
    );
    d.sh("st", "echo disk-before > /tmp/b && dd if=/tmp/b of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null");
    let out = app(
        &d,
        "st",
        "drover-guest save --name g1 --app-id app1 --data '{\"n\":1}' --wait",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).expect("event");
    assert_eq!(
        (ev["status"].as_str(), ev["data"]["n"].as_u64()),
        (Some("completed"), Some(1)),
        "{ev}"
    );
    let states = d.json(&["snapshot", "list", "st"]);
    assert_eq!(states[0]["name"], "g1");
    assert_eq!(states[0]["created_by"], "guest:app");
    let listed = app(&d, "st", "drover-guest list");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"g1\""));

    // Change things, then ask for the restore with data. The asking process is gone after it.
    d.sh("st", "echo x > /tmp/newfile && echo disk-after! > /tmp/b && dd if=/tmp/b of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null");
    app(&d, "st", "(sleep 0.3; drover-guest restore g1 --app-id app1 --data '{\"msg\":\"hello from the past\"}') >/dev/null 2>&1 &");
    let restored = wait_for(
        "the restore event in the restored state",
        Duration::from_secs(40),
        || {
            std::thread::sleep(Duration::from_millis(300));
            let evs = events(&d, "st");
            evs.into_iter().find(|e| e["op"] == "restore")
        },
    );
    assert_eq!(restored["status"], "completed", "{restored}");
    assert_eq!(restored["data"]["msg"], "hello from the past");
    assert!(
        !d.sh("st", "ls /tmp; true").contains("newfile"),
        "the file written after the save is gone"
    );
    assert_eq!(d.sh("st", "head -c 11 /dev/vda"), "disk-before");

    // Refusals: wrong credential, unknown state (reported failed, naming the known ones).
    let bad = d.drover(&[
        "vm",
        "exec",
        "st",
        "--",
        "sh",
        "-c",
        "DROVER_PRINCIPAL=app DROVER_SECRET=bad drover-guest list",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let unknown = app(&d, "st", "drover-guest restore nope --wait");
    assert_eq!(unknown.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&unknown.stdout).contains("g1"),
        "{}",
        String::from_utf8_lossy(&unknown.stdout)
    );
    assert!(d
        .fails(3, &["snapshot", "restore", "st", "nope"])
        .contains("known"));

    // Host side: fast and classic saves, restore, delete.
    let h1 = d.json(&["snapshot", "create", "st", "--name", "h1"]);
    assert_eq!(h1["mode"], "fast");
    let c1 = d.json(&["snapshot", "create", "st", "--name", "c1", "--classic"]);
    assert_eq!(c1["mode"], "classic");
    d.sh("st", "echo later > /tmp/later");
    d.ok(&["snapshot", "restore", "st", "h1"]);
    assert!(!d.sh("st", "ls /tmp").contains("later"));
    d.sh("st", "echo later > /tmp/later");
    // Some seconds after the save: the restored guest's clock is set to the host's, not left
    // where it was saved.
    std::thread::sleep(Duration::from_secs(5));
    d.ok(&["snapshot", "restore", "st", "c1"]);
    assert!(!d.sh("st", "ls /tmp").contains("later"));
    wait_for("the guest's clock set", Duration::from_secs(20), || {
        let guest: i64 = d.sh("st", "date +%s").trim().parse().ok()?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs() as i64;
        ((host - guest).abs() <= 2).then_some(())
    });
    d.ok(&["snapshot", "delete", "st", "g1"]);
    let names: Vec<String> = d
        .json(&["snapshot", "list", "st"])
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["h1", "c1"]);
    d.ok(&["snapshot", "restore", "st", "h1"]);
    assert_eq!(
        d.sh("st", "head -c 11 /dev/vda"),
        "disk-before",
        "layers survive a deleted state"
    );

    // Memory the VM cannot take live: the host stops, reconfigures and starts it, as asked.
    let kb0: u64 = d
        .sh("st", "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .trim()
        .parse()
        .expect("kb");
    app(
        &d,
        "st",
        "(drover-guest reconfigure --memory 384M >/dev/null 2>&1 &) ; sleep 0.5",
    );
    wait_for("the bigger VM", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(500));
        let out = d.drover(&[
            "vm",
            "exec",
            "st",
            "--",
            "awk",
            "/MemTotal/ {print $2}",
            "/proc/meminfo",
        ]);
        let kb: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (kb > kb0 + 100 * 1024).then_some(())
    });
    let audit = d.ok(&["vm", "audit", "st"]);
    assert!(
        audit.contains("reconfigure") && audit.contains("completed"),
        "{audit}"
    );

    // droverd killed while a guest request is queued: after the restart it is completed or
    // reported failed, never lost; the VM is not left paused.
    d.sh(
        "st",
        &format!("echo 'export DROVER_PRINCIPAL=app DROVER_SECRET={secret}' > /tmp/cred"),
    );
    let out = app(&d, "st", "drover-guest save --name k1 --app-id app1");
    let ticket: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ticket");
    let ticket = ticket["ticket"].as_str().expect("ticket").to_string();
    d.kill9();
    d.spawn();
    wait_for("the request's outcome", Duration::from_secs(60), || {
        let audit = d.ok(&["vm", "audit", "st"]);
        audit
            .lines()
            .any(|l| l.contains(&ticket) && (l.contains("completed") || l.contains("failed")))
            .then_some(())
    });
    wait_for("the guest to answer", Duration::from_secs(30), || {
        d.drover(&["vm", "exec", "st", "--", "true"])
            .status
            .success()
            .then_some(())
    });
}

/// A state deleted while its memory is still being written to disk, then a new save: the new
/// state gets a new id and stays as saved; the deleted one does not come back. (Ids used to be
/// reused, and the old write-out then wrote the deleted state's record over the new one.)
#[test]
fn a_state_deleted_during_its_write_out_stays_deleted_and_a_new_save_is_kept() {
    let d = Daemon::start();
    d.ok(&["vm", "create", "wo", "--memory", "256M"]);
    d.ok(&["vm", "start", "wo", "--wait"]);
    // Enough memory in use that writing the state out takes a while.
    d.ok(&[
        "vm",
        "exec",
        "wo",
        "--timeout",
        "300",
        "--",
        "sh",
        "-c",
        "mount -o remount,size=90% /tmp; head -c 150000000 /dev/urandom > /tmp/fill",
    ]);
    let a = d.json(&["snapshot", "create", "wo", "--name", "a"]);
    d.ok(&["snapshot", "delete", "wo", "a"]);
    let b = d.json(&["snapshot", "create", "wo", "--name", "b"]);
    assert_ne!(a["id"], b["id"], "a deleted state's id was issued again");
    let b_id = b["id"].as_str().unwrap_or_default().to_string();
    wait_for("state b on disk", Duration::from_secs(120), || {
        (d.json(&["snapshot", "show", "wo", &b_id])["phase"] == "durable").then_some(())
    });
    // Long enough for a's write-out to have ended, whatever it did.
    std::thread::sleep(Duration::from_secs(3));
    let list = d.json(&["snapshot", "list", "wo"]);
    let names: Vec<(String, String, String)> = list
        .as_array()
        .map(|l| {
            l.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or_default().to_string(),
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["phase"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, vec![(b_id.clone(), "b".into(), "durable".into())]);
    // And b is whole: it restores, and the guest still has its memory.
    d.ok(&["snapshot", "restore", "wo", "b"]);
    let out = d.ok(&["vm", "exec", "wo", "--", "sh", "-c", "wc -c < /tmp/fill"]);
    assert_eq!(out.trim(), "150000000");
}
