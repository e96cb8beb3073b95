//! A VM's lifecycle: list, define, show, delete, start, stop, restart (`/v1/vms`, tag `vms`).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::Json;
use drover_api::{StartRequest, StopRequest};
use drover_model::VmSpec;
use serde::Deserialize;

use super::detached::detached;
use super::extract::{Body, Who, Q};
use super::gate::{need, Res};

#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    summary = "Every VM",
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::VmInfo>),
    ),
)]
pub(super) async fn list(State(m): State<Manager>, who: Who) -> Res<Vec<drover_api::VmInfo>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.list()))
}

#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "vms",
    summary = "Define a VM",
    request_body = VmSpec,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn create(
    State(m): State<Manager>,
    who: Who,
    Body(spec): Body<VmSpec>,
) -> Res<drover_api::VmInfo> {
    need(&who, Permission::Lifecycle)?;
    detached(async move { m.create(spec, &who.0).await }).await
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}",
    tag = "vms",
    summary = "One VM",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn show(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::VmInfo> {
    need(&who, Permission::Read)?;
    Ok(Json(m.get(&name)?))
}

/// `DELETE /v1/vms/NAME?force=&discard_changes=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DeleteQuery {
    /// Delete a running VM too (its QEMU is killed).
    #[serde(default)]
    force: bool,
    /// Drop changes not yet written back into a user's image (`image=` disks).
    #[serde(default)]
    discard_changes: bool,
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}",
    tag = "vms",
    summary = "Delete a VM and the disks Drover made (answers with the VM as it was)",
    params(("name" = String, Path, description = "The VM's name"), DeleteQuery),
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn delete(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<DeleteQuery>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.delete(&name, q.force, q.discard_changes, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/start",
    tag = "vms",
    summary = "Start a VM (answers once QEMU runs)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = StartRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn start(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StartRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.start(&name, &req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/stop",
    tag = "vms",
    summary = "Stop a VM: agent, then ACPI, then kill after timeout_s",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = StopRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn stop(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.stop(&name, req.timeout_s, req.force, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/restart",
    tag = "vms",
    summary = "Stop and start a VM",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = StopRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn restart(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.restart(&name, req.timeout_s, req.force, &who.0).await }).await
}
