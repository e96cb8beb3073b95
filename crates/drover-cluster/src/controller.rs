//! The controller's loop: lead, then in rounds read the cluster from etcd and the hosts,
//! reconcile, and carry the plan out, each decision written (fenced) before it is acted on.
//!
//! What a round does is decided by [`crate::reconcile`]; this module only moves data between
//! etcd, the hosts (through a [`HostDriver`]) and the reconciler. Order inside an action is what
//! makes it safe: an assignment is written first and its revision is the token the start
//! carries, so a host can refuse a start that a newer decision has overtaken, and a controller
//! that lost its leadership fails at the write, before it touches any host.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::etcd::{Etcd, EtcdError, Leadership, ServiceStatus};
use crate::inventory::{HostInventory, HostStatus};
use crate::reconcile::{reconcile, Action, Assignment, ObservedVm, RestartPolicy, World};
use crate::service::{App, MemberId, Service};

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
    last_status: BTreeMap<String, Vec<(MemberId, crate::reconcile::MemberState)>>,
}

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
            last_status: BTreeMap::new(),
        }
    }

    /// Lead and run rounds every `interval` until leadership is lost (then returns `NotLeader`
    /// or `LeaseLost`) or etcd fails.
    pub async fn lead(
        &mut self,
        lead: &mut Leadership,
        interval: Duration,
    ) -> Result<(), EtcdError> {
        // What the previous leader wrote is unknown to this one: write every status again.
        self.last_status.clear();
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
        let services = self.etcd.services().await?;
        let assignments = self.etcd.assignments().await?;
        let by_name: BTreeMap<&str, &HostInventory> = hosts
            .iter()
            .map(|h| (h.inventory.name.as_str(), &h.inventory))
            .collect();
        // Ask each live host about the members assigned to it or wanted anywhere.
        let mut members: Vec<(MemberId, i64)> = assignments
            .iter()
            .map(|a| (a.member.clone(), a.revision))
            .collect();
        for s in &services {
            for (m, _) in s.members() {
                if !members.iter().any(|(x, _)| *x == m) {
                    members.push((m, 0));
                }
            }
        }
        let mut observed = Vec::new();
        let mut unobserved = Vec::new();
        for h in hosts.iter().filter(|h| h.status != HostStatus::Down) {
            match self.driver.list(&h.inventory, &members).await {
                Ok(vms) => observed.extend(vms),
                Err(e) => {
                    tracing::warn!(host = %h.inventory.name, error = %e, "host did not answer");
                    unobserved.push(h.inventory.name.clone());
                }
            }
        }
        let now = now_ms();
        let plan = reconcile(&World {
            services: &services,
            hosts: &hosts,
            assignments: &assignments,
            observed: &observed,
            unobserved: &unobserved,
            now_ms: now,
            policy: self.policy,
        });
        let app_of = |m: &MemberId| crate::service::app_of(&services, m);
        let mut report = RoundReport::default();
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
            let result = match (&action, start_as) {
                (_, Some(a)) => {
                    let host = by_name.get(a.host.as_str()).copied();
                    self.start(lead, &a, host, app_of(&a.member)).await?
                }
                (Action::Stop { host, member, .. }, None) => match by_name.get(host.as_str()) {
                    Some(inv) => self
                        .driver
                        .stop(inv, member)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err(format!("host {host} is not registered")),
                },
                (Action::Unassign { member }, None) => {
                    lead.unassign(member).await?;
                    Ok(())
                }
                _ => continue,
            };
            match result {
                Ok(()) => report.done.push(action),
                Err(why) => report.failed.push((action, why)),
            }
        }
        self.write_status(lead, &services, plan.members, now)
            .await?;
        Ok(report)
    }

    /// Write the assignment (fenced), then start the member with the new revision as token.
    async fn start(
        &self,
        lead: &Leadership,
        a: &Assignment,
        host: Option<&HostInventory>,
        app: Option<&App>,
    ) -> Result<Result<(), String>, EtcdError> {
        let (Some(host), Some(app)) = (host, app) else {
            return Ok(Err(format!("host {} or the member's app is gone", a.host)));
        };
        let token = lead.assign(a).await?;
        Ok(self
            .driver
            .start(host, &a.member, app, token)
            .await
            .map_err(|e| e.to_string()))
    }

    /// Write each service's member states when they changed; remove those of deleted services.
    async fn write_status(
        &mut self,
        lead: &Leadership,
        services: &[Service],
        members: Vec<(MemberId, crate::reconcile::MemberState)>,
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
