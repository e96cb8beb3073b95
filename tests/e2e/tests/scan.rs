//! Host identity and migration-safe scans, on one real guest: the guest reads the id of the host
//! that runs it (`drover-guest host-id`); a scan on one host is consistent; a "migration" in the
//! middle of a scan — droverd restarted with another `--host-id` while the VM keeps running, which
//! it re-adopts — makes the scan report RC_INCONSISTENT_OUTPUT (exit 5), `--repeat-if-migrated`
//! scans again and succeeds, the migrated.d hook runs exactly once per change (the agent's own
//! check and the scan's `--notify-if-migrated` see the same change), and the host records the
//! guest's notice in the VM's audit trail.

use drover_e2e::{wait_for, Daemon};
use std::time::Duration;

const VM: &str = "sc";
/// A test hook: one line per run, so "exactly once" is countable.
const HOOK: &str = "mkdir -p /etc/drover/hooks/migrated.d && \
    printf '#!/bin/sh\\necho \"$DROVER_OLD_HOST_ID $DROVER_NEW_HOST_ID\" >> /tmp/hook.log\\n' \
    > /etc/drover/hooks/migrated.d/10-test && chmod +x /etc/drover/hooks/migrated.d/10-test";

fn json_line(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Start a scan in the background in the guest; its stdout, stderr and exit code go to
/// /tmp/NAME.{out,err,rc}. Returns once it has read the host id the first time.
fn background_scan(d: &Daemon, name: &str, flags: &str) {
    d.sh(
        VM,
        &format!(
            "(drover-guest scan {flags} > /tmp/{name}.out 2> /tmp/{name}.err; echo $? > /tmp/{name}.rc) \
             </dev/null >/dev/null 2>&1 &"
        ),
    );
    wait_for(
        "the scan's first read of the host id",
        Duration::from_secs(30),
        || {
            d.sh(VM, &format!("cat /tmp/{name}.err 2>/dev/null || true"))
                .contains("scanning")
                .then_some(())
        },
    );
}

/// "Migrate": restart droverd with another host id; the VM keeps running and is re-adopted.
fn move_to(d: &mut Daemon, host: &str) {
    d.kill9();
    d.set_extra(&["--host-id", host]);
    d.spawn();
    wait_for("the re-adopted VM's agent", Duration::from_secs(60), || {
        d.drover(&["vm", "exec", VM, "--", "true"])
            .status
            .success()
            .then_some(())
    });
}

/// The finished background scan: (exit code, stdout, stderr).
fn finished_scan(d: &Daemon, name: &str) -> (i32, String, String) {
    let rc = wait_for("the scan to finish", Duration::from_secs(120), || {
        let rc = d.sh(VM, &format!("cat /tmp/{name}.rc 2>/dev/null || true"));
        rc.trim().parse::<i32>().ok()
    });
    (
        rc,
        d.sh(VM, &format!("cat /tmp/{name}.out")),
        d.sh(VM, &format!("cat /tmp/{name}.err")),
    )
}

fn hook_runs(d: &Daemon) -> Vec<String> {
    d.sh(VM, "cat /tmp/hook.log 2>/dev/null || true")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn scans_notice_a_host_change_and_hooks_run_once() {
    let mut d = Daemon::start_with(&["--host-id", "host-a"]);
    let host = d.json(&["host", "info"]);
    assert_eq!(host["identity"]["id"], "host-a", "{host}");
    assert!(host["identity"]["serial"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(d.ok(&["host", "info"]).contains("host id:      host-a"));
    // A bad id is refused before anything starts.
    let out = std::process::Command::new(drover_e2e::bin_dir().join("droverd"))
        .args(["--host-id", "no spaces", "--state-dir", "/nonexistent"])
        .output()
        .expect("droverd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid host id"));

    d.ok(&["vm", "create", VM, "--memory", "256M"]);
    d.ok(&["vm", "start", VM, "--wait"]);
    d.sh(VM, HOOK);

    // The host that runs the VM answers, without any principal.
    let id = json_line(&d.sh(VM, "drover-guest host-id"));
    assert_eq!(id["host"]["id"], "host-a", "{id}");
    let generation = id["generation_id"]
        .as_str()
        .expect("generation id")
        .to_string();
    assert_eq!(generation.len(), 36, "{id}");
    // The booted guest does not count as a move: the agent took it as its baseline.
    assert!(hook_runs(&d).is_empty());

    // On one host: consistent, with the inventory.
    let out = d.drover(&["vm", "exec", VM, "--", "drover-guest", "scan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scan = json_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(scan["status"], "consistent");
    assert_eq!(scan["host"]["id"], "host-a");
    assert_eq!(scan["attempts"], 1);
    let inv = &scan["inventory"];
    assert!(inv["cpus"]["count"].as_u64().unwrap_or(0) >= 1, "{inv}");
    assert!(
        inv["memory"]["total_bytes"].as_u64().unwrap_or(0) > 100 << 20,
        "{inv}"
    );
    assert!(
        inv["kernel"]["release"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{inv}"
    );
    assert!(inv["nics"].is_array() && inv["disks"].is_array() && inv["dmi"].is_object());

    // A move in the middle of a plain scan: inconsistent, output discarded, exit 5.
    background_scan(&d, "s1", "--pause-between 6000");
    move_to(&mut d, "host-b");
    let (rc, out, err) = finished_scan(&d, "s1");
    assert_eq!(rc, 5, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("RC_INCONSISTENT_OUTPUT"), "{err}");
    let report = json_line(&out);
    assert_eq!(report["status"], "RC_INCONSISTENT_OUTPUT");
    assert_eq!(
        (
            report["old_host_id"].as_str(),
            report["new_host_id"].as_str()
        ),
        (Some("host-a"), Some("host-b"))
    );
    assert!(
        report.get("inventory").is_none(),
        "no inventory from two machines"
    );
    // The agent noticed the new host by itself and ran the hook, once.
    wait_for("the agent's hook run", Duration::from_secs(60), || {
        (!hook_runs(&d).is_empty()).then_some(())
    });
    assert_eq!(hook_runs(&d), ["host-a host-b"]);

    // A move during a scan that repeats and notifies: one rescan, then the inventory.
    background_scan(
        &d,
        "s2",
        "--repeat-if-migrated --notify-if-migrated --pause-between 6000",
    );
    move_to(&mut d, "host-c");
    let (rc, out, err) = finished_scan(&d, "s2");
    assert_eq!(rc, 0, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("RC_INCONSISTENT_OUTPUT"), "{err}");
    let scan = json_line(&out);
    assert_eq!(scan["status"], "consistent");
    assert_eq!(scan["host"]["id"], "host-c");
    assert_eq!(scan["attempts"], 2, "{scan}");
    let m = &scan["migrations"][0];
    assert_eq!(
        (m["old_host_id"].as_str(), m["new_host_id"].as_str()),
        (Some("host-b"), Some("host-c"))
    );
    assert!(
        matches!(m["hooks"].as_str(), Some("ran" | "already-handled")),
        "{m}"
    );
    assert!(scan["inventory"]["cpus"].is_object());
    // The scan and the agent both saw host-b -> host-c: the hook ran once for it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hook_runs(&d), ["host-a host-b", "host-b host-c"]);
    // The same VM, not a restore: the generation id did not change.
    let id = json_line(&d.sh(VM, "drover-guest host-id"));
    assert_eq!(
        (id["host"]["id"].as_str(), id["generation_id"].as_str()),
        (Some("host-c"), Some(generation.as_str()))
    );

    // The hosts recorded the guest's notices, one per change, in the VM's audit trail.
    let audit = d.json(&["vm", "audit", VM]);
    let notices: Vec<String> = audit
        .as_array()
        .expect("audit list")
        .iter()
        .filter(|e| e["op"] == "migration-notice")
        .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(notices[0].contains("host host-a -> host-b"), "{notices:?}");
    assert!(notices[1].contains("host host-b -> host-c"), "{notices:?}");
}
