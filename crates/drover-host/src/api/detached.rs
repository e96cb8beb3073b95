//! Work that must outlive its request: mutating calls run in their own task, so a client that
//! hangs up mid-way cannot leave a VM half-started or half-stopped; long ones stream their
//! progress as NDJSON.

use crate::error::HostError;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_api::{ApiError, ErrorCode, StreamItem};
use futures_util::StreamExt as _;

use super::gate::{Failure, Res};

/// Run a mutating operation to completion even if the client goes away; its outcome is the
/// JSON answer (every mutating handler answers with what the manager returned).
pub(super) async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, HostError>> + Send + 'static,
) -> Res<T> {
    tokio::spawn(fut)
        .await
        .map_err(|e| {
            Failure(ApiError::new(
                ErrorCode::Internal,
                format!("operation failed: {e}"),
            ))
        })?
        .map(Json)
        .map_err(Failure::from)
}

/// Run `work` in its own task (a client that hangs up cannot cut it short), streaming its
/// progress lines and then its outcome as NDJSON [`StreamItem`]s.
pub(super) fn ndjson<T, F, Fut>(work: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(Box<dyn Fn(String) + Send + Sync>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, HostError>> + Send + 'static,
{
    fn line<T: serde::Serialize>(item: &StreamItem<T>) -> String {
        let mut s = serde_json::to_string(item).unwrap_or_default();
        s.push('\n');
        s
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress_tx = tx.clone();
    tokio::spawn(async move {
        let ptx = progress_tx.clone();
        let result = work(Box::new(move |p| {
            let _ = ptx.send(line::<T>(&StreamItem::Progress(p)));
        }))
        .await;
        let last = match result {
            Ok(v) => StreamItem::Result(v),
            Err(e) => StreamItem::Error(e.into()),
        };
        let _ = progress_tx.send(line(&last));
    });
    drop(tx);
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(|s| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(s)));
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}
