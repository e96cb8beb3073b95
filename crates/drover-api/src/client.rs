//! A client for droverd's API over its unix socket.

use crate::{ApiError, ErrorCode, StreamItem};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not listening.
    #[error("cannot reach droverd at {socket}: {source}. Is it running? Start it with `droverd` (or `droverd --socket {socket}`), or point the CLI elsewhere with --socket / DROVER_SOCKET")]
    Unreachable {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(#[from] ApiError),
    /// The answer was not understood.
    #[error("unexpected answer from droverd: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API error code, if the daemon gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A connection factory for one droverd.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A raw answer: status, headers, body.
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Headers.
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
}

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "droverd");
        if has_body {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(format!("request failed: {e}")))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        Ok(RawResponse {
            status,
            headers,
            body: resp.into_body(),
        })
    }

    async fn collect(
        raw: RawResponse,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let body = raw
            .body
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("reading answer: {e}")))?
            .to_bytes();
        Ok((raw.status, raw.headers, body))
    }

    fn error_from(status: StatusCode, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => ClientError::Api(e),
            Err(_) => ClientError::Protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            )),
        }
    }

    /// Send a JSON request and decode a JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let raw = self.send(method, path, body).await?;
        let (status, _, bytes) = Self::collect(raw).await?;
        if !status.is_success() {
            return Err(Self::error_from(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "{e} in {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// POST a JSON body and decode.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// GET raw bytes and the headers.
    pub async fn get_bytes(&self, path: &str) -> Result<(hyper::HeaderMap, Bytes), ClientError> {
        let raw = self.send(Method::GET, path, None).await?;
        let (status, headers, bytes) = Self::collect(raw).await?;
        if !status.is_success() {
            return Err(Self::error_from(status, &bytes));
        }
        Ok((headers, bytes))
    }

    /// POST and read an NDJSON stream of [`StreamItem`]s, reporting progress as it comes.
    pub async fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut progress: impl FnMut(&str),
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut raw = self.send(Method::POST, path, Some(body)).await?;
        if !raw.status.is_success() {
            let (status, _, bytes) = Self::collect(raw).await?;
            return Err(Self::error_from(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = raw.body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(format!("reading stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let item: StreamItem<T> = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Protocol(format!("bad stream line: {e}")))?;
                match item {
                    StreamItem::Progress(p) => progress(&p),
                    StreamItem::Result(t) => return Ok(t),
                    StreamItem::Error(e) => return Err(ClientError::Api(e)),
                }
            }
        }
        Err(ClientError::Protocol(
            "the stream ended without a result".into(),
        ))
    }
}
