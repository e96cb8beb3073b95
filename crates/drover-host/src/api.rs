//! The HTTP/JSON API: routes translate requests into [`Manager`] calls and errors into
//! [`ApiError`]s. Mutating calls run in their own task (`api/detached.rs`), so a client that
//! hangs up mid-way cannot leave a VM half-started or half-stopped.
//!
//! Every route is a `#[utoipa::path]` handler named once in `routes()`, which makes both the
//! router ([`router_with`]) and the document ([`openapi()`]). Every route goes through the door
//! in `api/gate.rs` first: the caller, the permission the route needs, its body's limit.
//!
//! Where each feature's routes live:
//! - `api/vms.rs`: a VM's lifecycle (`/v1/vms`, `/v1/vms/{name}`, start, stop, restart).
//! - `api/config.rs`: attach, detach, set; config generations (diff, promote, persist); the
//!   journal.
//! - `api/states.rs`: saved states: snapshots, hibernate and resume, restore, check, clone.
//! - `api/guest.rs`: inside the guest through its agent: agent status, exec, files (`vm cp`).
//! - `api/guest_access.rs`: guest principals (grant, revoke) and their audit trail.
//! - `api/console.rs`: the serial console, by offset and as a WebSocket.
//! - `api/images.rs`: the guest image (show, build, inject the agent) and imported disk images.
//! - `api/migration.rs`: migrate and cancel, and the peer routes of an incoming VM
//!   (`/v1/migrations`).
//! - `api/access.rs`: roles of local uids, API tokens, whoami (`/v1/auth`).
//! - `api/events.rs`: the event stream (`/v1/events`).
//! - `api/host.rs`: host facts, Prometheus' `/metrics`, and this document (`/v1/openapi.json`).
//!
//! And what they share: `api/gate.rs` (callers, tokens at the door, [`Failure`]),
//! `api/extract.rs` ([`Who`], [`Q`], [`Body`]), `api/detached.rs` (work that outlives its
//! request, NDJSON progress), `api/route_errors.rs` (the errors each operation answers, for the
//! document); `api/tests.rs` tests the whole router.

use crate::auth::{Role, TokenStore};
use crate::manager::Manager;
use axum::Router;
use drover_api::{ApiError, ErrorCode};
use std::sync::Arc;

mod access;
mod config;
mod console;
mod detached;
mod events;
mod extract;
mod gate;
mod guest;
mod guest_access;
mod host;
mod images;
mod migration;
mod route_errors;
mod states;
#[cfg(test)]
mod tests;
mod vms;

pub use access::GrantRequest;
pub use extract::{Body, Who, Q};
pub use gate::{Failure, Peer, TokenFailures};

use gate::{gate, route_rule, INCOMING_BODY, PUBLIC_ROUTES};
use route_errors::{error_answer, ROUTE_ERRORS};

/// Build the router, with no token store (TCP callers are all refused).
pub fn router(mgr: Manager) -> Router {
    router_with(mgr, None)
}

/// Build the router; `tokens` resolves TCP callers' bearer tokens and backs `/v1/auth/tokens`.
pub fn router_with(mgr: Manager, tokens: Option<Arc<TokenStore>>) -> Router {
    let (r, _) = routes().split_for_parts();
    let r = r
        .route_layer(axum::middleware::from_fn_with_state(mgr.clone(), gate))
        // The web console's page and files load before anyone logs in: outside the gate. They
        // hold no data; what the page shows it asks the API for, with the user's token.
        .route(WEB_ROUTES[0], axum::routing::get(crate::web::index))
        .route(WEB_ROUTES[1], axum::routing::get(crate::web::file))
        .fallback(|| async { Failure(ApiError::new(ErrorCode::NotFound, "no such API route")) })
        // The gate sets each route's limit; this only lifts axum's own default to the largest.
        .layer(axum::extract::DefaultBodyLimit::max(INCOMING_BODY))
        .layer(axum::Extension(Arc::new(TokenFailures::default())));
    let r = match tokens {
        Some(t) => r.layer(axum::Extension(t)),
        None => r,
    };
    r.with_state(mgr)
}

/// The document's frame; the paths come from the handlers' `#[utoipa::path]`s.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "droverd",
        description = "droverd's HTTP/JSON API. On the unix socket the caller is the peer's uid; on TCP (HTTPS) it is the holder of an `Authorization: Bearer TOKEN` header, with the token's role. Each operation's `x-drover-permission` names the permission it needs and `x-drover-roles` the roles that have it; every error is an `ApiError` with a stable `code`."
    ),
    components(schemas(ApiError, ErrorCode))
)]
struct ApiDoc;

/// Every route, each with its part of the document: a route exists only as a handler with a
/// `#[utoipa::path]`, so the router and the document cannot name different routes.
fn routes() -> utoipa_axum::router::OpenApiRouter<Manager> {
    use utoipa::OpenApi as _;
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(host::metrics))
        .routes(routes!(host::openapi_json))
        .routes(routes!(events::events))
        .routes(routes!(host::host))
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::show, vms::delete))
        .routes(routes!(vms::start))
        .routes(routes!(vms::stop))
        .routes(routes!(vms::restart))
        .routes(routes!(states::hibernate))
        .routes(routes!(states::resume))
        .routes(routes!(guest::agent))
        .routes(routes!(guest::exec))
        .routes(routes!(console::console))
        .routes(routes!(console::console_ws))
        .routes(routes!(guest::file_get, guest::file_put))
        .routes(routes!(config::attach))
        .routes(routes!(config::detach))
        .routes(routes!(config::set))
        .routes(routes!(config::config_list))
        .routes(routes!(config::config_diff))
        .routes(routes!(config::config_promote))
        .routes(routes!(config::config_persist))
        .routes(routes!(config::config_show))
        .routes(routes!(config::journal))
        .routes(routes!(guest_access::guest_list, guest_access::guest_grant))
        .routes(routes!(guest_access::guest_revoke))
        .routes(routes!(guest_access::guest_audit))
        .routes(routes!(states::states_list, states::state_create))
        .routes(routes!(states::state_show, states::state_delete))
        .routes(routes!(states::state_restore))
        .routes(routes!(states::state_check))
        .routes(routes!(states::state_clone))
        .routes(routes!(migration::migrate))
        .routes(routes!(migration::migrate_cancel))
        // A VM's records (its journal and audit trail grow with its life) come in one request.
        .routes(routes!(migration::incoming_prepare))
        .routes(routes!(migration::incoming_commit))
        .routes(routes!(migration::incoming_abort))
        .routes(routes!(images::image))
        .routes(routes!(images::image_build))
        .routes(routes!(images::image_inject_agent))
        .routes(routes!(images::images_list, images::image_import))
        .routes(routes!(images::image_show, images::image_delete))
        .routes(routes!(access::roles, access::grant))
        .routes(routes!(access::tokens_list, access::token_create))
        .routes(routes!(access::token_revoke))
        .routes(routes!(access::whoami))
}

/// The web console's page and files: served beside the API, not part of it (HTML and scripts,
/// no data), so not in the API document.
pub const WEB_ROUTES: [&str; 2] = ["/", "/ui/{file}"];

/// The API document (OpenAPI 3.1): the handlers' paths and types, and for each operation the
/// permission [`route_rule`] enforces, the roles that have it and the errors every route can
/// answer (401, 403, 413, 429, 500), on top of those its handler names.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::path::HttpMethod;
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let (_, mut doc) = routes().split_for_parts();
    let error = |what: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build(),
        )
    };
    if let Some(c) = doc.components.as_mut() {
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            (HttpMethod::Get, item.get.as_mut()),
            (HttpMethod::Post, item.post.as_mut()),
            (HttpMethod::Put, item.put.as_mut()),
            (HttpMethod::Delete, item.delete.as_mut()),
            (HttpMethod::Patch, item.patch.as_mut()),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            let m = match method {
                HttpMethod::Get => axum::http::Method::GET,
                HttpMethod::Post => axum::http::Method::POST,
                HttpMethod::Put => axum::http::Method::PUT,
                HttpMethod::Delete => axum::http::Method::DELETE,
                _ => axum::http::Method::PATCH,
            };
            let mut ext = utoipa::openapi::extensions::Extensions::default();
            if PUBLIC_ROUTES.contains(&path.as_str()) {
                ext.insert("x-drover-permission".into(), serde_json::json!(null));
                op.description = Some("Needs no token and no role.".into());
                op.security = Some(vec![
                    utoipa::openapi::security::SecurityRequirement::default(),
                ]);
                op.extensions = Some(ext);
                continue;
            }
            let (need, limit) = route_rule(&m, path);
            let roles: Vec<String> = [Role::Admin, Role::Operator, Role::Viewer]
                .into_iter()
                .filter(|r| r.allows(need))
                .map(|r| r.to_string())
                .collect();
            ext.insert("x-drover-permission".into(), serde_json::json!(need.name()));
            ext.insert("x-drover-roles".into(), serde_json::json!(roles));
            op.extensions = Some(ext);
            op.description = Some(format!(
                "Needs the `{}` permission (roles: {}).",
                need.name(),
                roles.join(", ")
            ));
            op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
            let own = ROUTE_ERRORS
                .iter()
                .find(|(rm, rp, _)| *rm == m.as_str() && rp == path)
                .map(|(_, _, e)| *e)
                .unwrap_or(&[]);
            let with_body: &[u16] = if op.request_body.is_some() {
                &[400, 413]
            } else {
                &[]
            };
            let r = &mut op.responses.responses;
            for &status in own.iter().chain(with_body).chain(&[401, 403, 429, 500]) {
                let what = if status == 413 {
                    format!("{} ({} KiB at most)", error_answer(413), limit >> 10)
                } else {
                    error_answer(status).to_string()
                };
                r.entry(status.to_string()).or_insert_with(|| error(&what));
            }
        }
    }
    doc
}
