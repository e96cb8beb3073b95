//! QEMU's side of moving a running VM to another host, as droverd sequences it (the orchestration,
//! who owns the VM when, lives in droverd): each disk mirrored into the destination's NBD export
//! (`blockdev-mirror`, as libvirt's `--copy-storage-all`), memory streamed over TCP, a stop before
//! the switch-over so the mirrors complete, then the final state; and on the destination, the NBD
//! exports and the incoming stream.

use crate::qmp::{Qmp, QmpError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What can go wrong beyond a QMP command's own error.
#[derive(Debug, thiserror::Error)]
pub enum LiveMigrationError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A disk mirror disappeared before it was complete.
    #[error("copying a disk to the destination failed (see its log)")]
    MirrorFailed,
    /// QEMU's migration failed; its reason.
    #[error("QEMU's migration failed: {0}")]
    Failed(String),
    /// Waited too long.
    #[error("{0}")]
    Timeout(String),
    /// The destination's memory did not arrive completely.
    #[error("the memory has not fully arrived (migration {0})")]
    Incomplete(String),
}

/// The node (and job) name of the mirror target of disk `id`.
pub fn mirror_node(id: &str) -> String {
    format!("mig-{id}")
}

/// A block job as `query-block-jobs` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct BlockJob {
    /// The job's id (QEMU calls it `device`).
    pub device: String,
    /// Bytes done.
    #[serde(default)]
    pub offset: u64,
    /// Bytes in all (grows with the guest's new writes).
    #[serde(default)]
    pub len: u64,
    /// A mirror is `ready` once source and target only differ by new writes.
    #[serde(default)]
    pub ready: bool,
}

/// The block jobs among `ids` that QEMU still runs.
pub async fn block_jobs(qmp: &Qmp, ids: &[String]) -> Result<Vec<BlockJob>, QmpError> {
    Ok(all_block_jobs(qmp)
        .await?
        .into_iter()
        .filter(|j| ids.contains(&j.device))
        .collect())
}

async fn all_block_jobs(qmp: &Qmp) -> Result<Vec<BlockJob>, QmpError> {
    let list = qmp.execute("query-block-jobs", None).await?;
    serde_json::from_value(list)
        .map_err(|e| QmpError::Protocol(format!("query-block-jobs answered {e}")))
}

/// Where a disk's mirror writes: the destination's NBD export.
#[derive(Debug, Clone)]
pub struct NbdTarget<'a> {
    /// The destination's address.
    pub host: &'a str,
    /// Its NBD server's port.
    pub port: u16,
    /// The export's name.
    pub export: &'a str,
}

/// Start mirroring block node `device` (its active layer) into `target`, as job (and node)
/// `job`, at most `speed` bytes/s.
pub async fn mirror_to_nbd(
    qmp: &Qmp,
    job: &str,
    device: &str,
    target: &NbdTarget<'_>,
    speed: u64,
) -> Result<(), QmpError> {
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "nbd",
            "node-name": job,
            "server": {"type": "inet", "host": target.host, "port": target.port.to_string()},
            "export": target.export,
        })),
    )
    .await?;
    qmp.execute(
        "blockdev-mirror",
        Some(json!({
            "job-id": job,
            "device": device,
            "target": job,
            "sync": "full",
            "speed": speed,
        })),
    )
    .await?;
    Ok(())
}

/// Complete mirror jobs (cancelling a `ready` mirror leaves its target a point-in-time copy)
/// and drop their NBD nodes.
pub async fn complete_mirrors(
    qmp: &Qmp,
    jobs: &[String],
    timeout: Duration,
) -> Result<(), LiveMigrationError> {
    for j in jobs {
        qmp.execute("block-job-cancel", Some(json!({"device": j})))
            .await?;
    }
    let deadline = Instant::now() + timeout;
    while !block_jobs(qmp, jobs).await?.is_empty() {
        if Instant::now() > deadline {
            return Err(LiveMigrationError::Timeout(format!(
                "the disk mirrors did not finish within {} s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for j in jobs {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": j})))
            .await;
    }
    Ok(())
}

/// How an outgoing migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Stop before the switch-over (to complete disk mirrors).
    pub pause_before_switchover: bool,
    /// The longest planned pause, ms.
    pub downtime_ms: u64,
    /// Bytes/s at most.
    pub bandwidth: u64,
}

/// Start sending memory and device state to `uri` (`tcp:HOST:PORT`).
pub async fn start_outgoing(qmp: &Qmp, uri: &str, tuning: &Tuning) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": false},
            {"capability": "background-snapshot", "state": false},
            {"capability": "pause-before-switchover", "state": tuning.pause_before_switchover},
            // A guest that dirties memory faster than the link carries it is slowed down step
            // by step until the copy converges, instead of migrating forever.
            {"capability": "auto-converge", "state": true},
        ]})),
    )
    .await?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({
            "downtime-limit": tuning.downtime_ms,
            "max-bandwidth": tuning.bandwidth,
        })),
    )
    .await?;
    qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
    Ok(())
}

/// Where a migration is, as `query-migrate` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing ran yet (`none`), or it is setting up.
    Setup,
    /// Copying.
    Active,
    /// Paused before the switch-over (`pause-before-switchover`).
    PreSwitchover,
    /// Done.
    Completed,
    /// Failed or cancelled, with QEMU's reason.
    Failed(String),
    /// Any other status QEMU reports (`device`, `cancelling`, `postcopy-active`, ...).
    Other(String),
}

/// A migration's progress (`query-migrate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Where it is.
    pub phase: Phase,
    /// The switch-over's pause once completed, ms.
    pub downtime_ms: u64,
    /// Memory bytes sent so far.
    pub ram_transferred: u64,
    /// Guest memory in all.
    pub ram_total: u64,
    /// Memory bytes still to send.
    pub ram_remaining: u64,
    /// How fast the guest dirties memory, bytes/s.
    pub dirty_bytes_per_s: u64,
    /// QEMU's estimate of the pause, ms.
    pub expected_downtime_ms: u64,
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |cur, p| cur.get(*p))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

impl Progress {
    /// Read a `query-migrate` answer.
    pub fn from_query(m: &Value) -> Progress {
        let status = m.get("status").and_then(Value::as_str).unwrap_or("none");
        let phase = match status {
            "none" | "setup" => Phase::Setup,
            "active" => Phase::Active,
            "pre-switchover" => Phase::PreSwitchover,
            "completed" => Phase::Completed,
            "failed" | "cancelled" => Phase::Failed(
                m.get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string(),
            ),
            other => Phase::Other(other.to_string()),
        };
        Progress {
            phase,
            downtime_ms: num(m, &["downtime"]),
            ram_transferred: num(m, &["ram", "transferred"]),
            ram_total: num(m, &["ram", "total"]),
            ram_remaining: num(m, &["ram", "remaining"]),
            dirty_bytes_per_s: num(m, &["ram", "dirty-pages-rate"])
                * num(m, &["ram", "page-size"]).max(4096),
            expected_downtime_ms: num(m, &["expected-downtime"]),
        }
    }
}

/// The migration's progress now.
pub async fn progress(qmp: &Qmp) -> Result<Progress, QmpError> {
    Ok(Progress::from_query(
        &qmp.execute("query-migrate", None).await?,
    ))
}

/// Past the pause before the switch-over: send the final state.
pub async fn continue_switchover(qmp: &Qmp) -> Result<(), QmpError> {
    qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
        .await
        .map(|_| ())
}

/// Undo an outgoing migration that will not finish: cancel it and every mirror job whose name
/// starts `mig-`, make sure the guest runs again, and drop the mirror target nodes `nodes`.
/// Best effort: what is already gone is fine.
pub async fn abandon_outgoing(qmp: &Qmp, nodes: &[String]) {
    let _ = qmp.execute("migrate_cancel", None).await;
    if let Ok(jobs) = all_block_jobs(qmp).await {
        for j in jobs.iter().filter(|j| j.device.starts_with("mig-")) {
            let _ = qmp
                .execute(
                    "block-job-cancel",
                    Some(json!({"device": j.device, "force": true})),
                )
                .await;
        }
    }
    // A cancelled migration resumes the guest by itself; make sure.
    for _ in 0..50 {
        match qmp.status().await.ok().as_deref() {
            Some("running") => break,
            Some("paused") | Some("postmigrate") => {
                let _ = qmp.execute("cont", None).await;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in nodes {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": node})))
            .await;
    }
}

/// A disk the destination exports for the source's mirror.
#[derive(Debug, Clone)]
pub struct Export<'a> {
    /// The export's name (the disk's id).
    pub name: &'a str,
    /// The block node written into.
    pub node: String,
}

/// Destination: serve `exports` (writable) over NBD on `host:port`.
pub async fn export_disks(
    qmp: &Qmp,
    host: &str,
    port: u16,
    exports: &[Export<'_>],
) -> Result<(), QmpError> {
    qmp.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "inet", "data": {"host": host, "port": port.to_string()}}})),
    )
    .await?;
    for e in exports {
        qmp.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd",
                "id": mirror_node(e.name),
                "node-name": e.node,
                "name": e.name,
                "writable": true,
            })),
        )
        .await?;
    }
    Ok(())
}

/// Destination: stop serving the disks (best effort).
pub async fn stop_exports(qmp: &Qmp) {
    let _ = qmp.execute("nbd-server-stop", None).await;
}

/// Destination: wait, paused before the switch-over like the source, for the stream on `uri`.
pub async fn start_incoming(qmp: &Qmp, uri: &str) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": false},
            {"capability": "pause-before-switchover", "state": true},
        ]})),
    )
    .await?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    Ok(())
}

/// Destination: wait until the memory has fully arrived. The source sees `completed` once it
/// has sent the last of it; this QEMU may still be loading it (seconds, on a loaded host).
pub async fn wait_arrived(qmp: &Qmp, timeout: Duration) -> Result<(), LiveMigrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = qmp.execute("query-migrate", None).await?;
        let status = m.get("status").and_then(Value::as_str).unwrap_or("none");
        if status == "completed" {
            return Ok(());
        }
        let loading = matches!(status, "active" | "setup" | "device" | "postcopy-active");
        if !loading || Instant::now() >= deadline {
            return Err(LiveMigrationError::Incomplete(status.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_migrate_answer_reads_as_progress() {
        let m = json!({
            "status": "active", "expected-downtime": 12,
            "ram": {"transferred": 1000, "total": 4096, "remaining": 3000,
                    "dirty-pages-rate": 10, "page-size": 4096}
        });
        let p = Progress::from_query(&m);
        assert_eq!(p.phase, Phase::Active);
        assert_eq!(
            (p.ram_transferred, p.ram_total, p.ram_remaining),
            (1000, 4096, 3000)
        );
        assert_eq!(p.dirty_bytes_per_s, 40960);
        assert_eq!(p.expected_downtime_ms, 12);
        let done = Progress::from_query(&json!({"status": "completed", "downtime": 9}));
        assert_eq!((done.phase, done.downtime_ms), (Phase::Completed, 9));
    }

    #[test]
    fn a_failed_migration_carries_qemus_reason() {
        let f = Progress::from_query(&json!({"status": "failed", "error-desc": "socket closed"}));
        assert_eq!(f.phase, Phase::Failed("socket closed".into()));
        let c = Progress::from_query(&json!({"status": "cancelled"}));
        assert_eq!(c.phase, Phase::Failed("no reason given".into()));
        assert_eq!(Progress::from_query(&json!({})).phase, Phase::Setup);
        assert_eq!(
            Progress::from_query(&json!({"status": "device"})).phase,
            Phase::Other("device".into())
        );
    }

    #[test]
    fn block_jobs_read_with_missing_counters_as_zero() {
        let jobs: Vec<BlockJob> = serde_json::from_value(json!([
            {"device": "mig-root", "offset": 5, "len": 10, "ready": true, "type": "mirror"},
            {"device": "other"}
        ]))
        .expect("jobs");
        assert_eq!(
            jobs[0],
            BlockJob {
                device: "mig-root".into(),
                offset: 5,
                len: 10,
                ready: true
            }
        );
        assert_eq!((jobs[1].offset, jobs[1].ready), (0, false));
    }
}
