//! Who may call the API: local uids' roles, API tokens for TCP callers, and `whoami`
//! (`/v1/auth`).

use crate::auth::{Permission, Role, TokenStore};
use crate::error::HostError;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::Json;
use drover_api::{ApiError, ErrorCode};
use serde::Deserialize;
use std::sync::Arc;

use super::extract::{Body, Who};
use super::gate::{need, Failure, Res};

/// A role grant.
#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct GrantRequest {
    /// The uid.
    pub uid: u32,
    /// The role, or none to revoke.
    pub role: Option<Role>,
}

#[utoipa::path(
    get,
    path = "/v1/auth/roles",
    tag = "auth",
    summary = "Roles granted to local uids, as [uid, role] pairs",
    responses(
        (status = 200, description = "Done", body = Vec<(u32, Role)>),
    ),
)]
pub(super) async fn roles(State(m): State<Manager>, who: Who) -> Res<Vec<(u32, Role)>> {
    need(&who, Permission::Admin)?;
    Ok(Json(m.roles()?))
}

#[utoipa::path(
    post,
    path = "/v1/auth/roles",
    tag = "auth",
    summary = "Grant a local uid a role (or none); answers with every grant",
    request_body = GrantRequest,
    responses(
        (status = 200, description = "Done", body = Vec<(u32, Role)>),
    ),
)]
pub(super) async fn grant(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<GrantRequest>,
) -> Res<Vec<(u32, Role)>> {
    m.set_role(&who.0, req.uid, req.role)?;
    Ok(Json(m.roles()?))
}

/// The token store behind a request, or a clear refusal.
fn token_store(ext: Option<axum::Extension<Arc<TokenStore>>>) -> Result<Arc<TokenStore>, Failure> {
    ext.map(|axum::Extension(t)| t).ok_or_else(|| {
        Failure(ApiError::new(
            ErrorCode::InvalidArgument,
            "this droverd keeps no API tokens",
        ))
    })
}

#[utoipa::path(
    get,
    path = "/v1/auth/tokens",
    tag = "auth",
    summary = "API tokens (never the tokens, only their hashes)",
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::TokenInfo>),
    ),
)]
pub(super) async fn tokens_list(
    who: Who,
    ext: Option<axum::Extension<Arc<TokenStore>>>,
) -> Res<Vec<drover_api::TokenInfo>> {
    need(&who, Permission::Admin)?;
    let t = token_store(ext)?;
    let list = t.entries().map_err(HostError::from)?;
    Ok(Json(list.iter().map(|e| e.info()).collect()))
}

#[utoipa::path(
    post,
    path = "/v1/auth/tokens",
    tag = "auth",
    summary = "Make an API token for TCP callers (shown once)",
    request_body = drover_api::TokenCreateRequest,
    responses(
        (status = 200, description = "Done", body = drover_api::TokenCreated),
    ),
)]
pub(super) async fn token_create(
    who: Who,
    ext: Option<axum::Extension<Arc<TokenStore>>>,
    Body(req): Body<drover_api::TokenCreateRequest>,
) -> Res<drover_api::TokenCreated> {
    need(&who, Permission::Admin)?;
    let t = token_store(ext)?;
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| Failure(ApiError::new(ErrorCode::InvalidArgument, e)))?;
    let (token, entry) = t
        .create(role, req.name.as_deref())
        .map_err(HostError::from)?;
    tracing::info!(name = %entry.name, role = %entry.role, by = %who.0.name, "API token created");
    Ok(Json(drover_api::TokenCreated {
        token,
        info: entry.info(),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/auth/tokens/{name}",
    tag = "auth",
    summary = "Revoke an API token (answers with it as it was)",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 200, description = "Done", body = drover_api::TokenInfo),
    ),
)]
pub(super) async fn token_revoke(
    who: Who,
    ext: Option<axum::Extension<Arc<TokenStore>>>,
    Path(name): Path<String>,
) -> Res<drover_api::TokenInfo> {
    need(&who, Permission::Admin)?;
    let t = token_store(ext)?;
    let gone = t.revoke(&name).map_err(HostError::from)?;
    tracing::info!(name = %gone.name, by = %who.0.name, "API token revoked");
    Ok(Json(gone.info()))
}

/// `GET /v1/auth/whoami`: the caller, its role and what that role may do.
#[utoipa::path(
    get,
    path = "/v1/auth/whoami",
    tag = "auth",
    summary = "The caller, its role and what it may do",
    responses((status = 200, description = "Done", body = drover_api::WhoAmI)),
)]
pub(super) async fn whoami(who: Who) -> Res<drover_api::WhoAmI> {
    let c = &who.0;
    Ok(Json(drover_api::WhoAmI {
        name: c.name.clone(),
        role: c.role.map(|r| r.to_string()),
        permissions: Permission::ALL
            .iter()
            .filter(|p| c.role.is_some_and(|r| r.allows(**p)))
            .map(|p| p.name().to_string())
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{router_with, Peer};
    use crate::auth::{Role, TokenStore};
    use axum::http::StatusCode;
    use std::sync::Arc;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn whoami_names_the_caller_and_what_its_role_may_do() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        let tokens = Arc::new(TokenStore::new(&dir.path().join("tokens")));
        let (viewer, _) = tokens.create(Role::Viewer, Some("v")).unwrap();
        let (operator, _) = tokens.create(Role::Operator, Some("o")).unwrap();
        let app = router_with(m, Some(tokens));
        let ask = |headers: Vec<(&'static str, String)>| {
            let app = app.clone();
            async move {
                let mut b = axum::http::Request::builder().uri("/v1/auth/whoami");
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                let mut req = b.body(axum::body::Body::empty()).unwrap();
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(Peer {
                        uid: None,
                        remote: Some(([127, 0, 0, 1], 40000).into()),
                    }));
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
                )
            }
        };
        let (status, v) = ask(vec![("authorization", format!("Bearer {viewer}"))]).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["role"], "viewer");
        assert_eq!(v["permissions"], serde_json::json!(["vm.read"]));
        let (_, v) = ask(vec![("authorization", format!("Bearer {operator}"))]).await;
        assert_eq!(
            v["permissions"],
            serde_json::json!(["vm.read", "vm.lifecycle", "config.change", "vm.exec"])
        );
        // A WebSocket upgrade may bring its token as a subprotocol; a plain request may not.
        let ws = |upgrade: bool| {
            let mut h = vec![(
                "sec-websocket-protocol",
                format!("drover.console.v1, bearer.{operator}"),
            )];
            if upgrade {
                h.push(("upgrade", "websocket".to_string()));
            }
            h
        };
        let (status, v) = ask(ws(true)).await;
        assert_eq!(
            (status, &v["name"]),
            (StatusCode::OK, &serde_json::json!("token o"))
        );
        let (status, _) = ask(ws(false)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}
