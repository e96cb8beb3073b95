//! The fence watchdog: a small process that droverd starts when it joins a cluster and that
//! outlives it. If droverd stops renewing the host's lease — killed, hung, or restarting too
//! slowly — the watchdog kills this host's cluster members' QEMU before the lease can expire.
//! Without it, a dead droverd's members would run on while the controller, seeing the lease
//! gone, starts them elsewhere: two copies of one member.
//!
//! - After every renewal droverd writes the plan ([`PLAN`]): the instant (`CLOCK_BOOTTIME`, which
//!   counts a suspended host's sleep as etcd does) by which its members must be gone unless it
//!   renews again, and its own pid. That instant is half the fencing margin after droverd's own
//!   in-process fence, so while droverd lives, it stops its members first, as before.
//! - A VM is marked a member by `vms/NAME/cluster-member`, written before each of its fenced
//!   starts. At the deadline the watchdog finds those VMs' QEMU processes by their run directory
//!   in `/proc` (not from a record droverd may not have written yet) and SIGKILLs them.
//! - One watchdog per state dir (a lock held for its life). It exits once droverd is gone and
//!   nothing is left to kill; the next droverd starts a new one.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The plan droverd writes, in the state dir.
pub const PLAN: &str = "cluster-fence.json";
/// Held by the running watchdog.
const LOCK: &str = "cluster-fence.lock";
/// A member VM's mark, in its VM dir.
pub const MEMBER_MARK: &str = "cluster-member";
/// How often the watchdog looks again (well under the fencing margin's half).
const POLL: Duration = Duration::from_millis(100);
/// The hidden droverd argument that runs the watchdog.
pub const ARG: &str = "--fence-watchdog";

/// What droverd promises the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// `CLOCK_BOOTTIME` in ms by which the members must be gone unless a new plan comes.
    pub kill_at_ms: u64,
    /// droverd's pid.
    pub droverd_pid: u32,
}

/// The watchdog's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Look again after this long.
    Wait(Duration),
    /// Kill the members' QEMU now.
    Kill,
    /// droverd is gone and nothing is left to guard.
    Exit,
}

/// The watchdog's rule. `members_running`: whether any member's QEMU runs now.
pub fn decide(
    plan: Option<&Plan>,
    now_ms: u64,
    droverd_alive: bool,
    members_running: bool,
) -> Step {
    let Some(plan) = plan else {
        return if droverd_alive {
            Step::Wait(POLL)
        } else {
            Step::Exit
        };
    };
    if now_ms >= plan.kill_at_ms {
        return match (members_running, droverd_alive) {
            (true, _) => Step::Kill,
            (false, false) => Step::Exit,
            (false, true) => Step::Wait(POLL),
        };
    }
    Step::Wait(Duration::from_millis(plan.kill_at_ms - now_ms).min(POLL))
}

/// `CLOCK_BOOTTIME` in milliseconds.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Mark `name` (in `state_dir`) a cluster member, before it starts.
pub fn mark_member(state_dir: &Path, name: &str) -> std::io::Result<()> {
    let dir = state_dir.join("vms").join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(MEMBER_MARK), b"")
}

/// Promise that the members are gone `within` from now unless a new plan comes; and make sure a
/// watchdog is there to keep the promise.
pub fn arm(state_dir: &Path, within: Duration, binary: &Path) -> anyhow::Result<()> {
    let plan = Plan {
        kill_at_ms: boottime_ms() + within.as_millis() as u64,
        droverd_pid: std::process::id(),
    };
    let json = serde_json::to_vec(&plan).context("encoding the fence plan")?;
    // Only the running watchdog reads it: no fsync between two lease renewals.
    crate::fsutil::replace_file_volatile(&state_dir.join(PLAN), &json)?;
    ensure_running(state_dir, binary)
}

/// The watchdog's lock, if nobody holds it.
fn try_lock(state_dir: &Path) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let lock = state_dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", lock.display())),
    }
}

/// Start the watchdog unless one holds the lock.
fn ensure_running(state_dir: &Path, binary: &Path) -> anyhow::Result<()> {
    // Nobody holds the lock: no watchdog runs. Released here, taken by the child.
    if try_lock(state_dir)?.is_none() {
        return Ok(());
    }
    let log_path = state_dir.join("fence-watchdog.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let err = log.try_clone().context("duplicating the watchdog's log")?;
    let mut child = std::process::Command::new(binary)
        .arg(ARG)
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        // Not in droverd's process group: a signal to droverd's group spares it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the fence watchdog {}", binary.display()))?;
    tracing::info!(pid = child.id(), "started the fence watchdog");
    // Reaped when it exits while droverd lives; after droverd, init adopts it.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// The member VMs' QEMU processes running now: (pid, VM name).
fn member_qemus(state_dir: &Path) -> Vec<(u32, String)> {
    let members: BTreeSet<String> = std::fs::read_dir(state_dir.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(MEMBER_MARK).exists())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    if members.is_empty() {
        return Vec::new();
    }
    drover_qemu::process::with_path_under(&state_dir.join("run"))
        .into_iter()
        .filter_map(|(pid, rest)| {
            let vm = rest.split('/').next()?.to_string();
            let qemu = drover_qemu::process::comm(pid)
                .is_some_and(|c| c.starts_with("qemu-system") || c.starts_with("qemu-kvm"));
            (qemu && members.contains(&vm)).then_some((pid, vm))
        })
        .collect()
}

fn read_plan(state_dir: &Path) -> Option<Plan> {
    let bytes = std::fs::read(state_dir.join(PLAN)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn log(line: std::fmt::Arguments) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{}.{:03} {line}", now.as_secs(), now.subsec_millis());
}

/// The watchdog process (`droverd --fence-watchdog STATE_DIR`).
pub fn run(state_dir: PathBuf) -> anyhow::Result<()> {
    let Some(_held) = try_lock(&state_dir)? else {
        // Another watchdog guards this state dir.
        return Ok(());
    };
    log(format_args!(
        "fence watchdog for {} running",
        state_dir.display()
    ));
    loop {
        let plan = read_plan(&state_dir);
        let alive = plan
            .as_ref()
            .is_some_and(|p| drover_qemu::process::is_alive(p.droverd_pid, "droverd"));
        let running = member_qemus(&state_dir);
        match decide(plan.as_ref(), boottime_ms(), alive, !running.is_empty()) {
            Step::Wait(d) => std::thread::sleep(d),
            Step::Kill => {
                for (pid, vm) in running {
                    log(format_args!(
                        "droverd did not renew the cluster lease in time: killing member {vm}'s QEMU (pid {pid})"
                    ));
                    drover_qemu::process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
                std::thread::sleep(POLL);
            }
            Step::Exit => {
                log(format_args!("droverd is gone and no member runs: exiting"));
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN_AT_1000: Plan = Plan {
        kill_at_ms: 1000,
        droverd_pid: 1,
    };

    #[test]
    fn members_are_killed_once_the_promise_runs_out_and_not_before() {
        let p = Some(&PLAN_AT_1000);
        assert_eq!(
            decide(p, 999, false, true),
            Step::Wait(Duration::from_millis(1))
        );
        assert_eq!(decide(p, 500, true, true), Step::Wait(POLL));
        // A dead droverd's members die at the deadline, a hung one's too.
        assert_eq!(decide(p, 1000, false, true), Step::Kill);
        assert_eq!(decide(p, 5000, true, true), Step::Kill);
    }

    #[test]
    fn the_watchdog_waits_for_droverd_and_leaves_when_nothing_is_left_to_guard() {
        let p = Some(&PLAN_AT_1000);
        // Before the deadline it stays, even with droverd gone: members may still run then.
        assert_eq!(decide(p, 10, false, false), Step::Wait(POLL));
        assert_eq!(decide(p, 1000, true, false), Step::Wait(POLL));
        assert_eq!(decide(p, 1000, false, false), Step::Exit);
        assert_eq!(decide(None, 0, true, false), Step::Wait(POLL));
        assert_eq!(decide(None, 0, false, true), Step::Exit);
    }

    /// A process named like QEMU whose command line names `state_dir/run/VM/qmp.sock`.
    fn fake_qemu(bin: &Path, state_dir: &Path, vm: &str) -> std::process::Child {
        let sock = state_dir.join("run").join(vm).join("qmp.sock");
        std::process::Command::new(bin)
            .arg("-c")
            .arg("sleep 30")
            .arg(sock)
            .spawn()
            .expect("spawning a fake QEMU")
    }

    #[test]
    fn a_dead_droverds_members_are_killed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let bin = dir.path().join("qemu-system-x86_64");
        std::fs::copy("/bin/sh", &bin).expect("copying sh");
        mark_member(&state, "shop-web-1").expect("mark");
        let mut member = fake_qemu(&bin, &state, "shop-web-1");
        let mut plain = fake_qemu(&bin, &state, "plain");
        std::thread::sleep(Duration::from_millis(100));
        let found = member_qemus(&state);
        assert_eq!(found, vec![(member.id(), "shop-web-1".to_string())]);
        // The promise ran out and "droverd" (this test, whose command line does not say
        // droverd) is not alive: the watchdog kills the member, then leaves.
        let plan = Plan {
            kill_at_ms: boottime_ms().saturating_sub(1),
            droverd_pid: std::process::id(),
        };
        crate::fsutil::replace_file(&state.join(PLAN), &serde_json::to_vec(&plan).expect("json"))
            .expect("plan");
        run(state.clone()).expect("the watchdog runs");
        let status = member.wait().expect("member waited");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the member was SIGKILLed"
        );
        assert!(
            plain.try_wait().expect("try_wait").is_none(),
            "a VM that is no member runs on"
        );
        let _ = plain.kill();
        let _ = plain.wait();
    }
}
