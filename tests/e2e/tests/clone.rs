//! Instant clones (issue 15, items 5 and 6): one template booted, a state saved, N clones (10 by
//! default, `CLONES=N` to change) each checked from inside: its own hostname, machine-id and
//! MAC, a working agent, the memory marker the template wrote before the save. The template's
//! state files and layers hash the same after the clones wrote to their disks and memory. The
//! clones are ordinary VMs afterwards (restart, snapshot, re-adoption by a new droverd, delete),
//! and the template's state cannot be deleted while they exist.

use drover_e2e::{wait_for, Daemon};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn sha256(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// Every file of the template's state: manifest, device state, memory on disk, the RAM copy
/// clones map, and the disk layers it pins.
fn state_files(d: &Daemon, state: &serde_json::Value) -> BTreeMap<PathBuf, String> {
    let dir = d.state_dir().join("vms/tpl/states/s1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("state dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.push(d.ram_dir().join("tpl@s1"));
    for l in state["layers"].as_object().expect("layers").values() {
        files.push(PathBuf::from(l.as_str().expect("layer path")));
    }
    files.into_iter().map(|p| (p.clone(), sha256(&p))).collect()
}

#[test]
fn clones_get_their_own_identity_share_the_template_memory_and_never_write_its_state() {
    let count: usize = std::env::var("CLONES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let mut d = Daemon::start();
    d.ok(&[
        "vm",
        "create",
        "tpl",
        "--memory",
        "256M",
        "--disk",
        "size=32M,id=data",
        "--nic",
        "user",
    ]);
    d.ok(&["vm", "start", "tpl", "--wait"]);
    let tpl_id = d.sh("tpl", "cat /etc/machine-id").trim().to_string();
    assert_eq!(
        tpl_id.len(),
        32,
        "the image gives every boot a machine-id: {tpl_id}"
    );
    // Only in the template's memory (the initramfs is RAM), written before the save.
    d.sh("tpl", "echo MEM-c10e > /tmp/marker");
    d.ok(&["snapshot", "create", "tpl", "--name", "warm"]);

    // Refused before anything is made.
    let e = d.fails(4, &["vm", "clone", "tpl/warm", "tpl"]);
    assert!(e.contains("tpl"), "{e}");
    let e = d.fails(1, &["vm", "clone", "tpl/warm", "c", "--count", "65"]);
    assert!(e.contains("1 to 64"), "{e}");
    let e = d.fails(3, &["vm", "clone", "tpl/nope", "c"]);
    assert!(e.contains("no state nope"), "{e}");
    assert_eq!(d.json(&["vm", "list"]).as_array().map(Vec::len), Some(1));
    let n = count.to_string();
    let dry_run = ["vm", "clone", "tpl/warm", "c", "--count", &n, "--dry-run"];
    // Just after the save its memory is still being captured (for a second or two, here).
    let early = d.drover(&dry_run);
    if !early.status.success() {
        let e = String::from_utf8_lossy(&early.stderr);
        assert_eq!(early.status.code(), Some(4), "{e}");
        assert!(e.contains("not restorable yet"), "{e}");
    }
    let state = wait_for("the state to be durable", Duration::from_secs(60), || {
        let s = d.json(&["snapshot", "show", "tpl", "warm"]);
        (s["phase"] == "durable").then_some(s)
    });
    let mut a = vec!["--output", "json"];
    a.extend_from_slice(&dry_run);
    let dry: serde_json::Value = serde_json::from_str(&d.ok(&a)).expect("JSON");
    assert_eq!(
        dry["checked"].as_array().map(Vec::len),
        Some(count),
        "{dry}"
    );
    assert_eq!(
        d.json(&["vm", "list"]).as_array().map(Vec::len),
        Some(1),
        "a dry run makes nothing"
    );
    let before = state_files(&d, &state);

    let r = d.json(&[
        "vm",
        "clone",
        "tpl/warm",
        "c",
        "--count",
        &count.to_string(),
    ]);
    let clones = r["clones"].as_array().expect("clones").clone();
    assert_eq!(clones.len(), count, "{r}");
    let mut ms: Vec<u64> = clones
        .iter()
        .filter_map(|c| c["agent_ms"].as_u64())
        .collect();
    ms.sort();
    eprintln!(
        "{count} clones in {} ms; per clone to running {:?} ms, to the agent's new identity {:?} ms",
        r["total_ms"],
        clones.iter().map(|c| c["running_ms"].as_u64().unwrap_or(0)).collect::<Vec<_>>(),
        ms
    );
    let (mut hostnames, mut ids, mut macs) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (i, c) in clones.iter().enumerate() {
        let name = format!("c-{}", i + 1);
        assert_eq!(c["name"], name.as_str(), "{c}");
        assert!(c["identity_error"].is_null(), "{c}");
        let mac = c["macs"]["net0"].as_str().or_else(|| {
            c["macs"]
                .as_object()
                .and_then(|m| m.values().next())
                .and_then(|v| v.as_str())
        });
        let mac = mac.expect("a MAC").to_string();
        // From inside, through the agent.
        let out = d.sh(
            &name,
            "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; cat /tmp/marker",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], name, "hostname of {name}");
        assert_eq!(
            lines[1],
            c["machine_id"].as_str().unwrap_or(""),
            "machine-id of {name}"
        );
        assert_ne!(lines[1], tpl_id, "{name} has the template's machine-id");
        assert_eq!(lines[2], mac, "MAC of {name}");
        assert_eq!(lines[3], "MEM-c10e", "{name} runs on the template's memory");
        hostnames.insert(lines[0].to_string());
        ids.insert(lines[1].to_string());
        macs.insert(lines[2].to_string());
        // Each writes to its memory and its disk.
        d.sh(
            &name,
            &format!(
                "dd if=/dev/urandom of=/tmp/junk bs=1M count=8 2>/dev/null; echo DISK-{name} | dd of=/dev/vda bs=512 seek=200 conv=notrunc,fsync 2>/dev/null; echo >/tmp/marker {name}"
            ),
        );
        let v = d.json(&["vm", "show", &name]);
        assert_eq!(v["clone_of"]["vm"], "tpl", "{v}");
        assert!(v["clone_of"]["identity_applied_ms"].is_u64(), "{v}");
    }
    assert_eq!(hostnames.len(), count);
    assert_eq!(ids.len(), count);
    assert_eq!(macs.len(), count);
    let tpl_mac = d
        .sh("tpl", "cat /sys/class/net/eth0/address")
        .trim()
        .to_string();
    assert!(!macs.contains(&tpl_mac), "a clone has the template's MAC");
    // The template is untouched: its memory and its own view.
    assert_eq!(d.sh("tpl", "cat /tmp/marker").trim(), "MEM-c10e");
    assert_eq!(d.sh("tpl", "hostname").trim(), "tpl");

    // The template's state was never written.
    assert_eq!(
        state_files(&d, &state),
        before,
        "a clone wrote into the template's state"
    );

    // While clones exist, the state and the template stay.
    let e = d.fails(4, &["snapshot", "delete", "tpl", "warm"]);
    assert!(e.contains("c-1") && e.contains("delete them first"), "{e}");
    let e = d.fails(4, &["vm", "delete", "--force", "tpl"]);
    assert!(e.contains("c-1"), "{e}");

    // Ordinary VMs: a snapshot of a clone, a cold restart (its disk kept, its name as
    // hostname), and a new droverd re-adopts them all.
    d.ok(&["snapshot", "create", "c-2"]);
    d.ok(&["vm", "restart", "c-1", "--wait"]);
    let out = d.sh(
        "c-1",
        "hostname; dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | head -c 9",
    );
    assert_eq!(out.trim_end(), "c-1\nDISK-c-1", "{out}");
    d.kill9();
    d.spawn();
    for i in 1..=count {
        let name = format!("c-{i}");
        assert_eq!(d.json(&["vm", "show", &name])["state"], "running", "{name}");
    }
    assert_eq!(
        d.sh(&format!("c-{count}"), "cat /tmp/marker").trim(),
        format!("c-{count}")
    );

    for i in 1..=count {
        d.ok(&["vm", "delete", "--force", &format!("c-{i}")]);
    }
    assert_eq!(state_files(&d, &state), before);
    d.ok(&["snapshot", "delete", "tpl", "warm"]);
    d.ok(&["vm", "delete", "--force", "tpl"]);
}

/// A droverd killed after a clone's QEMU runs but before its agent took its identity: the next
/// droverd re-adopts the clone and gives it that identity (crash point `clone-identity`, debug
/// builds).
#[test]
fn a_clone_cut_off_before_its_identity_gets_it_from_the_next_droverd() {
    let mut d = Daemon::start();
    d.ok(&["vm", "create", "tpl", "--memory", "256M", "--nic", "user"]);
    d.ok(&["vm", "start", "tpl", "--wait"]);
    d.ok(&["snapshot", "create", "tpl", "--name", "warm"]);
    wait_for("the state to be ready", Duration::from_secs(60), || {
        let s = d.json(&["snapshot", "show", "tpl", "warm"]);
        (s["phase"] != "capturing").then_some(())
    });
    d.kill9();
    d.set_env(&[("DROVER_TEST_CRASH_AT", "clone-identity")]);
    d.spawn();
    assert!(!d.drover(&["vm", "clone", "tpl/warm", "k"]).status.success());
    assert!(
        d.wait_exit(Duration::from_secs(60)),
        "droverd did not reach clone-identity"
    );
    d.set_env(&[]);
    d.spawn();
    let v = wait_for("the clone's identity", Duration::from_secs(60), || {
        let v = d.json(&["vm", "show", "k"]);
        v["clone_of"]["identity_applied_ms"].is_u64().then_some(v)
    });
    assert_eq!(v["state"], "running", "{v}");
    let out = d.sh("k", "hostname; cat /etc/machine-id");
    let want = format!("k\n{}", v["clone_of"]["machine_id"].as_str().unwrap_or(""));
    assert_eq!(out.trim_end(), want);
    d.ok(&["vm", "delete", "--force", "k"]);
    d.ok(&["vm", "delete", "--force", "tpl"]);
}
