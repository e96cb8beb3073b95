//! Who may reach into a VM's guest: its guest principals (grant, revoke) and the audit trail
//! of their requests (`/v1/vms/{name}/guest-access`, `/audit`).

use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::Json;

use super::detached::detached;
use super::extract::{Body, Who};
use super::gate::Res;

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/guest-access",
    tag = "guest-access",
    summary = "The VM's guest principals",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::GuestPrincipal>),
    ),
)]
pub(super) async fn guest_list(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::GuestPrincipal>> {
    Ok(Json(m.guest_principals(&name, &who.0)?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{name}/guest-access",
    tag = "guest-access",
    summary = "Grant a guest principal ops (its secret is shown once)",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = drover_api::GuestGrantRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::GuestGrant),
    ),
)]
pub(super) async fn guest_grant(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::GuestGrantRequest>,
) -> Res<drover_api::GuestGrant> {
    detached(async move { m.guest_grant(&name, &req.principal, &req.ops, &who.0) }).await
}

#[utoipa::path(
    delete,
    path = "/v1/vms/{name}/guest-access/{principal}",
    tag = "guest-access",
    summary = "Revoke a guest principal",
    params(("name" = String, Path, description = "The VM's name"), ("principal" = String, Path, description = "The principal")),
    responses(
        (status = 200, description = "Done", body = Revoked),
    ),
)]
pub(super) async fn guest_revoke(
    State(m): State<Manager>,
    who: Who,
    Path((name, principal)): Path<(String, String)>,
) -> Res<Revoked> {
    m.guest_revoke(&name, &principal, &who.0)?;
    Ok(Json(Revoked { revoked: principal }))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/audit",
    tag = "guest-access",
    summary = "Guest requests and refused operator changes",
    params(("name" = String, Path, description = "The VM's name")),
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::AuditEntry>),
    ),
)]
pub(super) async fn guest_audit(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::AuditEntry>> {
    Ok(Json(m.guest_audit(&name, &who.0)?))
}

/// The answer to a guest principal's revocation.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Revoked {
    /// The principal revoked.
    revoked: String,
}
