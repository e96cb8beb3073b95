//! Migration: moving a VM to another host (`/v1/vms/{name}/migrate`), and the routes the
//! source droverd calls on the destination (`/v1/migrations`).

use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use drover_api::StreamItem;

use super::detached::{detached, ndjson};
use super::extract::{Body, Who};
use super::gate::Res;

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/migrate",
    tag = "migration",
    summary = "Move the VM to another host: NDJSON lines of StreamItem (progress: JSON MigrateProgress as text, then the result or the error)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = drover_api::MigrateRequest,
    responses(
        (status = 200, description = "Done", body = StreamItem<drover_api::MigrateResult>, content_type = "application/x-ndjson"),
    ),
)]
pub(super) async fn migrate(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::MigrateRequest>,
) -> Response {
    ndjson(move |progress| async move {
        let run = m.migrate(&name, req, &who.0, move |p| {
            progress(serde_json::to_string(&p).unwrap_or_default())
        });
        crate::metrics::timed(crate::metrics::Op::Migrate, run).await
    })
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/migrate/cancel",
    tag = "migration",
    summary = "Cancel the VM's outgoing migration",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = Cancelling),
    ),
)]
pub(super) async fn migrate_cancel(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Cancelling> {
    m.migrate_cancel(&name, &who.0)?;
    Ok(Json(Cancelling { cancelling: name }))
}

#[utoipa::path(
    post,
    path = "/v1/migrations/incoming",
    tag = "migration",
    summary = "Droverd to droverd: take a VM's records and get ready to receive it",
    request_body = drover_api::IncomingRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::IncomingReady),
    ),
)]
pub(super) async fn incoming_prepare(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::IncomingRequest>,
) -> Res<drover_api::IncomingReady> {
    detached(async move { m.incoming_prepare(req, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{name}/commit",
    tag = "migration",
    summary = "Droverd to droverd: the VM is this host's now",
    params(("name" = String, Path, description = "The arriving VM")),
    request_body = drover_api::MigrationStep,
    responses(
        (status = 200, description = "Done", body = drover_api::VmInfo),
    ),
)]
pub(super) async fn incoming_commit(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(step): Body<drover_api::MigrationStep>,
) -> Res<drover_api::VmInfo> {
    detached(async move { m.incoming_commit(&name, step, &who.0).await }).await
}

#[utoipa::path(
    post,
    path = "/v1/migrations/{name}/abort",
    tag = "migration",
    summary = "Droverd to droverd: the source gave up; drop the copy",
    params(("name" = String, Path, description = "The arriving VM")),
    request_body = drover_api::MigrationStep,
    responses(
        (status = 200, description = "Done", body = Empty),
    ),
)]
pub(super) async fn incoming_abort(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(step): Body<drover_api::MigrationStep>,
) -> Res<Empty> {
    detached(async move { m.incoming_abort(&name, step, &who.0).await })
        .await
        .map(|_| Json(Empty {}))
}

/// The answer to a migration's cancel.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Cancelling {
    /// The VM whose migration is being cancelled.
    cancelling: String,
}

/// An empty JSON object.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Empty {}
