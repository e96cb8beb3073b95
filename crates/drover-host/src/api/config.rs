//! Changing a VM's config and reading its history: attach, detach, set, the config
//! generations (diff, promote, persist) and the journal (tag `config`).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::Json;
use drover_api::{AttachRequest, DetachRequest, PersistRequest, PromoteRequest, SetRequest};
use serde::Deserialize;

use super::detached::detached;
use super::extract::{Body, Who, Q};
use super::gate::{need, Res};

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/attach",
    tag = "config",
    summary = "Hot-plug a disk or NIC (or record it for the next boot)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = AttachRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::ChangeResult),
    ),
)]
pub(super) async fn attach(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<AttachRequest>,
) -> Res<drover_api::ChangeResult> {
    detached(async move { m.attach_device(&name, req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/detach",
    tag = "config",
    summary = "Hot-unplug a disk or NIC",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = DetachRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::ChangeResult),
    ),
)]
pub(super) async fn detach(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<DetachRequest>,
) -> Res<drover_api::ChangeResult> {
    detached(async move { m.detach_device(&name, req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/set",
    tag = "config",
    summary = "Change vCPUs or memory (live, or for the next boot)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = SetRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::ChangeResult),
    ),
)]
pub(super) async fn set(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<SetRequest>,
) -> Res<drover_api::ChangeResult> {
    detached(async move { m.set(&name, req, &who.0).await }).await
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/config",
    tag = "config",
    summary = "The VM's config generations",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = drover_api::ConfigHistoryView),
    ),
)]
pub(super) async fn config_list(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::ConfigHistoryView> {
    Ok(Json(m.config_history(&name, &who.0)?))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/config/{gen}",
    tag = "config",
    summary = "One generation's config",
    params(("name" = String, Path, description = "The VM's name"), ("gen" = u32, Path, description = "The generation (0: the initial config)")),
    responses(
        (status = 200, description = "Done", body = drover_model::VmConfig),
    ),
)]
pub(super) async fn config_show(
    State(m): State<Manager>,
    who: Who,
    Path((name, gen)): Path<(String, u32)>,
) -> Res<drover_model::VmConfig> {
    Ok(Json(m.generation_config(&name, gen, &who.0)?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DiffQuery {
    /// The generation to diff from.
    from: u32,
    /// The generation to diff to.
    to: u32,
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/config/diff",
    tag = "config",
    summary = "What changes between two generations, one line each",
    params(("name" = String, Path, description = "The VM's name"), DiffQuery),
    responses(
        (status = 200, description = "Done", body = Vec<String>),
    ),
)]
pub(super) async fn config_diff(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<DiffQuery>,
) -> Res<Vec<String>> {
    Ok(Json(m.config_diff(&name, q.from, q.to, &who.0)?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/config/promote",
    tag = "config",
    summary = "Make a generation the initial config (also needs config.persist)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = PromoteRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::ConfigHistoryView),
    ),
)]
pub(super) async fn config_promote(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<PromoteRequest>,
) -> Res<drover_api::ConfigHistoryView> {
    detached(async move { m.promote(&name, req.generation, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/config/persist",
    tag = "config",
    summary = "Turn persistence on or off, or change its mode (also needs config.persist)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = PersistRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn config_persist(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<PersistRequest>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.set_persist(&name, req, &who.0).await }).await
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/journal",
    tag = "config",
    summary = "Every change to the VM's config, as journaled",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::JournalEntry>),
    ),
)]
pub(super) async fn journal(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::JournalEntry>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.journal_of(&name)?))
}
