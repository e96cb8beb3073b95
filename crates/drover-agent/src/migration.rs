//! Noticing that the VM moved to another host (or was restored), and running the `migrated.d`
//! hooks **exactly once per change**.
//!
//! Three things can notice a change: the host's pushed `migrated` notice (port B), the agent's
//! own check of the host identity (at every port A connection and every [`CHECK_EVERY`]), and
//! `drover-guest scan --notify-if-migrated`, which runs in its own process. They share one record
//! of the last identity the hooks were run for ([`STATE_FILE`], on the guest's `/run` tmpfs),
//! read and written under an exclusive `flock` ([`LOCK_FILE`]): whoever first sees a new identity
//! runs the hooks and records it; the others find it recorded and do nothing ([`decide`]).
//!
//! An identity is the host id plus the VM's generation id (new on every restore or clone). The
//! first identity the agent ever sees is recorded as the baseline without running anything: a
//! boot is not a migration.

use std::fs;
use std::io::{self, Read as _};
use std::os::fd::AsFd as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use drover_proto::{
    EventStatus, GuestOp, GuestRequest, HostIdentityAnswer, MigratedNotice, MigrationNotice,
    NoticeTrigger,
};
use serde_json::{json, Value};

use crate::hub::EventHub;
use crate::port_a::{PortA, ACK_TIMEOUT};

/// Where the hooks live: every executable file in it runs, in name order.
pub const HOOKS_DIR: &str = "/etc/drover/hooks/migrated.d";
/// The last identity the hooks ran for (or the baseline).
pub const STATE_FILE: &str = "/run/drover/migration.json";
/// Serialises the agent and scans around [`STATE_FILE`] and the hooks.
pub const LOCK_FILE: &str = "/run/drover/migration.lock";
/// Longest one hook may run before it is killed (with everything it started).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Most hooks run per change; further files are ignored (logged).
pub const MAX_HOOKS: usize = 64;
/// How often the agent asks the host for its identity besides at each connection.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// Environment of each hook: the host id before the change.
pub const ENV_OLD_HOST_ID: &str = "DROVER_OLD_HOST_ID";
/// The host id now.
pub const ENV_NEW_HOST_ID: &str = "DROVER_NEW_HOST_ID";
/// The generation id before (empty when unknown).
pub const ENV_OLD_GENERATION_ID: &str = "DROVER_OLD_GENERATION_ID";
/// The generation id now (empty when unknown).
pub const ENV_NEW_GENERATION_ID: &str = "DROVER_NEW_GENERATION_ID";
/// Who noticed: `scan`, `pushed` or `agent`.
pub const ENV_TRIGGER: &str = "DROVER_MIGRATION_TRIGGER";
/// Triggers queued for the watcher; more are dropped (one queued check covers them).
const TRIGGER_QUEUE: usize = 4;
/// Largest state file read (a guard against a file someone filled).
const MAX_STATE_FILE: u64 = 64 * 1024;

/// Where a VM runs: the host's id and the VM's generation id (when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The host id.
    pub host_id: String,
    /// The generation id; `None` when only the host id is known (a pushed notice).
    pub generation_id: Option<String>,
}

impl Identity {
    /// From the host's answer to a `host-identity` request.
    pub fn from_answer(a: &HostIdentityAnswer) -> Self {
        Identity {
            host_id: a.host.id.clone(),
            generation_id: Some(a.generation_id.clone()),
        }
    }

    /// Whether `other` is a different place or generation. Generations count only when both
    /// sides know theirs.
    pub fn differs(&self, other: &Identity) -> bool {
        self.host_id != other.host_id
            || matches!((&self.generation_id, &other.generation_id), (Some(a), Some(b)) if a != b)
    }

    fn to_json(&self) -> Value {
        json!({ "host_id": self.host_id, "generation_id": self.generation_id })
    }

    /// Parse what [`Identity::to_json`] wrote; `None` for anything malformed.
    fn from_json(v: &Value) -> Option<Self> {
        let host_id = v["host_id"].as_str()?;
        if !drover_proto::valid_host_id(host_id) {
            return None;
        }
        let generation_id = match &v["generation_id"] {
            Value::Null => None,
            Value::String(g) if drover_proto::valid_generation_id(g) => Some(g.clone()),
            _ => return None,
        };
        Some(Identity {
            host_id: host_id.to_string(),
            generation_id,
        })
    }
}

/// What to do about an observed identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing was recorded yet and no change was seen: record it, run nothing.
    Baseline,
    /// Same as recorded.
    Unchanged,
    /// The caller saw a change, but it was already handled (by the agent, or an earlier scan).
    AlreadyHandled,
    /// A change not handled yet: run the hooks for `old` → observed.
    Run {
        /// The identity before.
        old: Identity,
    },
}

/// Decide, given the identity the hooks last ran for (`handled`), the one just `observed`, and
/// the one the caller itself saw before (`seen_before`: a scan's first read, a notice's `from`).
pub fn decide(
    handled: Option<&Identity>,
    observed: &Identity,
    seen_before: Option<&Identity>,
) -> Decision {
    let caller_saw_change = seen_before.is_some_and(|b| b.differs(observed));
    match handled {
        None if caller_saw_change => Decision::Run {
            old: seen_before.cloned().unwrap_or_else(|| observed.clone()),
        },
        None => Decision::Baseline,
        Some(h) if h.differs(observed) => Decision::Run { old: h.clone() },
        Some(_) if caller_saw_change => Decision::AlreadyHandled,
        Some(_) => Decision::Unchanged,
    }
}

/// How one hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookReport {
    /// Its file name.
    pub name: String,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Killed for running past the timeout.
    pub timed_out: bool,
    /// Why it could not be started.
    pub error: Option<String>,
}

impl HookReport {
    /// Exited 0.
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// As JSON for scan output.
    pub fn to_json(&self) -> Value {
        json!({ "name": self.name, "exit_code": self.exit_code, "timed_out": self.timed_out, "error": self.error })
    }
}

/// The outcome of [`Hooks::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What was decided.
    pub decision: Decision,
    /// The hooks that ran (empty unless the decision was `Run` and running was asked for).
    pub hooks: Vec<HookReport>,
    /// Whether the hooks ran (and the change is now recorded as handled).
    pub ran: bool,
}

impl Outcome {
    /// The migration notice for the host, when hooks ran.
    pub fn notice(&self, new: &Identity, trigger: NoticeTrigger) -> Option<MigrationNotice> {
        let Decision::Run { old } = &self.decision else {
            return None;
        };
        self.ran.then(|| MigrationNotice {
            old_host_id: old.host_id.clone(),
            new_host_id: new.host_id.clone(),
            old_generation_id: old.generation_id.clone(),
            new_generation_id: new.generation_id.clone(),
            trigger,
            hooks_run: self.hooks.len() as u32,
            hooks_failed: self.hooks.iter().filter(|h| !h.ok()).count() as u32,
        })
    }
}

/// The hooks directory and the shared record of what was handled.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Hooks directory.
    pub dir: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// Lock file.
    pub lock: PathBuf,
    /// Per-hook timeout.
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            dir: HOOKS_DIR.into(),
            state: STATE_FILE.into(),
            lock: LOCK_FILE.into(),
            timeout: HOOK_TIMEOUT,
        }
    }
}

impl Hooks {
    /// Record `observed` and, when it is a change nobody handled yet and `run` is set, run the
    /// hooks (once: under the lock, so a concurrent caller waits and then finds it handled).
    /// Without `run`, a change is only reported, not recorded, so someone else still handles it.
    pub fn observe(
        &self,
        observed: &Identity,
        seen_before: Option<&Identity>,
        trigger: NoticeTrigger,
        run: bool,
    ) -> io::Result<Outcome> {
        let _lock = FileLock::exclusive(&self.lock)?;
        let handled = self.read_state();
        let decision = decide(handled.as_ref(), observed, seen_before);
        let mut out = Outcome {
            decision: decision.clone(),
            hooks: Vec::new(),
            ran: false,
        };
        match decision {
            Decision::Baseline => self.write_state(observed)?,
            Decision::Run { old } if run => {
                crate::log!(
                    "host changed: {} -> {} ({trigger:?}); running {}",
                    old.host_id,
                    observed.host_id,
                    self.dir.display()
                );
                out.hooks = run_hooks(&self.dir, &old, observed, trigger, self.timeout);
                // A notice knows no generation: keep the one recorded, for the next comparison.
                let mut record = observed.clone();
                if record.generation_id.is_none() && old.host_id == observed.host_id {
                    record.generation_id = old.generation_id.clone();
                }
                self.write_state(&record)?;
                out.ran = true;
            }
            _ => {}
        }
        Ok(out)
    }

    fn read_state(&self) -> Option<Identity> {
        let mut buf = Vec::new();
        fs::File::open(&self.state)
            .and_then(|f| f.take(MAX_STATE_FILE).read_to_end(&mut buf))
            .ok()?;
        Identity::from_json(&serde_json::from_slice(&buf).ok()?)
    }

    /// Write the record atomically (temp file, rename): a crash leaves the old or the new one.
    fn write_state(&self, id: &Identity) -> io::Result<()> {
        if let Some(dir) = self.state.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self
            .state
            .with_extension(format!("tmp.{}", std::process::id()));
        fs::write(&tmp, id.to_json().to_string())?;
        fs::rename(&tmp, &self.state)
    }
}

/// An exclusive `flock` held until dropped (closing the file releases it).
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn exclusive(path: &Path) -> io::Result<FileLock> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: a valid open descriptor.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The hooks in `dir`: regular executable files (symlinks followed), not hidden, by name.
pub fn list_hooks(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hooks: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && !name.ends_with('~')
        })
        .map(|e| e.path())
        .filter(|p| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    hooks.sort();
    if hooks.len() > MAX_HOOKS {
        crate::log!(
            "{} holds {} hooks; running the first {MAX_HOOKS}",
            dir.display(),
            hooks.len()
        );
        hooks.truncate(MAX_HOOKS);
    }
    hooks
}

/// Run every hook in `dir` in order, each with the identities in its environment, its stdout
/// sent to our stderr (a scan's stdout is its JSON), and at most `timeout` each.
pub fn run_hooks(
    dir: &Path,
    old: &Identity,
    new: &Identity,
    trigger: NoticeTrigger,
    timeout: Duration,
) -> Vec<HookReport> {
    let trigger = match trigger {
        NoticeTrigger::Scan => "scan",
        NoticeTrigger::Pushed => "pushed",
        NoticeTrigger::Agent => "agent",
    };
    let env = [
        (ENV_OLD_HOST_ID, old.host_id.clone()),
        (ENV_NEW_HOST_ID, new.host_id.clone()),
        (
            ENV_OLD_GENERATION_ID,
            old.generation_id.clone().unwrap_or_default(),
        ),
        (
            ENV_NEW_GENERATION_ID,
            new.generation_id.clone().unwrap_or_default(),
        ),
        (ENV_TRIGGER, trigger.to_string()),
    ];
    run_hooks_with(dir, &env, timeout)
}

/// Run every hook in `dir` in order with `env` added to its environment, its stdout sent to our
/// stderr, each killed (with what it started) after `timeout`.
pub fn run_hooks_with(dir: &Path, env: &[(&str, String)], timeout: Duration) -> Vec<HookReport> {
    list_hooks(dir)
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let report = run_one(&path, env, timeout);
            let report = HookReport { name, ..report };
            crate::log!(
                "hook {}: exit {:?}{}{}",
                report.name,
                report.exit_code,
                if report.timed_out { ", timed out" } else { "" },
                report
                    .error
                    .as_deref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            );
            report
        })
        .collect()
}

fn run_one(path: &Path, env: &[(&str, String)], timeout: Duration) -> HookReport {
    let mut report = HookReport {
        name: String::new(),
        exit_code: None,
        timed_out: false,
        error: None,
    };
    let stdout = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let mut cmd = Command::new(path);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(stdout)
        .process_group(0);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", crate::exec::DEFAULT_PATH);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(format!("cannot start: {e}"));
            return report;
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                report.exit_code = status.code();
                return report;
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                report.timed_out = true;
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: signalling the hook's own process group.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                return report;
            }
            Err(e) => {
                report.error = Some(format!("waiting: {e}"));
                return report;
            }
        }
    }
}

/// Send a request as the agent itself (no principal: only ops that need no grant), and with
/// `wait`, wait that long for its outcome and return its `result`.
pub fn ask_host(
    port_a: &PortA,
    hub: &Arc<EventHub>,
    op: GuestOp,
    wait: Option<Duration>,
) -> Result<Value, String> {
    let req = GuestRequest {
        principal: String::new(),
        secret: String::new(),
        app_id: None,
        op,
        data: None,
    };
    let expectation = wait.map(|_| hub.expect());
    let ack = port_a
        .request(req, ACK_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if !ack.accepted {
        return Err(format!(
            "refused: {}",
            ack.reason.unwrap_or_else(|| "no reason".into())
        ));
    }
    let (Some(exp), Some(wait)) = (expectation, wait) else {
        return Ok(Value::Null);
    };
    let ticket = ack.ticket.ok_or("accepted without a ticket")?;
    let sub = exp.claim(&ticket);
    let event = sub
        .events()
        .recv_timeout(wait)
        .map_err(|_| format!("no answer within {wait:?}"))?;
    if event.status == EventStatus::Failed {
        return Err(event.error.unwrap_or_else(|| "failed".into()));
    }
    Ok(event.result)
}

/// What wakes the agent's watcher.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// A host (re)connected on port A: maybe a new one.
    Connected,
    /// The host pushed a `migrated` notice.
    Pushed(MigratedNotice),
}

/// The agent's own migration watcher: asks the host for its identity on every trigger and every
/// [`CHECK_EVERY`], runs the hooks on a change, and tells the host.
pub struct Watcher {
    /// Where requests go.
    pub port_a: Arc<PortA>,
    /// Where their answers come from.
    pub hub: Arc<EventHub>,
    /// Hooks and their record.
    pub hooks: Hooks,
}

impl Watcher {
    /// Serve triggers from `rx` forever (returns only if every sender is gone).
    pub fn run(&self, rx: &Receiver<Trigger>) {
        loop {
            let trigger = match rx.recv_timeout(CHECK_EVERY) {
                Ok(t) => Some(t),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if trigger.is_none() && !self.port_a.connected() {
                continue;
            }
            self.check(trigger);
        }
    }

    fn check(&self, trigger: Option<Trigger>) {
        let pushed = match &trigger {
            Some(Trigger::Pushed(n)) => Some(n.clone()),
            _ => None,
        };
        // Right after a connection the host may not have its port B up yet: a few tries.
        let mut observed = None;
        for attempt in 0..3u64 {
            match ask_host(
                &self.port_a,
                &self.hub,
                GuestOp::HostIdentity {},
                Some(Duration::from_secs(10)),
            )
            .and_then(|v| HostIdentityAnswer::from_result(&v).map_err(|e| e.to_string()))
            {
                Ok(a) => {
                    observed = Some(Identity::from_answer(&a));
                    break;
                }
                Err(e) => {
                    crate::log!("asking the host for its identity: {e}");
                    thread::sleep(Duration::from_secs(1 + attempt));
                }
            }
        }
        let (observed, seen_before, how) = match (observed, pushed) {
            (Some(o), Some(n)) => (o, Some(host_only(&n.from)), NoticeTrigger::Pushed),
            (Some(o), None) => (o, None, NoticeTrigger::Agent),
            // The notice alone is enough to act on.
            (None, Some(n)) => (
                host_only(&n.to),
                Some(host_only(&n.from)),
                NoticeTrigger::Pushed,
            ),
            (None, None) => return,
        };
        let outcome = match self
            .hooks
            .observe(&observed, seen_before.as_ref(), how, true)
        {
            Ok(o) => o,
            Err(e) => {
                crate::log!("migration record {}: {e}", self.hooks.state.display());
                return;
            }
        };
        if let Some(notice) = outcome.notice(&observed, how) {
            if let Err(e) = ask_host(
                &self.port_a,
                &self.hub,
                GuestOp::MigrationNotice(notice),
                // The ack means recorded; waiting for the outcome only keeps it from arriving
                // unclaimed (and logged as such).
                Some(Duration::from_secs(10)),
            ) {
                crate::log!("telling the host about the migration: {e}");
            }
        }
    }
}

fn host_only(id: &str) -> Identity {
    Identity {
        host_id: id.to_string(),
        generation_id: None,
    }
}

/// Start the watcher thread; returns the sender that feeds it triggers.
///
/// The queue is small and senders use `try_send`: a flood of triggers (a confused host pushing
/// notices) collapses into the few checks already queued instead of growing memory.
pub fn spawn_watcher(watcher: Watcher) -> io::Result<SyncSender<Trigger>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(TRIGGER_QUEUE);
    thread::Builder::new()
        .name("migration".into())
        .spawn(move || watcher.run(&rx))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn id(h: &str, g: Option<&str>) -> Identity {
        Identity {
            host_id: h.into(),
            generation_id: g.map(str::to_string),
        }
    }

    #[test]
    fn decisions() {
        let a = id("a", Some("1"));
        let b = id("b", Some("1"));
        let a2 = id("a", Some("2"));
        assert_eq!(decide(None, &a, None), Decision::Baseline);
        assert_eq!(decide(None, &a, Some(&a)), Decision::Baseline);
        assert_eq!(decide(None, &b, Some(&a)), Decision::Run { old: a.clone() });
        assert_eq!(decide(Some(&a), &a, None), Decision::Unchanged);
        assert_eq!(decide(Some(&a), &b, None), Decision::Run { old: a.clone() });
        assert_eq!(
            decide(Some(&a), &a2, None),
            Decision::Run { old: a.clone() }
        );
        assert_eq!(decide(Some(&b), &b, Some(&a)), Decision::AlreadyHandled);
        // A notice knows only host ids: no generation, no generation change.
        assert_eq!(decide(Some(&a), &id("a", None), None), Decision::Unchanged);
        assert_eq!(
            decide(Some(&b), &id("b", None), Some(&id("a", None))),
            Decision::AlreadyHandled
        );
    }

    fn hooks(dir: &TempDir) -> Hooks {
        let d = dir.path();
        fs::create_dir_all(d.join("hooks")).unwrap();
        Hooks {
            dir: d.join("hooks"),
            state: d.join("run/migration.json"),
            lock: d.join("run/migration.lock"),
            timeout: Duration::from_millis(500),
        }
    }

    fn script(h: &Hooks, name: &str, body: &str, mode: u32) {
        let p = h.dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn hooks_run_once_per_change_in_order_with_env() {
        let dir = TempDir::new("hooks");
        let h = hooks(&dir);
        let log = dir.path().join("log");
        let l = log.display();
        script(&h, "20-second", &format!("echo \"2 $DROVER_OLD_HOST_ID $DROVER_NEW_HOST_ID $DROVER_MIGRATION_TRIGGER\" >> {l}"), 0o755);
        script(
            &h,
            "10-first",
            &format!("echo \"1 $DROVER_NEW_GENERATION_ID\" >> {l}; exit 3"),
            0o755,
        );
        script(
            &h,
            "30-not-executable",
            &format!("echo never >> {l}"),
            0o644,
        );
        script(&h, ".hidden", &format!("echo never >> {l}"), 0o755);
        script(&h, "40-slow", "sleep 5", 0o755);

        let a = id("a", Some("1"));
        let b = id("b", Some("2"));
        // First sight: the baseline, nothing runs.
        let o = h.observe(&a, None, NoticeTrigger::Agent, true).unwrap();
        assert_eq!((o.decision, o.ran), (Decision::Baseline, false));
        // A scan that sees the change but is not asked to act: reported, not recorded.
        let o = h.observe(&b, Some(&a), NoticeTrigger::Scan, false).unwrap();
        assert_eq!(
            (o.decision.clone(), o.ran),
            (Decision::Run { old: a.clone() }, false)
        );
        assert!(!log.exists());
        // The scan acts: hooks run in name order with the ids.
        let o = h.observe(&b, Some(&a), NoticeTrigger::Scan, true).unwrap();
        assert!(o.ran);
        let names: Vec<_> = o.hooks.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["10-first", "20-second", "40-slow"]);
        assert_eq!(o.hooks[0].exit_code, Some(3));
        assert!(o.hooks[2].timed_out);
        let n = o.notice(&b, NoticeTrigger::Scan).unwrap();
        assert_eq!((n.hooks_run, n.hooks_failed), (3, 2));
        assert_eq!(fs::read_to_string(&log).unwrap(), "1 2\n2 a b scan\n");
        // The agent's own trigger for the same change, and a pushed notice: already handled.
        let o = h.observe(&b, None, NoticeTrigger::Agent, true).unwrap();
        assert_eq!((o.decision, o.ran), (Decision::Unchanged, false));
        let o = h
            .observe(
                &id("b", None),
                Some(&id("a", None)),
                NoticeTrigger::Pushed,
                true,
            )
            .unwrap();
        assert_eq!(
            (o.decision.clone(), o.ran),
            (Decision::AlreadyHandled, false)
        );
        assert!(o.notice(&b, NoticeTrigger::Pushed).is_none());
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
        // A restore (same host, new generation) is a new change.
        let o = h
            .observe(&id("b", Some("3")), None, NoticeTrigger::Agent, true)
            .unwrap();
        assert!(o.ran);
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 4);
    }

    #[test]
    fn concurrent_observers_run_hooks_once() {
        let dir = TempDir::new("race");
        let h = hooks(&dir);
        let log = dir.path().join("log");
        script(
            &h,
            "10-count",
            &format!("sleep 0.1; echo x >> {}", log.display()),
            0o755,
        );
        let a = id("a", Some("1"));
        h.observe(&a, None, NoticeTrigger::Agent, true).unwrap();
        let b = id("b", Some("1"));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (h, a, b) = (h.clone(), a.clone(), b.clone());
                thread::spawn(move || {
                    let trigger = if i % 2 == 0 {
                        NoticeTrigger::Scan
                    } else {
                        NoticeTrigger::Agent
                    };
                    h.observe(&b, Some(&a), trigger, true).unwrap().ran
                })
            })
            .collect();
        let ran = threads
            .into_iter()
            .filter(|_| true)
            .map(|t| t.join().unwrap())
            .filter(|r| *r)
            .count();
        assert_eq!(ran, 1);
        assert_eq!(fs::read_to_string(&log).unwrap(), "x\n");
    }

    #[test]
    fn a_garbled_record_is_a_fresh_start() {
        let dir = TempDir::new("garbled");
        let h = hooks(&dir);
        fs::create_dir_all(h.state.parent().unwrap()).unwrap();
        for junk in [
            "{",
            "{\"host_id\":\"has space\"}",
            "[]",
            "{\"host_id\":\"a\",\"generation_id\":7}",
        ] {
            fs::write(&h.state, junk).unwrap();
            assert_eq!(h.read_state(), None, "{junk}");
        }
        assert_eq!(
            list_hooks(&dir.path().join("missing")),
            Vec::<PathBuf>::new()
        );
    }
}
