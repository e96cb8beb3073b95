//! The host end of one VM's guest channel (ports A and B).
//!
//! droverd connects to the two chardev sockets QEMU serves and keeps them for the VM's life.
//! Port A: the agent's `Hello` (and later app requests) arrive and are acked. Port B: droverd
//! sends commands and matches replies by frame id. Everything read is untrusted: the decoder drops
//! malformed or oversized frames (counted and logged, rate-limited) and the link keeps serving.

use drover_api::AgentStatus;
use drover_proto::{encode, Body, Decoder, Frame};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Body>>>>;

/// Decides on a guest's request (port A) and returns the `Ack` to send: accepted with a ticket,
/// or refused with a reason. The work itself happens later; its outcome goes out as an event.
pub type RequestHandler = Arc<
    dyn Fn(
            drover_proto::GuestRequest,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Body> + Send>>
        + Send
        + Sync,
>;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Port B is not connected (QEMU not up yet, or gone).
    #[error("the guest channel is not connected")]
    NotConnected,
    /// No reply in time (agent not running, guest busy or hung).
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent said no.
    #[error("the guest agent refused: {0}")]
    Refused(String),
    /// No agent seen in the guest (see [`no_agent_seen`]).
    #[error("no agent seen in the guest: {0}")]
    NoAgent(String),
    /// The message could not be encoded.
    #[error("{0}")]
    Proto(#[from] drover_proto::ProtoError),
}

/// How long after the guest's virtio-serial driver came up an agent may take to open its port
/// before the VM is shown as having none: the busybox image opens it within a second, a Debian
/// guest with systemd once its unit runs (udev loads the driver early; ~30 s of systemd
/// userspace under TCG, PLATFORM.md; 57-73 s to agent-ready on a host at load 20), so well
/// beyond that: a false "none seen" fails a `--wait` that would have succeeded.
pub const NO_AGENT_AFTER_DRIVER: Duration = Duration::from_secs(120);
/// How much longer than the driver's wait a VM whose guest never brought up virtio-serial (or
/// whose driver state QEMU cannot tell) is given after QEMU's start: the guest's boot up to the
/// driver (seconds for both images here, under TCG).
pub const NO_AGENT_START_EXTRA: Duration = Duration::from_secs(60);

/// Whether a VM is to be shown as having no agent: none answered, nothing in the guest opened
/// the request port, and the guest has had time to (its virtio-serial driver up for
/// `after_driver` — droverd's `--no-agent-after`, [`NO_AGENT_AFTER_DRIVER`] by default — or QEMU
/// up for that plus [`NO_AGENT_START_EXTRA`]). Only what the host sees: an agent that is
/// installed but fails before opening its port looks the same.
pub fn no_agent_seen(
    status: &AgentStatus,
    since_start: Duration,
    driver_up_for: Option<Duration>,
    after_driver: Duration,
) -> bool {
    !status.ready
        && !status.guest_opened
        && (driver_up_for.is_some_and(|d| d >= after_driver)
            || since_start >= after_driver + NO_AGENT_START_EXTRA)
}

/// One VM's guest channel. Cheap to clone.
#[derive(Clone)]
pub struct AgentLink {
    inner: Arc<Inner>,
}

/// The id of a link's first request on port B: random, not 1. A restored or cloned guest (and one
/// that arrived by migration) resumes with replies to the previous link's requests still on
/// their way out; with ids from 1 on every link, such a stale reply would be taken for the
/// answer to this link's request of the same number (a `Pong` for an identity update). Ids
/// from a random point in 2^52 (exact even where a reader keeps numbers as doubles) make that a
/// chance of about one in 4 billion; a stale one is dropped as a reply to an unknown request.
fn first_request_id() -> u64 {
    (u64::from(rand::random::<u32>()) << 20) | 1
}

struct Inner {
    writer_b: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    pending: Pending,
    next_id: AtomicU64,
    status: watch::Sender<AgentStatus>,
    dropped_frames: AtomicU64,
    started: Instant,
}

impl AgentLink {
    /// Start the link's tasks; they end when `stop` fires or QEMU closes the sockets for good.
    pub fn spawn(
        vm: String,
        port_a: PathBuf,
        port_b: PathBuf,
        started: Instant,
        stop: watch::Receiver<bool>,
        requests: Option<RequestHandler>,
    ) -> Self {
        let (status, _) = watch::channel(AgentStatus::default());
        let link = AgentLink {
            inner: Arc::new(Inner {
                writer_b: tokio::sync::Mutex::new(None),
                pending: Arc::default(),
                next_id: AtomicU64::new(first_request_id()),
                status,
                dropped_frames: AtomicU64::new(0),
                started,
            }),
        };
        tokio::spawn(
            link.clone()
                .run_port_a(vm.clone(), port_a, stop.clone(), requests),
        );
        tokio::spawn(link.clone().run_port_b(vm, port_b, stop));
        link
    }

    /// Current status.
    pub fn status(&self) -> AgentStatus {
        self.inner.status.borrow().clone()
    }

    /// Frames dropped as malformed, oversized or unexpected.
    pub fn dropped_frames(&self) -> u64 {
        self.inner.dropped_frames.load(Ordering::Relaxed)
    }

    /// Wait until the agent is ready, at most `timeout`; end early when no agent is seen.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentStatus, LinkError> {
        let mut rx = self.inner.status.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|s| s.ready || s.none_seen)).await;
        match res {
            Ok(Ok(s)) if !s.ready => Err(LinkError::NoAgent(format!(
                "nothing in the guest opened its request port ({}) in {}s since QEMU started",
                drover_proto::PORT_A_NAME,
                self.inner.started.elapsed().as_secs()
            ))),
            Ok(Ok(s)) => Ok(s.clone()),
            // The sender lives in `inner`, which we hold: a closed channel cannot happen, but
            // treat it as not connected rather than panic.
            Ok(Err(_)) => Err(LinkError::NotConnected),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// Send a command on port B and wait for its reply.
    pub async fn call(&self, body: Body, timeout: Duration) -> Result<Body, LinkError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(&Frame::new(id, body))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        let sent = {
            let mut w = self.inner.writer_b.lock().await;
            match w.as_mut() {
                None => false,
                // A write blocks only while the socket buffer is full (guest not reading): bound it.
                Some(w) => matches!(
                    tokio::time::timeout(timeout, w.write_all(&bytes)).await,
                    Ok(Ok(()))
                ),
            }
        };
        if !sent {
            lock(&self.inner.pending).remove(&id);
            return Err(LinkError::NotConnected);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Body::Error { code, message })) => {
                Err(LinkError::Refused(format!("{code}: {message}")))
            }
            Ok(Ok(Body::Ack {
                accepted: false,
                reason,
                ..
            })) => Err(LinkError::Refused(
                reason.unwrap_or_else(|| "no reason given".into()),
            )),
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(LinkError::NotConnected),
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    /// Ask the agent whether it is there (a ping); it is marked ready when it answers. Also for
    /// after a guest arrived by migration: what was written to its port before it ran is lost.
    pub fn probe(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Ok(Body::Pong(info)) = me.call(Body::Ping, Duration::from_secs(3600)).await {
                me.mark_ready(info);
            }
        });
    }

    /// Probe until the agent answers, at most `within`: for a guest that just arrived by
    /// migration. A ping written while the destination was still loading can reach the guest
    /// cut short, and the agent's decoder then swallows the next frame with it: a later ping
    /// arrives whole. Each ping waits for its own answer, so no reply comes back unasked.
    pub fn probe_until_ready(&self, within: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + within;
            while !me.status().ready && tokio::time::Instant::now() < until {
                me.probe();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    fn mark_ready(&self, info: drover_proto::AgentInfo) {
        let after = self.inner.started.elapsed().as_millis() as u64;
        self.inner.status.send_modify(|s| {
            if !s.ready {
                s.ready_after_ms = Some(after);
            }
            s.ready = true;
            s.none_seen = false;
            s.info = Some(info);
        });
    }

    /// The guest opened the request port (QEMU's `VSERPORT_CHANGE`): an agent is starting.
    pub fn note_guest_opened(&self) {
        self.inner.status.send_modify(|s| {
            s.guest_opened = true;
            s.none_seen = false;
        });
    }

    /// Re-judge whether the VM shows no agent, given how long the guest's virtio-serial driver
    /// has been up (if known) and how long a guest may take after it ([`no_agent_seen`]).
    pub fn judge_presence(&self, driver_up_for: Option<Duration>, after_driver: Duration) {
        let since = self.inner.started.elapsed();
        self.inner.status.send_if_modified(|s| {
            let none = no_agent_seen(s, since, driver_up_for, after_driver);
            let changed = s.none_seen != none;
            s.none_seen = none;
            changed
        });
    }

    fn set_connected(&self, connected: bool) {
        self.inner.status.send_modify(|s| s.connected = connected);
    }

    fn drop_frame(&self, vm: &str, port: &str, err: &dyn std::fmt::Display) {
        let n = self.inner.dropped_frames.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first few and then every 100th, so a flooding guest cannot flood the host log.
        if n <= 10 || n.is_multiple_of(100) {
            tracing::warn!(vm, port, dropped_total = n, "dropped a guest frame: {err}");
        }
    }

    async fn connect(path: &PathBuf, stop: &mut watch::Receiver<bool>) -> Option<UnixStream> {
        loop {
            if *stop.borrow() {
                return None;
            }
            if let Ok(s) = UnixStream::connect(path).await {
                return Some(s);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn run_port_a(
        self,
        vm: String,
        path: PathBuf,
        mut stop: watch::Receiver<bool>,
        requests: Option<RequestHandler>,
    ) {
        while let Some(stream) = Self::connect(&path, &mut stop).await {
            let (mut r, mut w) = stream.into_split();
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    n = r.read(&mut buf) => n,
                    _ = stop.changed() => return,
                };
                let n = match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                while let Some(frame) = dec.next_frame() {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            self.drop_frame(&vm, "A", &e);
                            continue;
                        }
                    };
                    let reply = match frame.body {
                        Body::Hello(info) => {
                            tracing::info!(
                                vm,
                                agent = info.agent_version,
                                uptime_ms = info.uptime_ms,
                                "guest agent said hello"
                            );
                            self.mark_ready(info);
                            Body::Ack {
                                accepted: true,
                                reason: None,
                                ticket: None,
                            }
                        }
                        Body::Request(req) => match &requests {
                            Some(handle) => handle(req).await,
                            None => Body::Ack {
                                accepted: false,
                                reason: Some("this host takes no guest requests".into()),
                                ticket: None,
                            },
                        },
                        other => {
                            self.drop_frame(
                                &vm,
                                "A",
                                &format!("unexpected {} from guest", other.name()),
                            );
                            Body::Error {
                                code: "unsupported".into(),
                                message: format!(
                                    "{} is not a request this host accepts",
                                    other.name()
                                ),
                            }
                        }
                    };
                    if let Ok(bytes) = encode(&Frame::new(frame.id, reply)) {
                        if w.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // QEMU closed the socket: it is exiting. Retry until told to stop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run_port_b(self, vm: String, path: PathBuf, mut stop: watch::Receiver<bool>) {
        while let Some(stream) = Self::connect(&path, &mut stop).await {
            let (mut r, w) = stream.into_split();
            *self.inner.writer_b.lock().await = Some(w);
            self.set_connected(true);
            // Ask once at connect: an agent that was already up (droverd restarted) answers now.
            self.probe();
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = tokio::select! {
                    n = r.read(&mut buf) => n,
                    _ = stop.changed() => break,
                };
                let n = match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                dec.push(&buf[..n]);
                while let Some(frame) = dec.next_frame() {
                    match frame {
                        Ok(f) => {
                            let waiter = lock(&self.inner.pending).remove(&f.id);
                            match waiter {
                                Some(tx) => {
                                    let _ = tx.send(f.body);
                                }
                                None => self.drop_frame(
                                    &vm,
                                    "B",
                                    &format!("reply to unknown request {}", f.id),
                                ),
                            }
                        }
                        Err(e) => self.drop_frame(&vm, "B", &e),
                    }
                }
            }
            *self.inner.writer_b.lock().await = None;
            self.set_connected(false);
            lock(&self.inner.pending).clear();
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::AgentInfo;
    use tokio::net::UnixListener;

    fn info() -> AgentInfo {
        AgentInfo {
            agent_version: "t".into(),
            protocol: 1,
            uptime_ms: 5,
            boot_id: "b".into(),
        }
    }

    /// A VM shows no agent only when none answered, nothing opened its port and the guest had
    /// time to: its driver up long enough, or QEMU up very long when the driver state is unknown.
    #[test]
    fn no_agent_is_judged_from_what_the_host_sees() {
        let s = |ready, guest_opened| AgentStatus {
            ready,
            guest_opened,
            ..AgentStatus::default()
        };
        let secs = Duration::from_secs;
        let driver = NO_AGENT_AFTER_DRIVER;
        assert!(
            !no_agent_seen(&s(false, false), secs(5), None, driver),
            "just started"
        );
        let up = driver + secs(10);
        assert!(!no_agent_seen(
            &s(false, false),
            up,
            Some(driver - secs(1)),
            driver
        ));
        assert!(no_agent_seen(&s(false, false), up, Some(driver), driver));
        assert!(
            !no_agent_seen(&s(false, true), secs(400), Some(secs(300)), driver),
            "starting"
        );
        assert!(
            !no_agent_seen(&s(true, false), secs(400), Some(secs(300)), driver),
            "ready"
        );
        let start = driver + NO_AGENT_START_EXTRA;
        assert_eq!(start, secs(180), "the default waits as before");
        assert!(!no_agent_seen(
            &s(false, false),
            start - secs(1),
            None,
            driver
        ));
        assert!(
            no_agent_seen(&s(false, false), start, None, driver),
            "never a driver"
        );
        // A shorter setting (`--no-agent-after 20`) says so sooner, by the same rule.
        let short = secs(20);
        assert!(!no_agent_seen(
            &s(false, false),
            secs(25),
            Some(secs(19)),
            short
        ));
        assert!(no_agent_seen(
            &s(false, false),
            secs(25),
            Some(short),
            short
        ));
        assert!(no_agent_seen(&s(false, false), secs(80), None, short));
    }

    /// `wait_ready` ends as soon as no agent is seen, saying so; an agent seen later clears it.
    #[tokio::test]
    async fn waiting_ends_early_without_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, stop) = watch::channel(false);
        let started = Instant::now() - NO_AGENT_AFTER_DRIVER;
        let link = AgentLink::spawn(
            "t".into(),
            dir.path().join("a"),
            dir.path().join("b"),
            started,
            stop,
            None,
        );
        link.judge_presence(Some(NO_AGENT_AFTER_DRIVER), NO_AGENT_AFTER_DRIVER);
        assert!(link.status().none_seen);
        let t = Instant::now();
        let err = link.wait_ready(Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, LinkError::NoAgent(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        link.note_guest_opened();
        assert!(!link.status().none_seen);
        link.judge_presence(Some(NO_AGENT_AFTER_DRIVER * 10), NO_AGENT_AFTER_DRIVER);
        assert!(
            !link.status().none_seen,
            "an agent opened the port: starting"
        );
    }

    /// The two ports' sockets, listening, in a temporary directory (kept alive by the caller).
    fn ports() -> (
        tempfile::TempDir,
        PathBuf,
        PathBuf,
        UnixListener,
        UnixListener,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        let (la, lb) = (
            UnixListener::bind(&pa).unwrap(),
            UnixListener::bind(&pb).unwrap(),
        );
        (dir, pa, pb, la, lb)
    }

    /// A fake guest's port B: accepts the host's connection and writes what `answer` returns
    /// for each frame it reads (the `n`-th frame, counting from 1), until the host hangs up.
    fn fake_port_b(
        lb: UnixListener,
        answer: impl Fn(usize, Frame) -> Vec<Frame> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (mut s, _) = lb.accept().await.unwrap();
            let mut dec = Decoder::new();
            let mut buf = [0u8; 1024];
            let mut seen = 0;
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                dec.push(&buf[..n]);
                while let Some(Ok(f)) = dec.next_frame() {
                    seen += 1;
                    for reply in answer(seen, f) {
                        s.write_all(&encode(&reply).unwrap()).await.unwrap();
                    }
                }
            }
        })
    }

    /// A fake guest: garbage and an oversized frame on port A, then hello; answers ping on B.
    #[tokio::test]
    async fn survives_bad_frames_and_answers() {
        let (_dir, pa, pb, la, lb) = ports();
        let guest_a = tokio::spawn(async move {
            let (mut s, _) = la.accept().await.unwrap();
            s.write_all(b"garbage!").await.unwrap();
            s.write_all(&drover_proto::MAGIC).await.unwrap();
            s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
            s.write_all(&encode(&Frame::new(9, Body::Hello(info()))).unwrap())
                .await
                .unwrap();
            let mut dec = Decoder::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                dec.push(&buf[..n]);
                if let Some(Ok(f)) = dec.next_frame() {
                    return f;
                }
            }
        });
        let guest_b = fake_port_b(lb, |_, f| {
            let reply = match f.body {
                Body::Ping => Body::Pong(info()),
                _ => Body::Error {
                    code: "x".into(),
                    message: "y".into(),
                },
            };
            vec![Frame::new(f.id, reply)]
        });
        let (stop_tx, stop) = watch::channel(false);
        let link = AgentLink::spawn("t".into(), pa, pb, Instant::now(), stop, None);
        let st = link.wait_ready(Duration::from_secs(5)).await.unwrap();
        assert!(st.ready);
        let ack = guest_a.await.unwrap();
        assert_eq!(
            (ack.id, ack.body),
            (
                9,
                Body::Ack {
                    accepted: true,
                    reason: None,
                    ticket: None
                }
            )
        );
        assert!(
            link.dropped_frames() >= 2,
            "garbage and oversized were counted"
        );
        let pong = link.call(Body::Ping, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(pong, Body::Pong(_)));
        let err = link
            .call(Body::Shutdown { reboot: false }, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::Refused(_)));
        stop_tx.send(true).unwrap();
        drop(link);
        let _ = tokio::time::timeout(Duration::from_secs(2), guest_b).await;
    }

    /// A restored guest's agent sends replies to the previous link's requests (ids 1, 2, ...)
    /// before answering this one's: they are not taken for the answers.
    #[tokio::test]
    async fn stale_replies_from_before_a_restore_are_not_taken_for_answers() {
        let (_dir, pa, pb, _la, lb) = ports();
        fake_port_b(lb, |_, f| {
            let mut out: Vec<Frame> = (1..=16)
                .map(|stale| {
                    let old = Body::Error {
                        code: "stale".into(),
                        message: "the template's reply".into(),
                    };
                    Frame::new(stale, old)
                })
                .collect();
            out.push(Frame::new(f.id, Body::Pong(info())));
            out
        });
        let (_stop_tx, stop) = watch::channel(false);
        let link = AgentLink::spawn("t".into(), pa, pb, Instant::now(), stop, None);
        let connecting = Instant::now();
        while matches!(
            link.call(Body::Ping, Duration::from_secs(5)).await,
            Err(LinkError::NotConnected)
        ) {
            assert!(
                connecting.elapsed() < Duration::from_secs(5),
                "never connected"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..3 {
            let answer = link.call(Body::Ping, Duration::from_secs(5)).await;
            assert!(matches!(answer, Ok(Body::Pong(_))), "{answer:?}");
        }
        assert!(
            link.dropped_frames() >= 16,
            "the stale replies were dropped"
        );
    }

    /// A guest that arrived by migration loses the pings written before it ran: probing again
    /// finds its agent, without a hello on port A.
    #[tokio::test]
    async fn probing_after_migration_finds_an_agent_that_lost_the_first_pings() {
        let (_dir, pa, pb, _la, lb) = ports();
        // The connect-time ping and the first probe are lost on the way in.
        fake_port_b(lb, |seen, f| {
            if seen > 2 {
                vec![Frame::new(f.id, Body::Pong(info()))]
            } else {
                Vec::new()
            }
        });
        let (_stop_tx, stop) = watch::channel(false);
        let link = AgentLink::spawn("t".into(), pa, pb, Instant::now(), stop, None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!link.status().ready, "nothing answered yet");
        link.probe_until_ready(Duration::from_secs(30));
        let st = link.wait_ready(Duration::from_secs(10)).await.unwrap();
        assert!(st.ready);
        assert_eq!(link.dropped_frames(), 0, "no reply came back unasked");
    }
}
