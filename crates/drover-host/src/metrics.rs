//! Prometheus metrics, served at `/metrics` as OpenMetrics text (the `prometheus-client` crate).
//!
//! Two kinds of figures:
//! - **Kept by droverd as things happen** ([`Metrics`], one per process, [`global`]): guest
//!   requests by op and outcome, save/restore/migration durations, store write errors, open API
//!   connections, uptime.
//! - **Read at scrape time** ([`gather`]): VMs by state, and for each running VM its QEMU's CPU
//!   time and resident memory (`/proc/PID/stat`, `/proc/PID/statm`) and block I/O per disk
//!   (QMP `query-blockstats`). Every QMP call has a timeout and the VMs are asked together, so a
//!   QEMU that does not answer costs the scrape at most [`QMP_TIMEOUT`]: its block series are left
//!   out of that scrape (and counted in `drover_scrape_vms_skipped_total`), never waited for.
//!
//! QEMU is as untrusted as its guest: only disk ids of the VM's own config become label values,
//! and numbers that are not plain unsigned integers are dropped. Label values are VM names and
//! disk ids, both validated when they were created. Network I/O per NIC is not exported: QMP has
//! no counters for a netdev (`query-stats` covers KVM's vCPU and VM statistics only), and
//! user-mode NICs have no host interface whose counters could be read instead.

use drover_api::VmState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// How long one QMP call of a scrape may take before that VM's block series are skipped.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(1);

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most disks a VM's block series are kept for (QEMU's answer is not trusted to be small).
const MAX_DISKS: usize = 64;

/// An operation whose duration is kept as a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A state save, from the call until it answers (the memory may still be streaming out).
    Save,
    /// A restore, until the VM runs from the state.
    Restore,
    /// A live or offline migration from this host, until it has finished or failed.
    Migrate,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuestLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabels {
    vm: String,
    disk: String,
}

type Durations = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 10 ms .. ~5.5 min: a fast save of a small guest up to a long live migration under TCG.
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// What droverd counts as it runs. Cheap to update; shared by every part of the daemon.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    guest_requests: Family<GuestLabels, Counter>,
    save: Durations,
    restore: Durations,
    migrate: Durations,
    store_write_errors: Counter,
    connections: Gauge,
    skipped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            guest_requests: Family::default(),
            save: Family::new_with_constructor(duration_histogram),
            restore: Family::new_with_constructor(duration_histogram),
            migrate: Family::new_with_constructor(duration_histogram),
            store_write_errors: Counter::default(),
            connections: Gauge::default(),
            skipped: Counter::default(),
        }
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The daemon's metrics (one droverd per process).
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// Run `fut` and keep its duration in [`Op`]'s histogram, labelled `ok` or `error`.
pub async fn timed<T, E>(op: Op, fut: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let t = Instant::now();
    let r = fut.await;
    global().observe(op, t.elapsed(), r.is_ok());
    r
}

/// One open API connection; counted until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Keep one operation's duration.
    pub fn observe(&self, op: Op, took: Duration, ok: bool) {
        let family = match op {
            Op::Save => &self.save,
            Op::Restore => &self.restore,
            Op::Migrate => &self.migrate,
        };
        let outcome = if ok { "ok" } else { "error" };
        family
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
    }

    /// Count a guest request's answer: `accepted`/`refused` when it arrives, `completed`/`failed`
    /// when an accepted one has run. `op` is the protocol's op name: both come from fixed sets
    /// (`'static`), so a guest cannot grow the label space.
    pub fn guest_request(&self, op: &'static str, outcome: &'static str) {
        self.guest_requests
            .get_or_create(&GuestLabels { op, outcome })
            .inc();
    }

    /// Count a write the store refused.
    pub fn store_write_failed(&self) {
        self.store_write_errors.inc();
    }

    /// Count an API connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    /// Count running VMs a scrape skipped because their QEMU did not answer in time.
    pub fn vms_skipped(&self, n: u64) {
        self.skipped.inc_by(n);
    }

    /// The OpenMetrics text for one scrape: what is kept here, and `now` as gathered.
    pub fn render(&self, now: &Scrape) -> String {
        let mut r = Registry::with_prefix("drover");
        self.register_kept(&mut r);
        r.register(
            "scrape_vms_skipped",
            "Running VMs whose QEMU did not answer a scrape's QMP call in time (their block series were left out)",
            self.skipped.clone(),
        );
        register_gathered(&mut r, now);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }

    fn register_kept(&self, r: &mut Registry) {
        let up: Gauge = Gauge::default();
        up.set(1);
        r.register("up", "1 while droverd serves", up);
        let uptime: Gauge<f64, AtomicU64> = Gauge::default();
        uptime.set(self.started.elapsed().as_secs_f64());
        r.register("uptime_seconds", "Seconds since droverd started", uptime);
        r.register(
            "store_write_errors",
            "Writes the store refused (e.g. no space left on the state dir's filesystem)",
            self.store_write_errors.clone(),
        );
        r.register(
            "api_connections",
            "API connections open now (unix socket and TCP)",
            self.connections.clone(),
        );
        r.register(
            "guest_requests",
            "Guest requests by op and outcome: accepted or refused on arrival, then completed or failed",
            self.guest_requests.clone(),
        );
        r.register(
            "save_duration_seconds",
            "State saves, from the call until it answered",
            self.save.clone(),
        );
        r.register(
            "restore_duration_seconds",
            "State restores, until the VM ran from the state",
            self.restore.clone(),
        );
        r.register(
            "migration_duration_seconds",
            "Migrations from this host, until they finished or failed",
            self.migrate.clone(),
        );
    }
}

/// What one scrape read of the VMs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Every VM's state.
    pub states: Vec<VmState>,
    /// What was read of each running VM.
    pub vms: Vec<VmSample>,
}

/// One running VM's figures (absent where they could not be read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSample {
    /// The VM's name.
    pub name: String,
    /// User + system CPU time of its QEMU process.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its QEMU process (guest RAM it has touched included).
    pub rss_bytes: Option<u64>,
    /// Block I/O per disk.
    pub disks: Vec<DiskIo>,
}

/// One disk's I/O since its QEMU started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskIo {
    /// The disk's id in the VM's config.
    pub disk: String,
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub written_bytes: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Write requests.
    pub write_ops: u64,
}

fn register_gathered(r: &mut Registry, now: &Scrape) {
    let vms: Family<StateLabels, Gauge> = Family::default();
    // Every state, zeros included, so `drover_vms{state="running"}` is 0 rather than absent.
    for s in VmState::ALL {
        let n = now.states.iter().filter(|x| **x == s).count();
        vms.get_or_create(&StateLabels { state: s.as_str() })
            .set(n as i64);
    }
    r.register("vms", "VMs by state", vms);

    let cpu: Family<VmLabels, Counter<f64, AtomicU64>> = Family::default();
    let rss: Family<VmLabels, Gauge> = Family::default();
    let disk = || -> Family<DiskLabels, Counter> { Family::default() };
    let (rd_b, wr_b, rd_o, wr_o) = (disk(), disk(), disk(), disk());
    for v in &now.vms {
        let vm = VmLabels { vm: v.name.clone() };
        if let Some(s) = v.cpu_seconds {
            cpu.get_or_create(&vm).inc_by(s);
        }
        if let Some(b) = v.rss_bytes {
            rss.get_or_create(&vm)
                .set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        for d in &v.disks {
            let l = DiskLabels {
                vm: v.name.clone(),
                disk: d.disk.clone(),
            };
            rd_b.get_or_create(&l).inc_by(d.read_bytes);
            wr_b.get_or_create(&l).inc_by(d.written_bytes);
            rd_o.get_or_create(&l).inc_by(d.read_ops);
            wr_o.get_or_create(&l).inc_by(d.write_ops);
        }
    }
    r.register(
        "vm_cpu_seconds",
        "CPU time (user + system) of the VM's QEMU process",
        cpu,
    );
    r.register(
        "vm_memory_resident_bytes",
        "Resident memory of the VM's QEMU process",
        rss,
    );
    r.register(
        "vm_block_read_bytes",
        "Bytes the guest read from a disk since its QEMU started",
        rd_b,
    );
    r.register(
        "vm_block_written_bytes",
        "Bytes the guest wrote to a disk since its QEMU started",
        wr_b,
    );
    r.register(
        "vm_block_read_ops",
        "Read requests of the guest on a disk since its QEMU started",
        rd_o,
    );
    r.register(
        "vm_block_write_ops",
        "Write requests of the guest on a disk since its QEMU started",
        wr_o,
    );
}

/// A running VM, as a scrape reads it.
pub struct VmTarget<Q> {
    /// The VM's name.
    pub name: String,
    /// Its QEMU's pid.
    pub pid: u32,
    /// Its QMP connection.
    pub qmp: Q,
    /// The disk ids of its config: only these become label values.
    pub disks: Vec<String>,
}

/// Why a scrape has no block stats of a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    /// QEMU did not answer in time (counted in `drover_scrape_vms_skipped_total`).
    #[error("QEMU did not answer query-blockstats in time")]
    Timeout,
    /// Anything else (QEMU exited meanwhile, refused the command).
    #[error("{0}")]
    Failed(String),
}

/// The one QMP call a scrape makes (a seam: tests answer it without QEMU).
pub trait BlockStats {
    /// QEMU's `query-blockstats` answer, or why there is none.
    fn blockstats(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<serde_json::Value, StatsError>> + Send;
}

impl BlockStats for drover_qemu::qmp::Qmp {
    async fn blockstats(&self, timeout: Duration) -> Result<serde_json::Value, StatsError> {
        self.execute_timeout("query-blockstats", None, timeout)
            .await
            .map_err(|e| match e {
                drover_qemu::qmp::QmpError::Timeout(_) => StatsError::Timeout,
                other => StatsError::Failed(other.to_string()),
            })
    }
}

/// Read every running VM's figures, all at once; `proc` is `/proc` (a test's directory in
/// tests). A QMP call is cut off after `timeout` (the VM then has no block series this time);
/// the count is of VMs whose QEMU did not answer in time.
pub async fn gather<Q: BlockStats + Sync>(
    targets: &[VmTarget<Q>],
    proc: &Path,
    timeout: Duration,
) -> (Vec<VmSample>, u64) {
    let reads = targets.iter().map(|t| async move {
        // The QMP client's own timeout, and this one in case a call gets stuck before it.
        let stats = tokio::time::timeout(timeout, t.qmp.blockstats(timeout))
            .await
            .map_err(|_| StatsError::Timeout)
            .and_then(|r| r);
        let (cpu_seconds, rss_bytes) = read_proc(proc, t.pid);
        let disks = match &stats {
            Ok(v) => parse_blockstats(v, &t.disks),
            Err(e) => {
                tracing::debug!(vm = t.name, "no block stats for this scrape: {e}");
                Vec::new()
            }
        };
        let sample = VmSample {
            name: t.name.clone(),
            cpu_seconds,
            rss_bytes,
            disks,
        };
        (sample, stats == Err(StatsError::Timeout))
    });
    let done = futures_util::future::join_all(reads).await;
    let skipped = done.iter().filter(|(_, s)| *s).count() as u64;
    (done.into_iter().map(|(v, _)| v).collect(), skipped)
}

/// CPU seconds and resident bytes of process `pid`, when it is a QEMU (a pid reused by another
/// process since is not reported).
fn read_proc(proc: &Path, pid: u32) -> (Option<f64>, Option<u64>) {
    let dir = proc.join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
        return (None, None);
    };
    let Some((comm, ticks)) = parse_stat(&stat) else {
        return (None, None);
    };
    if !comm.starts_with("qemu") {
        return (None, None);
    }
    let cpu = clock_ticks().map(|hz| ticks as f64 / hz as f64);
    let rss = std::fs::read_to_string(dir.join("statm"))
        .ok()
        .and_then(|s| parse_statm_resident(&s))
        .zip(page_size())
        .map(|(pages, size)| pages.saturating_mul(size));
    (cpu, rss)
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|n| *n > 0)
}

fn page_size() -> Option<u64> {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|n| *n > 0)
}

/// The command name and utime + stime (clock ticks) of a `/proc/PID/stat` line. The name is
/// in parentheses and may itself hold spaces and parentheses, so fields count from the last `)`.
fn parse_stat(s: &str) -> Option<(&str, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?;
    let mut rest = s.get(close + 1..)?.split_ascii_whitespace();
    // After the name: state (field 3) ... utime (14), stime (15).
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((comm, utime.checked_add(stime)?))
}

/// Resident pages: the second field of `/proc/PID/statm`.
fn parse_statm_resident(s: &str) -> Option<u64> {
    s.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Per-disk I/O from a `query-blockstats` answer: devices are found by their qdev path
/// (`/machine/peripheral/disk-<id>/...`), and kept only for the VM's own disk ids.
fn parse_blockstats(v: &serde_json::Value, disks: &[String]) -> Vec<DiskIo> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    let mut out: Vec<DiskIo> = Vec::new();
    for dev in list {
        if out.len() >= MAX_DISKS {
            break;
        }
        let Some(id) = dev
            .get("qdev")
            .and_then(|q| q.as_str())
            .and_then(|q| q.split('/').find_map(|p| p.strip_prefix("disk-")))
        else {
            continue;
        };
        if !disks.iter().any(|d| d == id) || out.iter().any(|d| d.disk == id) {
            continue;
        }
        let Some(stats) = dev.get("stats") else {
            continue;
        };
        let n = |k: &str| stats.get(k).and_then(|x| x.as_u64());
        let (Some(read_bytes), Some(written_bytes), Some(read_ops), Some(write_ops)) = (
            n("rd_bytes"),
            n("wr_bytes"),
            n("rd_operations"),
            n("wr_operations"),
        ) else {
            continue;
        };
        out.push(DiskIo {
            disk: id.to_string(),
            read_bytes,
            written_bytes,
            read_ops,
            write_ops,
        });
    }
    out
}

/// A store that counts the writes it refuses in [`global`] (`drover_store_write_errors_total`).
pub struct CountingStore<S>(pub S);

impl<S: drover_store::Store> drover_store::Store for CountingStore<S> {
    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, drover_store::StoreError> {
        self.0.get_raw(table, key)
    }
    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, drover_store::StoreError> {
        self.0.list_raw(table)
    }
    fn apply(&self, writes: Vec<drover_store::Write>) -> Result<(), drover_store::StoreError> {
        self.0
            .apply(writes)
            .inspect_err(|_| global().store_write_failed())
    }
}

/// Answer one scrape: the VMs' states and running VMs' figures, read now, and the kept ones.
pub async fn scrape(states: Vec<VmState>, targets: Vec<VmTarget<drover_qemu::qmp::Qmp>>) -> String {
    let (vms, skipped) = gather(&targets, Path::new("/proc"), QMP_TIMEOUT).await;
    global().vms_skipped(skipped);
    global().render(&Scrape { states, vms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The value of the sample `series` (name and labels exactly as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn vms_by_state_include_zeros_and_per_vm_series_carry_names() {
        let m = Metrics::default();
        let now = Scrape {
            states: vec![VmState::Running, VmState::Stopped, VmState::Running],
            vms: vec![VmSample {
                name: "web1".into(),
                cpu_seconds: Some(12.5),
                rss_bytes: Some(300 << 20),
                disks: vec![DiskIo {
                    disk: "data".into(),
                    read_bytes: 4096,
                    written_bytes: 8 << 20,
                    read_ops: 1,
                    write_ops: 64,
                }],
            }],
        };
        let t = m.render(&now);
        assert_eq!(
            value(&t, r#"drover_vms{state="running"}"#),
            Some(2.0),
            "{t}"
        );
        assert_eq!(value(&t, r#"drover_vms{state="stopped"}"#), Some(1.0));
        assert_eq!(value(&t, r#"drover_vms{state="paused"}"#), Some(0.0));
        for s in VmState::ALL {
            let q = format!(r#"drover_vms{{state="{s}"}}"#);
            assert!(value(&t, &q).is_some(), "{q}");
        }
        assert_eq!(
            value(&t, r#"drover_vm_cpu_seconds_total{vm="web1"}"#),
            Some(12.5)
        );
        assert_eq!(
            value(&t, r#"drover_vm_memory_resident_bytes{vm="web1"}"#),
            Some((300u64 << 20) as f64)
        );
        assert_eq!(
            value(
                &t,
                r#"drover_vm_block_written_bytes_total{vm="web1",disk="data"}"#
            ),
            Some((8u64 << 20) as f64)
        );
        assert_eq!(
            value(
                &t,
                r#"drover_vm_block_write_ops_total{vm="web1",disk="data"}"#
            ),
            Some(64.0)
        );
        assert_eq!(value(&t, "drover_up"), Some(1.0));
        assert!(t.contains("# TYPE drover_vm_cpu_seconds counter"), "{t}");
        assert!(
            t.trim_end().ends_with("# EOF"),
            "OpenMetrics ends with # EOF"
        );
        // A VM gone by the next scrape leaves no series behind.
        let t = m.render(&Scrape::default());
        assert!(!t.contains("web1"), "{t}");
        assert_eq!(value(&t, r#"drover_vms{state="running"}"#), Some(0.0));
    }

    #[test]
    fn kept_figures_accumulate_across_scrapes() {
        let m = Metrics::default();
        m.observe(Op::Save, Duration::from_millis(300), true);
        m.observe(Op::Save, Duration::from_secs(3), true);
        m.observe(Op::Restore, Duration::from_millis(50), false);
        m.guest_request("save", "accepted");
        m.guest_request("save", "accepted");
        m.guest_request("save", "completed");
        m.store_write_failed();
        m.vms_skipped(1);
        m.vms_skipped(2);
        let t = m.render(&Scrape::default());
        assert_eq!(
            value(&t, r#"drover_save_duration_seconds_count{outcome="ok"}"#),
            Some(2.0),
            "{t}"
        );
        assert_eq!(
            value(&t, r#"drover_save_duration_seconds_sum{outcome="ok"}"#),
            Some(3.3)
        );
        // 0.3 s falls in the 0.32 s bucket; 3 s does not.
        assert_eq!(
            value(
                &t,
                r#"drover_save_duration_seconds_bucket{le="0.32",outcome="ok"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"drover_restore_duration_seconds_count{outcome="error"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                r#"drover_guest_requests_total{op="save",outcome="accepted"}"#
            ),
            Some(2.0)
        );
        assert_eq!(value(&t, "drover_store_write_errors_total"), Some(1.0));
        assert_eq!(value(&t, "drover_scrape_vms_skipped_total"), Some(3.0));
        let g = m.connection_opened();
        let t = m.render(&Scrape::default());
        assert_eq!(value(&t, "drover_api_connections"), Some(1.0));
        drop(g);
        let t = m.render(&Scrape::default());
        assert_eq!(value(&t, "drover_api_connections"), Some(0.0));
    }

    #[test]
    fn proc_stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 31337 0 12 0 250 75 0 0 20 0 5 0 123456 1234567 890 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("qemu-system-x86", 325)));
        // A name with spaces and parentheses does not shift the fields.
        let odd = "7 (a) b (c) S 1 7 7 0 -1 0 0 0 0 0 9 1 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(odd), Some(("a) b (c", 10)));
        assert_eq!(parse_stat("7 (x) S 1 2"), None);
        assert_eq!(parse_statm_resident("1000 250 30 1 0 200 0\n"), Some(250));
        assert_eq!(parse_statm_resident("1000"), None);
    }

    #[test]
    fn blockstats_keep_only_the_vms_own_disks_with_sane_numbers() {
        let stats = |rd: serde_json::Value| json!({"rd_bytes": rd, "wr_bytes": 2048, "rd_operations": 3, "wr_operations": 4});
        let answer = json!([
            {"device": "", "qdev": "/machine/peripheral/disk-data/virtio-backend", "stats": stats(json!(1024))},
            {"device": "", "qdev": "/machine/peripheral/disk-root/virtio-backend", "stats": stats(json!(-1))},
            {"device": "", "qdev": "/machine/peripheral/disk-evil\"}/virtio-backend", "stats": stats(json!(1))},
            {"device": "", "qdev": "/machine/peripheral/disk-data/virtio-backend", "stats": stats(json!(9))},
            {"device": "", "qdev": "/machine/peripheral-anon/device[3]", "stats": stats(json!(1))},
        ]);
        let own = vec!["data".to_string(), "root".to_string()];
        assert_eq!(
            parse_blockstats(&answer, &own),
            vec![DiskIo {
                disk: "data".into(),
                read_bytes: 1024,
                written_bytes: 2048,
                read_ops: 3,
                write_ops: 4,
            }]
        );
        assert!(parse_blockstats(&json!({"error": 1}), &own).is_empty());
    }

    #[tokio::test]
    async fn timed_operations_land_in_their_histogram_by_outcome() {
        let count = |outcome: &str| {
            let q = format!(r#"drover_migration_duration_seconds_count{{outcome="{outcome}"}}"#);
            value(&global().render(&Scrape::default()), &q).unwrap_or(0.0)
        };
        let (ok, err) = (count("ok"), count("error"));
        let r: Result<u8, String> = timed(Op::Migrate, async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err("the destination went away".into())
        })
        .await;
        assert_eq!(r, Err("the destination went away".to_string()));
        assert!(count("error") > err);
        // Nothing else in this process migrates.
        assert_eq!(count("ok"), ok);
    }

    /// A store whose disk is full.
    struct Full;

    impl drover_store::Store for Full {
        fn get_raw(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, drover_store::StoreError> {
            Ok(None)
        }
        fn list_raw(&self, _: &str) -> Result<Vec<(String, Vec<u8>)>, drover_store::StoreError> {
            Ok(Vec::new())
        }
        fn apply(&self, _: Vec<drover_store::Write>) -> Result<(), drover_store::StoreError> {
            Err(drover_store::StoreError::Op {
                op: "commit",
                table: "vms".into(),
                key: "web1".into(),
                message: "No space left on device".into(),
            })
        }
    }

    #[test]
    fn refused_store_writes_are_counted_and_reads_are_not() {
        use drover_store::Store as _;
        let errors = || {
            value(
                &global().render(&Scrape::default()),
                "drover_store_write_errors_total",
            )
            .unwrap()
        };
        let store = CountingStore(Full);
        let before = errors();
        assert!(store.get_raw("vms", "web1").is_ok());
        assert!(store.apply(Vec::new()).is_err());
        assert!(store.apply(Vec::new()).is_err());
        // Other tests in this process may count too, never fewer.
        assert!(errors() - before >= 2.0);
    }

    /// Answers after `delay`, like a QEMU busy (or stuck) in a long command; `Duration::MAX`:
    /// a QEMU that has exited.
    struct Slow(Duration);

    impl BlockStats for Slow {
        async fn blockstats(&self, _timeout: Duration) -> Result<serde_json::Value, StatsError> {
            if self.0 == Duration::MAX {
                return Err(StatsError::Failed(
                    "QMP connection closed (QEMU exited)".into(),
                ));
            }
            tokio::time::sleep(self.0).await;
            Ok(json!([{"qdev": "/machine/peripheral/disk-d/virtio-backend",
                "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}}]))
        }
    }

    #[tokio::test]
    async fn a_qemu_that_does_not_answer_is_skipped_without_holding_up_the_scrape() {
        let proc = tempfile::tempdir().unwrap();
        let pid_dir = proc.path().join("10");
        std::fs::create_dir(&pid_dir).unwrap();
        std::fs::write(
            pid_dir.join("stat"),
            "10 (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 100 100 0 0 20 0 1 0 1 1 1",
        )
        .unwrap();
        std::fs::write(pid_dir.join("statm"), "900 100 10 1 0 50 0").unwrap();
        // pid 11 is some other program now: no CPU or memory figures for it.
        let other = proc.path().join("11");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(
            other.join("stat"),
            "11 (bash) S 1 1 1 0 -1 0 0 0 0 0 5 5 0 0 20 0 1 0 1 1 1",
        )
        .unwrap();
        let target = |name: &str, pid, delay| VmTarget {
            name: name.into(),
            pid,
            qmp: Slow(delay),
            disks: vec!["d".into()],
        };
        let targets = vec![
            target("fast", 10, Duration::ZERO),
            target("stuck", 11, Duration::from_secs(3600)),
            target("gone", 12, Duration::MAX),
        ];
        let t = Instant::now();
        let (vms, skipped) = gather(&targets, proc.path(), Duration::from_millis(200)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Only the one that did not answer in time; the one that exited is simply gone.
        assert_eq!(skipped, 1);
        assert!(vms[2].disks.is_empty() && vms[2].cpu_seconds.is_none());
        let hz = clock_ticks().unwrap() as f64;
        let page = page_size().unwrap();
        assert_eq!(vms[0].name, "fast");
        assert_eq!(vms[0].cpu_seconds, Some(200.0 / hz));
        assert_eq!(vms[0].rss_bytes, Some(100 * page));
        assert_eq!(vms[0].disks.len(), 1);
        assert_eq!(vms[0].disks[0].written_bytes, 2);
        assert_eq!(
            vms[1],
            VmSample {
                name: "stuck".into(),
                ..VmSample::default()
            }
        );
    }
}
