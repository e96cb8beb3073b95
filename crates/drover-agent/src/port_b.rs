//! Port B (`org.drover.evt`): commands and events the host initiates, answered on the same port
//! with the frame's id.
//!
//! Events (outcomes of app requests, host notices) are acknowledged as soon as the agent has taken
//! them, then handed to the [`EventHub`], which passes them to the app connections waiting for
//! them; an event no app waits for is logged and dropped.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use drover_proto::{Body, ExecRequest, ExecResult, Frame, MAX_FRAME_LEN};

use crate::hub::EventHub;
use crate::migration::Trigger;
use crate::power::{Power, PowerAction};
use crate::wire::{body_name, FrameReader, FrameWriter, Incoming};

/// Default cap on commands running at once; beyond it `exec` is answered `Error{code: "busy"}`.
pub const MAX_CONCURRENT_EXECS: usize = 8;

/// Time between writing the shutdown `Ack` and powering off, so QEMU can take the ack out of the
/// virtqueue and pass it to the host before the guest stops.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(100);

/// Handles host commands. One per agent; it outlives connections, so its exec limit holds across
/// host reconnects.
pub struct PortB {
    power: Arc<dyn Power>,
    hub: Arc<EventHub>,
    /// Where the host's `migrated` notices go (the migration watcher).
    migrated: Option<SyncSender<Trigger>>,
    running: Arc<AtomicUsize>,
    max_execs: usize,
}

impl PortB {
    /// A handler that stops the guest through `power` and passes events to `hub`.
    pub fn new(power: Arc<dyn Power>, hub: Arc<EventHub>) -> Self {
        PortB {
            power,
            hub,
            migrated: None,
            running: Arc::new(AtomicUsize::new(0)),
            max_execs: MAX_CONCURRENT_EXECS,
        }
    }

    /// Hand the host's `migrated` notices to `tx` (see [`crate::migration`]).
    pub fn with_migration_watcher(mut self, tx: SyncSender<Trigger>) -> Self {
        self.migrated = Some(tx);
        self
    }

    /// Change the cap on concurrent execs.
    pub fn with_max_execs(mut self, max: usize) -> Self {
        self.max_execs = max;
        self
    }

    /// Serve one connection: read commands from `reader` until end of stream, answering on
    /// `writer`. Returns how many frames arrived; `Err` only for a failed read.
    ///
    /// Bad input is logged (and answered when its id is known), never fatal. Execs run on their
    /// own threads and may answer after this returns.
    pub fn serve<R, W>(&self, reader: R, writer: &FrameWriter<W>) -> io::Result<u64>
    where
        R: Read,
        W: Write + Send + 'static,
    {
        let mut frames = FrameReader::new(reader);
        let mut count = 0;
        while let Some(incoming) = frames.next_incoming()? {
            match incoming {
                Incoming::Frame(frame) => {
                    count += 1;
                    self.handle(frame, writer);
                }
                // The decoder cannot tell us the id of a frame it refused, so it goes unanswered.
                Incoming::Dropped(e) => crate::log!("port B: dropped input: {e}"),
            }
        }
        Ok(count)
    }

    fn handle<W: Write + Send + 'static>(&self, frame: Frame, writer: &FrameWriter<W>) {
        let id = frame.id;
        match frame.body {
            Body::Ping => writer.reply(id, Body::Pong(crate::info::agent_info())),
            Body::Exec(req) => self.start_exec(id, req, writer),
            Body::SetClock { unix_ms } => match crate::clock::set_clock(unix_ms) {
                Ok(()) => {
                    crate::log!("clock set to the host's ({unix_ms} ms since the epoch)");
                    writer.ack(id)
                }
                Err(e) => writer.reply_error(id, "io", &format!("setting the clock: {e}")),
            },
            // Pieces are small (MAX_FILE_CHUNK) and the host waits for each: handled in line.
            Body::FilePut(p) => match crate::files::put(&p) {
                Ok(()) => writer.ack(id),
                Err(e) => writer.reply_error(id, e.code, &e.message),
            },
            Body::FileGet(g) => match crate::files::get(&g) {
                Ok(d) => writer.reply(id, Body::FileData(d)),
                Err(e) => writer.reply_error(id, e.code, &e.message),
            },
            Body::Shutdown { reboot } => {
                let action = if reboot {
                    PowerAction::Reboot
                } else {
                    PowerAction::PowerOff
                };
                crate::log!("host requested {action:?} (id {id})");
                writer.ack(id);
                thread::sleep(SHUTDOWN_DRAIN);
                self.power.stop(action);
            }
            Body::Event(event) => {
                // Ack first: the event is ours now, so the host need not redeliver it; delivery
                // never blocks, so the ack does not wait on slow apps either.
                writer.ack(id);
                match event.migrated_notice() {
                    None => {
                        self.hub.deliver(event);
                    }
                    Some(Ok(notice)) => {
                        crate::log!(
                            "host says: migrated from {} to {} ({} ms downtime)",
                            notice.from,
                            notice.to,
                            notice.downtime_ms
                        );
                        if let Some(tx) = &self.migrated {
                            let _ = tx.try_send(Trigger::Pushed(notice));
                        }
                    }
                    Some(Err(e)) => {
                        crate::log!("port B: ignoring a malformed migrated notice: {e}")
                    }
                }
            }
            Body::SetIdentity(update) => {
                // On its own thread: the hooks may take a while, and port B keeps serving.
                let w = writer.clone();
                let hub = self.hub.clone();
                let spawned =
                    thread::Builder::new()
                        .name(format!("identity-{id}"))
                        .spawn(move || {
                            let paths = crate::identity::Paths::guest();
                            let before = crate::identity::Before::read(&paths);
                            let applied = crate::identity::apply(
                                &update,
                                &paths,
                                &crate::identity::RealSystem,
                            );
                            if !applied.already {
                                // Every listening app hears what changed (once per update).
                                let notice =
                                    crate::identity::restored_notice(&update, &applied, &before);
                                hub.broadcast(drover_proto::GuestEvent::restored(
                                    format!("restored-{}", update.token),
                                    notice,
                                ));
                            }
                            w.reply(id, Body::IdentitySet(applied));
                        });
                if let Err(e) = spawned {
                    writer.reply_error(id, "internal", &format!("cannot start a thread: {e}"));
                }
            }
            // Replies are never answered, so two confused peers cannot ping-pong errors forever.
            Body::Ack { .. } | Body::Error { .. } => {
                crate::log!(
                    "port B: ignoring unexpected {} (id {id})",
                    body_name(&frame.body)
                );
            }
            body @ (Body::Hello(_)
            | Body::Pong(_)
            | Body::ExecResult(_)
            | Body::Request(_)
            | Body::FileData(_)
            | Body::IdentitySet(_)) => {
                let name = body_name(&body);
                crate::log!("port B: {name} is not a host command (id {id})");
                writer.reply_error(
                    id,
                    "unsupported",
                    &format!("{name} is not a command the agent accepts on port B"),
                );
            }
        }
    }

    fn start_exec<W: Write + Send + 'static>(
        &self,
        id: u64,
        req: ExecRequest,
        writer: &FrameWriter<W>,
    ) {
        let Some(slot) = ExecSlot::take(&self.running, self.max_execs) else {
            writer.reply_error(
                id,
                "busy",
                &format!("{} commands already running", self.max_execs),
            );
            return;
        };
        let w = writer.clone();
        // The thread owns the slot: it is released before the result is sent, or with the
        // closure if the thread cannot be started.
        let spawned = thread::Builder::new()
            .name(format!("exec-{id}"))
            .spawn(move || {
                let result = fit_exec_result(id, crate::exec::run(&req));
                // Free the slot before answering: a host that sends the next command as soon
                // as it has this result must not find it still taken.
                drop(slot);
                w.reply(id, Body::ExecResult(result));
            });
        if let Err(e) = spawned {
            crate::log!("exec {id}: cannot start thread: {e}");
            writer.reply_error(id, "internal", &format!("cannot start exec thread: {e}"));
        }
    }
}

/// One of the limited exec slots, released on drop.
struct ExecSlot(Arc<AtomicUsize>);

impl ExecSlot {
    fn take(running: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ExecSlot(Arc::clone(running)))
    }
}

impl Drop for ExecSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cut stdout/stderr so the encoded reply fits in [`MAX_FRAME_LEN`].
///
/// Needed because JSON escaping can grow output up to six-fold (a NUL byte is `\u0000`), so two
/// full [`drover_proto::MAX_EXEC_OUTPUT`] captures do not always fit in one frame. Cut streams are
/// marked truncated. The budget is shared: a small stream leaves its unused part to the other.
pub fn fit_exec_result(id: u64, mut r: ExecResult) -> ExecResult {
    let out_len = json_len(&r.stdout);
    let err_len = json_len(&r.stderr);
    let empty = ExecResult {
        stdout: String::new(),
        stderr: String::new(),
        ..r.clone()
    };
    let overhead = match serde_json::to_vec(&Frame::new(id, Body::ExecResult(empty))) {
        Ok(v) => v.len(),
        Err(_) => return r,
    };
    let budget = MAX_FRAME_LEN.saturating_sub(overhead);
    if out_len + err_len <= budget {
        return r;
    }
    let half = budget / 2;
    let (out_budget, err_budget) = if out_len <= half {
        (out_len, budget - out_len)
    } else if err_len <= half {
        (budget - err_len, err_len)
    } else {
        (half, budget - half)
    };
    if out_len > out_budget {
        r.stdout.truncate(json_prefix(&r.stdout, out_budget));
        r.stdout_truncated = true;
    }
    if err_len > err_budget {
        r.stderr.truncate(json_prefix(&r.stderr, err_budget));
        r.stderr_truncated = true;
    }
    r
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{08}' | '\u{0c}' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

fn json_len(s: &str) -> usize {
    s.chars().map(json_char_len).sum()
}

/// Byte length of the longest prefix of `s` whose JSON form fits in `budget` bytes.
fn json_prefix(s: &str, budget: usize) -> usize {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += json_char_len(c);
        if used > budget {
            return i;
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::event;
    use drover_proto::MAX_EXEC_OUTPUT;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default)]
    struct FakePower(Mutex<Vec<PowerAction>>);

    impl Power for FakePower {
        fn stop(&self, action: PowerAction) {
            crate::lock(&self.0).push(action);
        }
    }

    /// The host's end of a port-B connection with an agent serving the other end.
    struct Host {
        sock: UnixStream,
        frames: FrameReader<UnixStream>,
        power: Arc<FakePower>,
        hub: Arc<EventHub>,
        agent: Option<thread::JoinHandle<io::Result<u64>>>,
    }

    /// A pushed `migrated` notice is acked and handed to the migration watcher, not to apps;
    /// a malformed one is acked and dropped.
    #[test]
    fn migrated_notice_goes_to_the_watcher() {
        let (mut host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let port =
            PortB::new(Arc::new(FakePower::default()), EventHub::new()).with_migration_watcher(tx);
        thread::spawn(move || {
            let writer = FrameWriter::new(agent.try_clone()?);
            port.serve(agent, &writer)
        });
        let notice = drover_proto::MigratedNotice {
            from: "h1".into(),
            to: "h2".into(),
            downtime_ms: 9,
        };
        let mut bad = drover_proto::GuestEvent::migrated("m2".into(), &notice);
        bad.result["from"] = "not valid".into();
        for (id, ev) in [
            (1, drover_proto::GuestEvent::migrated("m1".into(), &notice)),
            (2, bad),
        ] {
            let bytes = drover_proto::encode(&Frame::new(id, Body::Event(ev))).unwrap();
            host.write_all(&bytes).unwrap();
        }
        let mut frames = FrameReader::new(host.try_clone().unwrap());
        for id in [1, 2] {
            match frames.next_incoming().unwrap() {
                Some(Incoming::Frame(f)) => {
                    assert_eq!(f.id, id);
                    assert!(matches!(f.body, Body::Ack { accepted: true, .. }));
                }
                other => panic!("{other:?}"),
            }
        }
        match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
            Trigger::Pushed(n) => assert_eq!(n, notice),
            other => panic!("{other:?}"),
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "malformed one dropped"
        );
    }

    impl Host {
        fn start(max_execs: usize) -> Host {
            let (host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let power = Arc::new(FakePower::default());
            let hub = EventHub::new();
            let port = PortB::new(power.clone(), hub.clone()).with_max_execs(max_execs);
            let agent = thread::spawn(move || {
                let writer = FrameWriter::new(agent.try_clone()?);
                port.serve(agent, &writer)
            });
            Host {
                frames: FrameReader::new(host.try_clone().unwrap()),
                sock: host,
                power,
                hub,
                agent: Some(agent),
            }
        }

        fn send(&mut self, id: u64, body: Body) {
            let bytes = drover_proto::encode(&Frame::new(id, body)).unwrap();
            self.sock.write_all(&bytes).unwrap();
        }

        fn recv(&mut self) -> Frame {
            match self.frames.next_incoming().unwrap() {
                Some(Incoming::Frame(f)) => f,
                other => panic!("expected a frame, got {other:?}"),
            }
        }

        fn exec(&mut self, id: u64, argv: &[&str], timeout_ms: u64) -> ExecResult {
            let req = ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                stdin: None,
                timeout_ms,
            };
            self.send(id, Body::Exec(req));
            let f = self.recv();
            assert_eq!(f.id, id);
            match f.body {
                Body::ExecResult(r) => r,
                other => panic!("expected exec_result, got {other:?}"),
            }
        }
    }

    #[test]
    fn ping_gets_pong_with_same_id() {
        let mut h = Host::start(8);
        h.send(42, Body::Ping);
        let f = h.recv();
        assert_eq!(f.id, 42);
        match f.body {
            Body::Pong(info) => {
                assert_eq!(info.protocol, drover_proto::PROTOCOL_VERSION);
                assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
            }
            other => panic!("expected pong, got {other:?}"),
        }
    }

    #[test]
    fn exec_reports_exit_code_and_output() {
        let mut h = Host::start(8);
        let r = h.exec(1, &["sh", "-c", "echo out; echo err >&2; exit 3"], 10_000);
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.timed_out);
    }

    #[test]
    fn exec_timeout_kills_quickly() {
        let mut h = Host::start(8);
        let t = Instant::now();
        let r = h.exec(2, &["sleep", "5"], 200);
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn exec_output_is_capped() {
        let mut h = Host::start(8);
        let r = h.exec(
            3,
            &["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a"],
            10_000,
        );
        assert!(r.stdout_truncated);
        assert_eq!(r.stdout.len(), MAX_EXEC_OUTPUT);
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn exec_nul_output_is_capped_and_still_fits_a_frame() {
        let mut h = Host::start(8);
        // 64 KiB of NULs is 384 KiB of JSON: more than a frame holds, so the reply is cut further.
        let r = h.exec(4, &["head", "-c", "200000", "/dev/zero"], 10_000);
        assert!(r.stdout_truncated);
        assert!(r.stdout.len() <= MAX_EXEC_OUTPUT);
        assert!(r.stdout.len() > MAX_EXEC_OUTPUT / 2, "{}", r.stdout.len());
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn garbage_then_ping_is_answered() {
        let mut h = Host::start(8);
        h.sock.write_all(b"\x00\xffDRnot a frame DRV").unwrap();
        // A magic with an absurd length, then a frame whose JSON is invalid.
        h.sock.write_all(b"DRV1\xff\xff\xff\xff").unwrap();
        h.sock.write_all(b"DRV1\x00\x00\x00\x02{}").unwrap();
        h.send(7, Body::Ping);
        let f = h.recv();
        assert_eq!(f.id, 7);
        assert!(matches!(f.body, Body::Pong(_)));
    }

    #[test]
    fn unknown_command_exits_127() {
        let mut h = Host::start(8);
        let r = h.exec(5, &["no-such-command-drover"], 10_000);
        assert_eq!(r.exit_code, Some(127));
        assert!(r.stderr.contains("no-such-command-drover"), "{}", r.stderr);
    }

    #[test]
    fn ping_is_answered_while_exec_runs() {
        let mut h = Host::start(8);
        let req = ExecRequest {
            argv: vec!["sleep".into(), "1".into()],
            stdin: None,
            timeout_ms: 10_000,
        };
        h.send(10, Body::Exec(req));
        h.send(11, Body::Ping);
        let first = h.recv();
        assert_eq!(first.id, 11, "pong must not wait for the exec");
        let second = h.recv();
        assert_eq!(second.id, 10);
        assert!(matches!(second.body, Body::ExecResult(_)));
    }

    #[test]
    fn execs_beyond_the_cap_are_busy() {
        let mut h = Host::start(1);
        let sleep = ExecRequest {
            argv: vec!["sleep".into(), "1".into()],
            stdin: None,
            timeout_ms: 10_000,
        };
        h.send(20, Body::Exec(sleep.clone()));
        h.send(21, Body::Exec(sleep));
        let f = h.recv();
        assert_eq!(f.id, 21);
        assert!(matches!(f.body, Body::Error { ref code, .. } if code == "busy"));
        assert_eq!(h.recv().id, 20);
        // The slot is free again.
        let r = h.exec(22, &["true"], 10_000);
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn shutdown_acks_then_powers_off() {
        let mut h = Host::start(8);
        h.send(30, Body::Shutdown { reboot: false });
        let f = h.recv();
        assert_eq!(f.id, 30);
        assert_eq!(
            f.body,
            Body::Ack {
                accepted: true,
                reason: None,
                ticket: None
            }
        );
        h.send(31, Body::Shutdown { reboot: true });
        assert_eq!(h.recv().id, 31);
        // Round-trip a ping so both shutdowns have been handled.
        h.send(32, Body::Ping);
        assert_eq!(h.recv().id, 32);
        assert_eq!(
            *crate::lock(&h.power.0),
            vec![PowerAction::PowerOff, PowerAction::Reboot]
        );
    }

    #[test]
    fn wrong_direction_bodies_get_errors_and_replies_are_ignored() {
        let mut h = Host::start(8);
        h.send(
            40,
            Body::Ack {
                accepted: true,
                reason: None,
                ticket: None,
            },
        );
        h.send(41, Body::Pong(crate::info::agent_info()));
        let f = h.recv();
        assert_eq!(f.id, 41);
        assert!(matches!(f.body, Body::Error { ref code, .. } if code == "unsupported"));
    }

    #[test]
    fn events_are_acked_then_delivered() {
        let mut h = Host::start(8);
        let listener = h.hub.listen("app");
        let waiter = h.hub.expect().claim("t1");
        h.send(60, Body::Event(event("t1", Some("app"))));
        let f = h.recv();
        assert_eq!(f.id, 60);
        assert_eq!(
            f.body,
            Body::Ack {
                accepted: true,
                reason: None,
                ticket: None
            }
        );
        let wait = Duration::from_secs(5);
        assert_eq!(listener.events().recv_timeout(wait).unwrap().ticket, "t1");
        assert_eq!(waiter.events().recv_timeout(wait).unwrap().ticket, "t1");

        // Nobody listens for this one: still acked (then dropped), and serving goes on.
        h.send(61, Body::Event(event("t2", Some("nobody"))));
        assert_eq!(h.recv().id, 61);
        assert!(listener.events().try_recv().is_err());

        // A request on the host's port is still refused.
        h.send(
            62,
            Body::Request(drover_proto::GuestRequest {
                principal: "p".into(),
                secret: "s".into(),
                app_id: None,
                op: drover_proto::GuestOp::List,
                data: None,
            }),
        );
        let f = h.recv();
        assert_eq!(f.id, 62);
        assert!(matches!(f.body, Body::Error { ref code, .. } if code == "unsupported"));
    }

    #[test]
    fn serve_returns_at_end_of_stream() {
        let mut h = Host::start(8);
        h.send(50, Body::Ping);
        assert_eq!(h.recv().id, 50);
        h.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let n = h.agent.take().unwrap().join().unwrap().unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn fitting_shares_the_budget() {
        let r = ExecResult {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            // NUL encodes as six JSON bytes: this is far over the frame limit.
            stdout: "\0".repeat(MAX_EXEC_OUTPUT * 3),
            stderr: "\0".repeat(MAX_EXEC_OUTPUT * 3),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 1,
        };
        let fitted = fit_exec_result(u64::MAX, r);
        assert!(fitted.stdout_truncated && fitted.stderr_truncated);
        let encoded = drover_proto::encode(&Frame::new(u64::MAX, Body::ExecResult(fitted)));
        assert!(encoded.is_ok());

        let small = ExecResult {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: "ok".into(),
            stderr: "\"é\t".into(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 1,
        };
        assert_eq!(fit_exec_result(1, small.clone()), small);
        assert_eq!(json_len("\"é\t\u{1}"), 2 + 2 + 2 + 6);
    }
}
