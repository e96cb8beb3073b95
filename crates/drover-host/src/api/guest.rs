//! Working inside a running guest through its agent: the agent's status, `exec`, and reading
//! and writing files (`vm cp`).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_api::{ApiError, ErrorCode, ExecRequest};
use serde::Deserialize;
use std::time::Duration;

use super::extract::{Body, Who, Q};
use super::gate::{need, Failure, Res};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct WaitQuery {
    /// Seconds to wait for the agent to be ready (0: answer at once; at most 3600).
    #[serde(default)]
    wait_s: u64,
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/agent",
    tag = "vms",
    summary = "The guest agent's status (waits up to wait_s for readiness)",
    params(("name" = String, Path, description = "The VM's name"), WaitQuery),
    responses(
        (status = 200, description = "Done", body = drover_api::AgentStatus),
    ),
)]
pub(super) async fn agent(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<WaitQuery>,
) -> Res<drover_api::AgentStatus> {
    need(&who, Permission::Read)?;
    if q.wait_s == 0 {
        let info = m.get(&name)?;
        return Ok(Json(info.agent.unwrap_or_default()));
    }
    Ok(Json(
        m.wait_agent(&name, Duration::from_secs(q.wait_s.min(3600)))
            .await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/exec",
    tag = "vms",
    summary = "Run a command in the guest",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "Done", body = drover_proto::ExecResult),
    ),
)]
pub(super) async fn exec(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<ExecRequest>,
) -> Res<drover_proto::ExecResult> {
    Ok(Json(m.exec(&name, req, &who.0).await?))
}

/// Where in a guest file a `vm cp` request reads or writes.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct FileQuery {
    path: String,
    #[serde(default)]
    offset: u64,
    /// Read: at most this many bytes.
    #[serde(default = "default_file_len")]
    len: usize,
    /// Write: the last request of the file.
    #[serde(default)]
    done: bool,
    /// Write: the finished file's mode, octal (`755`).
    #[serde(default)]
    mode: Option<String>,
}
fn default_file_len() -> usize {
    crate::manager::MAX_FILE_REQUEST
}

/// The headers a file read answers with.
const FILE_SIZE: &str = "x-drover-file-size";
const FILE_MODE: &str = "x-drover-file-mode";
const FILE_EOF: &str = "x-drover-eof";

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/files",
    tag = "vms",
    summary = "Read a piece of a file in the guest (vm cp)",
    params(("name" = String, Path, description = "The VM's name"), FileQuery),
    responses((status = 200, body = String, content_type = "application/octet-stream", headers(("x-drover-file-size" = u64, description = "The file's size"), ("x-drover-file-mode" = String, description = "Its mode, octal"), ("x-drover-eof" = bool, description = "Whether this piece ends the file")))),
)]
pub(super) async fn file_get(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, Failure> {
    let r = m.file_get(&name, &q.path, q.offset, q.len, &who.0).await?;
    let mut headers = HeaderMap::new();
    for (k, v) in [
        (FILE_SIZE, r.size.to_string()),
        (FILE_MODE, format!("{:o}", r.mode)),
        (FILE_EOF, r.eof.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    }
    Ok((headers, r.data).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/vms/{name}/files",
    tag = "vms",
    summary = "Write a piece of a file in the guest (vm cp; renamed into place once done)",
    params(("name" = String, Path, description = "The VM's name"), FileQuery),
    request_body(content = String, content_type = "application/octet-stream"),
    responses((status = 200, description = "Done", body = drover_api::FileWritten)),
)]
pub(super) async fn file_put(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Query(q): Query<FileQuery>,
    data: axum::body::Bytes,
) -> Res<drover_api::FileWritten> {
    let mode = q
        .mode
        .as_deref()
        .map(|t| u32::from_str_radix(t, 8))
        .transpose()
        .ok()
        .flatten()
        .filter(|m| *m <= 0o7777);
    if q.mode.is_some() && mode.is_none() {
        return Err(Failure(ApiError::new(
            ErrorCode::InvalidArgument,
            "mode must be octal permission bits, e.g. 755",
        )));
    }
    let written = m
        .file_put(&name, &q.path, q.offset, &data, q.done, mode, &who.0)
        .await?;
    Ok(Json(drover_api::FileWritten {
        path: q.path,
        written,
        done: q.done,
    }))
}
