//! An async QMP client.
//!
//! One connection per VM, held by droverd for the VM's life. Commands carry an `id` so replies are
//! matched even while events interleave; events go to a channel whose end (`None`) means QEMU closed
//! the socket — for droverd, the surest sign that QEMU has exited.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// QEMU's lines are small; a longer one means something is badly wrong.
const MAX_LINE: usize = 16 << 20;
/// How long a command may take before the caller gets [`QmpError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Could not connect or talk to the socket.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU went away (the VM exited or was killed).
    #[error("QMP connection closed (QEMU exited)")]
    Disconnected,
    /// No answer in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
    /// Unexpected greeting or reply shape.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `RESET`, `STOP`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected QMP client. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Qmp {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    version: Arc<Value>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connect, read the greeting, negotiate capabilities. Returns the client and its events.
    pub async fn connect(
        path: &Path,
    ) -> Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let io = |source| QmpError::Io {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = tokio::time::timeout(Duration::from_secs(10), read_line(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        let version = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .cloned()
            .ok_or_else(|| QmpError::Protocol(format!("unexpected greeting: {greeting}")))?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let qmp = Qmp {
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            pending: pending.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            version: Arc::new(version),
        };
        tokio::spawn(read_loop(reader, pending, events_tx));
        qmp.execute("qmp_capabilities", None).await?;
        Ok((qmp, events_rx))
    }

    /// QEMU's version as `major.minor.micro`.
    pub fn version(&self) -> String {
        let q = self.version.get("qemu");
        let n = |k: &str| {
            q.and_then(|q| q.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        format!("{}.{}.{}", n("major"), n("minor"), n("micro"))
    }

    /// Run a command with [`DEFAULT_TIMEOUT`].
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, args, DEFAULT_TIMEOUT).await
    }

    /// Run a command, waiting at most `timeout` for its reply.
    pub async fn execute_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (id, line, rx) = self.request(command, args);
        {
            let mut w = self.writer.lock().await;
            if w.write_all(line.as_bytes()).await.is_err() {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Disconnected);
            }
        }
        self.reply(id, rx, command, timeout).await
    }

    /// A new command's id and line (newline-terminated), its reply awaited from now on.
    fn request(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> (u64, String, oneshot::Receiver<Result<Value, QmpError>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        (id, line, rx)
    }

    /// Wait up to `timeout` for the reply to command `id`, naming `command` in its error.
    async fn reply(
        &self,
        id: u64,
        rx: oneshot::Receiver<Result<Value, QmpError>>,
        command: &str,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let reply = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Timeout(command.to_string()));
            }
            Ok(Err(_)) => return Err(QmpError::Disconnected),
            Ok(Ok(r)) => r,
        };
        reply.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            },
            other => other,
        })
    }

    /// Run a command that takes a descriptor (`add-fd`, `getfd`): it goes with the command, in
    /// the same `sendmsg`, as `SCM_RIGHTS` (QMP reads it from the message carrying the command).
    pub async fn execute_with_fd(
        &self,
        command: &str,
        args: Option<Value>,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let (id, line, rx) = self.request(command, args);
        let sent = {
            let mut w = self.writer.lock().await;
            let stream: &UnixStream = (*w).as_ref();
            let raw = [fd.as_raw_fd()];
            let first = loop {
                if stream.writable().await.is_err() {
                    break Err(());
                }
                match stream.try_io(tokio::io::Interest::WRITABLE, || {
                    sendmsg::<()>(
                        stream.as_raw_fd(),
                        &[std::io::IoSlice::new(line.as_bytes())],
                        &[ControlMessage::ScmRights(&raw)],
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                }) {
                    Ok(n) => break Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break Err(()),
                }
            };
            match first {
                // The rest of a long line, if the first message took only part of it.
                Ok(n) if n < line.len() => w.write_all(&line.as_bytes()[n..]).await.is_ok(),
                Ok(_) => true,
                Err(()) => false,
            }
        };
        if !sent {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Disconnected);
        }
        self.reply(id, rx, command, DEFAULT_TIMEOUT).await
    }

    /// `query-status`'s `status` field (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {v}")))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, QmpError> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|_| QmpError::Disconnected)?;
    if n == 0 {
        return Err(QmpError::Disconnected);
    }
    if !buf.ends_with(b"\n") {
        return Err(QmpError::Protocol("line too long or truncated".into()));
    }
    serde_json::from_slice(&buf).map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")))
}

async fn read_loop<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    loop {
        let msg = match read_line(&mut reader).await {
            Ok(v) => v,
            Err(QmpError::Protocol(e)) => {
                tracing::warn!("ignoring QMP line: {e}");
                continue;
            }
            Err(_) => break,
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            });
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let Some(tx) = lock(&pending).remove(&id) else {
            continue;
        };
        let result = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else {
            let err = msg.get("error");
            let field = |k: &str| {
                err.and_then(|e| e.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            Err(QmpError::Command {
                command: String::new(),
                class: field("class"),
                desc: field("desc"),
            })
        };
        let _ = tx.send(result);
    }
    // Dropping the senders fails every waiting command with Disconnected.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greeting, then answers every command, emitting an event before one reply.
    #[tokio::test]
    async fn commands_events_and_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n").await.unwrap();
            let mut line = String::new();
            for _ in 0..3 {
                line.clear();
                r.read_line(&mut line).await.unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].clone();
                match v["execute"].as_str().unwrap() {
                    "query-status" => {
                        w.write_all(b"{\"event\": \"RESET\", \"data\": {\"guest\": true}}\n").await.unwrap();
                        w.write_all(format!("{{\"return\": {{\"status\": \"running\"}}, \"id\": {id}}}\n").as_bytes()).await.unwrap();
                    }
                    "bogus" => w.write_all(format!("{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}, \"id\": {id}}}\n").as_bytes()).await.unwrap(),
                    _ => w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes()).await.unwrap(),
                }
            }
        });
        let (qmp, mut events) = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.version(), "7.2.0");
        assert_eq!(qmp.status().await.unwrap(), "running");
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, "RESET");
        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert!(
            err.to_string().contains("bogus failed: CommandNotFound"),
            "{err}"
        );
        server.await.unwrap();
        assert!(events.recv().await.is_none(), "EOF ends the event stream");
        assert!(matches!(
            qmp.execute("x", None).await,
            Err(QmpError::Disconnected)
        ));
    }
}
