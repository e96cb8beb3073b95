//! The controller's loop: lead, then in rounds read the cluster from etcd and the hosts,
//! reconcile, and carry the plan out, each decision written (fenced) before it is acted on.
//!
//! What a round does is decided by [`crate::reconcile`]; this module only moves data between
//! etcd, the hosts (through a [`HostDriver`]) and the reconciler. Order inside an action is what
//! makes it safe: an assignment is written first and its revision is the token the start
//! carries, so a host can refuse a start that a newer decision has overtaken, and a controller
//! that lost its leadership fails at the write, before it touches any host.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;

use crate::etcd::{Etcd, EtcdError, Leadership, ServiceStatus};
use crate::inventory::{HostInventory, HostStatus};
use crate::reconcile::{
    reconcile, Action, Assignment, MemberState, ObservedVm, RestartPolicy, VmState, World,
};
use crate::scale::{self, Load, Target};
use crate::service::{App, MemberId, Service};
use crate::usage::Meter;

/// Why a host could not be driven.
#[derive(Debug, thiserror::Error)]
#[error("host {host}: {reason}")]
pub struct DriverError {
    /// The host.
    pub host: String,
    /// What failed.
    pub reason: String,
}

/// How the controller reaches hosts: list their cluster VMs, start and stop members.
pub trait HostDriver {
    /// The cluster VMs of `members` that exist on `host` (members not there are left out).
    fn list(
        &self,
        host: &HostInventory,
        members: &[(MemberId, i64)],
    ) -> impl Future<Output = Result<Vec<ObservedVm>, DriverError>>;
    /// Create (if needed) and start a member's VM from its app's template, with its fencing token.
    fn start(
        &self,
        host: &HostInventory,
        member: &MemberId,
        app: &App,
        token: i64,
    ) -> impl Future<Output = Result<(), DriverError>>;
    /// Stop and remove a member's VM.
    fn stop(
        &self,
        host: &HostInventory,
        member: &MemberId,
    ) -> impl Future<Output = Result<(), DriverError>>;
    /// Run the app's readiness command (`ready = "CMD"`) in the member's guest through its
    /// agent: `Ok(None)` when it exited 0, `Ok(Some(why))` when it did not.
    fn check_ready(
        &self,
        host: &HostInventory,
        member: &MemberId,
        command: &str,
    ) -> impl Future<Output = Result<Option<String>, DriverError>>;
}

/// What one round did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RoundReport {
    /// Actions carried out.
    pub done: Vec<Action>,
    /// Actions that failed on a host (retried next round), with why.
    pub failed: Vec<(Action, String)>,
}

/// A controller: its name, etcd, a driver for hosts and its restart policy.
pub struct Controller<D> {
    /// Its name in the election.
    pub name: String,
    /// The cluster's etcd.
    pub etcd: Etcd,
    /// How hosts are driven.
    pub driver: D,
    /// Restart policy for members.
    pub policy: RestartPolicy,
    /// How fast scale rules act.
    pub scale_policy: scale::Policy,
    /// How often counted usage is written to etcd.
    pub usage_flush_ms: u64,
    last_status: BTreeMap<String, Vec<(MemberId, MemberState)>>,
    /// Members whose readiness command passed, by host and start token: not asked again
    /// until they are started again.
    passed: BTreeSet<(MemberId, String, i64)>,
    /// Each ready member's CPU samples, by host and start token.
    cpu: BTreeMap<(MemberId, String, i64), CpuSample>,
    /// What the scale rules remember between rounds, by (service, app).
    scale_memory: BTreeMap<(String, String), scale::Memory>,
    /// Usage counted since the last flush.
    meter: Meter,
}

/// A ready member's last CPU reading.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    /// When it was first seen ready (ms since the epoch).
    ready_since_ms: u64,
    /// When it was last read, and its QEMU's CPU seconds then.
    last: (u64, f64),
}

/// Longest a host may take to list its VMs before the round goes on without it (its members
/// are then left as they are this round).
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<D: HostDriver> Controller<D> {
    /// A controller that has not campaigned yet.
    pub fn new(name: &str, etcd: Etcd, driver: D) -> Self {
        Controller {
            name: name.to_string(),
            etcd,
            driver,
            policy: RestartPolicy::default(),
            scale_policy: scale::Policy::default(),
            usage_flush_ms: crate::usage::FLUSH_EVERY_MS,
            last_status: BTreeMap::new(),
            passed: BTreeSet::new(),
            cpu: BTreeMap::new(),
            scale_memory: BTreeMap::new(),
            meter: Meter::default(),
        }
    }

    /// Lead and run rounds every `interval` until leadership is lost (then returns `NotLeader`
    /// or `LeaseLost`) or etcd fails.
    pub async fn lead(
        &mut self,
        lead: &mut Leadership,
        interval: Duration,
    ) -> Result<(), EtcdError> {
        // What the previous leader wrote is unknown to this one: write every status again, and
        // count usage afresh from this leader's first round.
        self.last_status.clear();
        self.meter = Meter::default();
        loop {
            if lead.is_lost() {
                return Err(EtcdError::NotLeader);
            }
            let report = self.round(lead).await?;
            for (action, why) in &report.failed {
                tracing::warn!(?action, %why, "action failed; retrying next round");
            }
            for action in &report.done {
                tracing::info!(?action, "done");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = lead.lost() => return Err(EtcdError::NotLeader),
            }
        }
    }

    /// One round: read, reconcile, act. An etcd error (a refused fenced write among them) ends
    /// it at once; a host's error is reported and retried next round.
    pub async fn round(&mut self, lead: &Leadership) -> Result<RoundReport, EtcdError> {
        let hosts = self.etcd.hosts().await?;
        let mut services = self.etcd.services().await?;
        let assignments = self.etcd.assignments().await?;
        let targets = self.etcd.scale_targets().await?;
        // Members up to each scale rule's maximum are asked about, so a scaled-out member
        // is seen whatever the target this round.
        let mut asked = services.clone();
        for app in asked.iter_mut().flat_map(|s| s.apps.iter_mut()) {
            if let Some(rule) = &app.scale {
                app.replicas = app.replicas.max(rule.max_replicas);
            }
        }
        let by_name: BTreeMap<&str, &HostInventory> = hosts
            .iter()
            .map(|h| (h.inventory.name.as_str(), &h.inventory))
            .collect();
        // Ask each live host about the members assigned to it or wanted anywhere.
        let mut members: Vec<(MemberId, i64)> = assignments
            .iter()
            .map(|a| (a.member.clone(), a.revision))
            .collect();
        for s in &asked {
            for (m, _) in s.members() {
                if !members.iter().any(|(x, _)| *x == m) {
                    members.push((m, 0));
                }
            }
        }
        // Every live host at once, each for at most LIST_TIMEOUT: a host that died but whose
        // lease has not expired yet must not hold the round up (it would delay its own failover).
        let live: Vec<&HostInventory> = hosts
            .iter()
            .filter(|h| h.status != HostStatus::Down)
            .map(|h| &h.inventory)
            .collect();
        let answers = join_all(
            live.iter()
                .map(|h| tokio::time::timeout(LIST_TIMEOUT, self.driver.list(h, &members))),
        )
        .await;
        let mut observed = Vec::new();
        let mut unobserved = Vec::new();
        for (h, answer) in live.iter().zip(answers) {
            let why = match answer {
                Ok(Ok(vms)) => {
                    observed.extend(vms);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {LIST_TIMEOUT:?}"),
            };
            tracing::warn!(host = %h.name, error = %why, "host did not answer");
            unobserved.push(h.name.clone());
        }
        let not_ready = self.check_ready(&services, &by_name, &mut observed).await;
        let now = now_ms();
        self.scale(lead, &mut services, &targets, &assignments, &observed, now)
            .await?;
        self.meter
            .round(now, &services, &hosts, &assignments, &observed);
        if self.meter.due(now, self.usage_flush_ms) {
            lead.add_usage(&self.meter.pending).await?;
            self.meter.pending.clear();
            self.meter.flushed_ms = now;
        }
        let mut plan = reconcile(&World {
            services: &services,
            hosts: &hosts,
            assignments: &assignments,
            observed: &observed,
            unobserved: &unobserved,
            now_ms: now,
            policy: self.policy,
        });
        // A member that runs but failed its readiness command says why.
        for (m, st) in plan.members.iter_mut() {
            if let (MemberState::Starting { host }, Some(reason)) = (&*st, not_ready.get(m)) {
                *st = MemberState::NotReady {
                    host: host.clone(),
                    reason: reason.clone(),
                };
            }
        }
        let app_of = |m: &MemberId| crate::service::app_of(&services, m);
        let mut report = RoundReport::default();
        // First every decision is written (fenced: a deposed leader stops here, before it
        // touches a host), then the hosts are driven, stops before starts, each phase on all
        // hosts at once.
        let mut stops = Vec::new();
        let mut starts = Vec::new();
        for action in plan.actions {
            // Placing and restarting both write the assignment, then start under its revision.
            let start_as = match &action {
                Action::Place {
                    member,
                    host,
                    avoid,
                    ..
                } => Some(Assignment {
                    member: member.clone(),
                    host: host.clone(),
                    revision: 0,
                    attempt: 1,
                    started_ms: now,
                    avoid: avoid.clone(),
                }),
                Action::Restart {
                    member, attempt, ..
                } => match assignments.iter().find(|a| a.member == *member) {
                    Some(a) => Some(Assignment {
                        attempt: *attempt,
                        started_ms: now,
                        ..a.clone()
                    }),
                    None => continue,
                },
                _ => None,
            };
            match (&action, start_as) {
                (_, Some(a)) => {
                    let host = by_name.get(a.host.as_str()).copied();
                    match (host, app_of(&a.member)) {
                        (Some(host), Some(app)) => {
                            let token = lead.assign(&a).await?;
                            starts.push((action, host, app, token));
                        }
                        _ => {
                            let why = format!("host {} or the member's app is gone", a.host);
                            report.failed.push((action, why));
                        }
                    }
                }
                (Action::Stop { host, .. }, None) => match by_name.get(host.as_str()) {
                    Some(inv) => stops.push((action, *inv)),
                    None => {
                        let why = format!("host {host} is not registered");
                        report.failed.push((action, why));
                    }
                },
                (Action::Unassign { member }, None) => {
                    lead.unassign(member).await?;
                    report.done.push(action);
                }
                _ => {}
            }
        }
        let driver = &self.driver;
        let stopped = join_all(stops.iter().map(|(action, host)| async move {
            match action {
                Action::Stop { member, .. } => driver.stop(host, member).await,
                _ => Ok(()),
            }
        }))
        .await;
        let started = join_all(starts.iter().map(|(action, host, app, token)| {
            let member = match action {
                Action::Place { member, .. } | Action::Restart { member, .. } => member,
                Action::Stop { member, .. } | Action::Unassign { member } => member,
            };
            driver.start(host, member, app, *token)
        }))
        .await;
        let outcomes = stops
            .into_iter()
            .map(|(a, _)| a)
            .zip(stopped)
            .chain(starts.into_iter().map(|(a, ..)| a).zip(started));
        for (action, result) in outcomes {
            match result {
                Ok(()) => report.done.push(action),
                Err(e) => report.failed.push((action, e.to_string())),
            }
        }
        self.write_status(lead, &services, plan.members, now)
            .await?;
        Ok(report)
    }

    /// Apply the scale rules: measure each app's load from its members' CPU time since the last
    /// round, write a changed target (fenced) and set the app's replicas to it for this round.
    /// Targets of apps that lost their rule (or services that are gone) are removed.
    async fn scale(
        &mut self,
        lead: &Leadership,
        services: &mut [Service],
        targets: &BTreeMap<(String, String), Target>,
        assignments: &[Assignment],
        observed: &[ObservedVm],
        now: u64,
    ) -> Result<(), EtcdError> {
        let mut load: BTreeMap<(String, String), (f64, u32)> = BTreeMap::new();
        let mut cpu = BTreeMap::new();
        for vm in observed.iter().filter(|v| v.state == VmState::Ready) {
            let Some(seconds) = vm.cpu_seconds else {
                continue;
            };
            let key = (vm.member.clone(), vm.host.clone(), vm.token);
            let cpus = crate::service::app_of(services, &vm.member).map_or(0, |a| a.needs.cpus);
            let before = self.cpu.get(&key).copied();
            let warm = before.filter(|b| {
                b.last.0.saturating_sub(b.ready_since_ms) >= self.scale_policy.warmup_ms
            });
            if let Some(l) = warm.and_then(|b| scale::cpu_load(b.last, (now, seconds), cpus)) {
                let e = load
                    .entry((vm.member.service.clone(), vm.member.app.clone()))
                    .or_default();
                e.0 += l;
                e.1 += 1;
            }
            let ready_since_ms = before.map_or(now, |b| b.ready_since_ms);
            cpu.insert(
                key,
                CpuSample {
                    ready_since_ms,
                    last: (now, seconds),
                },
            );
        }
        self.cpu = cpu;
        let mut wanted = BTreeSet::new();
        for service in services.iter_mut() {
            let name = service.name.clone();
            for app in &mut service.apps {
                let Some(rule) = app.scale.clone() else {
                    continue;
                };
                let key = (name.clone(), app.name.clone());
                let current = targets.get(&key);
                let replicas = current.map_or(app.replicas, |t| t.replicas);
                let all_ready = (1..=replicas).all(|index| {
                    let m = MemberId {
                        service: name.clone(),
                        app: app.name.clone(),
                        index,
                    };
                    crate::reconcile::ready_where_assigned(&m, assignments, observed)
                });
                let measured = load.get(&key).map(|(sum, n)| Load {
                    average: sum / f64::from(*n),
                    measured: *n,
                    all_ready,
                });
                let memory = self.scale_memory.entry(key.clone()).or_default();
                let (n, changed) = scale::decide(
                    &self.scale_policy,
                    &rule,
                    app.replicas,
                    current,
                    measured,
                    memory,
                    now,
                );
                if let Some(t) = changed {
                    tracing::info!(service = %name, app = %app.name, why = %t.why, "scaled");
                    lead.put_scale(&name, &app.name, Some(&t)).await?;
                }
                app.replicas = n;
                wanted.insert(key);
            }
        }
        for (service, app) in targets.keys().filter(|k| !wanted.contains(*k)) {
            lead.put_scale(service, app, None).await?;
        }
        self.scale_memory.retain(|k, _| wanted.contains(k));
        Ok(())
    }

    /// Run the readiness commands of members whose agent is ready and whose command has not
    /// passed since their last start; those that fail count as running, not ready. Returns
    /// why each such member is not ready.
    async fn check_ready(
        &mut self,
        services: &[Service],
        hosts: &BTreeMap<&str, &HostInventory>,
        observed: &mut [ObservedVm],
    ) -> BTreeMap<MemberId, String> {
        self.passed.retain(|(m, h, t)| {
            observed
                .iter()
                .any(|v| v.member == *m && v.host == *h && v.token == *t)
        });
        let mut not_ready = BTreeMap::new();
        for vm in observed.iter_mut().filter(|v| v.state == VmState::Ready) {
            let command = crate::service::app_of(services, &vm.member)
                .and_then(|a| a.ready_command.as_deref());
            let (Some(command), Some(host)) = (command, hosts.get(vm.host.as_str())) else {
                continue;
            };
            let key = (vm.member.clone(), vm.host.clone(), vm.token);
            if self.passed.contains(&key) {
                continue;
            }
            let why = match self.driver.check_ready(host, &vm.member, command).await {
                Ok(None) => {
                    self.passed.insert(key);
                    continue;
                }
                Ok(Some(why)) => why,
                Err(e) => format!("ready command could not run: {e}"),
            };
            vm.state = VmState::Running;
            not_ready.insert(vm.member.clone(), why);
        }
        not_ready
    }

    /// Write each service's member states when they changed; remove those of deleted services.
    async fn write_status(
        &mut self,
        lead: &Leadership,
        services: &[Service],
        members: Vec<(MemberId, MemberState)>,
        now: u64,
    ) -> Result<(), EtcdError> {
        let mut by_service: BTreeMap<String, Vec<_>> = services
            .iter()
            .map(|s| (s.name.clone(), Vec::new()))
            .collect();
        for (m, st) in members {
            by_service
                .entry(m.service.clone())
                .or_default()
                .push((m, st));
        }
        let gone: Vec<String> = self
            .last_status
            .keys()
            .filter(|k| !by_service.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            lead.put_status(&name, None).await?;
            self.last_status.remove(&name);
        }
        for (name, members) in by_service {
            if self.last_status.get(&name) == Some(&members) {
                continue;
            }
            let status = ServiceStatus {
                at_ms: now,
                controller: self.name.clone(),
                members: members.clone(),
            };
            lead.put_status(&name, Some(&status)).await?;
            self.last_status.insert(name, members);
        }
        Ok(())
    }
}
