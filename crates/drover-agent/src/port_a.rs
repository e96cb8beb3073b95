//! Port A (`org.drover.req`): requests the guest initiates; the host answers each with an `Ack`.
//!
//! Each connection starts with a `Hello`, so the host learns the agent is up (and which boot it
//! is in). Once the host has acknowledged it, apps' requests ([`PortA::request`]) are forwarded:
//! each gets a fresh frame id, and the reader thread hands the host's `Ack` (or `Error`) for that
//! id to the thread that asked. Nothing waits longer than the caller's bound: the host answers a
//! request at once and reports its outcome later as an event on port B.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use drover_proto::{Body, Frame, GuestRequest};

use crate::wire::{body_name, FrameReader, FrameWriter, Incoming};

/// Created once the host has acknowledged a hello; `/init` waits for it before loading the
/// modules only data disks need, so they do not compete with the agent's start.
pub const READY_FLAG: &str = "/run/drover/agent-ready";

/// How long an app request waits for the host's ack by default.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests sent and not yet acknowledged, at most (beyond it: [`RequestError::Busy`]).
pub const MAX_PENDING: usize = 64;

/// The host's immediate answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Whether the host took the request.
    pub accepted: bool,
    /// Why not, when refused.
    pub reason: Option<String>,
    /// The host's handle, repeated in the event that reports the outcome.
    pub ticket: Option<String>,
}

/// Why a request got no ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// It breaks the protocol's rules (too long, bad app id, ...); not sent.
    Invalid(String),
    /// No host is connected on port A (or it has not acknowledged the agent's hello yet).
    NotConnected,
    /// Too many requests are waiting for acks.
    Busy,
    /// The host did not answer within the bound; it may or may not have received the request.
    Timeout(Duration),
    /// The connection ended, or the request could not be written, before the host answered.
    Lost(String),
}

impl RequestError {
    /// A stable code for apps (`invalid`, `not_connected`, `busy`, `timeout`, `lost`).
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::Invalid(_) => "invalid",
            RequestError::NotConnected => "not_connected",
            RequestError::Busy => "busy",
            RequestError::Timeout(_) => "timeout",
            RequestError::Lost(_) => "lost",
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Invalid(m) => write!(f, "invalid request: {m}"),
            RequestError::NotConnected => f.write_str("the host is not connected to the agent"),
            RequestError::Busy => write!(
                f,
                "too many requests waiting for the host ({MAX_PENDING}); try again"
            ),
            RequestError::Timeout(t) if t.subsec_millis() == 0 => {
                write!(f, "host did not acknowledge within {} s", t.as_secs())
            }
            RequestError::Timeout(t) => write!(
                f,
                "host did not acknowledge within {:.1} s",
                t.as_secs_f64()
            ),
            RequestError::Lost(m) => write!(f, "request lost before the host answered: {m}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// What the reader hands a waiting request.
type Answer = Result<Ack, RequestError>;

/// A frame queued for the session's sender thread, dropped unsent after `deadline` (its
/// requester has given up by then).
struct Outgoing {
    frame: Frame,
    deadline: Instant,
}

/// Requests waiting for their ack, by frame id.
type Pending = Arc<Mutex<HashMap<u64, SyncSender<Answer>>>>;

/// The guest-initiated side of the channel. One per agent, shared across connections (so request
/// ids keep increasing over host reconnects) and with the app socket (which sends through it).
pub struct PortA {
    next_id: AtomicU64,
    /// The current session's outbox; `None` while no host has acknowledged our hello.
    link: Mutex<Option<SyncSender<Outgoing>>>,
    pending: Pending,
    /// Where to drop the ready flag (`None`: don't).
    ready_flag: Option<std::path::PathBuf>,
    /// Told each time a host acknowledges a hello (it may be a new host: see `migration`).
    on_connect: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Default for PortA {
    fn default() -> Self {
        Self::new()
    }
}

impl PortA {
    /// A fresh id sequence, starting at 1. Creates [`READY_FLAG`] when the host first answers.
    pub fn new() -> Self {
        PortA {
            next_id: AtomicU64::new(1),
            link: Mutex::new(None),
            pending: Arc::default(),
            ready_flag: Some(READY_FLAG.into()),
            on_connect: Mutex::new(None),
        }
    }

    /// Call `f` (which must not block) each time a host acknowledges this agent's hello.
    pub fn on_connect(&self, f: impl Fn() + Send + Sync + 'static) {
        *crate::lock(&self.on_connect) = Some(Box::new(f));
    }

    /// Like [`PortA::new`] but never writes the ready flag (for tests).
    pub fn without_ready_flag() -> Self {
        PortA {
            ready_flag: None,
            ..Self::new()
        }
    }

    /// A new request id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a host is connected and has acknowledged this session's hello.
    pub fn connected(&self) -> bool {
        crate::lock(&self.link).is_some()
    }

    /// Forward an app's request and wait up to `timeout` for the host's ack.
    ///
    /// The request is checked against the protocol's bounds first (the same encode-and-decode the
    /// host will run). Writing happens on the session's sender thread: a write that blocks (the
    /// host went away mid-request) costs the caller its timeout, never more.
    pub fn request(&self, req: GuestRequest, timeout: Duration) -> Result<Ack, RequestError> {
        let id = self.next_id();
        let frame = checked_request_frame(id, req)?;
        let outbox = crate::lock(&self.link)
            .clone()
            .ok_or(RequestError::NotConnected)?;
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut pending = crate::lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                return Err(RequestError::Busy);
            }
            pending.insert(id, tx);
        }
        let deadline = Instant::now() + timeout;
        if let Err(e) = outbox.try_send(Outgoing { frame, deadline }) {
            crate::lock(&self.pending).remove(&id);
            return Err(match e {
                TrySendError::Full(_) => RequestError::Busy,
                TrySendError::Disconnected(_) => RequestError::NotConnected,
            });
        }
        match rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => {
                // A late ack then finds no waiter and is logged as unmatched.
                crate::lock(&self.pending).remove(&id);
                crate::log!("port A: request {id} not acknowledged within {timeout:?}");
                Err(RequestError::Timeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(RequestError::Lost("the agent dropped the request".into()))
            }
        }
    }

    /// Hand the host's answer for `id` to its waiting request. Returns `false` (and logs) when
    /// nothing waits for that id: a late ack after a timeout, or a confused host.
    fn route(&self, id: u64, answer: Answer) -> bool {
        let waiter = crate::lock(&self.pending).remove(&id);
        match waiter {
            // A waiter that just timed out has gone; that race is harmless.
            Some(tx) => {
                let _ = tx.try_send(answer);
                true
            }
            None => {
                let what = match &answer {
                    Ok(a) if a.accepted => "accepted".to_string(),
                    Ok(a) => format!("refused: {}", a.reason.as_deref().unwrap_or("-")),
                    Err(e) => e.to_string(),
                };
                crate::log!("port A: unmatched answer for id {id} ({what}); nobody waits for it");
                false
            }
        }
    }

    /// Serve one connection: send `Hello`, then read the host's answers until end of stream.
    /// Returns how many frames arrived; `Err` if the hello cannot be sent or a read fails.
    ///
    /// On virtio-serial the hello write blocks until a host is connected, which is what we want:
    /// it goes out as soon as someone can hear it. App requests are accepted from the hello's ack
    /// until the end of the connection; requests still unanswered then fail at once.
    pub fn serve<R, W>(&self, reader: R, writer: &FrameWriter<W>) -> io::Result<u64>
    where
        R: Read,
        W: Write + Send + 'static,
    {
        let hello_id = self.next_id();
        writer
            .send(&Frame::new(
                hello_id,
                Body::Hello(crate::info::agent_info()),
            ))
            .map_err(|e| io::Error::other(format!("{e:#}")))?;

        let result = self.read_answers(reader, writer, hello_id);
        // Close the outbox (its thread ends after its current write) and fail what is in flight:
        // the host will not answer them on this connection.
        *crate::lock(&self.link) = None;
        let orphans: Vec<_> = crate::lock(&self.pending).drain().collect();
        for (_, tx) in orphans {
            let _ = tx.try_send(Err(RequestError::Lost(
                "the host disconnected before acknowledging".into(),
            )));
        }
        result
    }

    fn read_answers<R, W>(
        &self,
        reader: R,
        writer: &FrameWriter<W>,
        hello_id: u64,
    ) -> io::Result<u64>
    where
        R: Read,
        W: Write + Send + 'static,
    {
        let mut frames = FrameReader::new(reader);
        let mut count = 0;
        while let Some(incoming) = frames.next_incoming()? {
            let frame = match incoming {
                Incoming::Frame(f) => f,
                Incoming::Dropped(e) => {
                    crate::log!("port A: dropped input: {e}");
                    continue;
                }
            };
            count += 1;
            let id = frame.id;
            match frame.body {
                Body::Ack { accepted, .. } if id == hello_id => {
                    if accepted {
                        crate::log!("host connected (hello {id} acknowledged)");
                        self.open_link(writer);
                        self.mark_ready();
                        if let Some(f) = crate::lock(&self.on_connect).as_ref() {
                            f();
                        }
                    } else {
                        crate::log!("host refused hello {id}; app requests stay off");
                    }
                }
                Body::Error { code, message } if id == hello_id => {
                    crate::log!("host refused hello {id}: {code}: {message}");
                }
                Body::Ack {
                    accepted,
                    reason,
                    ticket,
                } => {
                    self.route(
                        id,
                        Ok(Ack {
                            accepted,
                            reason,
                            ticket,
                        }),
                    );
                }
                Body::Error { code, message } => {
                    // The host could not take the request at all: to the app, a refusal.
                    self.route(
                        id,
                        Ok(Ack {
                            accepted: false,
                            reason: Some(format!("{code}: {message}")),
                            ticket: None,
                        }),
                    );
                }
                body => {
                    // The host sent a command on the guest's port; tell it where to go.
                    let name = body_name(&body);
                    crate::log!("port A: unexpected {name} from host (id {id})");
                    writer.reply_error(
                        id,
                        "unsupported",
                        &format!("{name} is not accepted on port A; host commands go to port B"),
                    );
                }
            }
        }
        Ok(count)
    }

    /// Start this session's sender thread and accept app requests.
    fn open_link<W: Write + Send + 'static>(&self, writer: &FrameWriter<W>) {
        // Bounded like the pending map: a host that stops reading cannot make us queue forever.
        let (tx, rx) = mpsc::sync_channel::<Outgoing>(MAX_PENDING);
        let w = writer.clone();
        let pending = Arc::clone(&self.pending);
        let spawned = thread::Builder::new()
            .name("port-a-send".into())
            .spawn(move || {
                for out in rx {
                    let id = out.frame.id;
                    if Instant::now() > out.deadline {
                        crate::log!("port A: request {id} expired before it could be sent");
                        continue;
                    }
                    if let Err(e) = w.send(&out.frame) {
                        crate::log!("port A: {e:#}");
                        if let Some(tx) = crate::lock(&pending).remove(&id) {
                            let _ = tx.try_send(Err(RequestError::Lost(format!("{e:#}"))));
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => *crate::lock(&self.link) = Some(tx),
            Err(e) => crate::log!("port A: cannot start sender thread: {e}; app requests off"),
        }
    }

    fn mark_ready(&self) {
        if let Some(flag) = &self.ready_flag {
            // /init holds back non-essential boot work until the host has heard us.
            let _ = flag
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::write(flag, b""));
        }
    }
}

/// `req` as a frame with `id`, checked by the protocol's own encoder and decoder so every bound
/// the host enforces is enforced here first.
pub fn checked_request_frame(id: u64, req: GuestRequest) -> Result<Frame, RequestError> {
    let frame = Frame::new(id, Body::Request(req));
    let bytes = drover_proto::encode(&frame).map_err(|e| RequestError::Invalid(e.to_string()))?;
    drover_proto::decode_body(&bytes[drover_proto::HEADER_LEN..])
        .map_err(|e| RequestError::Invalid(e.to_string()))?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::GuestOp;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn recv(frames: &mut FrameReader<UnixStream>) -> Frame {
        match frames.next_incoming().unwrap() {
            Some(Incoming::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn send(host: &mut UnixStream, id: u64, body: Body) {
        host.write_all(&drover_proto::encode(&Frame::new(id, body)).unwrap())
            .unwrap();
    }

    fn ack(accepted: bool, ticket: Option<&str>) -> Body {
        Body::Ack {
            accepted,
            reason: (!accepted).then(|| "not allowed".to_string()),
            ticket: ticket.map(str::to_string),
        }
    }

    fn list_request() -> GuestRequest {
        GuestRequest {
            principal: "p".into(),
            secret: "s".into(),
            app_id: Some("app".into()),
            op: GuestOp::List,
            data: None,
        }
    }

    /// A host end with an agent serving port A on the other; the hello is acknowledged.
    struct Host {
        sock: UnixStream,
        frames: FrameReader<UnixStream>,
        port: Arc<PortA>,
        served: Option<thread::JoinHandle<io::Result<u64>>>,
    }

    impl Host {
        fn connect(port: Arc<PortA>) -> Host {
            let (host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let p = Arc::clone(&port);
            let served = thread::spawn(move || {
                let writer = FrameWriter::new(agent.try_clone()?);
                p.serve(agent, &writer)
            });
            let mut h = Host {
                frames: FrameReader::new(host.try_clone().unwrap()),
                sock: host,
                port,
                served: Some(served),
            };
            let hello = recv(&mut h.frames);
            assert!(matches!(hello.body, Body::Hello(_)), "{hello:?}");
            send(&mut h.sock, hello.id, ack(true, None));
            let t = Instant::now();
            while !h.port.connected() {
                assert!(t.elapsed() < Duration::from_secs(5), "never connected");
                thread::sleep(Duration::from_millis(5));
            }
            h
        }

        fn close(mut self) -> u64 {
            self.sock.shutdown(std::net::Shutdown::Write).unwrap();
            self.served.take().unwrap().join().unwrap().unwrap()
        }
    }

    #[test]
    fn hello_on_every_connection_then_answers() {
        let port = Arc::new(PortA::without_ready_flag());
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (mut host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let p = port.clone();
            let served = thread::spawn(move || {
                let writer = FrameWriter::new(agent.try_clone()?);
                p.serve(agent, &writer)
            });
            let mut frames = FrameReader::new(host.try_clone().unwrap());
            let hello = recv(&mut frames);
            let Body::Hello(info) = hello.body else {
                panic!("expected hello, got {hello:?}");
            };
            assert_eq!(info.protocol, drover_proto::PROTOCOL_VERSION);
            assert_eq!(info.boot_id.len(), 36);
            ids.push(hello.id);

            send(&mut host, hello.id, ack(true, None));
            // A host command on the wrong port gets an error, not silence.
            send(&mut host, 99, Body::Ping);
            let err = recv(&mut frames);
            assert_eq!(err.id, 99);
            assert!(matches!(err.body, Body::Error { ref code, .. } if code == "unsupported"));

            host.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(served.join().unwrap().unwrap(), 2);
            assert!(!port.connected(), "disconnected after end of stream");
        }
        assert!(ids[1] > ids[0], "ids keep increasing across connections");
    }

    #[test]
    fn request_gets_the_ack_with_its_id() {
        let mut h = Host::connect(Arc::new(PortA::without_ready_flag()));
        let port = Arc::clone(&h.port);
        let asked = thread::spawn(move || port.request(list_request(), Duration::from_secs(10)));
        let port2 = Arc::clone(&h.port);
        let asked2 = thread::spawn(move || port2.request(list_request(), Duration::from_secs(10)));
        let r1 = recv(&mut h.frames);
        let r2 = recv(&mut h.frames);
        assert!(matches!(r1.body, Body::Request(_)) && matches!(r2.body, Body::Request(_)));
        // Answer out of order: each waiter still gets its own.
        send(&mut h.sock, r2.id, ack(false, None));
        send(&mut h.sock, r1.id, ack(true, Some(&format!("t{}", r1.id))));
        let answers = [asked.join().unwrap(), asked2.join().unwrap()];
        let accepted: Vec<_> = answers
            .iter()
            .filter(|a| a.as_ref().unwrap().accepted)
            .collect();
        assert_eq!(accepted.len(), 1);
        assert_eq!(
            accepted[0].as_ref().unwrap().ticket,
            Some(format!("t{}", r1.id))
        );
        let refused = answers
            .iter()
            .find(|a| !a.as_ref().unwrap().accepted)
            .unwrap();
        assert_eq!(
            refused.as_ref().unwrap().reason.as_deref(),
            Some("not allowed")
        );
        assert_eq!(h.close(), 3);
    }

    #[test]
    fn host_error_is_a_refusal() {
        let mut h = Host::connect(Arc::new(PortA::without_ready_flag()));
        let port = Arc::clone(&h.port);
        let asked = thread::spawn(move || port.request(list_request(), Duration::from_secs(10)));
        let r = recv(&mut h.frames);
        send(
            &mut h.sock,
            r.id,
            Body::Error {
                code: "rate_limited".into(),
                message: "slow down".into(),
            },
        );
        let a = asked.join().unwrap().unwrap();
        assert!(!a.accepted);
        assert_eq!(a.reason.as_deref(), Some("rate_limited: slow down"));
        h.close();
    }

    #[test]
    fn no_ack_times_out_and_late_ack_is_unmatched() {
        let mut h = Host::connect(Arc::new(PortA::without_ready_flag()));
        let t = Instant::now();
        let err = h
            .port
            .request(list_request(), Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(err, RequestError::Timeout(Duration::from_millis(200)));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(err.to_string(), "host did not acknowledge within 0.2 s");
        assert_eq!(
            RequestError::Timeout(ACK_TIMEOUT).to_string(),
            "host did not acknowledge within 10 s"
        );
        let r = recv(&mut h.frames);
        // The late ack and one for an id never used: logged, and the reader carries on.
        assert!(!h.port.route(
            r.id,
            Ok(Ack {
                accepted: true,
                reason: None,
                ticket: None
            })
        ));
        send(&mut h.sock, r.id, ack(true, Some("late")));
        send(&mut h.sock, 12345, ack(true, Some("stray")));
        send(&mut h.sock, 98, Body::Ping);
        assert_eq!(recv(&mut h.frames).id, 98, "still serving");
        assert!(crate::lock(&h.port.pending).is_empty());
        h.close();
    }

    #[test]
    fn not_connected_and_invalid_requests_fail_at_once() {
        let port = PortA::without_ready_flag();
        assert_eq!(
            port.request(list_request(), ACK_TIMEOUT),
            Err(RequestError::NotConnected)
        );
        let mut bad = list_request();
        bad.app_id = Some("no spaces".into());
        assert!(matches!(
            port.request(bad, ACK_TIMEOUT),
            Err(RequestError::Invalid(_))
        ));
        let mut big = list_request();
        big.data = Some(serde_json::Value::String(
            "x".repeat(drover_proto::MAX_APP_DATA),
        ));
        assert!(matches!(
            checked_request_frame(1, big),
            Err(RequestError::Invalid(_))
        ));
    }

    #[test]
    fn disconnect_fails_pending_requests() {
        let mut h = Host::connect(Arc::new(PortA::without_ready_flag()));
        let port = Arc::clone(&h.port);
        let asked = thread::spawn(move || port.request(list_request(), Duration::from_secs(10)));
        let _ = recv(&mut h.frames);
        let t = Instant::now();
        h.close();
        assert!(matches!(asked.join().unwrap(), Err(RequestError::Lost(_))));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
