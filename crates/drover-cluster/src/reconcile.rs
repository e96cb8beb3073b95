//! The reconciler: from what is wanted (services), what exists (hosts, assignments) and what runs
//! (the VMs hosts report), the actions that bring them together, and each member's state.
//!
//! Pure and deterministic: one call is one round; the controller carries its actions out (each
//! write fenced by its leadership) and calls it again with what it then observes.
//!
//! Rules it keeps:
//! - A member runs only where its assignment says; a copy seen anywhere else is stopped.
//! - A member is moved off a host only once the host is known dead (its lease expired, so it has
//!   stopped its cluster VMs itself) or after it kept failing there; members with local disks
//!   (or `relocatable = false`) wait for their host instead.
//! - A member that exits is restarted in place with exponential back-off, at most
//!   [`RestartPolicy::max_in_place`] times, then placed elsewhere.
//! - A member starts only when every member of the apps it is `after` runs and is ready.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::inventory::{HostRecord, HostStatus};
use crate::scheduler::{Request, Scheduler};
use crate::service::{MemberId, Service, Storage};

/// A member's place in the cluster, as the controller keeps it in etcd. Its etcd revision is the
/// fencing token every start of the member carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The member.
    pub member: MemberId,
    /// The host it runs on.
    pub host: String,
    /// The etcd revision of this record (its fencing token); 0 before it is written.
    #[serde(default)]
    pub revision: i64,
    /// Starts on this host so far (1 after the first).
    pub attempt: u32,
    /// When the last start was ordered (ms since the epoch).
    pub started_ms: u64,
    /// Hosts it failed on, not to be used again for it.
    #[serde(default)]
    pub avoid: Vec<String>,
}

/// What a host reports of one of its cluster VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedVm {
    /// The host that runs it.
    pub host: String,
    /// The member it is.
    pub member: MemberId,
    /// The fencing token it was started with.
    pub token: i64,
    /// Its state.
    pub state: VmState,
    /// CPU time its QEMU process has used so far, in seconds (for scale rules; `None` when the
    /// host did not say).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
}

/// A cluster VM's state as its host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// QEMU runs; the agent has not said it is ready (or the readiness command has not passed).
    Running,
    /// QEMU runs and the member is ready.
    Ready,
    /// The VM exists but does not run.
    Stopped,
}

/// How often and how fast a failing member is restarted in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Starts on one host before the member is placed elsewhere.
    pub max_in_place: u32,
    /// Wait before the second start; doubled for each further one.
    pub base_ms: u64,
    /// Longest wait between two starts.
    pub cap_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_in_place: 3,
            base_ms: 1000,
            cap_ms: 30_000,
        }
    }
}

impl RestartPolicy {
    /// How long to wait after start number `attempt` failed before the next.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(20);
        self.base_ms.saturating_mul(1 << doublings).min(self.cap_ms)
    }
}

/// Everything one round looks at.
#[derive(Debug, Clone, Copy)]
pub struct World<'a> {
    /// The services wanted.
    pub services: &'a [Service],
    /// Every registered host with its status.
    pub hosts: &'a [HostRecord],
    /// Every assignment in etcd.
    pub assignments: &'a [Assignment],
    /// Every cluster VM the reachable hosts report.
    pub observed: &'a [ObservedVm],
    /// Live hosts that did not answer this round: their members are left as they are (not
    /// restarted, not moved: their lease says they still run them).
    pub unobserved: &'a [String],
    /// Now, in ms since the epoch.
    pub now_ms: u64,
    /// The restart policy.
    pub policy: RestartPolicy,
}

/// Something the controller should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Write the member's assignment to `host` (attempt 1), then start it there with the
    /// record's revision as fencing token. Replaces an assignment elsewhere.
    Place {
        /// The member.
        member: MemberId,
        /// The host chosen.
        host: String,
        /// Hosts not to use for it again.
        avoid: Vec<String>,
        /// Why (first placement, host lost, failing where it was).
        why: String,
    },
    /// Rewrite the assignment with this attempt, then start the member again on its host with
    /// the new revision as token.
    Restart {
        /// The member.
        member: MemberId,
        /// Its host.
        host: String,
        /// The start number this will be.
        attempt: u32,
    },
    /// Stop (and remove) a VM: a copy where its member is not assigned, or a member no longer
    /// wanted.
    Stop {
        /// The host.
        host: String,
        /// The member the VM is.
        member: MemberId,
        /// Why.
        why: String,
    },
    /// Delete the assignment of a member no longer wanted (no copy of it runs).
    Unassign {
        /// The member.
        member: MemberId,
    },
}

/// A member's state, for `drover service show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MemberState {
    /// Running and ready.
    Ready {
        /// Where.
        host: String,
    },
    /// Started; not ready yet.
    Starting {
        /// Where.
        host: String,
    },
    /// Running with its agent up, but its app's readiness command has not exited 0 yet.
    NotReady {
        /// Where.
        host: String,
        /// What the command said (`ready command exited 1: ...`).
        reason: String,
    },
    /// Waiting for the apps it starts after.
    Waiting {
        /// Why (`waiting for db-1 (starting)`).
        reason: String,
    },
    /// No host takes it.
    Pending {
        /// The scheduler's reasons.
        reason: String,
    },
    /// Its host is down and it may not move (local disks or `relocatable = false`).
    WaitingForHost {
        /// The host.
        host: String,
        /// Why it does not move.
        reason: String,
    },
    /// It exited; the next start is due later.
    BackingOff {
        /// Where.
        host: String,
        /// The start that failed.
        attempt: u32,
        /// When the next start is due (ms since the epoch).
        next_ms: u64,
    },
    /// Its host is alive but did not answer; nothing is done to it until it does.
    Unknown {
        /// Where.
        host: String,
    },
    /// It exited too often and may not move.
    Failed {
        /// Where.
        host: String,
        /// Why.
        reason: String,
    },
}

impl MemberState {
    /// Running and ready.
    pub fn is_ready(&self) -> bool {
        matches!(self, MemberState::Ready { .. })
    }

    /// The host the member is on, if any.
    pub fn host(&self) -> Option<&str> {
        match self {
            MemberState::Ready { host }
            | MemberState::Starting { host }
            | MemberState::NotReady { host, .. }
            | MemberState::WaitingForHost { host, .. }
            | MemberState::BackingOff { host, .. }
            | MemberState::Unknown { host }
            | MemberState::Failed { host, .. } => Some(host),
            _ => None,
        }
    }

    /// The state's name as `--output json` gives it (`ready`, `starting`, `waiting`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            MemberState::Ready { .. } => "ready",
            MemberState::Starting { .. } => "starting",
            MemberState::NotReady { .. } => "not_ready",
            MemberState::Waiting { .. } => "waiting",
            MemberState::Pending { .. } => "pending",
            MemberState::WaitingForHost { .. } => "waiting_for_host",
            MemberState::BackingOff { .. } => "backing_off",
            MemberState::Unknown { .. } => "unknown",
            MemberState::Failed { .. } => "failed",
        }
    }

    /// One line for a person.
    pub fn describe(&self) -> String {
        match self {
            MemberState::Ready { host } => format!("ready on {host}"),
            MemberState::Starting { host } => format!("starting on {host}"),
            MemberState::NotReady { host, reason } => {
                format!("running on {host}, not ready: {reason}")
            }
            MemberState::Waiting { reason } => reason.clone(),
            MemberState::Pending { reason } => format!("pending: {reason}"),
            MemberState::WaitingForHost { host, reason } => {
                format!("waiting for host {host} ({reason})")
            }
            MemberState::BackingOff { host, attempt, .. } => {
                format!("exited on {host} after start {attempt}; restarting after back-off")
            }
            MemberState::Unknown { host } => format!("unknown: host {host} did not answer"),
            MemberState::Failed { host, reason } => format!("failed on {host}: {reason}"),
        }
    }
}

/// One round's outcome.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// Every wanted member and its state, by service then start order.
    pub members: Vec<(MemberId, MemberState)>,
}

impl Plan {
    /// Members of a service that are not ready, with their state; empty means available.
    pub fn unavailable<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a (MemberId, MemberState)> + 'a {
        self.members
            .iter()
            .filter(move |(m, s)| m.service == service && !s.is_ready())
    }
}

/// One round of reconciliation.
pub fn reconcile(world: &World<'_>) -> Plan {
    let status: BTreeMap<&str, HostStatus> = world
        .hosts
        .iter()
        .map(|h| (h.inventory.name.as_str(), h.status))
        .collect();
    let host_up = |h: &str| matches!(status.get(h), Some(HostStatus::Up | HostStatus::Draining));
    let draining = |h: &str| status.get(h) == Some(&HostStatus::Draining);
    // Apps with a member being moved off a draining host this round (one at a time per app).
    let mut evacuating: BTreeSet<(String, String)> = BTreeSet::new();
    let assigned: BTreeMap<&MemberId, &Assignment> =
        world.assignments.iter().map(|a| (&a.member, a)).collect();
    let mut running: BTreeMap<&MemberId, Vec<&ObservedVm>> = BTreeMap::new();
    for vm in world.observed {
        if vm.state != VmState::Stopped {
            running.entry(&vm.member).or_default().push(vm);
        }
    }
    let mut services: Vec<&Service> = world.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let wanted: BTreeMap<MemberId, &crate::service::App> =
        services.iter().flat_map(|s| s.members()).collect();

    let mut plan = Plan::default();

    // Copies where their member is not assigned, and members no longer wanted.
    for vm in world.observed {
        if vm.state == VmState::Stopped || !host_up(&vm.host) {
            continue;
        }
        let why = match (wanted.contains_key(&vm.member), assigned.get(&vm.member)) {
            (false, _) => "the member is no longer in its service",
            (true, Some(a)) if a.host != vm.host => "the member is assigned to another host",
            (true, None) => "the member has no assignment",
            _ => continue,
        };
        plan.actions.push(Action::Stop {
            host: vm.host.clone(),
            member: vm.member.clone(),
            why: why.to_string(),
        });
    }
    for a in world.assignments {
        let copies_up = running
            .get(&a.member)
            .is_some_and(|v| v.iter().any(|vm| host_up(&vm.host)));
        // A live host that did not answer may still run it: wait for its answer.
        let host_silent = host_up(&a.host) && world.unobserved.contains(&a.host);
        if !wanted.contains_key(&a.member) && !copies_up && !host_silent {
            plan.actions.push(Action::Unassign {
                member: a.member.clone(),
            });
        }
    }

    // The scheduler sees every assignment on a live host.
    let mut sched = Scheduler::new(world.hosts);
    for (member, app) in &wanted {
        if let Some(a) = assigned.get(member) {
            if host_up(&a.host) {
                sched.record(member, app.needs, &a.host);
            }
        }
    }

    let mut states: BTreeMap<MemberId, MemberState> = BTreeMap::new();
    for service in services {
        for (member, app) in service.members() {
            let ready = |s: &BTreeMap<MemberId, MemberState>| -> Option<String> {
                // The first member of an `after` app that is not ready, if any.
                for dep in &app.after {
                    let app_dep = service.app(dep)?;
                    for i in 1..=app_dep.replicas {
                        let m = MemberId {
                            service: service.name.clone(),
                            app: dep.clone(),
                            index: i,
                        };
                        match s.get(&m) {
                            Some(st) if st.is_ready() => {}
                            Some(st) => {
                                return Some(format!(
                                    "waiting for {} ({})",
                                    m.short(),
                                    st.describe()
                                ))
                            }
                            None => return Some(format!("waiting for {}", m.short())),
                        }
                    }
                }
                None
            };
            let state = match assigned.get(&member) {
                None => match ready(&states) {
                    Some(reason) => MemberState::Waiting { reason },
                    None => place(&mut sched, &member, app, &[], "first placement", &mut plan),
                },
                Some(a) if !host_up(&a.host) => {
                    if app.storage == Storage::Local || !app.relocatable {
                        MemberState::WaitingForHost {
                            host: a.host.clone(),
                            reason: if app.storage == Storage::Local {
                                "local disks".to_string()
                            } else {
                                "relocatable = false".to_string()
                            },
                        }
                    } else if let Some(reason) = ready(&states) {
                        // Moved members keep the start order too: a web member re-placed
                        // with its db waits until the db is ready again.
                        MemberState::Waiting { reason }
                    } else {
                        let why = format!("host {} lost", a.host);
                        place(&mut sched, &member, app, &a.avoid, &why, &mut plan)
                    }
                }
                Some(a) if world.unobserved.contains(&a.host) => MemberState::Unknown {
                    host: a.host.clone(),
                },
                Some(a)
                    if draining(&a.host)
                        && app.relocatable
                        && app.storage == Storage::Stateless =>
                {
                    evacuate(
                        &mut sched,
                        world,
                        &running,
                        &member,
                        app,
                        a,
                        &mut plan,
                        &mut evacuating,
                    )
                    .unwrap_or_else(|| match ready(&states) {
                        Some(reason) => MemberState::Waiting { reason },
                        None => {
                            sched.release(&member);
                            let why = format!("host {} draining", a.host);
                            place(&mut sched, &member, app, &a.avoid, &why, &mut plan)
                        }
                    })
                }
                Some(a) => {
                    let here = running
                        .get(&member)
                        .and_then(|v| v.iter().find(|vm| vm.host == a.host));
                    match here.map(|vm| vm.state) {
                        Some(VmState::Ready) => MemberState::Ready {
                            host: a.host.clone(),
                        },
                        Some(_) => MemberState::Starting {
                            host: a.host.clone(),
                        },
                        None => exited(&mut sched, world, &member, app, a, &mut plan),
                    }
                }
            };
            states.insert(member.clone(), state.clone());
            plan.members.push((member, state));
        }
    }
    plan
}

/// Place a member (first time or elsewhere), recording the action or why it stays pending.
fn place(
    sched: &mut Scheduler,
    member: &MemberId,
    app: &crate::service::App,
    avoid: &[String],
    why: &str,
    plan: &mut Plan,
) -> MemberState {
    let mut req = Request::new(member, app);
    req.avoid = avoid;
    match sched.place(&req) {
        Ok(host) => {
            plan.actions.push(Action::Place {
                member: member.clone(),
                host: host.clone(),
                avoid: avoid.to_vec(),
                why: why.to_string(),
            });
            MemberState::Starting { host }
        }
        Err(nofit) => MemberState::Pending {
            reason: nofit.summary(),
        },
    }
}

/// Is `member` running and ready on the host it is assigned to?
pub fn ready_where_assigned(
    member: &MemberId,
    assignments: &[Assignment],
    observed: &[ObservedVm],
) -> bool {
    let Some(a) = assignments.iter().find(|a| a.member == *member) else {
        return false;
    };
    observed
        .iter()
        .any(|vm| vm.member == *member && vm.host == a.host && vm.state == VmState::Ready)
}

/// A member on a draining host that may move. While it runs there: stopped (break before make,
/// so there are never two copies) once every other member of its app is ready, no other member
/// of the app is moving, and another host would take it; until then it stays as it is.
/// `None` once it no longer runs there: the caller places it elsewhere.
#[allow(clippy::too_many_arguments)]
fn evacuate(
    sched: &mut Scheduler,
    world: &World<'_>,
    running: &BTreeMap<&MemberId, Vec<&ObservedVm>>,
    member: &MemberId,
    app: &crate::service::App,
    a: &Assignment,
    plan: &mut Plan,
    evacuating: &mut BTreeSet<(String, String)>,
) -> Option<MemberState> {
    let here = running
        .get(member)
        .and_then(|v| v.iter().find(|vm| vm.host == a.host))?;
    let host = a.host.clone();
    let state = if here.state == VmState::Ready {
        MemberState::Ready { host: host.clone() }
    } else {
        MemberState::Starting { host: host.clone() }
    };
    let app_key = (member.service.clone(), member.app.clone());
    let others_ready = (1..=app.replicas)
        .filter(|i| *i != member.index)
        .all(|index| {
            let m = MemberId {
                index,
                ..member.clone()
            };
            ready_where_assigned(&m, world.assignments, world.observed)
        });
    let mut req = Request::new(member, app);
    req.avoid = &a.avoid;
    let elsewhere = sched.explain(&req).chosen.is_some();
    if here.state != VmState::Ready || !others_ready || !elsewhere || evacuating.contains(&app_key)
    {
        return Some(state);
    }
    evacuating.insert(app_key);
    plan.actions.push(Action::Stop {
        host,
        member: member.clone(),
        why: "its host is draining: moving it elsewhere".into(),
    });
    Some(state)
}

/// A member assigned to a live host that does not run there: restart, wait, or move it.
fn exited(
    sched: &mut Scheduler,
    world: &World<'_>,
    member: &MemberId,
    app: &crate::service::App,
    a: &Assignment,
    plan: &mut Plan,
) -> MemberState {
    let policy = world.policy;
    if a.attempt < policy.max_in_place {
        let next_ms = a.started_ms.saturating_add(policy.backoff_ms(a.attempt));
        if world.now_ms >= next_ms {
            plan.actions.push(Action::Restart {
                member: member.clone(),
                host: a.host.clone(),
                attempt: a.attempt + 1,
            });
            return MemberState::Starting {
                host: a.host.clone(),
            };
        }
        return MemberState::BackingOff {
            host: a.host.clone(),
            attempt: a.attempt,
            next_ms,
        };
    }
    if !app.relocatable || app.storage == Storage::Local {
        return MemberState::Failed {
            host: a.host.clone(),
            reason: format!(
                "exited after {} starts; it may not move (relocatable = false or local disks)",
                a.attempt
            ),
        };
    }
    let mut avoid: BTreeSet<String> = a.avoid.iter().cloned().collect();
    avoid.insert(a.host.clone());
    let avoid: Vec<String> = avoid.into_iter().collect();
    sched.release(member);
    let why = format!("exited {} times on {}", a.attempt, a.host);
    place(sched, member, app, &avoid, &why, plan)
}
