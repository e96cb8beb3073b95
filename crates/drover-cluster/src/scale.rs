//! Scale-out: how many members an app with a `[app.scale]` rule runs, from its members' load.
//!
//! Pure: the controller measures each member's load between two rounds (vCPU time used over
//! vCPU time given, from the QEMU process's CPU time its host reports; only for members ready
//! for [`Policy::warmup_ms`], as a guest that just booted is busy), calls [`decide`] and
//! writes a changed target (fenced) before the reconciler places or stops members for it.
//!
//! Rules it keeps:
//! - Never fewer members than the file's `replicas`, never more than `max_replicas`.
//! - One step at a time: a member is added only while every member is ready (a member still
//!   booting would otherwise count as idle and a burst would add several at once), and at most
//!   once per [`Policy::out_cooldown_ms`].
//! - Scale-in needs the load below half the threshold (hysteresis, so a load near the threshold
//!   does not flap) for [`Policy::in_after_ms`] without a break; the newest member goes first.
//! - No measurement (a new leader's first round, a host that did not answer) changes nothing.

use serde::{Deserialize, Serialize};

use crate::service::ScaleRule;

/// How fast scale rules act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Least time between two scale-outs of one app.
    pub out_cooldown_ms: u64,
    /// How long the load must stay low before one member is removed.
    pub in_after_ms: u64,
    /// A member's load counts only from this long after it was first seen ready: a guest
    /// that just booted is still busy (under TCG an idle minimal guest read 0.87 right after
    /// its agent answered).
    pub warmup_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            out_cooldown_ms: 30_000,
            in_after_ms: 120_000,
            warmup_ms: 10_000,
        }
    }
}

/// The metrics a rule may name: measured by the controller itself.
pub const METRICS: &[&str] = &["cpu"];

/// An app's scale target as the leading controller keeps it in etcd (`scale/<service>/<app>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Members wanted now.
    pub replicas: u32,
    /// When it last changed (ms since the epoch).
    pub changed_ms: u64,
    /// Why, for `drover service show` (`cpu 0.93 > 0.80 over 2 members`).
    pub why: String,
}

/// What one round knows of an app's load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// The rule's metric averaged over the members measured (for `cpu`: 0.0-1.0 of their vCPUs).
    pub average: f64,
    /// How many members were measured.
    pub measured: u32,
    /// Every wanted member is running and ready.
    pub all_ready: bool,
}

/// What the controller remembers between rounds (not stored: a new leader starts afresh,
/// which can only delay a scale-in).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// Since when the load has been low without a break.
    pub low_since_ms: Option<u64>,
}

/// The members an app runs under its stored target: the target, kept within the file's
/// `replicas` and `max_replicas` (the file may have changed since it was written).
pub fn replicas(rule: &ScaleRule, base: u32, current: Option<&Target>) -> u32 {
    current
        .map_or(base, |t| t.replicas)
        .clamp(base, rule.max_replicas.max(base))
}

/// Set every scaled app's replicas to its stored target (what `drover service show` lists).
pub fn apply_targets(
    services: &mut [crate::service::Service],
    targets: &std::collections::BTreeMap<(String, String), Target>,
) {
    for s in services {
        let name = s.name.clone();
        for app in &mut s.apps {
            if let Some(rule) = &app.scale {
                let t = targets.get(&(name.clone(), app.name.clone()));
                app.replicas = replicas(rule, app.replicas, t);
            }
        }
    }
}

/// The members to run this round, and a new target to write if it changed.
pub fn decide(
    policy: &Policy,
    rule: &ScaleRule,
    base: u32,
    current: Option<&Target>,
    load: Option<Load>,
    memory: &mut Memory,
    now_ms: u64,
) -> (u32, Option<Target>) {
    let max = rule.max_replicas.max(base);
    let replicas = replicas(rule, base, current);
    let changed_ms = current.map_or(0, |t| t.changed_ms);
    let Some(load) = load.filter(|l| l.measured > 0 && l.average.is_finite()) else {
        memory.low_since_ms = None;
        return (replicas, None);
    };
    let over = format!(
        "{} {:.2} {} {:.2} over {} member{}",
        rule.metric,
        load.average,
        if load.average > rule.threshold {
            ">"
        } else {
            "<"
        },
        rule.threshold,
        load.measured,
        if load.measured == 1 { "" } else { "s" }
    );
    if load.average > rule.threshold {
        memory.low_since_ms = None;
        let cooled = now_ms.saturating_sub(changed_ms) >= policy.out_cooldown_ms;
        if replicas < max && load.all_ready && cooled {
            let to = replicas + 1;
            return (
                to,
                Some(Target {
                    replicas: to,
                    changed_ms: now_ms,
                    why: format!("scaled out to {to}: {over}"),
                }),
            );
        }
        return (replicas, None);
    }
    if load.average >= rule.threshold / 2.0 || replicas <= base {
        memory.low_since_ms = None;
        return (replicas, None);
    }
    let since = *memory.low_since_ms.get_or_insert(now_ms);
    if now_ms.saturating_sub(since) >= policy.in_after_ms {
        memory.low_since_ms = None;
        let to = replicas - 1;
        return (
            to,
            Some(Target {
                replicas: to,
                changed_ms: now_ms,
                why: format!(
                    "scaled in to {to}: {over} / 2 for {} s",
                    policy.in_after_ms / 1000
                ),
            }),
        );
    }
    (replicas, None)
}

/// A member's CPU load between two samples of its QEMU process's CPU time: the share of its
/// vCPUs it used (`None` when the samples do not allow it: the VM restarted, no time passed).
pub fn cpu_load(before: (u64, f64), after: (u64, f64), cpus: u32) -> Option<f64> {
    let (t0, c0) = before;
    let (t1, c1) = after;
    let wall = t1.checked_sub(t0).filter(|d| *d > 0)? as f64 / 1000.0;
    let used = c1 - c0;
    if !used.is_finite() || used < 0.0 || cpus == 0 {
        return None;
    }
    Some(used / wall / f64::from(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: Policy = Policy {
        out_cooldown_ms: 30_000,
        in_after_ms: 120_000,
        warmup_ms: 10_000,
    };

    fn rule(threshold: f64, max: u32) -> ScaleRule {
        ScaleRule {
            metric: "cpu".into(),
            threshold,
            max_replicas: max,
        }
    }

    fn load(average: f64, measured: u32) -> Option<Load> {
        Some(Load {
            average,
            measured,
            all_ready: true,
        })
    }

    #[test]
    fn a_busy_app_grows_one_member_per_cooldown_up_to_its_maximum() {
        let r = rule(0.8, 4);
        let mut mem = Memory::default();
        let (n, t) = decide(&P, &r, 2, None, load(0.95, 2), &mut mem, 1_000_000);
        let t = t.expect("scaled out");
        assert_eq!((n, t.replicas), (3, 3));
        assert_eq!(t.why, "scaled out to 3: cpu 0.95 > 0.80 over 2 members");
        // Still busy, but within the cooldown: no second member yet.
        let (n, t2) = decide(&P, &r, 2, Some(&t), load(0.99, 3), &mut mem, 1_010_000);
        assert_eq!((n, t2), (3, None));
        let (n, t3) = decide(&P, &r, 2, Some(&t), load(0.99, 3), &mut mem, 1_030_000);
        assert_eq!(n, 4);
        let t3 = t3.expect("second step");
        // At the maximum nothing more is added.
        let (n, t4) = decide(&P, &r, 2, Some(&t3), load(1.0, 4), &mut mem, 2_000_000);
        assert_eq!((n, t4), (4, None));
    }

    #[test]
    fn no_member_is_added_while_one_still_starts() {
        let mut mem = Memory::default();
        let booting = Some(Load {
            average: 0.99,
            measured: 2,
            all_ready: false,
        });
        assert_eq!(
            decide(&P, &rule(0.8, 5), 2, None, booting, &mut mem, 1 << 40),
            (2, None)
        );
    }

    #[test]
    fn scale_in_waits_for_a_sustained_low_load_and_a_blip_restarts_the_wait() {
        let r = rule(0.8, 4);
        let at = |replicas| Target {
            replicas,
            changed_ms: 0,
            why: String::new(),
        };
        let mut mem = Memory::default();
        // Four members against a floor of two, at time `now`.
        let mut four = |l, now| decide(&P, &r, 2, Some(&at(4)), l, &mut mem, now);
        let t0 = 10_000_000;
        assert_eq!(four(load(0.1, 4), t0), (4, None));
        // A blip to 0.5: not over the threshold, but above half: the low stretch is broken.
        assert_eq!(four(load(0.5, 4), t0 + 100_000).0, 4);
        let t1 = t0 + 110_000;
        four(load(0.1, 4), t1);
        assert_eq!(four(load(0.1, 4), t1 + P.in_after_ms - 1), (4, None));
        let (n, t) = four(load(0.1, 4), t1 + P.in_after_ms);
        assert_eq!(n, 3);
        assert!(t
            .expect("scaled in")
            .why
            .starts_with("scaled in to 3: cpu 0.10 < 0.80"));
        // Never below the file's replicas.
        let mut mem = Memory::default();
        decide(&P, &r, 2, Some(&at(2)), load(0.0, 2), &mut mem, 0);
        assert_eq!(
            decide(&P, &r, 2, Some(&at(2)), load(0.0, 2), &mut mem, 1 << 40),
            (2, None)
        );
    }

    #[test]
    fn without_a_measurement_nothing_changes() {
        let mut mem = Memory {
            low_since_ms: Some(0),
        };
        let t = Target {
            replicas: 3,
            changed_ms: 0,
            why: String::new(),
        };
        assert_eq!(
            decide(&P, &rule(0.8, 4), 2, Some(&t), None, &mut mem, 1 << 40),
            (3, None)
        );
        assert_eq!(mem.low_since_ms, None);
        assert_eq!(
            decide(
                &P,
                &rule(0.8, 4),
                2,
                Some(&t),
                load(f64::NAN, 3),
                &mut mem,
                1 << 40
            ),
            (3, None)
        );
    }

    #[test]
    fn cpu_load_is_the_share_of_the_members_vcpus() {
        assert_eq!(cpu_load((0, 10.0), (2_000, 13.0), 2), Some(0.75));
        // A restarted VM's counter starts again: no reading rather than a negative one.
        assert_eq!(cpu_load((0, 10.0), (2_000, 1.0), 2), None);
        assert_eq!(cpu_load((5, 1.0), (5, 2.0), 1), None);
    }

    proptest! {
        /// Whatever the loads and times, the count stays within the file's bounds and moves
        /// by at most one member per round.
        #[test]
        fn the_count_stays_in_bounds_and_moves_one_step(
            base in 1u32..4, extra in 0u32..5, threshold in 0.05f64..1.0,
            rounds in proptest::collection::vec((0.0f64..1.5, 1u32..6, any::<bool>(), 0u64..200_000), 1..40),
        ) {
            let r = rule(threshold, base + extra);
            let mut mem = Memory::default();
            let mut target: Option<Target> = None;
            let mut now = 0u64;
            let mut prev = base;
            for (avg, measured, all_ready, dt) in rounds {
                now += dt;
                let l = Some(Load { average: avg, measured, all_ready });
                let (n, t) = decide(&P, &r, base, target.as_ref(), l, &mut mem, now);
                prop_assert!(n >= base && n <= base + extra);
                prop_assert!(n.abs_diff(prev) <= 1);
                if let Some(t) = t {
                    prop_assert_eq!(t.replicas, n);
                    target = Some(t);
                }
                prev = n;
            }
        }
    }
}
