//! The app socket (`/run/drover/agent.sock`): how programs in the guest ask the host for things.
//!
//! Newline-delimited JSON, one object per line, each line at most [`MAX_LINE`] bytes. A client
//! sends commands; the agent answers each with one line:
//!
//! ```text
//! → {"cmd":"request","principal":"backup","secret":"…","app_id":"app-1","op":{"op":"save","name":"n"},"data":{…},"wait":true}
//! ← {"ack":{"accepted":true,"reason":null,"ticket":"t-17"}}
//! ← {"event":{"ticket":"t-17","app_id":"app-1","op":"save","status":"completed","result":{…},"data":{…}}}   (only with "wait": true and accepted)
//!
//! → {"cmd":"listen","app_id":"app-1"}
//! ← {"listening":"app-1"}
//! ← {"event":{…}}          (every event for app-1, until the client closes)
//!
//! ← {"error":"…","code":"…"} (a bad line, or a request that got no ack: see below)
//! ```
//!
//! `app_id`, `data` and `wait` are optional. `op` is a [`GuestOp`] in its wire form. Requests are
//! checked against the protocol's bounds here, so the app hears about a bad one at once. The agent
//! never interprets the op: whatever the protocol carries is forwarded.
//!
//! Error codes: `bad_line` (not a command), `too_long` (line over the limit; the connection is
//! then closed), `invalid` (breaks a protocol bound), `not_connected` (no host), `busy`, `timeout`
//! (the host did not ack within 10 s), `lost` (the host went away before acking), `no_ticket`
//! (accepted without a ticket, so there is nothing to wait for), `too_many_clients`.
//!
//! After a `request` the connection takes further commands (after the event, when waiting). After
//! `listen` it only delivers events; anything more the client sends is ignored. A waiting or
//! listening connection ends when the client closes it: waits are not bounded by the agent,
//! because a save may take minutes; the client chooses how long to wait.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use drover_proto::{EventStatus, GuestEvent, GuestOp, GuestRequest};
use serde_json::{json, Map, Value};

use crate::hub::{EventHub, Subscription};
use crate::port_a::{Ack, PortA, ACK_TIMEOUT};

/// Where the app socket lives.
pub const DEFAULT_SOCKET: &str = "/run/drover/agent.sock";
/// Longest line a client may send, newline excluded.
pub const MAX_LINE: usize = 128 * 1024;
/// Most clients served at once; further ones get `too_many_clients` and are closed.
pub const MAX_CLIENTS: usize = 64;
/// Permissions of the socket: root and its group. The principal's secret is the real check; the
/// mode only narrows who may try.
pub const SOCKET_MODE: u32 = 0o660;
/// The group the socket belongs to where it exists (the `.deb` creates it), so that members may
/// use `drover-guest` without root; elsewhere the socket stays `root:root`.
pub const SOCKET_GROUP: &str = "drover";
/// The group database read for [`SOCKET_GROUP`]. Read directly rather than through NSS, which a
/// statically linked agent cannot load.
const GROUP_FILE: &str = "/etc/group";
/// Most bytes read from [`GROUP_FILE`].
const MAX_GROUP_FILE: u64 = 1024 * 1024;
/// A client that sends no command for this long is disconnected, so idle connections cannot
/// hold the client slots forever. Waiting and listening connections are not idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its events for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting or listening connection checks whether its client has gone.
const HANGUP_POLL: Duration = Duration::from_millis(500);

/// One command from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Forward `req` to the host; with `wait`, also deliver its outcome.
    Request {
        /// The request as it goes to the host.
        req: GuestRequest,
        /// Keep the connection for the outcome event.
        wait: bool,
    },
    /// Deliver every event for this app id.
    Listen {
        /// The app id.
        app_id: String,
    },
}

/// Serves the app socket: one thread per client.
pub struct AppServer {
    port_a: Arc<PortA>,
    hub: Arc<EventHub>,
    clients: Arc<AtomicUsize>,
    max_clients: usize,
    ack_timeout: Duration,
}

impl AppServer {
    /// A server forwarding requests through `port_a` and events from `hub`.
    pub fn new(port_a: Arc<PortA>, hub: Arc<EventHub>) -> Self {
        AppServer {
            port_a,
            hub,
            clients: Arc::new(AtomicUsize::new(0)),
            max_clients: MAX_CLIENTS,
            ack_timeout: ACK_TIMEOUT,
        }
    }

    /// Change how long a request waits for the host's ack.
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Change the cap on concurrent clients.
    pub fn with_max_clients(mut self, max: usize) -> Self {
        self.max_clients = max;
        self
    }

    /// Bind the socket at `path` and serve it forever, retrying the bind (logged once per kind
    /// of failure) if it fails: the agent's ports keep working without the app socket.
    pub fn run(self: Arc<Self>, path: &Path) -> ! {
        let mut last_error = None;
        loop {
            match bind(path) {
                Ok(listener) => {
                    crate::log!("app socket: listening on {}", path.display());
                    self.serve(&listener)
                }
                Err(e) => {
                    if last_error != Some(e.kind()) {
                        crate::log!("app socket: cannot bind {}: {e}; retrying", path.display());
                        last_error = Some(e.kind());
                    }
                    thread::sleep(Duration::from_secs(2));
                }
            }
        }
    }

    /// Accept clients on `listener` forever.
    pub fn serve(self: &Arc<Self>, listener: &UnixListener) -> ! {
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.start_client(stream),
                Err(e) => {
                    // EMFILE and friends: pause rather than spin; the next accept may work.
                    crate::log!("app socket: accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn start_client(self: &Arc<Self>, mut stream: UnixStream) {
        let Some(slot) = ClientSlot::take(&self.clients, self.max_clients) else {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_line(
                &mut stream,
                &error_line(
                    "too_many_clients",
                    &format!("the agent serves at most {} clients", self.max_clients),
                ),
            );
            return;
        };
        let server = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("app-client".into())
            .spawn(move || {
                let _slot = slot;
                server.handle(stream);
            });
        if let Err(e) = spawned {
            crate::log!("app socket: cannot start client thread: {e}");
        }
    }

    /// Serve one client until it closes, breaks the line limit, or goes idle.
    pub fn handle(&self, stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        let mut out = stream;
        let mut reader = match out.try_clone() {
            Ok(s) => BufReader::new(s),
            Err(e) => {
                crate::log!("app socket: cannot duplicate client socket: {e}");
                return;
            }
        };
        loop {
            let line = match read_line(&mut reader, MAX_LINE) {
                Ok(Line::Eof) => return,
                Ok(Line::TooLong) => {
                    let _ = write_line(
                        &mut out,
                        &error_line("too_long", &format!("line exceeds {MAX_LINE} bytes")),
                    );
                    return;
                }
                Ok(Line::Line(l)) => l,
                // Idle timeout or a broken socket: either way this client is done.
                Err(_) => return,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let keep_going = match parse_command(&line) {
                Err(msg) => write_line(&mut out, &error_line("bad_line", &msg)).is_ok(),
                Ok(Command::Listen { app_id }) => {
                    let sub = self.hub.listen(&app_id);
                    if write_line(&mut out, &json!({ "listening": app_id })).is_ok() {
                        forward(&mut out, &sub, false);
                    }
                    return;
                }
                Ok(Command::Request { req, wait }) => self.request(&mut out, req, wait),
            };
            if !keep_going {
                return;
            }
        }
    }

    /// Forward one request and answer the client; returns whether the client is still there.
    fn request(&self, out: &mut UnixStream, req: GuestRequest, wait: bool) -> bool {
        // Before sending: the event may be read on port B before the ack on port A.
        let expectation = wait.then(|| self.hub.expect());
        let ack = match self.port_a.request(req, self.ack_timeout) {
            Ok(ack) => ack,
            Err(e) => return write_line(out, &error_line(e.code(), &e.to_string())).is_ok(),
        };
        if write_line(out, &ack_line(&ack)).is_err() {
            return false;
        }
        match (expectation, ack.accepted, ack.ticket) {
            (Some(exp), true, Some(ticket)) => forward(out, &exp.claim(&ticket), true),
            (Some(_), true, None) => write_line(
                out,
                &error_line(
                    "no_ticket",
                    "the host accepted without a ticket; there is no outcome to wait for",
                ),
            )
            .is_ok(),
            _ => true,
        }
    }
}

/// Write the events of `sub` to the client: the first only (`once`) or all. Returns whether the
/// client is still there.
fn forward(out: &mut UnixStream, sub: &Subscription, once: bool) -> bool {
    loop {
        match sub.events().recv_timeout(HANGUP_POLL) {
            Ok(event) => {
                if write_line(out, &event_line(&event)).is_err() {
                    return false;
                }
                if once {
                    return true;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer_hung_up(out) {
                    return false;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// Whether the client closed its end. Only a full close counts: a client that shut down its
/// writing half (`nc` after its input ends) may still be reading.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        // POLLHUP and POLLERR are always reported.
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut fd, 1, 0) };
    rc > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Bind the app socket at `path` with mode [`SOCKET_MODE`], creating its directory and replacing
/// a stale socket left by a previous agent.
///
/// The socket is bound under a temporary name, given its mode, then renamed into place, so it is
/// never reachable with the process umask's looser mode. Anything at `path` that is not a socket
/// is left alone (an error): it is not ours to delete.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::other("socket path has no file name"));
    };
    if !dir.as_os_str().is_empty() {
        fs::create_dir_all(dir)?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Ok(_) => crate::log!("app socket: replacing stale {}", path.display()),
        Err(_) => {}
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| match socket_gid() {
            Some(gid) => std::os::unix::fs::chown(&tmp, None, Some(gid)),
            None => Ok(()),
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The gid of [`SOCKET_GROUP`] in this guest's group file, if it has one.
fn socket_gid() -> Option<u32> {
    use std::io::Read as _;
    let mut text = String::new();
    fs::File::open(GROUP_FILE)
        .ok()?
        .take(MAX_GROUP_FILE)
        .read_to_string(&mut text)
        .ok()?;
    group_gid(&text, SOCKET_GROUP)
}

/// The gid of group `name` in the text of a `group(5)` file (`name:password:gid:members`).
/// Malformed lines are skipped.
pub fn group_gid(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (n, _pw, gid) = (fields.next()?, fields.next()?, fields.next()?);
        (n == name).then(|| gid.parse().ok()).flatten()
    })
}

/// One of the limited client slots, released on drop.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(Arc::clone(count)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// One line, without its `\n` (or `\r\n`).
    Line(Vec<u8>),
    /// More than the limit without a newline; the stream is no longer in step.
    TooLong,
    /// End of stream.
    Eof,
}

/// Read one line of at most `max` bytes (newline excluded), never buffering more than `max + 1`.
/// A last line without a newline counts as a line.
pub fn read_line<R: BufRead>(reader: &mut R, max: usize) -> io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = io::Read::take(reader, limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Line::Line(buf));
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Line(buf))
}

/// Write `value` as one line, in one write.
pub fn write_line(w: &mut impl Write, value: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes)?;
    w.flush()
}

/// `{"ack":{...}}`, every field present (null when absent) so clients need not guess.
pub fn ack_line(ack: &Ack) -> Value {
    json!({ "ack": { "accepted": ack.accepted, "reason": ack.reason, "ticket": ack.ticket } })
}

/// `{"event":{...}}` with the event in its wire form.
pub fn event_line(event: &GuestEvent) -> Value {
    let event = serde_json::to_value(event).unwrap_or_else(|e| {
        // Cannot happen for a type of plain strings and JSON values; stay total all the same.
        json!({ "ticket": event.ticket, "op": event.op, "status": EventStatus::Failed,
                "error": format!("agent could not encode the event: {e}") })
    });
    json!({ "event": event })
}

/// `{"error":..,"code":..}`.
pub fn error_line(code: &str, message: &str) -> Value {
    json!({ "error": message, "code": code })
}

/// Parse one client line.
pub fn parse_command(line: &[u8]) -> Result<Command, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut m) = value else {
        return Err("expected a JSON object with a \"cmd\" field".into());
    };
    let cmd = take_string(&mut m, "cmd")?;
    let command = match cmd.as_str() {
        "request" => {
            let principal = take_string(&mut m, "principal")?;
            let secret = take_string(&mut m, "secret")?;
            let app_id = take_opt_string(&mut m, "app_id")?;
            let op = m.remove("op").ok_or("missing field \"op\"")?;
            let op: GuestOp = serde_json::from_value(op).map_err(|e| format!("bad op: {e}"))?;
            let data = m.remove("data").filter(|d| !d.is_null());
            let wait = match m.remove("wait") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err("field \"wait\" must be true or false".into()),
            };
            Command::Request {
                req: GuestRequest {
                    principal,
                    secret,
                    app_id,
                    op,
                    data,
                },
                wait,
            }
        }
        "listen" => {
            let app_id = take_string(&mut m, "app_id")?;
            check_app_id(&app_id)?;
            Command::Listen { app_id }
        }
        other => {
            return Err(format!(
                "unknown cmd {other:?}; expected \"request\" or \"listen\""
            ))
        }
    };
    // Strict like the wire protocol: a misspelt field is an error, not silently ignored.
    if let Some(k) = m.keys().next() {
        return Err(format!("unknown field {k:?} for cmd {cmd:?}"));
    }
    Ok(command)
}

/// Check an app id by the protocol's own rule (an event carrying it must decode).
fn check_app_id(app_id: &str) -> Result<(), String> {
    let probe = drover_proto::Frame::new(
        0,
        drover_proto::Body::Event(GuestEvent {
            ticket: String::new(),
            app_id: Some(app_id.to_string()),
            op: String::new(),
            status: EventStatus::Notice,
            result: Value::Null,
            error: None,
            data: None,
        }),
    );
    drover_proto::encode(&probe)
        .and_then(|b| drover_proto::decode_body(&b[drover_proto::HEADER_LEN..]))
        .map(|_| ())
        .map_err(|_| {
            format!(
                "app id must be 1-{} characters of a-z, A-Z, 0-9, '.', '_', '-'",
                drover_proto::MAX_APP_ID
            )
        })
}

fn take_string(m: &mut Map<String, Value>, key: &str) -> Result<String, String> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field {key:?} must be a string")),
        None => Err(format!("missing field {key:?}")),
    }
}

fn take_opt_string(m: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(format!("field {key:?} must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{Power, PowerAction};
    use crate::test_support::TempDir;
    use crate::wire::{FrameReader, FrameWriter, Incoming};
    use drover_proto::{Body, Frame};
    use std::sync::mpsc;
    use std::time::Instant;

    struct NoPower;
    impl Power for NoPower {
        fn stop(&self, _: PowerAction) {}
    }

    fn send(sock: &mut UnixStream, id: u64, body: Body) {
        sock.write_all(&drover_proto::encode(&Frame::new(id, body)).unwrap())
            .unwrap();
    }

    /// An agent (ports A and B, app socket) wired to a scripted host over socket pairs.
    ///
    /// The host acks requests from principals `ok` and `fail` with ticket `t-<id>`, never answers
    /// `slow`, and refuses others. For an accepted request it then sends the outcome on port B: an
    /// event echoing the app id and data, completed for `ok`, failed for `fail`.
    struct Rig {
        _dir: TempDir,
        path: std::path::PathBuf,
        /// Acks the host received on port B, by frame id.
        port_b_acks: mpsc::Receiver<Frame>,
        hub: Arc<EventHub>,
    }

    impl Rig {
        fn start() -> Rig {
            Self::start_with(MAX_CLIENTS, Duration::from_secs(10))
        }

        fn start_with(max_clients: usize, ack_timeout: Duration) -> Rig {
            let dir = TempDir::new("app");
            let path = dir.path().join("run/agent.sock");
            let hub = EventHub::new();
            let port_a = Arc::new(PortA::without_ready_flag());

            let (mut host_a, agent_a) = UnixStream::pair().unwrap();
            let p = Arc::clone(&port_a);
            thread::spawn(move || {
                let writer = FrameWriter::new(agent_a.try_clone()?);
                p.serve(agent_a, &writer)
            });
            let (mut host_b, agent_b) = UnixStream::pair().unwrap();
            let port_b = crate::port_b::PortB::new(Arc::new(NoPower), Arc::clone(&hub));
            thread::spawn(move || {
                let writer = FrameWriter::new(agent_b.try_clone()?);
                port_b.serve(agent_b, &writer)
            });
            let (acks_tx, port_b_acks) = mpsc::channel();
            let mut b_frames = FrameReader::new(host_b.try_clone().unwrap());
            thread::spawn(move || {
                while let Ok(Some(Incoming::Frame(f))) = b_frames.next_incoming() {
                    let _ = acks_tx.send(f);
                }
            });
            thread::spawn(move || {
                let mut frames = FrameReader::new(host_a.try_clone().unwrap());
                let mut event_id = 1000;
                while let Ok(Some(Incoming::Frame(f))) = frames.next_incoming() {
                    let req = match f.body {
                        Body::Hello(_) => {
                            send(
                                &mut host_a,
                                f.id,
                                Body::Ack {
                                    accepted: true,
                                    reason: None,
                                    ticket: None,
                                },
                            );
                            continue;
                        }
                        Body::Request(r) => r,
                        _ => continue,
                    };
                    match req.principal.as_str() {
                        "slow" => continue,
                        "ok" | "fail" => {}
                        _ => {
                            let reason = Some("principal not allowed".to_string());
                            send(
                                &mut host_a,
                                f.id,
                                Body::Ack {
                                    accepted: false,
                                    reason,
                                    ticket: None,
                                },
                            );
                            continue;
                        }
                    }
                    let ticket = format!("t-{}", f.id);
                    let ack = Body::Ack {
                        accepted: true,
                        reason: None,
                        ticket: Some(ticket.clone()),
                    };
                    send(&mut host_a, f.id, ack);
                    event_id += 1;
                    let failed = req.principal == "fail";
                    let event = GuestEvent {
                        ticket,
                        app_id: req.app_id,
                        op: req.op.name().into(),
                        status: if failed {
                            EventStatus::Failed
                        } else {
                            EventStatus::Completed
                        },
                        result: if failed {
                            Value::Null
                        } else {
                            json!({"ok": true})
                        },
                        error: failed.then(|| "no space left".to_string()),
                        data: req.data,
                    };
                    send(&mut host_b, event_id, Body::Event(event));
                }
            });
            let t = Instant::now();
            while !port_a.connected() {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "host never acked hello"
                );
                thread::sleep(Duration::from_millis(5));
            }

            let listener = bind(&path).unwrap();
            let server = Arc::new(
                AppServer::new(port_a, Arc::clone(&hub))
                    .with_max_clients(max_clients)
                    .with_ack_timeout(ack_timeout),
            );
            thread::spawn(move || server.serve(&listener));
            Rig {
                _dir: dir,
                path,
                port_b_acks,
                hub,
            }
        }

        fn client(&self) -> Client {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client {
                reader: BufReader::new(s.try_clone().unwrap()),
                sock: s,
            }
        }
    }

    struct Client {
        sock: UnixStream,
        reader: BufReader<UnixStream>,
    }

    impl Client {
        fn send(&mut self, line: &str) {
            self.sock.write_all(line.as_bytes()).unwrap();
            self.sock.write_all(b"\n").unwrap();
        }

        fn recv(&mut self) -> Value {
            match read_line(&mut self.reader, 1 << 20).unwrap() {
                Line::Line(l) => serde_json::from_slice(&l).unwrap(),
                other => panic!("expected a line, got {other:?}"),
            }
        }

        fn closed(&mut self) -> bool {
            matches!(read_line(&mut self.reader, 1 << 20), Ok(Line::Eof))
        }
    }

    const SAVE_WAIT: &str = r#"{"cmd":"request","principal":"ok","secret":"s","app_id":"app-1","op":{"op":"save","name":"n1"},"data":{"k":[1,2]},"wait":true}"#;

    #[test]
    fn request_with_wait_gets_ack_then_event() {
        let rig = Rig::start();
        let mut c = rig.client();
        c.send(SAVE_WAIT);
        let ack = c.recv();
        assert_eq!(ack["ack"]["accepted"], true);
        assert_eq!(ack["ack"]["reason"], Value::Null);
        let ticket = ack["ack"]["ticket"].as_str().unwrap().to_string();
        let ev = c.recv();
        assert_eq!(ev["event"]["ticket"], ticket.as_str());
        assert_eq!(ev["event"]["status"], "completed");
        assert_eq!(ev["event"]["op"], "save");
        assert_eq!(ev["event"]["data"], json!({"k": [1, 2]}));
        // The host got its ack for the event.
        let ack = rig
            .port_b_acks
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        assert!(matches!(ack.body, Body::Ack { accepted: true, .. }));
        // The connection takes more commands: a refused one, without waiting.
        c.send(
            r#"{"cmd":"request","principal":"nope","secret":"s","op":{"op":"list"},"wait":true}"#,
        );
        let refused = c.recv();
        assert_eq!(refused["ack"]["accepted"], false);
        assert_eq!(refused["ack"]["reason"], "principal not allowed");
        c.send(r#"{"cmd":"request","principal":"ok","secret":"s","op":{"op":"host_info"}}"#);
        assert_eq!(c.recv()["ack"]["accepted"], true);
    }

    #[test]
    fn listeners_get_events_for_their_app() {
        let rig = Rig::start();
        let mut l1 = rig.client();
        let mut l2 = rig.client();
        let mut other = rig.client();
        l1.send(r#"{"cmd":"listen","app_id":"app-1"}"#);
        l2.send(r#"{"cmd":"listen","app_id":"app-1"}"#);
        other.send(r#"{"cmd":"listen","app_id":"app-2"}"#);
        for l in [&mut l1, &mut l2] {
            assert_eq!(l.recv(), json!({"listening": "app-1"}));
        }
        assert_eq!(other.recv(), json!({"listening": "app-2"}));
        let mut r = rig.client();
        r.send(&SAVE_WAIT.replace("true}", "false}"));
        let ticket = r.recv()["ack"]["ticket"].clone();
        for l in [&mut l1, &mut l2] {
            let ev = l.recv();
            assert_eq!(ev["event"]["ticket"], ticket);
            assert_eq!(ev["event"]["app_id"], "app-1");
        }
        other
            .sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            read_line(&mut other.reader, 1024).is_err(),
            "app-2 hears nothing"
        );

        // Closed listeners unsubscribe (noticed within the hang-up poll).
        drop(l1);
        drop(l2);
        drop(other);
        let t = Instant::now();
        while rig.hub.subscriptions() > 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "listeners linger");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn bad_lines_get_errors_and_the_connection_goes_on() {
        let rig = Rig::start();
        let mut c = rig.client();
        let cases = [
            ("{not json", "bad_line"),
            ("[1]", "bad_line"),
            (r#"{"cmd":"format"}"#, "bad_line"),
            (r#"{"cmd":"listen","app_id":"has space"}"#, "bad_line"),
            (r#"{"cmd":"listen","app_id":"a","extra":1}"#, "bad_line"),
            (
                r#"{"cmd":"request","principal":"ok","secret":"s","op":{"op":"reboot_host"}}"#,
                "bad_line",
            ),
            (
                r#"{"cmd":"request","principal":"ok","secret":"s","op":{"op":"list"},"wait":"yes"}"#,
                "bad_line",
            ),
            (
                r#"{"cmd":"request","principal":"ok","secret":"s","op":{"op":"reconfigure","changes":[]}}"#,
                "invalid",
            ),
            (
                r#"{"cmd":"request","principal":"","secret":"s","op":{"op":"list"}}"#,
                "invalid",
            ),
        ];
        for (line, code) in cases {
            c.send(line);
            let reply = c.recv();
            assert_eq!(reply["code"], code, "{line}: {reply}");
            assert!(reply["error"].as_str().is_some_and(|m| !m.is_empty()));
        }
        c.send("");
        c.send(r#"{"cmd":"listen","app_id":"a"}"#);
        assert_eq!(c.recv(), json!({"listening": "a"}));
    }

    #[test]
    fn oversized_line_is_refused_and_closed() {
        let rig = Rig::start();
        let mut c = rig.client();
        let big = format!(r#"{{"cmd":"listen","app_id":"{}"}}"#, "a".repeat(MAX_LINE));
        // The agent answers and closes after MAX_LINE + 1 bytes; the rest may hit a closed socket.
        let _ = c.sock.write_all(big.as_bytes());
        let reply = c.recv();
        assert_eq!(reply["code"], "too_long");
        assert!(c.closed());
    }

    #[test]
    fn unacknowledged_request_times_out_for_the_app() {
        let rig = Rig::start_with(MAX_CLIENTS, Duration::from_millis(300));
        let mut c = rig.client();
        c.send(
            r#"{"cmd":"request","principal":"slow","secret":"s","op":{"op":"list"},"wait":true}"#,
        );
        let reply = c.recv();
        assert_eq!(reply["code"], "timeout");
        assert!(reply["error"]
            .as_str()
            .unwrap()
            .contains("host did not acknowledge"));
    }

    #[test]
    fn clients_beyond_the_cap_are_turned_away() {
        let rig = Rig::start_with(1, Duration::from_secs(10));
        let mut first = rig.client();
        first.send(r#"{"cmd":"listen","app_id":"a"}"#);
        first.recv();
        let mut second = rig.client();
        assert_eq!(second.recv()["code"], "too_many_clients");
        assert!(second.closed());
    }

    #[test]
    fn bind_sets_mode_replaces_stale_socket_and_spares_other_files() {
        let dir = TempDir::new("bind");
        let path = dir.path().join("d/agent.sock");
        let first = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        drop(first);
        // The old socket file is still there (stale): it is replaced, and the new one works.
        let listener = bind(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temp left"
        );

        let file = dir.path().join("plain");
        fs::write(&file, b"keep").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn group_file_lookup() {
        let text = "root:x:0:\n# comment\nbroken\ndrov:x:5:\ndrover:x:998:alice,bob\nlate:x:7:";
        assert_eq!(group_gid(text, "drover"), Some(998));
        assert_eq!(group_gid(text, "root"), Some(0));
        assert_eq!(group_gid(text, "dro"), None);
        assert_eq!(group_gid("drover:x:notanumber:", "drover"), None);
        assert_eq!(group_gid("", "drover"), None);
    }

    /// `drover-guest` against the rig: output and exit codes.
    #[test]
    fn guest_cli_exit_codes() {
        use crate::cli::{GuestCli, GuestCommand};
        use crate::guest::{execute, exit};
        use clap::Parser as _;

        // A short ack bound so the unanswered request below fails fast.
        let rig = Rig::start_with(MAX_CLIENTS, Duration::from_millis(500));
        let socket = rig.path.to_str().unwrap().to_string();
        let secret = rig._dir.path().join("secret");
        fs::write(&secret, "s\n").unwrap();
        let secret = secret.to_str().unwrap().to_string();
        let run = |principal: &str, args: &[&str]| -> (Result<(), crate::guest::Failure>, String) {
            let mut argv = vec!["drover-guest"];
            argv.extend_from_slice(args);
            argv.extend(["--principal", principal, "--secret-file", &secret]);
            if !args.contains(&"--socket") {
                argv.extend(["--socket", &socket]);
            }
            let cmd: GuestCommand = GuestCli::try_parse_from(argv).unwrap().command;
            let mut out = Vec::new();
            let r = execute(&cmd, &mut out);
            (r, String::from_utf8(out).unwrap())
        };

        let (r, out) = run("ok", &["save", "--name", "n"]);
        assert!(r.is_ok());
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["ticket"].as_str().unwrap().starts_with("t-"), "{out}");

        let (r, out) = run(
            "ok",
            &[
                "reconfigure",
                "--cpus",
                "2",
                "--app-id",
                "a",
                "--data",
                "[7]",
                "--wait",
            ],
        );
        assert!(r.is_ok());
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["op"], "reconfigure");
        assert_eq!(v["data"], json!([7]));

        let (r, out) = run("ok", &["list"]);
        assert!(r.is_ok());
        assert_eq!(out, "{\n  \"ok\": true\n}\n", "pretty result");

        let (r, _) = run("nope", &["host-info"]);
        let f = r.unwrap_err();
        assert_eq!(f.code, exit::REFUSED);
        assert!(f.message.contains("principal not allowed"), "{}", f.message);

        let (r, out) = run("fail", &["restore", "s1", "--wait"]);
        let f = r.unwrap_err();
        assert_eq!(f.code, exit::FAILED);
        assert!(f.message.contains("no space left"), "{}", f.message);
        assert!(
            out.contains("\"failed\""),
            "the event is printed too: {out}"
        );

        let (r, _) = run("ok", &["save", "--name", &"x".repeat(65)]);
        assert_eq!(
            r.unwrap_err().code,
            exit::USAGE,
            "protocol bounds are bad input"
        );

        let (r, _) = run(
            "ok",
            &[
                "reconfigure",
                "--cpus",
                "1",
                "--socket",
                "/nonexistent/agent.sock",
            ],
        );
        assert_eq!(r.unwrap_err().code, exit::UNAVAILABLE);

        let (r, _) = run("slow", &["list", "--timeout", "1"]);
        // The agent's ack bound answers first: host did not acknowledge.
        let f = r.unwrap_err();
        assert_eq!(f.code, exit::UNAVAILABLE);
        assert!(
            f.message.contains("host did not acknowledge"),
            "{}",
            f.message
        );
    }

    #[test]
    fn line_reader_is_bounded() {
        let mut r = BufReader::new(&b"ab\r\ncd\n\nlast"[..]);
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Line(b"ab".to_vec()));
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Line(b"cd".to_vec()));
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Line(vec![]));
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Line(b"last".to_vec()));
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Eof);
        let mut r = BufReader::new(&b"abcd\nabcde\n"[..]);
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::Line(b"abcd".to_vec()));
        assert_eq!(read_line(&mut r, 4).unwrap(), Line::TooLong);
    }

    #[test]
    fn commands_parse() {
        let c = parse_command(SAVE_WAIT.as_bytes()).unwrap();
        let Command::Request { req, wait } = c else {
            panic!("{c:?}")
        };
        assert!(wait);
        assert_eq!(
            req.op,
            GuestOp::Save {
                name: Some("n1".into())
            }
        );
        assert_eq!(req.app_id.as_deref(), Some("app-1"));
        let c = parse_command(br#"{"cmd":"request","principal":"p","secret":"s","app_id":null,"data":null,"op":{"op":"reconfigure","changes":[{"change":"set_cpus","count":2}]}}"#).unwrap();
        assert!(matches!(
            c,
            Command::Request {
                wait: false,
                req: GuestRequest {
                    app_id: None,
                    data: None,
                    ..
                }
            }
        ));
    }
}
