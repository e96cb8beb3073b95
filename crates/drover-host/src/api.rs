//! The HTTP/JSON API: routes translate requests into [`Manager`] calls and errors into
//! [`ApiError`]s. Mutating calls run in their own task, so a client that hangs up mid-way cannot
//! leave a VM half-started or half-stopped.

use crate::error::HostError;
use crate::manager::Manager;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_api::{ApiError, ErrorCode, ExecRequest, ImageBuildRequest, StopRequest, StreamItem};
use drover_model::VmSpec;
use serde::Deserialize;
use std::time::Duration;

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// An error answer.
pub struct Failure(ApiError);

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        Failure(e.into())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type Res<T> = Result<Json<T>, Failure>;

/// Run a mutating operation to completion even if the client goes away.
async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, HostError>> + Send + 'static,
) -> Result<T, Failure> {
    tokio::spawn(fut)
        .await
        .map_err(|e| {
            Failure(ApiError::new(
                ErrorCode::Internal,
                format!("operation failed: {e}"),
            ))
        })?
        .map_err(Failure::from)
}

/// Build the router.
pub fn router(mgr: Manager) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/restart", post(restart))
        .route("/v1/vms/{name}/agent", get(agent))
        .route("/v1/vms/{name}/exec", post(exec))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/image", get(image))
        .route("/v1/image/build", post(image_build))
        .fallback(|| async { Failure(ApiError::new(ErrorCode::NotFound, "no such API route")) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(mgr)
}

/// A JSON body whose parse errors become `invalid_argument` answers.
pub struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Failure;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| Failure(ApiError::new(ErrorCode::InvalidArgument, e.body_text())))?;
        let bytes = if bytes.is_empty() {
            axum::body::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map(Body).map_err(|e| {
            Failure(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("invalid request: {e}"),
            ))
        })
    }
}

async fn host(State(m): State<Manager>) -> Res<drover_api::HostInfo> {
    Ok(Json(m.host_info()))
}

async fn list(State(m): State<Manager>) -> Res<Vec<drover_api::VmInfo>> {
    Ok(Json(m.list()))
}

async fn create(State(m): State<Manager>, Body(spec): Body<VmSpec>) -> Res<drover_api::VmInfo> {
    Ok(Json(detached(async move { m.create(spec).await }).await?))
}

async fn show(State(m): State<Manager>, Path(name): Path<String>) -> Res<drover_api::VmInfo> {
    Ok(Json(m.get(&name)?))
}

#[derive(Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.delete(&name, q.force).await }).await?,
    ))
}

async fn start(State(m): State<Manager>, Path(name): Path<String>) -> Res<drover_api::VmInfo> {
    Ok(Json(detached(async move { m.start(&name).await }).await?))
}

async fn stop(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.stop(&name, req.timeout_s, req.force).await }).await?,
    ))
}

async fn restart(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.restart(&name, req.timeout_s, req.force).await }).await?,
    ))
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default)]
    wait_s: u64,
}

async fn agent(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Res<drover_api::AgentStatus> {
    if q.wait_s == 0 {
        let info = m.get(&name)?;
        return Ok(Json(info.agent.unwrap_or_default()));
    }
    Ok(Json(
        m.wait_agent(&name, Duration::from_secs(q.wait_s.min(3600)))
            .await?,
    ))
}

async fn exec(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Body(req): Body<ExecRequest>,
) -> Res<drover_proto::ExecResult> {
    Ok(Json(m.exec(&name, req).await?))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_console_max")]
    max: usize,
}
fn default_console_max() -> usize {
    256 * 1024
}

async fn console(
    State(m): State<Manager>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, Failure> {
    let (bytes, next) = m.console(&name, q.offset, q.max.min(4 << 20))?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
        headers.insert("x-drover-next-offset", v);
    }
    Ok((headers, bytes).into_response())
}

async fn image(State(m): State<Manager>) -> Res<drover_api::ImageInfo> {
    match m.current_image()? {
        Some(i) => Ok(Json(i)),
        None => Err(Failure(ApiError::new(
            ErrorCode::ImageMissing,
            "the default guest image is not built yet; run `drover image build`",
        ))),
    }
}

/// Streams progress lines, then the result, as NDJSON.
async fn image_build(State(m): State<Manager>, Body(req): Body<ImageBuildRequest>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let line = |item: &StreamItem<drover_api::ImageInfo>| {
        let mut s = serde_json::to_string(item).unwrap_or_default();
        s.push('\n');
        s
    };
    let progress_tx = tx.clone();
    tokio::spawn(async move {
        let ptx = progress_tx.clone();
        let result = m
            .build_image(req.force, move |p| {
                let _ = ptx.send(line(&StreamItem::Progress(p)));
            })
            .await;
        let last = match result {
            Ok(info) => StreamItem::Result(info),
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

use futures_util::StreamExt as _;
