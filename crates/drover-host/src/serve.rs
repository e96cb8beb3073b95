//! Serving the API with bounded connections: on the unix socket and on TCP with TLS.
//!
//! - Each peer (a local uid, a TCP address) holds at most [`ServeLimits::per_peer`] connections
//!   at once; more are closed as soon as they are accepted. uid 0 is not capped: root is the
//!   host's administrator, and its calls must get through whatever other users do.
//! - A connection with no request in flight and no bytes moving for [`ServeLimits::idle`] is
//!   closed; a request's headers must arrive within [`ServeLimits::header_read`]; a TLS
//!   handshake must end within [`ServeLimits::handshake`].
//! - On shutdown nothing new is accepted, idle connections close at once, and requests in
//!   flight get [`ServeLimits::grace`] to finish.

use crate::api::Peer;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

/// Connection bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Concurrent connections per non-root uid or per TCP address.
    pub per_peer: usize,
    /// A connection doing nothing this long is closed.
    pub idle: Duration,
    /// A request's headers must be read within this.
    pub header_read: Duration,
    /// A TLS handshake must finish within this.
    pub handshake: Duration,
    /// After shutdown begins, requests in flight get this long.
    pub grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            per_peer: 32,
            idle: Duration::from_secs(60),
            header_read: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerKey {
    Uid(u32),
    Addr(std::net::IpAddr),
}

/// Open connections per peer.
#[derive(Default)]
struct Counts(Mutex<HashMap<PeerKey, usize>>);

/// One open connection's place in [`Counts`]; gives it back when dropped.
struct Held {
    counts: Arc<Counts>,
    key: PeerKey,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Counts {
    fn take(self: &Arc<Self>, key: PeerKey, cap: usize) -> Option<Held> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Held {
            counts: self.clone(),
            key,
        })
    }
}

static REFUSALS: crate::limits::LogLimiter =
    crate::limits::LogLimiter::new(Duration::from_secs(10));

fn refused(key: &PeerKey, cap: usize) {
    let who = match key {
        PeerKey::Uid(u) => format!("uid {u}"),
        PeerKey::Addr(a) => a.to_string(),
    };
    if let Some(held_back) = REFUSALS.allow(&who) {
        tracing::warn!(
            peer = who,
            cap,
            refused_since_last_line = held_back,
            "too many API connections from one peer; closing the new ones"
        );
    }
}

/// Serve `app` on the unix socket until `stop` turns true, then drain (see the module docs).
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    app: Router,
    limits: ServeLimits,
    stop: watch::Receiver<bool>,
) {
    let counts = Arc::new(Counts::default());
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    let mut stop_accept = stop.clone();
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = until_stopped(&mut stop_accept) => break,
        };
        let uid = sock.peer_cred().ok().map(|c| c.uid());
        let held = match uid {
            Some(0) => None,
            Some(u) => match counts.take(PeerKey::Uid(u), limits.per_peer) {
                Some(h) => Some(h),
                None => {
                    refused(&PeerKey::Uid(u), limits.per_peer);
                    continue;
                }
            },
            // No credentials: nobody in particular, and capped together.
            None => match counts.take(PeerKey::Uid(u32::MAX), limits.per_peer) {
                Some(h) => Some(h),
                None => continue,
            },
        };
        let peer = Peer { uid, remote: None };
        let (app, stop, done) = (app.clone(), stop.clone(), done_tx.clone());
        tokio::spawn(async move {
            connection(sock, peer, app, limits, stop).await;
            drop((held, done));
        });
    }
    // New callers are refused from now on, not left waiting in the backlog.
    drop(listener);
    drain(done_tx, done_rx, limits.grace).await;
}

/// Serve `app` on TCP with TLS until `stop` turns true, then drain.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: ServeLimits,
    stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let counts = Arc::new(Counts::default());
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    let mut stop_accept = stop.clone();
    loop {
        let (sock, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = until_stopped(&mut stop_accept) => break,
        };
        // Counted before the handshake: a flood of half-open handshakes is capped too.
        let key = PeerKey::Addr(addr.ip());
        let Some(held) = counts.take(key.clone(), limits.per_peer) else {
            refused(&key, limits.per_peer);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (app, stop, done, acceptor) =
            (app.clone(), stop.clone(), done_tx.clone(), acceptor.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(limits.handshake, acceptor.accept(sock)).await {
                Ok(Ok(tls)) => {
                    let peer = Peer {
                        uid: None,
                        remote: Some(addr),
                    };
                    connection(tls, peer, app, limits, stop).await;
                }
                Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
            }
            drop((held, done));
        });
    }
    // New callers are refused from now on, not left waiting in the backlog.
    drop(listener);
    drain(done_tx, done_rx, limits.grace).await;
}

/// Returns once `stop` is true (the borrowed value is not held across awaits: it is not `Send`).
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Wait until every connection task has ended, or `grace` has passed.
async fn drain(done_tx: mpsc::Sender<()>, mut done_rx: mpsc::Receiver<()>, grace: Duration) {
    drop(done_tx);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "API requests still running after the shutdown grace time; leaving them"
        );
    }
}

/// Bytes moved on a connection, and when last.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T> Activity<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requests of one connection whose response has not been sent in full.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serve HTTP/1.1 on one connection until the client leaves, it idles too long, or shutdown.
async fn connection<T>(
    io: T,
    peer: Peer,
    app: Router,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let _open = crate::metrics::global().connection_opened();
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = Activity {
        inner: io,
        last: last.clone(),
        epoch,
    };
    let inflight = Arc::new(AtomicUsize::new(0));
    let counter = inflight.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer.clone()));
        let guard = InFlight::new(&counter);
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            // Counted until the last byte of the body (NDJSON streams run long).
            Ok::<_, std::convert::Infallible>(resp.map(|b| {
                axum::body::Body::new(b.map_frame(move |f| {
                    let _ = &guard;
                    f
                }))
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(io), svc)
        // The console's WebSocket: the upgraded connection leaves this loop for its own task.
        .with_upgrades();
    tokio::pin!(conn);
    let tick = (limits.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                let quiet = epoch.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if inflight.load(Ordering::SeqCst) == 0 && quiet >= limits.idle {
                    // Dropping the connection closes it.
                    return;
                }
            }
            _ = until_stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn app() -> Router {
        Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    "slow"
                }),
            )
    }

    async fn get(path: &std::path::Path, route: &str) -> std::io::Result<String> {
        let mut s = tokio::net::UnixStream::connect(path).await?;
        s.write_all(
            format!("GET {route} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Idle connections beyond a uid's cap are closed at once, idle ones within it after the
    /// idle time, a request still answers meanwhile, and shutdown lets a slow request finish.
    #[tokio::test]
    async fn connections_are_capped_timed_out_and_drained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let limits = ServeLimits {
            per_peer: 3,
            idle: Duration::from_millis(300),
            header_read: Duration::from_millis(300),
            grace: Duration::from_secs(5),
            ..ServeLimits::default()
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve_unix(listener, app(), limits, stop_rx));
        // As root the cap does not apply: check the counting directly, then the timeouts.
        let counts = Arc::new(Counts::default());
        let held: Vec<_> = (0..3)
            .map(|_| counts.take(PeerKey::Uid(1000), 3).unwrap())
            .collect();
        assert!(counts.take(PeerKey::Uid(1000), 3).is_none());
        assert!(counts.take(PeerKey::Uid(1001), 3).is_some());
        drop(held);
        assert!(counts.take(PeerKey::Uid(1000), 3).is_some());
        // An idle connection is closed after the idle time.
        let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
            .await
            .expect("the idle connection was not closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert!(get(&path, "/ok").await.unwrap().ends_with("ok"));
        // A slow request outlives the idle time, and shutdown waits for it.
        let p = path.clone();
        let slow = tokio::spawn(async move { get(&p, "/slow").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(true).unwrap();
        let out = slow.await.unwrap().unwrap();
        assert!(out.ends_with("slow"), "{out}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not drain")
            .unwrap();
        // Nothing is accepted any more.
        assert!(get(&path, "/ok")
            .await
            .map(|s| s.is_empty())
            .unwrap_or(true));
    }
}
