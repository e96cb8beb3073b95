//! VM state through QEMU's migration machinery: saving device state to a file (with guest RAM in a
//! shared file, `x-ignore-shared` leaves RAM out and the save takes milliseconds), loading it into
//! a QEMU started with `-incoming defer`, and disk layers (`blockdev-snapshot`).

use crate::qmp::{Qmp, QmpError};
use serde_json::{json, Value};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// The name under which QEMU holds a state file handed to it.
const STATE_FD: &str = "drover-state";

/// Set migration capabilities: `x-ignore-shared` for the fast path, off for a classic save.
pub async fn set_ignore_shared(qmp: &Qmp, on: bool) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})),
    )
    .await
    .map(|_| ())
}

/// QEMU's reason when a `query-migrate` answer says the migration failed or was cancelled.
fn failure(m: &Value, fallback: &str) -> Option<QmpError> {
    matches!(
        m.get("status").and_then(Value::as_str),
        Some("failed") | Some("cancelled")
    )
    .then(|| QmpError::Command {
        command: "migrate".into(),
        class: "MigrationFailed".into(),
        desc: m
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or(fallback)
            .to_string(),
    })
}

/// Wait for the running migration to finish; `Err` with QEMU's reason if it failed.
pub async fn wait_migration(qmp: &Qmp, timeout: Duration) -> Result<Value, QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        // A paused VM's memory is written in the migration's last step, under QEMU's main lock:
        // QMP answers only once it is all out (11 s for 1.5 GiB to a busy disk here), so the
        // query may wait as long as the migration may take.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(10));
        let v = qmp.execute_timeout("query-migrate", None, left).await?;
        if let Some(e) = failure(&v, "migration failed") {
            return Err(e);
        }
        if v.get("status").and_then(Value::as_str) == Some("completed") {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(QmpError::Timeout("migrate".into()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The status `query-migrate` reports (`none` when no migration ever ran).
async fn migration_status(qmp: &Qmp) -> Result<String, QmpError> {
    let v = qmp.execute("query-migrate", None).await?;
    Ok(v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string())
}

/// Whether a migration in `status` is still under way.
fn under_way(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling"
    )
}

/// Poll until the migration is no longer under way; `Ok(None)` past `deadline`.
async fn wait_not_under_way(qmp: &Qmp, deadline: Instant) -> Result<Option<String>, QmpError> {
    loop {
        let now = migration_status(qmp).await?;
        if !under_way(&now) {
            return Ok(Some(now));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cancel an outgoing migration (or background snapshot) this QEMU still runs, and wait until
/// QEMU has let go of it. Returns the status it was in (`None`: none was running).
pub async fn cancel_migration(qmp: &Qmp, timeout: Duration) -> Result<Option<String>, QmpError> {
    let was = migration_status(qmp).await?;
    if !under_way(&was) {
        return Ok(None);
    }
    qmp.execute("migrate_cancel", None).await?;
    match wait_not_under_way(qmp, Instant::now() + timeout).await? {
        Some(_) => Ok(Some(was)),
        None => Err(QmpError::Timeout("migrate_cancel".into())),
    }
}

/// Wait for an outgoing migration (or background snapshot) this QEMU still runs to end by
/// itself; cancel it only after `timeout`. Returns how it ended (`None`: none was running).
/// What a droverd that restarts in the middle of a capture does: the receiving QEMU outlives
/// droverd, so the stream ends normally, and QEMU 7.2 does not survive a cancelled background
/// snapshot (its vCPUs stay stuck on write-protected memory).
pub async fn settle_migration(qmp: &Qmp, timeout: Duration) -> Result<Option<String>, QmpError> {
    if !under_way(&migration_status(qmp).await?) {
        return Ok(None);
    }
    match wait_not_under_way(qmp, Instant::now() + timeout).await? {
        Some(end) => Ok(Some(end)),
        None => {
            cancel_migration(qmp, Duration::from_secs(10)).await?;
            Err(QmpError::Timeout("migration".into()))
        }
    }
}

/// Save the (paused) VM's state to `file` (made new, mode 0600). With `fast`, shared RAM is left
/// out.
///
/// QEMU is handed the open file (`getfd`, then `fd:`), as [`load_state`] and libvirt do: it
/// writes the state itself, with no shell, no `cat` and no pipe between (a classic state holds
/// all of RAM, and the pipe cost a second copy of it). droverd makes the file, so QEMU's user
/// needs no right to write in the state dir.
pub async fn save_state(qmp: &Qmp, file: &Path, fast: bool) -> Result<(), QmpError> {
    set_ignore_shared(qmp, fast).await?;
    if !fast {
        // The default 128 MiB/s cap would make a classic save of 2 GiB take 16 s.
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 16u64 << 30})),
        )
        .await?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file);
    hand_over(qmp, file, f).await?;
    qmp.execute("migrate", Some(json!({"uri": format!("fd:{STATE_FD}")})))
        .await?;
    wait_migration(qmp, Duration::from_secs(600))
        .await
        .map(|_| ())
}

/// Give QEMU `opened` (the state file `file`, just opened) under the name [`STATE_FD`], for an
/// `fd:` migration URI. QEMU keeps its own copy of the descriptor; ours is closed.
async fn hand_over(
    qmp: &Qmp,
    file: &Path,
    opened: std::io::Result<std::fs::File>,
) -> Result<(), QmpError> {
    let f = opened.map_err(|source| QmpError::Io {
        path: file.display().to_string(),
        source,
    })?;
    qmp.execute_with_fd(
        "getfd",
        Some(json!({"fdname": STATE_FD})),
        std::os::fd::AsFd::as_fd(&f),
    )
    .await
    .map(|_| ())
}

/// Load state from `file` into a QEMU started with `-incoming defer`; it stays paused.
///
/// QEMU is handed the open file (`getfd`, then `fd:`), as libvirt does: it reads the state
/// itself, with no `cat` and no pipe between (a classic state holds all of RAM). droverd opens
/// it, so QEMU's user needs no right to read the state dir.
pub async fn load_state(qmp: &Qmp, file: &Path, fast: bool) -> Result<(), QmpError> {
    set_ignore_shared(qmp, fast).await?;
    hand_over(qmp, file, std::fs::File::open(file)).await?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("fd:{STATE_FD}")})),
    )
    .await?;
    wait_migration(qmp, Duration::from_secs(600))
        .await
        .map(|_| ())
}

/// Turn `mapped-ram` and `multifd` on or off (with 2 channels when on).
async fn set_mapped_ram(qmp: &Qmp, on: bool) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": false},
            // Left on by an earlier fast save; QEMU refuses it together with multifd.
            {"capability": "background-snapshot", "state": false},
            {"capability": "mapped-ram", "state": on},
            {"capability": "multifd", "state": on},
        ]})),
    )
    .await?;
    if on {
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 16u64 << 30, "multifd-channels": 2})),
        )
        .await?;
    }
    Ok(())
}

/// A classic save (RAM in the file) with `mapped-ram` and `multifd` (QEMU >= 9.0): every RAM
/// page at a fixed offset of `file`, written by two threads with pwrite. On QEMU 10.0 it restored
/// 2 GiB faster than the stream through `exec:cat` (before QEMU was handed the file) in three sessions of bench/mapped_ram.py (or as
/// fast) and saved faster in two of them (the machine was loaded; see bench/README.md). The
/// file must be loaded with [`load_state_mapped`]. The capabilities are switched off again
/// afterwards: the VM's QEMU runs on, and a later live migration or background snapshot must
/// not inherit them.
pub async fn save_state_mapped(qmp: &Qmp, file: &Path) -> Result<(), QmpError> {
    set_mapped_ram(qmp, true).await?;
    let saved = async {
        qmp.execute(
            "migrate",
            Some(json!({"uri": format!("file:{}", file.display())})),
        )
        .await?;
        wait_migration(qmp, Duration::from_secs(600)).await
    }
    .await;
    let reset = set_mapped_ram(qmp, false).await;
    saved?;
    reset
}

/// Load a state saved with [`save_state_mapped`] into a QEMU started with `-incoming defer`; it
/// stays paused, with the capabilities off again.
pub async fn load_state_mapped(qmp: &Qmp, file: &Path) -> Result<(), QmpError> {
    set_mapped_ram(qmp, true).await?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("file:{}", file.display())})),
    )
    .await?;
    wait_migration(qmp, Duration::from_secs(600)).await?;
    set_mapped_ram(qmp, false).await
}

/// Start a background snapshot of a VM into `uri` (another QEMU waiting with
/// [`receive_snapshot`]): QEMU pauses the VM only to take its device state and write-protect its
/// RAM, then runs it on and streams each page before the guest first changes it
/// (userfaultfd), so the stream holds the memory of the pause. Wait with [`wait_running`] for
/// the guest to run again and with [`wait_migration`] for the stream to end.
pub async fn background_snapshot(qmp: &Qmp, uri: &str) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": false},
            {"capability": "background-snapshot", "state": true},
        ]})),
    )
    .await?;
    // The stream stays on this host; the default 128 MiB/s cap would stretch a 2 GiB capture to
    // 16 s, during which the guest pays a copy for every first write.
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 16u64 << 30})),
    )
    .await?;
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    Ok(())
}

/// Make a QEMU started with `-incoming defer -S` (and detached disks: it activates them when the
/// stream ends, so it can save its device state afterwards) receive a migration stream on `uri`.
pub async fn receive_snapshot(qmp: &Qmp, uri: &str) -> Result<(), QmpError> {
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    Ok(())
}

/// Wait until the VM runs again after a [`background_snapshot`] has taken its device state;
/// `Err` if the snapshot failed first.
pub async fn wait_running(qmp: &Qmp, timeout: Duration) -> Result<(), QmpError> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp.execute("query-status", None).await?;
        if st.get("running").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        let m = qmp.execute("query-migrate", None).await?;
        if let Some(e) = failure(&m, "background snapshot failed") {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(QmpError::Timeout("background snapshot".into()));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Wait until a [`background_snapshot`] has taken the VM's device state and write-protected its
/// RAM, the moment the guest may run again.
///
/// QEMU < 9.0 restarts the VM itself then: wait for it to run ([`wait_running`]). QEMU 9.0 and
/// newer put it back in the run state it had when the snapshot began, and Drover pauses first
/// (to switch the disks to new layers at the same instant), so it stays paused and nothing else
/// tells the moment: the migration thread takes the device state, schedules the VM's return and
/// only then sends its first RAM page, so the first pages counted (`ram.normal`/`duplicate`) mark
/// it. One more round trip lets QEMU's main loop run the scheduled return before the caller's
/// `cont` (which it would otherwise undo).
pub async fn wait_device_state(
    qmp: &Qmp,
    keeps_run_state: bool,
    timeout: Duration,
) -> Result<(), QmpError> {
    if !keeps_run_state {
        return wait_running(qmp, timeout).await;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let m = qmp.execute("query-migrate", None).await?;
        let pages = ["normal", "duplicate"]
            .iter()
            .map(|k| {
                m.get("ram")
                    .and_then(|r| r.get(*k))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            })
            .sum::<u64>();
        if let Some(e) = failure(&m, "background snapshot failed") {
            return Err(e);
        }
        match m.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("active") if pages > 0 => {
                qmp.execute("query-status", None).await?;
                return Ok(());
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(QmpError::Timeout("background snapshot".into()));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Put a new qcow2 overlay (`overlay_path`, node `overlay_node`) on top of disk node `node`; the
/// old image becomes read-only and the guest writes to the overlay from now on.
pub async fn snapshot_disk(
    qmp: &Qmp,
    node: &str,
    overlay_path: &Path,
    overlay_node: &str,
) -> Result<(), QmpError> {
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2",
            "node-name": overlay_node,
            "discard": "unmap",
            "file": {"driver": "file", "filename": overlay_path},
            "backing": null,
        })),
    )
    .await?;
    if let Err(e) = qmp
        .execute(
            "blockdev-snapshot",
            Some(json!({"node": node, "overlay": overlay_node})),
        )
        .await
    {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": overlay_node})))
            .await;
        return Err(e);
    }
    Ok(())
}
