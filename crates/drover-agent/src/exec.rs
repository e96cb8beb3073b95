//! Running a host-requested command ([`ExecRequest`]) and collecting its [`ExecResult`].

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use drover_proto::{ExecRequest, ExecResult, MAX_EXEC_OUTPUT};

/// `PATH` given to commands when the agent itself has none (it is started by a bare `/init`).
pub const DEFAULT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// After killing a timed-out command, how long to wait for its pipes to close before giving up on
/// them (a process that left the group may hold them open forever).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output is awaited after the command exited, for pipes a process it started in the
/// background still holds open.
pub const OUTPUT_LINGER: Duration = Duration::from_millis(500);

/// Output kept from one pipe.
#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    truncated: bool,
}

/// What the waiting loop hears from the helper threads.
enum Event {
    Exited(io::Result<ExitStatus>),
    PipeClosed,
}

/// Run `req` to completion (or until its timeout) and describe the outcome.
///
/// Never fails: a command that cannot be started is reported like a shell would, exit code 127
/// (not found) or 126 (found but not runnable) with the reason on stderr.
///
/// The command runs in its own process group so a timeout kills everything it started. Output
/// beyond [`MAX_EXEC_OUTPUT`] bytes per stream is drained and dropped, so the command never blocks
/// on a full pipe. Once the command exits, its output is awaited [`OUTPUT_LINGER`] more for
/// pipes still open: a background process it left (`sh -c 'daemon &'`) holds them, keeps
/// running, and its later output is not part of the result.
pub fn run(req: &ExecRequest) -> ExecResult {
    let start = Instant::now();
    let Some((program, args)) = req.argv.split_first() else {
        return spawn_failure(start, "", &io::Error::other("empty argv"), 127);
    };

    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if std::env::var_os("PATH").is_none() {
        // Setting PATH on the Command also makes std search it for `program`.
        cmd.env("PATH", DEFAULT_PATH);
    }

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return spawn_failure(start, program, &e, code);
        }
    };
    // With process_group(0) the child's pid is also its process group id.
    let pid = child.id() as libc::pid_t;

    let (tx, rx) = mpsc::channel::<Event>();
    let mut pending = 0;
    let mut captures = Vec::new();

    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), req.stdin.clone()) {
        // A writer thread, so a child that writes a lot before reading cannot deadlock us. A child
        // that exits without reading gives EPIPE, which is fine.
        let spawned = thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let _ = stdin.write_all(data.as_bytes());
            });
        if let Err(e) = spawned {
            crate::log!("exec: cannot start stdin thread: {e}");
        }
    }
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ] {
        let cap = Arc::new(Mutex::new(Capture::default()));
        captures.push(Arc::clone(&cap));
        let Some(pipe) = pipe else { continue };
        let tx = tx.clone();
        let spawned = thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || {
                drain(pipe, &cap);
                let _ = tx.send(Event::PipeClosed);
            });
        match spawned {
            Ok(_) => pending += 1,
            Err(e) => crate::log!("exec: cannot start output thread: {e}"),
        }
    }
    let waiter = {
        let tx = tx.clone();
        thread::Builder::new()
            .name("exec-wait".into())
            .spawn(move || {
                let _ = tx.send(Event::Exited(child.wait()));
            })
    };
    match waiter {
        Ok(_) => pending += 1,
        Err(e) => {
            // Without a waiter we cannot learn the status; kill rather than leak the command.
            crate::log!("exec: cannot start wait thread: {e}");
            kill_group(pid, true);
        }
    }
    drop(tx);

    let deadline = start.checked_add(Duration::from_millis(req.timeout_ms));
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut give_up_at: Option<Instant> = None;
    let mut linger_until: Option<Instant> = None;
    while pending > 0 {
        let until = if timed_out {
            give_up_at
        } else {
            match (deadline, linger_until) {
                (Some(d), Some(l)) => Some(d.min(l)),
                (d, l) => d.or(l),
            }
        };
        let event = match until {
            Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Exited(Ok(s))) => {
                status = Some(s);
                pending -= 1;
                linger_until = Instant::now().checked_add(OUTPUT_LINGER);
            }
            Ok(Event::Exited(Err(e))) => {
                crate::log!("exec: waiting for {program}: {e}");
                pending -= 1;
                linger_until = Instant::now().checked_add(OUTPUT_LINGER);
            }
            Ok(Event::PipeClosed) => pending -= 1,
            // Exited, and something it left in the background holds its output open: done.
            Err(RecvTimeoutError::Timeout)
                if !timed_out && linger_until.is_some_and(|l| Instant::now() >= l) =>
            {
                crate::log!("exec: {program} exited; a process it left holds its output open");
                break;
            }
            Err(RecvTimeoutError::Timeout) if !timed_out => {
                timed_out = true;
                // Only signal the pid itself while it is unreaped: after that it may be reused.
                kill_group(pid, status.is_none());
                give_up_at = Instant::now().checked_add(KILL_GRACE);
            }
            Err(RecvTimeoutError::Timeout) => {
                crate::log!("exec: {program}: gave up waiting after kill");
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    let [out, err] = [0, 1].map(|i| {
        let c = crate::lock(&captures[i]);
        (String::from_utf8_lossy(&c.bytes).into_owned(), c.truncated)
    });
    ExecResult {
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        stdout: out.0,
        stderr: err.0,
        stdout_truncated: out.1,
        stderr_truncated: err.1,
        duration_ms: elapsed_ms(start),
    }
}

/// Read `pipe` to its end, keeping the first [`MAX_EXEC_OUTPUT`] bytes.
fn drain(mut pipe: impl Read, cap: &Mutex<Capture>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut c = crate::lock(cap);
        let room = MAX_EXEC_OUTPUT.saturating_sub(c.bytes.len());
        let take = n.min(room);
        c.bytes.extend_from_slice(&buf[..take]);
        if take < n {
            c.truncated = true;
        }
    }
}

/// SIGKILL the process group led by `pid` (and `pid` itself, in case it left the group).
fn kill_group(pid: libc::pid_t, include_leader: bool) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        if include_leader {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn spawn_failure(start: Instant, program: &str, e: &io::Error, code: i32) -> ExecResult {
    ExecResult {
        exit_code: Some(code),
        signal: None,
        timed_out: false,
        stdout: String::new(),
        stderr: format!("drover-agent: {program}: {e}\n"),
        stdout_truncated: false,
        stderr_truncated: false,
        duration_ms: elapsed_ms(start),
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str], timeout_ms: u64) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: None,
            timeout_ms,
        }
    }

    #[test]
    fn captures_output_and_exit_code() {
        let r = run(&req(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            10_000,
        ));
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.signal, None);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.timed_out && !r.stdout_truncated && !r.stderr_truncated);
    }

    #[test]
    fn feeds_stdin() {
        let mut q = req(&["cat"], 10_000);
        q.stdin = Some("hello".into());
        let r = run(&q);
        assert_eq!(r.stdout, "hello");
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn caps_output_and_keeps_draining() {
        let r = run(&req(&["head", "-c", "200000", "/dev/zero"], 10_000));
        assert_eq!(r.exit_code, Some(0));
        assert!(r.stdout_truncated);
        assert_eq!(r.stdout.len(), MAX_EXEC_OUTPUT);
    }

    /// A command that leaves a process in the background returns when it exits, with its own
    /// output; the process runs on.
    #[test]
    fn background_processes_do_not_hold_the_result() {
        let t = Instant::now();
        let r = run(&req(
            &["sh", "-c", "echo started; (sleep 3; echo late) &"],
            60_000,
        ));
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout, "started\n");
        assert!(!r.timed_out);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn timeout_kills_the_group() {
        let t = Instant::now();
        // The inner sleep is a grandchild: it must die with the group or its pipe would keep us.
        let r = run(&req(&["sh", "-c", "sleep 5; true"], 200));
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn missing_program_is_127_and_huge_timeout_is_fine() {
        let r = run(&req(&["definitely-not-a-command-xyz"], u64::MAX));
        assert_eq!(r.exit_code, Some(127));
        assert!(
            r.stderr.contains("definitely-not-a-command-xyz"),
            "{}",
            r.stderr
        );
    }
}
