//! Saved states: snapshots, hibernate and resume, restore, check, instant clones
//! (`/v1/vms/{name}/states`, tag `states`).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use drover_api::StreamItem;

use super::detached::{detached, ndjson};
use super::extract::{Body, Who};
use super::gate::{need, Res};

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/states",
    tag = "states",
    summary = "The VM's saved states",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::StateInfo>),
    ),
)]
pub(super) async fn states_list(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::StateInfo>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.states(&name)?))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/states/{state}",
    tag = "states",
    summary = "One saved state",
    params(("name" = String, Path, description = "The VM's name"), ("state" = String, Path, description = "The state's id or name")),
    responses(
        (status = 200, description = "Done", body = drover_api::StateInfo),
    ),
)]
pub(super) async fn state_show(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
) -> Res<drover_api::StateInfo> {
    need(&who, Permission::Read)?;
    Ok(Json(m.state(&name, &state)?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/states",
    tag = "states",
    summary = "Save a running VM's state (a snapshot)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = drover_api::SnapshotRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::StateInfo),
    ),
)]
pub(super) async fn state_create(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::SnapshotRequest>,
) -> Res<drover_api::StateInfo> {
    detached(async move {
        m.snapshot_create(&name, req.name, req.classic, req.capture, &who.0)
            .await
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/hibernate",
    tag = "states",
    summary = "Save a running VM to disk and stop it",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn hibernate(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.hibernate(&name, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/resume",
    tag = "states",
    summary = "Bring a hibernated VM back (optionally grown)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = drover_api::ResumeRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn resume(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::ResumeRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.resume(&name, &req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/states/{state}/restore",
    tag = "states",
    summary = "Run the VM from a saved state (a running VM is replaced)",
    params(("name" = String, Path, description = "The VM's name"), ("state" = String, Path, description = "The state's id or name")),
    request_body = drover_api::ResumeRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn state_restore(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
    Body(req): Body<drover_api::ResumeRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.snapshot_restore(&name, &state, &req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/states/{state}/check",
    tag = "states",
    summary = "Compare a saved state with a host and shape: same, adaptable or blocking, line by line",
    params(("name" = String, Path, description = "The VM's name"), ("state" = String, Path, description = "The state's id or name")),
    request_body = drover_api::StateCheckRequest,
    responses((status = 200, description = "Done", body = drover_api::StateCheck)),
)]
pub(super) async fn state_check(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
    Body(req): Body<drover_api::StateCheckRequest>,
) -> Res<drover_api::StateCheck> {
    Ok(Json(m.check_state(&name, &state, &req, &who.0)?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/states/{state}/clone",
    tag = "states",
    summary = "Start new VMs from a saved state (instant clones): NDJSON lines of StreamItem (a progress line per clone, then the result or the error)",
    params(("name" = String, Path, description = "The template VM's name"), ("state" = String, Path, description = "The state's id or name")),
    request_body = drover_api::CloneRequest,
    responses(
        (status = 200, description = "Done", body = StreamItem<drover_api::CloneResult>, content_type = "application/x-ndjson"),
    ),
)]
pub(super) async fn state_clone(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
    Body(req): Body<drover_api::CloneRequest>,
) -> Response {
    ndjson(move |progress| async move { m.clone_state(&name, &state, req, &who.0, progress).await })
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}/states/{state}",
    tag = "states",
    summary = "Delete a saved state (answers with it as it was)",
    params(("name" = String, Path, description = "The VM's name"), ("state" = String, Path, description = "The state's id or name")),
    responses(
        (status = 200, description = "Done", body = drover_api::StateInfo),
    ),
)]
pub(super) async fn state_delete(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
) -> Res<drover_api::StateInfo> {
    detached(async move { m.snapshot_delete(&name, &state, &who.0).await }).await
}
