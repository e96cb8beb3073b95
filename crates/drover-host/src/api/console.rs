//! A VM's serial console: its log read by offset, and the live console as a WebSocket.

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use drover_api::{ApiError, ErrorCode};
use serde::Deserialize;
use std::time::Duration;

use super::extract::{Who, Q};
use super::gate::{need, Failure};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ConsoleQuery {
    /// Where to start reading the console log (bytes).
    #[serde(default)]
    offset: u64,
    /// Bytes to read at most (default 256 KiB, at most 4 MiB).
    #[serde(default = "default_console_max")]
    max: usize,
}
fn default_console_max() -> usize {
    256 * 1024
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console",
    tag = "vms",
    summary = "The serial console's bytes from offset (header x-drover-next-offset: where to go on)",
    params(("name" = String, Path, description = "The VM's name"), ConsoleQuery),
    responses(
        (status = 200, description = "Done", body = String, content_type = "application/octet-stream", headers(("x-drover-next-offset" = u64, description = "The offset to ask for next"))),
    ),
)]
pub(super) async fn console(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<ConsoleQuery>,
) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    let (bytes, next) = m.console(&name, q.offset, q.max.min(4 << 20))?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
        headers.insert("x-drover-next-offset", v);
    }
    Ok((headers, bytes).into_response())
}

/// The largest frame a console client may send (keystrokes and pastes).
const CONSOLE_FRAME_MAX: usize = 64 << 10;
/// How much of the log a new console session starts with.
const CONSOLE_BACKLOG: u64 = 64 << 10;
/// How often a session looks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(100);
/// A client that has sent nothing (not even a pong to our pings) this long is gone.
const CONSOLE_SILENCE: Duration = Duration::from_secs(60);

/// `GET /v1/vms/NAME/console/ws`: the serial console as a WebSocket. Output for everyone who
/// may read the VM; input only for callers with `vm.exec` (root in the guest's shell is what
/// `vm exec` gives too). See [`drover_api::ConsoleHello`].
#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console/ws",
    tag = "vms",
    summary = "The serial console as a WebSocket: a ConsoleHello text frame, then output as binary frames; frames from a client with vm.exec are typed into the guest",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, body = drover_api::ConsoleHello, description = "Switching to the WebSocket protocol (101 in fact; its first frame is this)")),
)]
pub(super) async fn console_ws(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    m.get(&name)?;
    let permit = m.console_socket().ok_or_else(|| {
        Failure(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "{} consoles are open on this host; close one and retry",
                crate::manager::CONSOLE_SOCKETS_MAX
            ),
        ))
    })?;
    let input = who.0.require(Permission::Exec);
    let hello = drover_api::ConsoleHello {
        vm: name.clone(),
        input: input.is_ok(),
        why: input.err().map(|e| e.to_string()),
    };
    Ok(ws
        .protocols([drover_api::CONSOLE_PROTOCOL])
        .max_message_size(CONSOLE_FRAME_MAX)
        .max_frame_size(CONSOLE_FRAME_MAX)
        .on_upgrade(move |socket| async move {
            console_session(m, hello, socket).await;
            drop(permit);
        }))
}

/// One console session: the log's recent output, then new output as it comes; the client's
/// frames typed into the guest when the hello allowed it.
async fn console_session(
    m: Manager,
    hello: drover_api::ConsoleHello,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    let name = hello.vm.clone();
    if socket.send(json_frame(&hello)).await.is_err() {
        return;
    }
    let start = std::fs::metadata(m.console_path(&name))
        .map(|md| md.len().saturating_sub(CONSOLE_BACKLOG))
        .unwrap_or(0);
    // The backlog, then the mark after which output is live: a terminal must not answer the
    // queries in old output (a shell's cursor-position request), or the guest reads the answers.
    let mut offset = match m.console(&name, start, CONSOLE_BACKLOG as usize) {
        Ok((bytes, next)) => {
            if !bytes.is_empty() && socket.send(Message::Binary(bytes.into())).await.is_err() {
                return;
            }
            next
        }
        Err(_) => start,
    };
    if socket
        .send(json_frame(&serde_json::json!({"live": true})))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(CONSOLE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    let mut pinged = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = socket.recv() => {
                heard = tokio::time::Instant::now();
                let bytes = match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => axum::body::Bytes::from(t.as_str().to_owned()),
                    Some(Ok(_)) => continue,
                };
                let refused = if hello.input {
                    m.console_input(&name, &bytes).await.err().map(ApiError::from)
                } else {
                    Some(ApiError::new(
                        ErrorCode::Forbidden,
                        hello.why.clone().unwrap_or_default(),
                    ))
                };
                if let Some(e) = refused {
                    if socket.send(json_frame(&e)).await.is_err() {
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > CONSOLE_SILENCE {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                if pinged.elapsed() > CONSOLE_SILENCE / 3 {
                    pinged = tokio::time::Instant::now();
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                let (bytes, next) = match m.console(&name, offset, CONSOLE_FRAME_MAX) {
                    Ok(r) => r,
                    Err(e) => {
                        // The VM is gone: say why, then end.
                        let _ = socket.send(json_frame(&ApiError::from(e))).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                };
                offset = next;
                if !bytes.is_empty() && socket.send(Message::Binary(bytes.into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A console control frame: JSON text.
fn json_frame(v: &impl serde::Serialize) -> axum::extract::ws::Message {
    axum::extract::ws::Message::Text(serde_json::to_string(v).unwrap_or_default().into())
}
