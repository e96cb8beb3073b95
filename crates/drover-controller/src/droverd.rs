//! The [`HostDriver`] for real hosts: each host's droverd over its HTTPS API, with the
//! address, token and certificate an operator registered for it (`drover remote add NAME`,
//! NAME being the host's cluster name).

use std::collections::BTreeMap;

use drover_api::{
    Client, ClientError, ErrorCode, ExecRequest, Fence, RemoteSpec, StartRequest, StopRequest,
    VmInfo,
};
use drover_cluster::controller::{DriverError, HostDriver};
use drover_cluster::{App, HostInventory, MemberId, ObservedVm, VmState};
use drover_model::{format_size, DiskSpec, VmSpec};
use serde::Deserialize;

/// The remotes file's shape (`drover remote add` writes it).
#[derive(Debug, Default, Deserialize)]
pub struct Remotes {
    /// By host name.
    #[serde(default)]
    pub remote: BTreeMap<String, RemoteSpec>,
}

/// Drives hosts through their droverd.
pub struct Droverd {
    remotes: Remotes,
}

fn err(host: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError {
        host: host.to_string(),
        reason: e.to_string(),
    }
}

impl Droverd {
    /// A driver reaching each host through its entry in `remotes`.
    pub fn new(remotes: Remotes) -> Self {
        Droverd { remotes }
    }

    fn client(&self, host: &HostInventory) -> Result<Client, DriverError> {
        let spec = self.remotes.remote.get(&host.name).ok_or_else(|| {
            err(
                &host.name,
                format!("no remote named {0}: `drover remote add {0} URL --token-file F --ca-file F` for the controller's user", host.name),
            )
        })?;
        spec.client().map_err(|e| err(&host.name, e))
    }
}

/// Longest a readiness command may run before it counts as failed (the controller's round
/// waits for it).
const READY_TIMEOUT_S: u64 = 5;

/// Why a readiness command's run means "not ready" (`None`: it exited 0). The guest's output is
/// untrusted: only its last line, cut to 200 characters, is kept.
fn not_ready(r: &drover_proto::ExecResult) -> Option<String> {
    if r.exit_code == Some(0) && !r.timed_out {
        return None;
    }
    let how = match (r.timed_out, r.exit_code, r.signal) {
        (true, _, _) => format!("ready command timed out after {READY_TIMEOUT_S} s"),
        (_, Some(code), _) => format!("ready command exited {code}"),
        (_, None, Some(sig)) => format!("ready command was killed by signal {sig}"),
        _ => "ready command did not exit".to_string(),
    };
    let said = if r.stderr.trim().is_empty() {
        &r.stdout
    } else {
        &r.stderr
    };
    let last: String = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    Some(if last.is_empty() {
        how
    } else {
        format!("{how}: {last}")
    })
}

/// Largest metrics page read for CPU times; the rest is ignored.
const MAX_METRICS: usize = 4 << 20;

/// Each VM's QEMU CPU time from a host's `/metrics` page
/// (`drover_vm_cpu_seconds_total{vm="web1"} 12.5`). The page comes over the network: lines that
/// do not parse exactly are skipped.
fn cpu_seconds(page: &[u8]) -> BTreeMap<String, f64> {
    let page = &page[..page.len().min(MAX_METRICS)];
    let text = String::from_utf8_lossy(page);
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("drover_vm_cpu_seconds_total{vm=\"")?;
            let (name, rest) = rest.split_once("\"} ")?;
            if name.is_empty() || name.len() > 64 || name.contains(['\\', '"']) {
                return None;
            }
            let value: f64 = rest.split(' ').next()?.parse().ok()?;
            (value.is_finite() && value >= 0.0).then(|| (name.to_string(), value))
        })
        .collect()
}

fn not_found(e: &ClientError) -> bool {
    e.code() == Some(ErrorCode::NotFound)
}

impl HostDriver for Droverd {
    async fn list(
        &self,
        host: &HostInventory,
        members: &[(MemberId, i64)],
    ) -> Result<Vec<ObservedVm>, DriverError> {
        let c = self.client(host)?;
        let (vms, metrics) = tokio::join!(c.get::<Vec<VmInfo>>("/v1/vms"), c.get_bytes("/metrics"));
        let vms = vms.map_err(|e| err(&host.name, e))?;
        // CPU time only feeds scale rules: a host whose metrics fail is still listed.
        let cpu = match metrics {
            Ok((_, body)) => cpu_seconds(&body),
            Err(e) => {
                tracing::debug!(host = %host.name, error = %e, "no metrics");
                BTreeMap::new()
            }
        };
        let by_name: BTreeMap<&str, &VmInfo> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
        Ok(members
            .iter()
            .filter_map(|(m, token)| {
                let vm = by_name.get(m.vm_name().as_str())?;
                let state = match vm.state {
                    drover_api::VmState::Running if vm.agent.as_ref().is_some_and(|a| a.ready) => {
                        VmState::Ready
                    }
                    // A paused VM (QEMU stopped it, e.g. on a full disk) still exists: it counts
                    // as a running copy, never as one to replace.
                    drover_api::VmState::Running
                    | drover_api::VmState::Starting
                    | drover_api::VmState::Paused => VmState::Running,
                    drover_api::VmState::Stopped
                    | drover_api::VmState::Stopping
                    | drover_api::VmState::Hibernated => VmState::Stopped,
                };
                Some(ObservedVm {
                    host: host.name.clone(),
                    member: m.clone(),
                    // The token droverd recorded at the VM's last start (the assignment's for a
                    // VM started before droverd recorded them).
                    token: vm.fence.as_ref().map(|f| f.token).unwrap_or(*token),
                    state,
                    cpu_seconds: cpu.get(vm.name.as_str()).copied(),
                })
            })
            .collect())
    }

    async fn start(
        &self,
        host: &HostInventory,
        member: &MemberId,
        app: &App,
        token: i64,
    ) -> Result<(), DriverError> {
        let c = self.client(host)?;
        let name = member.vm_name();
        match c.get::<VmInfo>(&format!("/v1/vms/{name}")).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {
                let mut spec = VmSpec::named(&name);
                spec.cpus = app.needs.cpus;
                spec.memory = format_size(app.needs.memory);
                if app.needs.disk > 0 {
                    spec.disks.push(DiskSpec {
                        id: Some("data".into()),
                        size: Some(format_size(app.needs.disk)),
                        image: None,
                        from: None,
                        readonly: false,
                    });
                }
                let _: VmInfo = c
                    .post("/v1/vms", &spec)
                    .await
                    .map_err(|e| err(&host.name, e))?;
            }
            Err(e) => return Err(err(&host.name, e)),
        }
        let _: VmInfo = c
            .post(
                &format!("/v1/vms/{name}/start"),
                &StartRequest {
                    fence: Some(Fence {
                        service: member.service.clone(),
                        app: member.app.clone(),
                        index: member.index,
                        token,
                    }),
                    ..StartRequest::default()
                },
            )
            .await
            .map_err(|e| err(&host.name, e))?;
        Ok(())
    }

    async fn check_ready(
        &self,
        host: &HostInventory,
        member: &MemberId,
        command: &str,
    ) -> Result<Option<String>, DriverError> {
        let c = self.client(host)?;
        let r: drover_proto::ExecResult = c
            .post(
                &format!("/v1/vms/{}/exec", member.vm_name()),
                &ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), command.to_string()],
                    stdin: None,
                    timeout_s: READY_TIMEOUT_S,
                },
            )
            .await
            .map_err(|e| err(&host.name, e))?;
        Ok(not_ready(&r))
    }

    async fn stop(&self, host: &HostInventory, member: &MemberId) -> Result<(), DriverError> {
        let c = self.client(host)?;
        let name = member.vm_name();
        let stop = StopRequest {
            timeout_s: 10,
            force: false,
        };
        match c
            .post::<_, VmInfo>(&format!("/v1/vms/{name}/stop"), &stop)
            .await
        {
            Ok(_) => {}
            Err(e) if not_found(&e) => return Ok(()),
            // Already stopped is fine: it is removed next.
            Err(e) if e.code() == Some(ErrorCode::Conflict) => {}
            Err(e) => return Err(err(&host.name, e)),
        }
        let path = format!("/v1/vms/{name}?force=true");
        match c
            .call::<(), VmInfo>(drover_api::Method::DELETE, &path, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(err(&host.name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(exit_code: Option<i32>, stderr: &str) -> drover_proto::ExecResult {
        drover_proto::ExecResult {
            exit_code,
            signal: None,
            timed_out: false,
            stdout: String::new(),
            stderr: stderr.into(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 3,
        }
    }

    #[test]
    fn cpu_times_are_read_from_the_metrics_page_and_anything_odd_is_skipped() {
        let page = b"# TYPE drover_vm_cpu_seconds counter\n\
drover_vm_cpu_seconds_total{vm=\"shop-web-1\"} 12.5\n\
drover_vm_cpu_seconds_total{vm=\"x\"} NaN\n\
drover_vm_cpu_seconds_total{vm=\"y\"} -1\n\
drover_vm_cpu_seconds_total{vm=\"a\\\"b\"} 3\n\
drover_vm_cpu_seconds_created{vm=\"shop-web-1\"} 1700000000\n\
drover_vm_rss_bytes{vm=\"shop-web-1\"} 5\n";
        let cpu = cpu_seconds(page);
        assert_eq!(cpu.len(), 1, "{cpu:?}");
        assert_eq!(cpu.get("shop-web-1"), Some(&12.5));
        assert!(cpu_seconds(&[0xff; 64]).is_empty());
    }

    proptest::proptest! {
        /// Whatever a host's metrics page holds, reading it never panics and every CPU time
        /// kept is a finite, non-negative number for a plausible VM name.
        #[test]
        fn any_metrics_page_reads_safely(page in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
                                         name in "[a-z0-9-]{1,20}", value in 0.0f64..1e9) {
            let mut text = page.clone();
            text.extend_from_slice(format!("\ndrover_vm_cpu_seconds_total{{vm=\"{name}\"}} {value}\n").as_bytes());
            let cpu = cpu_seconds(&text);
            proptest::prop_assert_eq!(cpu.get(&name).copied(), Some(value));
            for (n, v) in cpu_seconds(&page) {
                proptest::prop_assert!(v.is_finite() && v >= 0.0 && !n.is_empty() && n.len() <= 64);
            }
        }
    }

    #[test]
    fn a_ready_command_passes_only_on_exit_0_and_says_why_not_in_one_short_line() {
        assert_eq!(not_ready(&ran(Some(0), "noise")), None);
        assert_eq!(
            not_ready(&ran(Some(1), "connecting\npg_isready: no response\n\n")).as_deref(),
            Some("ready command exited 1: pg_isready: no response")
        );
        let long = format!("{}\u{1b}[31m", "x".repeat(500));
        let why = not_ready(&ran(Some(2), &long)).unwrap_or_default();
        assert!(why.len() < 240 && !why.contains('\u{1b}'), "{why}");
        let mut timed_out = ran(None, "");
        timed_out.timed_out = true;
        assert_eq!(
            not_ready(&timed_out).as_deref(),
            Some("ready command timed out after 5 s")
        );
    }
}
