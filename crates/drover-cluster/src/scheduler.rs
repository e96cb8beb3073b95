//! The scheduler: filter the hosts by hard rules and free resources, then score those left.
//!
//! Pure and deterministic: the same hosts, placements and request give the same host, whatever
//! the order the hosts came in (they are kept sorted by name; ties go to the first name). It never
//! over-commits: a placement takes its member's needs from the host's free resources, and a host
//! whose free resources fall short is rejected. Every rejection has a reason a person can act on
//! ([`Rejection`]), so `drover service explain` can say why each host was not chosen.
//!
//! Speed: one placement scans every host once over compact per-host data; anti-affinity is
//! resolved by marking the hosts (or sites) of the app's other members before the scan, so a
//! host's check is a handful of comparisons.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::inventory::{HostRecord, HostStatus, Needs, HOURS_PER_MONTH};
use crate::service::{mib, App, Constraints, MemberId, Scope, Strategy};

/// What to place: one member with its app's needs and rules.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The member.
    pub member: &'a MemberId,
    /// What it needs.
    pub needs: Needs,
    /// Its hard rules.
    pub constraints: &'a Constraints,
    /// How to rank the hosts that fit.
    pub strategy: Strategy,
    /// Hosts not to use (where the member kept failing).
    pub avoid: &'a [String],
}

impl<'a> Request<'a> {
    /// A request for a member of `app`.
    pub fn new(member: &'a MemberId, app: &'a App) -> Self {
        Request {
            member,
            needs: app.needs,
            constraints: &app.constraints,
            strategy: app.strategy,
            avoid: &[],
        }
    }
}

/// Why a host was not chosen for a member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    /// The host's lease is lost.
    HostDown,
    /// The host is being emptied.
    HostDraining,
    /// The member is pinned to another host.
    PinnedTo {
        /// The host it is pinned to.
        host: String,
    },
    /// The member is pinned to a label this host lacks.
    MissingLabel {
        /// `key=value`.
        label: String,
    },
    /// The host is less trusted than the member requires.
    Security {
        /// The host's level.
        host: u8,
        /// The minimum asked for.
        need: u8,
    },
    /// The member failed here before and is being moved away.
    Avoided,
    /// Another member of the app is on this host (or in this site).
    AntiAffinity {
        /// That member (`web-1`).
        with: String,
        /// Host or site.
        scope: Scope,
    },
    /// Not enough free vCPUs.
    CpusShort {
        /// How many more it would need.
        by: u32,
    },
    /// Not enough free memory.
    MemoryShort {
        /// Bytes more it would need.
        by: u64,
    },
    /// Not enough free disk.
    DiskShort {
        /// Bytes more it would need.
        by: u64,
    },
    /// Not enough free bandwidth.
    BandwidthShort {
        /// Mbit/s more it would need.
        by: u32,
    },
    /// The member would cost more per hour here than allowed.
    Cost {
        /// What it would cost per hour.
        per_hour: f64,
        /// The limit.
        max: f64,
    },
    /// The host fits, but another ranked better.
    RankedLower {
        /// This host's score (lower is better).
        score: f64,
        /// The chosen host.
        chosen: String,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::HostDown => write!(f, "host down"),
            Rejection::HostDraining => write!(f, "host draining"),
            Rejection::PinnedTo { host } => write!(f, "pinned to host {host}"),
            Rejection::MissingLabel { label } => write!(f, "no label {label}"),
            Rejection::Security { host, need } => write!(f, "security {host} < {need}"),
            Rejection::Avoided => write!(f, "member failed here; moving it elsewhere"),
            Rejection::AntiAffinity {
                with,
                scope: Scope::Host,
            } => write!(f, "anti-affinity with {with}"),
            Rejection::AntiAffinity {
                with,
                scope: Scope::Site,
            } => {
                write!(f, "anti-affinity with {with} (same site)")
            }
            Rejection::CpusShort { by } => write!(f, "vCPUs short by {by}"),
            Rejection::MemoryShort { by } => write!(f, "memory short by {}", mib(*by)),
            Rejection::DiskShort { by } => write!(f, "disk short by {}", mib(*by)),
            Rejection::BandwidthShort { by } => write!(f, "bandwidth short by {by} Mbit/s"),
            Rejection::Cost { per_hour, max } => write!(f, "cost {per_hour:.2}/h > {max:.2}/h"),
            Rejection::RankedLower { score, chosen } => {
                write!(f, "fits, ranked below {chosen} (score {score:.3})")
            }
        }
    }
}

/// No host takes the member; each host's reason, in name order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoFit {
    /// The member.
    pub member: MemberId,
    /// Every host and why it was rejected.
    pub rejected: Vec<(String, Rejection)>,
}

impl NoFit {
    /// One line: the reasons, most common first, with how many hosts gave each.
    pub fn summary(&self) -> String {
        if self.rejected.is_empty() {
            return "no hosts in the cluster".to_string();
        }
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (_, r) in &self.rejected {
            let text = r.to_string();
            match counts.iter_mut().find(|(t, _)| *t == text) {
                Some((_, n)) => *n += 1,
                None => counts.push((text, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
            .iter()
            .take(4)
            .map(|(t, n)| {
                if *n == 1 {
                    t.clone()
                } else {
                    format!("{t} ({n} hosts)")
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no host fits {}: {}", self.member, self.summary())
    }
}

/// The scheduler's answer for one member, with every host's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The member.
    pub member: MemberId,
    /// The host chosen, if any fits.
    pub chosen: Option<String>,
    /// Every other host and why it was not chosen, in name order.
    pub rejected: Vec<(String, Rejection)>,
}

/// Per-host data the scan reads: kept small so 10,000 hosts stay in cache.
#[derive(Debug, Clone)]
struct Slot {
    free_memory: u64,
    free_disk: u64,
    free_cpus: u32,
    free_bandwidth: u32,
    /// 0: no bandwidth accounting.
    bandwidth: u32,
    site: u32,
    /// 1 / total vCPUs and 1 / total memory: the score multiplies rather than divides.
    per_cpu: f32,
    per_byte: f32,
    status: HostStatus,
    security: u8,
}

/// Prices per host, read only when cost matters (kept out of [`Slot`] so the scan stays small).
#[derive(Debug, Clone, Copy)]
struct Prices {
    vcpu_hour: f64,
    gib_hour: f64,
    disk_gib_month: f64,
}

/// Members of one app already placed: where they are, for anti-affinity.
#[derive(Debug, Clone, Default)]
struct Group {
    members: Vec<(u32, u32)>, // (host, replica index)
}

/// The scheduler's view of the cluster: hosts with their free resources and who runs where.
#[derive(Debug, Clone)]
pub struct Scheduler {
    slots: Vec<Slot>,
    prices: Vec<Prices>,
    names: Vec<String>,
    by_name: HashMap<String, u32>,
    /// Label ids per host, sorted.
    labels: Vec<Vec<u32>>,
    label_ids: HashMap<String, u32>,
    /// Anti-affinity groups by `service/app`.
    groups: HashMap<String, Group>,
    /// Where each placed member is, and what it took.
    placed: HashMap<MemberId, (u32, Needs)>,
    /// Scratch marks for one scan: (stamp, replica index + 1) per host and per site.
    host_marks: Vec<(u32, u32)>,
    site_marks: Vec<(u32, u32)>,
    stamp: u32,
}

fn group_key(member: &MemberId) -> String {
    format!("{}/{}", member.service, member.app)
}

impl Scheduler {
    /// A scheduler over these hosts, with nothing placed yet.
    pub fn new(hosts: &[HostRecord]) -> Self {
        let mut hosts: Vec<&HostRecord> = hosts.iter().collect();
        hosts.sort_by(|a, b| a.inventory.name.cmp(&b.inventory.name));
        hosts.dedup_by(|a, b| a.inventory.name == b.inventory.name);
        let mut sites: HashMap<&str, u32> = HashMap::new();
        let mut label_ids: HashMap<String, u32> = HashMap::new();
        let mut slots = Vec::with_capacity(hosts.len());
        let mut prices = Vec::with_capacity(hosts.len());
        let mut labels = Vec::with_capacity(hosts.len());
        for h in &hosts {
            let inv = &h.inventory;
            let next = sites.len() as u32;
            let site = *sites.entry(inv.site.as_str()).or_insert(next);
            let mut ids: Vec<u32> = inv
                .labels
                .iter()
                .map(|(k, v)| {
                    let next = label_ids.len() as u32;
                    *label_ids.entry(format!("{k}={v}")).or_insert(next)
                })
                .collect();
            ids.sort_unstable();
            labels.push(ids);
            slots.push(Slot {
                free_cpus: inv.cpus,
                free_memory: inv.memory,
                free_disk: inv.disk,
                free_bandwidth: inv.bandwidth_mbps,
                bandwidth: inv.bandwidth_mbps,
                per_cpu: 1.0 / inv.cpus.max(1) as f32,
                per_byte: 1.0 / inv.memory.max(1) as f32,
                status: h.status,
                security: inv.security_level,
                site,
            });
            prices.push(Prices {
                vcpu_hour: inv.cost.vcpu_hour,
                gib_hour: inv.cost.gib_hour,
                disk_gib_month: inv.cost.disk_gib_month,
            });
        }
        let names: Vec<String> = hosts.iter().map(|h| h.inventory.name.clone()).collect();
        let by_name = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        let site_count = sites.len();
        Scheduler {
            host_marks: vec![(0, 0); slots.len()],
            site_marks: vec![(0, 0); site_count],
            slots,
            prices,
            names,
            by_name,
            labels,
            label_ids,
            groups: HashMap::new(),
            placed: HashMap::new(),
            stamp: 0,
        }
    }

    /// How many hosts the scheduler knows.
    pub fn host_count(&self) -> usize {
        self.slots.len()
    }

    /// The host a member is placed on.
    pub fn host_of(&self, member: &MemberId) -> Option<&str> {
        self.placed
            .get(member)
            .map(|(h, _)| self.names[*h as usize].as_str())
    }

    /// Free resources of a host.
    pub fn free(&self, host: &str) -> Option<Needs> {
        let s = &self.slots[*self.by_name.get(host)? as usize];
        Some(Needs {
            cpus: s.free_cpus,
            memory: s.free_memory,
            disk: s.free_disk,
            bandwidth_mbps: s.free_bandwidth,
        })
    }

    /// Record a member that already runs (or is assigned) on a host, whatever its free resources
    /// say: what is, is. Returns false when the host is unknown (the member is then not counted).
    pub fn record(&mut self, member: &MemberId, needs: Needs, host: &str) -> bool {
        let Some(&h) = self.by_name.get(host) else {
            return false;
        };
        self.release(member);
        self.take(member, needs, h);
        true
    }

    /// Forget a member's placement and give its resources back.
    pub fn release(&mut self, member: &MemberId) {
        let Some((h, needs)) = self.placed.remove(member) else {
            return;
        };
        let s = &mut self.slots[h as usize];
        s.free_cpus = s.free_cpus.saturating_add(needs.cpus);
        s.free_memory = s.free_memory.saturating_add(needs.memory);
        s.free_disk = s.free_disk.saturating_add(needs.disk);
        s.free_bandwidth = s.free_bandwidth.saturating_add(needs.bandwidth_mbps);
        if let Some(g) = self.groups.get_mut(&group_key(member)) {
            g.members
                .retain(|&(gh, idx)| !(gh == h && idx == member.index));
        }
    }

    fn take(&mut self, member: &MemberId, needs: Needs, h: u32) {
        let s = &mut self.slots[h as usize];
        s.free_cpus = s.free_cpus.saturating_sub(needs.cpus);
        s.free_memory = s.free_memory.saturating_sub(needs.memory);
        s.free_disk = s.free_disk.saturating_sub(needs.disk);
        s.free_bandwidth = s.free_bandwidth.saturating_sub(needs.bandwidth_mbps);
        self.groups
            .entry(group_key(member))
            .or_default()
            .members
            .push((h, member.index));
        self.placed.insert(member.clone(), (h, needs));
    }

    /// Place a member: the best host that passes every rule, with its resources taken.
    pub fn place(&mut self, req: &Request<'_>) -> Result<String, NoFit> {
        self.release(req.member);
        let scan = self.prepare(req);
        let mut best: Option<((f64, f64), u32)> = None;
        let mut consider = |i: u32, this: &Self| {
            if let Some(score) = this.passes(i, req, &scan) {
                // Strictly better only: among equals the first host by name wins.
                if best.is_none_or(|(b, _)| score < b) {
                    best = Some((score, i));
                }
            }
        };
        match scan.pinned {
            Pin::Host(i) => consider(i, self),
            Pin::Unknown => {}
            Pin::None => {
                for i in 0..self.slots.len() as u32 {
                    consider(i, self);
                }
            }
        }
        match best {
            Some((_, h)) => {
                self.take(req.member, req.needs, h);
                Ok(self.names[h as usize].clone())
            }
            None => Err(NoFit {
                member: req.member.clone(),
                rejected: self.verdicts(req, &scan, None),
            }),
        }
    }

    /// Where a member would go now and why every other host would not take it; changes nothing
    /// (a member already placed is evaluated as if it were not).
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let mut this = self.clone();
        let result = this.place(req);
        // `this` placed it; evaluate the others against the state before that placement.
        let mut before = self.clone();
        before.release(req.member);
        let scan = before.prepare(req);
        match result {
            Ok(host) => {
                let chosen = before.by_name.get(&host).copied();
                Explanation {
                    member: req.member.clone(),
                    rejected: before.verdicts(req, &scan, chosen),
                    chosen: Some(host),
                }
            }
            Err(nofit) => Explanation {
                member: req.member.clone(),
                chosen: None,
                rejected: nofit.rejected,
            },
        }
    }

    /// Every host but `chosen` with its reason.
    fn verdicts(
        &self,
        req: &Request<'_>,
        scan: &Scan,
        chosen: Option<u32>,
    ) -> Vec<(String, Rejection)> {
        let chosen_name = chosen
            .map(|c| self.names[c as usize].clone())
            .unwrap_or_default();
        (0..self.slots.len() as u32)
            .filter(|&i| Some(i) != chosen)
            .map(|i| {
                let why = match self.evaluate(i, req, scan) {
                    Err(r) => self.resolve(r, req),
                    Ok((score, _)) => Rejection::RankedLower {
                        score,
                        chosen: chosen_name.clone(),
                    },
                };
                (self.names[i as usize].clone(), why)
            })
            .collect()
    }

    fn resolve(&self, r: Reject, req: &Request<'_>) -> Rejection {
        let c = req.constraints;
        match r {
            Reject::Down => Rejection::HostDown,
            Reject::Draining => Rejection::HostDraining,
            Reject::Pinned => Rejection::PinnedTo {
                host: c.pin_host.clone().unwrap_or_default(),
            },
            Reject::Label => Rejection::MissingLabel {
                label: c
                    .pin_label
                    .as_ref()
                    .map(|(k, v)| format!("{k}={v}"))
                    .unwrap_or_default(),
            },
            Reject::Security(host) => Rejection::Security {
                host,
                need: c.min_security,
            },
            Reject::Avoided => Rejection::Avoided,
            Reject::Anti(scope, index) => Rejection::AntiAffinity {
                with: format!("{}-{}", req.member.app, index),
                scope,
            },
            Reject::Cpus(by) => Rejection::CpusShort { by },
            Reject::Memory(by) => Rejection::MemoryShort { by },
            Reject::Disk(by) => Rejection::DiskShort { by },
            Reject::Bandwidth(by) => Rejection::BandwidthShort { by },
            Reject::Cost(per_hour) => Rejection::Cost {
                per_hour,
                max: c.max_cost_per_hour.unwrap_or(0.0),
            },
        }
    }

    /// Resolve the request's names to ids and mark the hosts and sites anti-affinity excludes.
    fn prepare(&mut self, req: &Request<'_>) -> Scan {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Wrapped: old marks could collide with the new stamp.
            self.host_marks.iter_mut().for_each(|m| *m = (0, 0));
            self.site_marks.iter_mut().for_each(|m| *m = (0, 0));
            self.stamp = 1;
        }
        let stamp = self.stamp;
        let c = req.constraints;
        if let (Some(scope), Some(g)) = (c.anti_affinity, self.groups.get(&group_key(req.member))) {
            for &(h, idx) in &g.members {
                match scope {
                    Scope::Host => self.host_marks[h as usize] = (stamp, idx + 1),
                    Scope::Site => {
                        let site = self.slots[h as usize].site as usize;
                        self.site_marks[site] = (stamp, idx + 1);
                    }
                }
            }
        }
        let avoid = req
            .avoid
            .iter()
            .filter_map(|n| self.by_name.get(n).copied())
            .collect();
        let pinned = match &c.pin_host {
            None => Pin::None,
            Some(h) => self.by_name.get(h).map_or(Pin::Unknown, |&i| Pin::Host(i)),
        };
        let label = c
            .pin_label
            .as_ref()
            .map(|(k, v)| self.label_ids.get(&format!("{k}={v}")).copied());
        let gib = (1u64 << 30) as f64;
        Scan {
            stamp,
            avoid,
            pinned,
            label,
            cpus: req.needs.cpus as f64,
            memory_gib: req.needs.memory as f64 / gib,
            disk_gib_hour: req.needs.disk as f64 / gib / HOURS_PER_MONTH,
            need_cost: c.max_cost_per_hour.is_some() || req.strategy == Strategy::Cheapest,
            max_cost: c.max_cost_per_hour.unwrap_or(f64::INFINITY),
            min_security: c.min_security,
            anti: c.anti_affinity,
        }
    }

    /// One host against one request: its score (lower is better, compared in order) or the first
    /// rule it breaks, hard rules before resources.
    fn evaluate(&self, i: u32, req: &Request<'_>, scan: &Scan) -> Result<(f64, f64), Reject> {
        let s = &self.slots[i as usize];
        let c = req.constraints;
        let n = &req.needs;
        match s.status {
            HostStatus::Up => {}
            HostStatus::Down => return Err(Reject::Down),
            HostStatus::Draining => return Err(Reject::Draining),
        }
        match scan.pinned {
            Pin::Host(p) if p != i => return Err(Reject::Pinned),
            Pin::Unknown => return Err(Reject::Pinned),
            _ => {}
        }
        match scan.label {
            Some(None) => return Err(Reject::Label),
            Some(Some(l)) if self.labels[i as usize].binary_search(&l).is_err() => {
                return Err(Reject::Label)
            }
            _ => {}
        }
        if s.security < c.min_security {
            return Err(Reject::Security(s.security));
        }
        if scan.avoid.contains(&i) {
            return Err(Reject::Avoided);
        }
        if let Some(scope) = c.anti_affinity {
            let mark = match scope {
                Scope::Host => self.host_marks[i as usize],
                Scope::Site => self.site_marks[s.site as usize],
            };
            if mark.0 == scan.stamp {
                return Err(Reject::Anti(scope, mark.1 - 1));
            }
        }
        if s.free_cpus < n.cpus {
            return Err(Reject::Cpus(n.cpus - s.free_cpus));
        }
        if s.free_memory < n.memory {
            return Err(Reject::Memory(n.memory - s.free_memory));
        }
        if s.free_disk < n.disk {
            return Err(Reject::Disk(n.disk - s.free_disk));
        }
        if s.bandwidth > 0 && s.free_bandwidth < n.bandwidth_mbps {
            return Err(Reject::Bandwidth(n.bandwidth_mbps - s.free_bandwidth));
        }
        let cost = self.cost(i, scan);
        if let Some(max) = c.max_cost_per_hour {
            if cost > max {
                return Err(Reject::Cost(cost));
            }
        }
        Ok(score(s, n, req.strategy, cost))
    }

    /// What the member costs per hour on host `i` (0 when no rule or strategy needs it).
    #[inline(always)]
    fn cost(&self, i: u32, scan: &Scan) -> f64 {
        if !scan.need_cost {
            return 0.0;
        }
        let p = &self.prices[i as usize];
        scan.cpus * p.vcpu_hour
            + scan.memory_gib * p.gib_hour
            + scan.disk_gib_hour * p.disk_gib_month
    }

    /// The scan's check: the same verdict as [`Self::evaluate`] (a host passes one exactly when
    /// it passes the other; a property test holds them together), cheapest checks first and
    /// without building a reason. Pinning to a host is left to the caller.
    #[inline(always)]
    fn passes(&self, i: u32, req: &Request<'_>, scan: &Scan) -> Option<(f64, f64)> {
        let s = &self.slots[i as usize];
        let n = &req.needs;
        if s.free_cpus < n.cpus
            || s.free_memory < n.memory
            || s.status != HostStatus::Up
            || s.security < scan.min_security
            || s.free_disk < n.disk
            || (s.bandwidth > 0 && s.free_bandwidth < n.bandwidth_mbps)
        {
            return None;
        }
        match scan.anti {
            Some(Scope::Host) if self.host_marks[i as usize].0 == scan.stamp => return None,
            Some(Scope::Site) if self.site_marks[s.site as usize].0 == scan.stamp => return None,
            _ => {}
        }
        match scan.label {
            Some(None) => return None,
            Some(Some(l)) if self.labels[i as usize].binary_search(&l).is_err() => return None,
            _ => {}
        }
        if !scan.avoid.is_empty() && scan.avoid.contains(&i) {
            return None;
        }
        let cost = self.cost(i, scan);
        if cost > scan.max_cost {
            return None;
        }
        Some(score(s, n, req.strategy, cost))
    }
}

/// A fitting host's score, lower is better (compared in order).
#[inline(always)]
fn score(s: &Slot, n: &Needs, strategy: Strategy, cost: f64) -> (f64, f64) {
    // What would be left, as a fraction of the host: small is a tight fit.
    let left = ((s.free_cpus - n.cpus) as f32 * s.per_cpu
        + (s.free_memory - n.memory) as f32 * s.per_byte) as f64;
    match strategy {
        Strategy::Binpack => (left, 0.0),
        Strategy::Spread => (-left, 0.0),
        // Cost first; among equal costs, the tighter fit.
        Strategy::Cheapest => (cost, left),
    }
}

#[derive(Debug, Clone, Copy)]
enum Pin {
    None,
    Host(u32),
    /// Pinned to a host the cluster does not have.
    Unknown,
}

/// A request resolved against the scheduler's ids, for one scan.
#[derive(Debug)]
struct Scan {
    stamp: u32,
    avoid: Vec<u32>,
    pinned: Pin,
    /// `Some(None)`: pinned to a label no host has.
    label: Option<Option<u32>>,
    cpus: f64,
    memory_gib: f64,
    disk_gib_hour: f64,
    need_cost: bool,
    max_cost: f64,
    min_security: u8,
    anti: Option<Scope>,
}

/// A rejection with ids, cheap to make in the scan; [`Rejection`] is its readable form.
#[derive(Debug, Clone, Copy)]
enum Reject {
    Down,
    Draining,
    Pinned,
    Label,
    Security(u8),
    Avoided,
    Anti(Scope, u32),
    Cpus(u32),
    Memory(u64),
    Disk(u64),
    Bandwidth(u32),
    Cost(f64),
}
