//! A client for the serial console's WebSocket (`GET /v1/vms/NAME/console/ws`), over the unix
//! socket or HTTPS like every other request: the terminal's `drover vm console --attach`.

use crate::client::{Client, Endpoint};
use crate::{ApiError, ClientError, ConsoleHello, CONSOLE_PROTOCOL};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

/// The largest frame taken from droverd (its output frames are 64 KiB; control frames small).
const FRAME_MAX: usize = 1 << 20;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open console: what droverd said on opening it, then [`Console::next`] for output and
/// [`Console::send`] for input.
pub struct Console {
    /// The first frame: the VM, and whether input is accepted (and why not).
    pub hello: ConsoleHello,
    ws: tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
}

/// What a console brings.
#[derive(Debug, PartialEq)]
pub enum ConsoleEvent {
    /// Bytes the guest wrote on its serial port (the log's recent backlog first).
    Output(Bytes),
    /// The backlog is over: output from here on is new (a terminal may answer queries in it).
    Live,
    /// droverd refused an input or says the VM is gone (the console closes after the latter).
    Error(ApiError),
}

impl Client {
    /// Open VM `name`'s serial console.
    pub async fn console(&self, name: &str) -> Result<Console, ClientError> {
        let path = format!("/v1/vms/{name}/console/ws");
        let (io, authority, token): (Box<dyn Io>, String, Option<String>) = match self.endpoint() {
            Endpoint::Unix(socket) => {
                let s = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|source| ClientError::Unreachable {
                        socket: socket.clone(),
                        source,
                    })?;
                (Box::new(s), "droverd".into(), None)
            }
            Endpoint::Https(r) => (
                Box::new(r.connect().await?),
                r.authority.clone(),
                r.token.clone(),
            ),
        };
        let mut req = format!("ws://{authority}{path}")
            .into_client_request()
            .map_err(|e| ClientError::Protocol(format!("console request: {e}")))?;
        let h = req.headers_mut();
        h.insert(
            "sec-websocket-protocol",
            CONSOLE_PROTOCOL
                .parse()
                .map_err(|e| ClientError::Protocol(format!("{e}")))?,
        );
        if let Some(t) = token {
            h.insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| ClientError::Protocol(format!("bad token: {e}")))?,
            );
        }
        let cfg = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(FRAME_MAX))
            .max_frame_size(Some(FRAME_MAX));
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(cfg))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => {
                    let body = resp.body().as_deref().unwrap_or_default();
                    Client::error_from(resp.status(), body)
                }
                e => ClientError::Protocol(format!("opening the console of {name}: {e}")),
            })?;
        let hello = match ws.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str::<ConsoleHello>(t.as_str())
                .map_err(|e| ClientError::Protocol(format!("the console's first frame: {e}")))?,
            other => {
                return Err(ClientError::Protocol(format!(
                    "the console did not start with its hello frame (got {other:?})"
                )))
            }
        };
        Ok(Console { hello, ws })
    }
}

impl Console {
    /// The next event, `None` once droverd closed the console. Cancel-safe: nothing is lost
    /// if the future is dropped (in a `select!`).
    pub async fn next(&mut self) -> Result<Option<ConsoleEvent>, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => return Ok(None),
                Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Protocol(format!("console: {e}"))),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Binary(b) => return Ok(Some(ConsoleEvent::Output(b))),
                Message::Text(t) => return Ok(Some(control(t.as_str())?)),
                Message::Close(_) => return Ok(None),
                // Pings are answered by tungstenite on the next read or write.
                _ => continue,
            }
        }
    }

    /// Type `bytes` into the guest's serial port.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
            .map_err(|e| ClientError::Protocol(format!("console input: {e}")))
    }

    /// Close the console (the VM goes on).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A text frame: the live mark, or an error.
fn control(text: &str) -> Result<ConsoleEvent, ClientError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ClientError::Protocol(format!("a console control frame: {e}")))?;
    if v.get("live") == Some(&serde_json::Value::Bool(true)) {
        return Ok(ConsoleEvent::Live);
    }
    serde_json::from_value::<ApiError>(v)
        .map(ConsoleEvent::Error)
        .map_err(|e| ClientError::Protocol(format!("an unknown console control frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_are_the_live_mark_or_an_error() {
        assert_eq!(control(r#"{"live":true}"#).unwrap(), ConsoleEvent::Live);
        let e = control(r#"{"code":"forbidden","message":"needs vm.exec"}"#).unwrap();
        assert!(matches!(e, ConsoleEvent::Error(a) if a.message == "needs vm.exec"));
        assert!(control(r#"{"what":1}"#).is_err());
        assert!(control("not json").is_err());
    }
}
