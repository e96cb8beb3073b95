//! The HTTP/JSON API: routes translate requests into [`Manager`] calls and errors into
//! [`ApiError`]s. Mutating calls run in their own task, so a client that hangs up mid-way cannot
//! leave a VM half-started or half-stopped.

use crate::auth::{bearer, Caller, Permission, Role, TokenStore};
use crate::error::HostError;
use crate::manager::Manager;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use drover_api::{
    ApiError, AttachRequest, DetachRequest, ErrorCode, ExecRequest, ImageBuildRequest,
    PersistRequest, PromoteRequest, SetRequest, StartRequest, StopRequest, StreamItem,
};
use drover_model::VmSpec;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Who is on the other end of an API connection: a local process (unix socket peer
/// credentials) or a TCP client (which must then bring a bearer token).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The peer's uid, when the unix socket reports it.
    pub uid: Option<u32>,
    /// The TCP client's address; set for every connection that came in over TCP (TLS).
    pub remote: Option<std::net::SocketAddr>,
}

/// The request's caller, resolved to a role.
pub struct Who(pub Caller);

/// The caller [`gate`] resolved, for the handlers after it.
#[derive(Clone)]
struct Resolved(Caller);

impl axum::extract::FromRequestParts<Manager> for Who {
    type Rejection = Failure;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        m: &Manager,
    ) -> Result<Self, Self::Rejection> {
        if let Some(Resolved(c)) = parts.extensions.get::<Resolved>() {
            return Ok(Who(c.clone()));
        }
        resolve_caller(parts, m).map(Who)
    }
}

/// Wrong tokens per TCP address: past [`TOKEN_FAILURES`] in [`TOKEN_WINDOW`], the address is
/// refused (429) without looking at its tokens until the window has passed.
const TOKEN_FAILURES: u32 = 10;
const TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// Failed token checks per address.
#[derive(Default)]
pub struct TokenFailures(
    std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
);

impl TokenFailures {
    fn blocked(&self, ip: std::net::IpAddr) -> bool {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ip)
            .is_some_and(|(since, n)| *n >= TOKEN_FAILURES && since.elapsed() < TOKEN_WINDOW)
    }

    fn failed(&self, ip: std::net::IpAddr) -> u32 {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            m.retain(|_, (since, _)| since.elapsed() < TOKEN_WINDOW);
        }
        let e = m.entry(ip).or_insert((std::time::Instant::now(), 0));
        if e.0.elapsed() >= TOKEN_WINDOW {
            *e = (std::time::Instant::now(), 0);
        }
        e.1 += 1;
        e.1
    }
}

static TCP_REFUSALS: crate::limits::LogLimiter =
    crate::limits::LogLimiter::new(Duration::from_secs(10));

/// Who is calling: the unix peer's uid, or on TCP the bearer token's role (rate-limited per
/// address after repeated failures).
fn resolve_caller(parts: &axum::http::request::Parts, m: &Manager) -> Result<Caller, Failure> {
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    let Some(addr) = peer.remote else {
        // Local: the kernel vouches for the uid; a token header is ignored.
        return Ok(m.caller(peer.uid));
    };
    let failures = parts.extensions.get::<Arc<TokenFailures>>();
    if failures.is_some_and(|f| f.blocked(addr.ip())) {
        return Err(Failure(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "too many wrong tokens from {}; wait a minute and use a valid token",
                addr.ip()
            ),
        )));
    }
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| websocket_bearer(&parts.headers).map(|t| format!("Bearer {t}")));
    token_caller(parts.extensions.get::<Arc<TokenStore>>(), header.as_deref()).inspect_err(|f| {
        let n = failures.map(|t| t.failed(addr.ip())).unwrap_or(0);
        let ip = addr.ip().to_string();
        if let Some(held_back) = TCP_REFUSALS.allow(&ip) {
            tracing::info!(peer = %addr, failures_in_window = n, refused_since_last_line = held_back, error = %f.0.message, "refused a TCP caller");
        }
    })
}

/// The token a browser's WebSocket brings: it cannot set `Authorization`, so it offers the
/// subprotocol `bearer.TOKEN` beside [`drover_api::CONSOLE_PROTOCOL`] (a header, unlike a URL's
/// query, that access logs do not keep). Looked at only on WebSocket upgrades.
fn websocket_bearer(headers: &HeaderMap) -> Option<String> {
    let upgrade = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("bearer.").map(str::to_string))
}

/// Body limit of most routes: specs, changes and requests are small.
const SMALL_BODY: usize = 64 << 10;
/// `exec` carries the command's standard input (a guest frame holds at most 1 MiB).
const EXEC_BODY: usize = 2 << 20;
/// A VM's records on arrival from another host (its journal and audit trail grow with its life).
const INCOMING_BODY: usize = 64 << 20;

/// What a route needs of its caller, and the largest body it takes. Checked by [`gate`] before
/// any byte of the body is read; handlers and the manager check finer rules after.
fn route_rule(method: &axum::http::Method, route: &str) -> (Permission, usize) {
    use axum::http::Method;
    use Permission::*;
    let tail = route.strip_prefix("/v1/vms/{name}").unwrap_or("");
    let on_vm = route.starts_with("/v1/vms/{name}");
    let p = match (method, route) {
        (&Method::GET, "/v1/auth/whoami") => Read,
        (_, r) if r.starts_with("/v1/auth") || r.starts_with("/v1/migrations") => Admin,
        (&Method::POST, "/v1/image/build" | "/v1/image/inject-agent") => Admin,
        (_, _) if on_vm && (tail.starts_with("/guest-access") || tail == "/audit") => GuestAccess,
        // Reading or writing any file in the guest is as much as running a command there.
        (_, _) if on_vm && tail == "/files" => Exec,
        (&Method::GET, _) => Read,
        (&Method::POST, "/v1/vms") => Lifecycle,
        (&Method::POST, _) if on_vm && matches!(tail, "/attach" | "/detach" | "/set") => Change,
        (&Method::POST, _) if on_vm && tail == "/exec" => Exec,
        // The door asks for config.change; the manager checks config.persist itself, in one
        // place for every route that can change the initial config, and audits a refusal.
        (&Method::POST, _) if on_vm && tail.starts_with("/config/") => Change,
        (&Method::POST | &Method::DELETE, _) if on_vm => Lifecycle,
        // Anything not listed: only an admin.
        _ => Admin,
    };
    let limit = match route {
        "/v1/migrations/incoming" => INCOMING_BODY,
        "/v1/vms/{name}/exec" => EXEC_BODY,
        "/v1/vms/{name}/files" => crate::manager::MAX_FILE_REQUEST,
        _ => SMALL_BODY,
    };
    (p, limit)
}

/// Every route's door: resolve the caller, refuse one without the route's permission and a body
/// over the route's limit (413) — all before the body is read.
async fn gate(
    State(m): State<Manager>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = matched.as_ref().map(|p| p.as_str()).unwrap_or("");
    if PUBLIC_ROUTES.contains(&route) {
        return next.run(req).await;
    }
    let (need, limit) = route_rule(req.method(), route);
    let (mut parts, body) = req.into_parts();
    let caller = match resolve_caller(&parts, &m) {
        Ok(c) => c,
        Err(f) => return f.into_response(),
    };
    if let Err(e) = caller.require(need) {
        return Failure::from(e).into_response();
    }
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    parts.extensions.insert(Resolved(caller));
    // A body without a length (chunked) is cut off at the limit as it is read.
    let body = axum::body::Body::new(http_body_util::Limited::new(body, limit));
    next.run(axum::extract::Request::from_parts(parts, body))
        .await
}

fn too_large(limit: usize) -> Failure {
    Failure(ApiError::new(
        ErrorCode::TooLarge,
        format!(
            "the request body is larger than this route takes ({} KiB at most)",
            limit >> 10
        ),
    ))
}

/// The caller behind an `Authorization` header on a TCP connection.
fn token_caller(tokens: Option<&Arc<TokenStore>>, header: Option<&str>) -> Result<Caller, Failure> {
    let unauth = |m: &str| Failure(ApiError::new(ErrorCode::Unauthenticated, m));
    let Some(token) = header.and_then(bearer) else {
        return Err(unauth(
            "this droverd needs a bearer token on TCP (Authorization: Bearer TOKEN); with the CLI: `drover remote add NAME URL --token-file FILE`. An admin on the host makes one with `drover auth token create --role viewer`",
        ));
    };
    let Some(tokens) = tokens else {
        return Err(unauth("this droverd accepts no tokens"));
    };
    match tokens.resolve(token) {
        Ok(Some(entry)) => Ok(entry.caller()),
        Ok(None) => Err(unauth(
            "this droverd does not know the bearer token (revoked, mistyped, or meant for another host); ask its admin for one (`drover auth token create`)",
        )),
        Err(e) => Err(Failure(ApiError::new(ErrorCode::Internal, e.to_string()))),
    }
}

/// Resolve the caller and check one permission.
fn need(who: &Who, p: Permission) -> Result<(), Failure> {
    who.0.require(p).map_err(Failure::from)
}

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
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(events))
        .routes(routes!(host))
        .routes(routes!(list, create))
        .routes(routes!(show, delete))
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(restart))
        .routes(routes!(hibernate))
        .routes(routes!(resume))
        .routes(routes!(agent))
        .routes(routes!(exec))
        .routes(routes!(console))
        .routes(routes!(console_ws))
        .routes(routes!(file_get, file_put))
        .routes(routes!(attach))
        .routes(routes!(detach))
        .routes(routes!(set))
        .routes(routes!(config_list))
        .routes(routes!(config_diff))
        .routes(routes!(config_promote))
        .routes(routes!(config_persist))
        .routes(routes!(config_show))
        .routes(routes!(journal))
        .routes(routes!(guest_list, guest_grant))
        .routes(routes!(guest_revoke))
        .routes(routes!(guest_audit))
        .routes(routes!(states_list, state_create))
        .routes(routes!(state_show, state_delete))
        .routes(routes!(state_restore))
        .routes(routes!(state_check))
        .routes(routes!(state_clone))
        .routes(routes!(migrate))
        .routes(routes!(migrate_cancel))
        // A VM's records (its journal and audit trail grow with its life) come in one request.
        .routes(routes!(incoming_prepare))
        .routes(routes!(incoming_commit))
        .routes(routes!(incoming_abort))
        .routes(routes!(image))
        .routes(routes!(image_build))
        .routes(routes!(image_inject_agent))
        .routes(routes!(images_list, image_import))
        .routes(routes!(image_show, image_delete))
        .routes(routes!(roles, grant))
        .routes(routes!(tokens_list, token_create))
        .routes(routes!(token_revoke))
        .routes(routes!(whoami))
}

/// The errors each operation answers besides those every route can (401, 403, 429, 500, and
/// 400 and 413 for one that takes a body), by HTTP status ([`ErrorCode::http_status`]); the
/// document lists each with [`error_answer`]'s description. A test checks every row names a
/// served operation.
const ROUTE_ERRORS: &[(&str, &str, &[u16])] = &[
    ("GET", "/v1/vms/{name}/console/ws", &[404, 429]),
    ("GET", "/v1/vms/{name}/files", &[400, 404, 409, 503, 504]),
    ("PUT", "/v1/vms/{name}/files", &[400, 404, 409, 503, 504]),
    ("POST", "/v1/vms/{name}/states/{state}/check", &[400, 404]),
    (
        "POST",
        "/v1/vms/{name}/states/{state}/clone",
        &[400, 404, 409, 507],
    ),
    ("GET", "/v1/images/{name}", &[404]),
    ("POST", "/v1/images", &[400, 409, 507]),
    ("DELETE", "/v1/images/{name}", &[404, 409]),
    ("GET", "/v1/events", &[400]),
    ("POST", "/v1/vms", &[400, 409, 507]),
    ("GET", "/v1/vms/{name}", &[404]),
    ("DELETE", "/v1/vms/{name}", &[400, 404, 409]),
    ("POST", "/v1/vms/{name}/start", &[400, 404, 409, 424, 507]),
    ("POST", "/v1/vms/{name}/stop", &[400, 404, 409]),
    ("POST", "/v1/vms/{name}/restart", &[400, 404, 409, 507]),
    ("POST", "/v1/vms/{name}/attach", &[400, 404, 409, 507]),
    ("POST", "/v1/vms/{name}/detach", &[400, 404, 409]),
    ("POST", "/v1/vms/{name}/set", &[400, 404, 409, 507]),
    ("GET", "/v1/vms/{name}/config", &[404]),
    ("GET", "/v1/vms/{name}/config/{gen}", &[400, 404]),
    ("GET", "/v1/vms/{name}/config/diff", &[400, 404]),
    ("POST", "/v1/vms/{name}/config/promote", &[400, 404, 409]),
    ("POST", "/v1/vms/{name}/config/persist", &[400, 404, 409]),
    ("GET", "/v1/vms/{name}/journal", &[404]),
    ("GET", "/v1/vms/{name}/guest-access", &[404]),
    ("POST", "/v1/vms/{name}/guest-access", &[400, 404]),
    ("DELETE", "/v1/vms/{name}/guest-access/{principal}", &[404]),
    ("GET", "/v1/vms/{name}/audit", &[404]),
    ("GET", "/v1/vms/{name}/states", &[404]),
    ("GET", "/v1/vms/{name}/states/{state}", &[404]),
    ("POST", "/v1/vms/{name}/states", &[400, 404, 409, 507]),
    ("POST", "/v1/vms/{name}/hibernate", &[404, 409]),
    ("POST", "/v1/vms/{name}/resume", &[400, 404, 409, 507]),
    (
        "POST",
        "/v1/vms/{name}/states/{state}/restore",
        &[404, 409, 507],
    ),
    ("DELETE", "/v1/vms/{name}/states/{state}", &[404, 409]),
    ("POST", "/v1/auth/roles", &[400]),
    ("GET", "/v1/auth/tokens", &[400]),
    ("POST", "/v1/auth/tokens", &[400, 409]),
    ("DELETE", "/v1/auth/tokens/{name}", &[400, 404]),
    ("GET", "/v1/vms/{name}/agent", &[404, 409, 504]),
    ("POST", "/v1/vms/{name}/exec", &[400, 404, 409, 503, 504]),
    ("GET", "/v1/vms/{name}/console", &[404]),
    ("GET", "/v1/image", &[424]),
    ("POST", "/v1/image/build", &[400]),
    ("POST", "/v1/image/inject-agent", &[400, 409]),
    ("POST", "/v1/vms/{name}/migrate", &[400, 404, 409]),
    ("POST", "/v1/vms/{name}/migrate/cancel", &[404, 409]),
    ("POST", "/v1/migrations/incoming", &[400, 409, 507]),
    ("POST", "/v1/migrations/{name}/commit", &[400, 404, 409]),
    ("POST", "/v1/migrations/{name}/abort", &[400]),
];

/// What an error status means, for the document (the `ErrorCode`s that answer with it).
fn error_answer(status: u16) -> &'static str {
    match status {
        400 => "A malformed request or a value out of range (`invalid_argument`)",
        401 => "On TCP: no bearer token, or one this droverd does not know (`unauthenticated`)",
        403 => "The caller's role lacks the permission (`forbidden`)",
        404 => "No such VM or object (`not_found`)",
        409 => "The VM is in the wrong state for this, or the name is taken (`conflict`, `already_exists`)",
        413 => "The body is larger than this route takes (`too_large`)",
        424 => "The guest image is not built (`image_missing`)",
        429 => "Too many wrong tokens from this address within a minute (`too_many_requests`)",
        502 => "The other host could not be reached (`peer_unreachable`)",
        503 => "The guest agent is not connected or did not answer (`agent_unavailable`)",
        504 => "It did not finish in time (`timeout`)",
        507 => "The host cannot give what is asked (`insufficient_resources`)",
        _ => "Something failed inside droverd (`internal`)",
    }
}

/// The web console's page and files: served beside the API, not part of it (HTML and scripts,
/// no data), so not in the API document.
pub const WEB_ROUTES: [&str; 2] = ["/", "/ui/{file}"];

/// Routes anyone who reaches the API may read, with or without a token (a token is not even
/// looked at, so a wrong one is not counted against its address). The document is the same
/// for every droverd of a version and says nothing about the host.
const PUBLIC_ROUTES: [&str; 1] = ["/v1/openapi.json"];

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

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "host",
    summary = "This document (OpenAPI 3.1)",
    responses((status = 200, description = "The document", body = Object)),
)]
async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOC.get_or_init(|| {
        openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        text.clone(),
    )
        .into_response()
}

/// `GET /v1/events?follow=&vm=&since=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Keep the stream open and send events as they happen.
    #[serde(default)]
    follow: bool,
    /// Only this VM's events.
    #[serde(default)]
    vm: Option<String>,
    /// Only events after this `seq` (to catch up after a reconnect); without `follow`, the
    /// default is every recent event, with it, none (only new ones).
    #[serde(default)]
    since: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    summary = "VM, state and migration events: NDJSON, one Event per line. Without follow: the recent events (the last 1000 since droverd started), then the stream ends. With follow=true the stream stays open; a client that falls 256 events behind gets one `lagged` line and the stream ends",
    params(EventsQuery),
    responses(
        (status = 200, description = "One Event per line", body = drover_api::Event, content_type = "application/x-ndjson"),
    ),
)]
async fn events(
    State(m): State<Manager>,
    who: Who,
    Q(q): Q<EventsQuery>,
) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    if let Some(vm) = &q.vm {
        drover_model::VmName::new(vm).map_err(|e| {
            Failure(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("vm: {e}"),
            ))
        })?;
    }
    let vm = q.vm.clone();
    let wanted = move |e: &drover_api::Event| vm.is_none() || e.vm == vm || e.vm.is_none();
    let line = |e: &drover_api::Event| {
        let mut s = serde_json::to_string(e).unwrap_or_default();
        s.push('\n');
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(s))
    };
    let stream = if !q.follow {
        let lines: Vec<_> = m
            .events()
            .recent(q.since)
            .iter()
            .filter(|e| wanted(e))
            .map(line)
            .collect();
        futures_util::stream::iter(lines).boxed()
    } else {
        let sub = m.events().subscribe(q.since);
        let backlog: Vec<_> = sub.backlog.iter().filter(|e| wanted(e)).map(line).collect();
        let live = futures_util::stream::unfold(
            (sub.live, sub.closed, false),
            move |(mut rx, mut closed, done)| async move {
                if done || *closed.borrow() {
                    return None;
                }
                let got = tokio::select! {
                    r = rx.recv() => r,
                    _ = closed.changed() => return None,
                };
                match got {
                    Ok(e) => Some((Some(e), (rx, closed, false))),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Some((Some(crate::events::lagged(n)), (rx, closed, true)))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
                }
            },
        )
        .filter_map(move |e| {
            let keep = e.filter(|e| wanted(e));
            async move { keep }
        })
        .map(move |e| line(&e));
        futures_util::stream::iter(backlog).chain(live).boxed()
    };
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// A query string whose parse errors become `invalid_argument` answers (as the document says),
/// not axum's plain-text ones.
pub struct Q<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = Failure;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Q(q))
            .map_err(|e| {
                Failure(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("invalid query: {}", e.body_text()),
                ))
            })
    }
}

/// A JSON body whose parse errors become `invalid_argument` answers.
pub struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Failure;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::InvalidArgument
                };
                Failure(ApiError::new(code, e.body_text()))
            })?;
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

#[utoipa::path(
    get,
    path = "/v1/host",
    tag = "host",
    summary = "The host: accelerator, QEMU, resources",
    responses(
        (status = 200, description = "Done", body = drover_api::HostInfo),
    ),
)]
async fn host(State(m): State<Manager>, who: Who) -> Res<drover_api::HostInfo> {
    need(&who, Permission::Read)?;
    Ok(Json(m.host_info()))
}

/// Prometheus' scrape: OpenMetrics text ([`crate::metrics`]).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "host",
    summary = "Prometheus metrics (OpenMetrics text)",
    responses(
        (status = 200, description = "Done", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    ),
)]
async fn metrics(State(m): State<Manager>, who: Who) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    let (states, targets) = m.metrics_targets();
    let text = crate::metrics::scrape(states, targets).await;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    summary = "Every VM",
    responses(
        (status = 200, description = "Done", body = Vec<drover_api::VmInfo>),
    ),
)]
async fn list(State(m): State<Manager>, who: Who) -> Res<Vec<drover_api::VmInfo>> {
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
async fn create(
    State(m): State<Manager>,
    who: Who,
    Body(spec): Body<VmSpec>,
) -> Res<drover_api::VmInfo> {
    need(&who, Permission::Lifecycle)?;
    Ok(Json(
        detached(async move { m.create(spec, &who.0).await }).await?,
    ))
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
async fn show(
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
struct DeleteQuery {
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
async fn delete(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<DeleteQuery>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.delete(&name, q.force, q.discard_changes, &who.0).await }).await?,
    ))
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
async fn start(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StartRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.start(&name, &req, &who.0).await }).await?,
    ))
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
async fn stop(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.stop(&name, req.timeout_s, req.force, &who.0).await }).await?,
    ))
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
async fn restart(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<StopRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.restart(&name, req.timeout_s, req.force, &who.0).await }).await?,
    ))
}

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
async fn attach(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<AttachRequest>,
) -> Res<drover_api::ChangeResult> {
    Ok(Json(
        detached(async move { m.attach_device(&name, req, &who.0).await }).await?,
    ))
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
async fn detach(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<DetachRequest>,
) -> Res<drover_api::ChangeResult> {
    Ok(Json(
        detached(async move { m.detach_device(&name, req, &who.0).await }).await?,
    ))
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
async fn set(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<SetRequest>,
) -> Res<drover_api::ChangeResult> {
    Ok(Json(
        detached(async move { m.set(&name, req, &who.0).await }).await?,
    ))
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
async fn config_list(
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
async fn config_show(
    State(m): State<Manager>,
    who: Who,
    Path((name, gen)): Path<(String, u32)>,
) -> Res<drover_model::VmConfig> {
    Ok(Json(m.generation_config(&name, gen, &who.0)?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DiffQuery {
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
async fn config_diff(
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
async fn config_promote(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<PromoteRequest>,
) -> Res<drover_api::ConfigHistoryView> {
    Ok(Json(
        detached(async move { m.promote(&name, req.generation, &who.0).await }).await?,
    ))
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
async fn config_persist(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<PersistRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.set_persist(&name, req, &who.0).await }).await?,
    ))
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
async fn journal(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::JournalEntry>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.journal_of(&name)?))
}

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
async fn guest_list(
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
async fn guest_grant(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::GuestGrantRequest>,
) -> Res<drover_api::GuestGrant> {
    Ok(Json(
        detached(async move { m.guest_grant(&name, &req.principal, &req.ops, &who.0) }).await?,
    ))
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
async fn guest_revoke(
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
async fn guest_audit(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<Vec<drover_api::AuditEntry>> {
    Ok(Json(m.guest_audit(&name, &who.0)?))
}

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
async fn states_list(
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
async fn state_show(
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
async fn state_create(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::SnapshotRequest>,
) -> Res<drover_api::StateInfo> {
    Ok(Json(
        detached(async move {
            m.snapshot_create(&name, req.name, req.classic, req.capture, &who.0)
                .await
        })
        .await?,
    ))
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
async fn hibernate(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.hibernate(&name, &who.0).await }).await?,
    ))
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
async fn resume(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<drover_api::ResumeRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.resume(&name, &req, &who.0).await }).await?,
    ))
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
async fn state_restore(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
    Body(req): Body<drover_api::ResumeRequest>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.snapshot_restore(&name, &state, &req, &who.0).await }).await?,
    ))
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
async fn state_check(
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
async fn state_clone(
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
async fn state_delete(
    State(m): State<Manager>,
    who: Who,
    Path((name, state)): Path<(String, String)>,
) -> Res<drover_api::StateInfo> {
    Ok(Json(
        detached(async move { m.snapshot_delete(&name, &state, &who.0).await }).await?,
    ))
}

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
async fn roles(State(m): State<Manager>, who: Who) -> Res<Vec<(u32, Role)>> {
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
async fn grant(
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
async fn tokens_list(
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
async fn token_create(
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
async fn token_revoke(
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
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
async fn agent(
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
async fn exec(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(req): Body<ExecRequest>,
) -> Res<drover_proto::ExecResult> {
    Ok(Json(m.exec(&name, req, &who.0).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ConsoleQuery {
    /// Where to start reading the console log (bytes).
    #[serde(default)]
    offset: u64,
    /// Bytes to read at most (default 256 KiB, at most 4 MiB).
    #[serde(default = "default_console_max")]
    max: usize,
}
fn default_console_max() -> usize {
    256 * 1024
}

#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console",
    tag = "vms",
    summary = "The serial console's bytes from offset (header x-drover-next-offset: where to go on)",
    params(("name" = String, Path, description = "The VM's name"), ConsoleQuery),
    responses(
        (status = 200, description = "Done", body = String, content_type = "application/octet-stream", headers(("x-drover-next-offset" = u64, description = "The offset to ask for next"))),
    ),
)]
async fn console(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Q(q): Q<ConsoleQuery>,
) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    let (bytes, next) = m.console(&name, q.offset, q.max.min(4 << 20))?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
        headers.insert("x-drover-next-offset", v);
    }
    Ok((headers, bytes).into_response())
}

/// The largest frame a console client may send (keystrokes and pastes).
const CONSOLE_FRAME_MAX: usize = 64 << 10;
/// How much of the log a new console session starts with.
const CONSOLE_BACKLOG: u64 = 64 << 10;
/// How often a session looks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(100);
/// A client that has sent nothing (not even a pong to our pings) this long is gone.
const CONSOLE_SILENCE: Duration = Duration::from_secs(60);

/// `GET /v1/vms/NAME/console/ws`: the serial console as a WebSocket. Output for everyone who
/// may read the VM; input only for callers with `vm.exec` (root in the guest's shell is what
/// `vm exec` gives too). See [`drover_api::ConsoleHello`].
#[utoipa::path(
    get,
    path = "/v1/vms/{name}/console/ws",
    tag = "vms",
    summary = "The serial console as a WebSocket: a ConsoleHello text frame, then output as binary frames; frames from a client with vm.exec are typed into the guest",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, body = drover_api::ConsoleHello, description = "Switching to the WebSocket protocol (101 in fact; its first frame is this)")),
)]
async fn console_ws(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, Failure> {
    need(&who, Permission::Read)?;
    m.get(&name)?;
    let permit = m.console_socket().ok_or_else(|| {
        Failure(ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "{} consoles are open on this host; close one and retry",
                crate::manager::CONSOLE_SOCKETS_MAX
            ),
        ))
    })?;
    let input = who.0.require(Permission::Exec);
    let hello = drover_api::ConsoleHello {
        vm: name.clone(),
        input: input.is_ok(),
        why: input.err().map(|e| e.to_string()),
    };
    Ok(ws
        .protocols([drover_api::CONSOLE_PROTOCOL])
        .max_message_size(CONSOLE_FRAME_MAX)
        .max_frame_size(CONSOLE_FRAME_MAX)
        .on_upgrade(move |socket| async move {
            console_session(m, hello, socket).await;
            drop(permit);
        }))
}

/// One console session: the log's recent output, then new output as it comes; the client's
/// frames typed into the guest when the hello allowed it.
async fn console_session(
    m: Manager,
    hello: drover_api::ConsoleHello,
    mut socket: axum::extract::ws::WebSocket,
) {
    use axum::extract::ws::Message;
    let name = hello.vm.clone();
    if socket.send(json_frame(&hello)).await.is_err() {
        return;
    }
    let start = std::fs::metadata(m.console_path(&name))
        .map(|md| md.len().saturating_sub(CONSOLE_BACKLOG))
        .unwrap_or(0);
    // The backlog, then the mark after which output is live: a terminal must not answer the
    // queries in old output (a shell's cursor-position request), or the guest reads the answers.
    let mut offset = match m.console(&name, start, CONSOLE_BACKLOG as usize) {
        Ok((bytes, next)) => {
            if !bytes.is_empty() && socket.send(Message::Binary(bytes.into())).await.is_err() {
                return;
            }
            next
        }
        Err(_) => start,
    };
    if socket
        .send(json_frame(&serde_json::json!({"live": true})))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(CONSOLE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    let mut pinged = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = socket.recv() => {
                heard = tokio::time::Instant::now();
                let bytes = match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => axum::body::Bytes::from(t.as_str().to_owned()),
                    Some(Ok(_)) => continue,
                };
                let refused = if hello.input {
                    m.console_input(&name, &bytes).await.err().map(ApiError::from)
                } else {
                    Some(ApiError::new(
                        ErrorCode::Forbidden,
                        hello.why.clone().unwrap_or_default(),
                    ))
                };
                if let Some(e) = refused {
                    if socket.send(json_frame(&e)).await.is_err() {
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > CONSOLE_SILENCE {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                if pinged.elapsed() > CONSOLE_SILENCE / 3 {
                    pinged = tokio::time::Instant::now();
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                let (bytes, next) = match m.console(&name, offset, CONSOLE_FRAME_MAX) {
                    Ok(r) => r,
                    Err(e) => {
                        // The VM is gone: say why, then end.
                        let _ = socket.send(json_frame(&ApiError::from(e))).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                };
                offset = next;
                if !bytes.is_empty() && socket.send(Message::Binary(bytes.into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A console control frame: JSON text.
fn json_frame(v: &impl serde::Serialize) -> axum::extract::ws::Message {
    axum::extract::ws::Message::Text(serde_json::to_string(v).unwrap_or_default().into())
}

/// `GET /v1/auth/whoami`: the caller, its role and what that role may do.
#[utoipa::path(
    get,
    path = "/v1/auth/whoami",
    tag = "auth",
    summary = "The caller, its role and what it may do",
    responses((status = 200, description = "Done", body = drover_api::WhoAmI)),
)]
async fn whoami(who: Who) -> Res<drover_api::WhoAmI> {
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

/// Where in a guest file a `vm cp` request reads or writes.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct FileQuery {
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
async fn file_get(
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
async fn file_put(
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

#[utoipa::path(
    get,
    path = "/v1/image",
    tag = "image",
    summary = "The guest image (default, or ?distro=)",
    params(ImageQuery),
    responses(
        (status = 200, description = "Done", body = drover_api::ImageInfo),
    ),
)]
async fn image(
    State(m): State<Manager>,
    who: Who,
    Q(q): Q<ImageQuery>,
) -> Res<drover_api::ImageInfo> {
    need(&who, Permission::Read)?;
    if let Some(distro) = q.distro {
        return match m.current_distro_image(&distro)? {
            Some(i) => Ok(Json(i)),
            None => Err(Failure(ApiError::new(
                ErrorCode::ImageMissing,
                format!("the {distro} image is not built yet; run `drover image build --distro {distro}`"),
            ))),
        };
    }
    match m.current_image()? {
        Some(i) => Ok(Json(i)),
        None => Err(Failure(ApiError::new(
            ErrorCode::ImageMissing,
            "the default guest image is not built yet; run `drover image build`",
        ))),
    }
}

/// `GET /v1/image?distro=debian-12`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ImageQuery {
    /// A distribution image (`debian-12`) instead of the default one.
    #[serde(default)]
    distro: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/images",
    tag = "image",
    summary = "Imported disk images",
    responses((status = 200, description = "Done", body = Vec<drover_api::DiskImage>)),
)]
async fn images_list(State(m): State<Manager>, who: Who) -> Res<Vec<drover_api::DiskImage>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.images()?))
}

#[utoipa::path(
    get,
    path = "/v1/images/{name}",
    tag = "image",
    summary = "One disk image",
    params(("name" = String, Path, description = "The image's name")),
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
async fn image_show(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::DiskImage> {
    need(&who, Permission::Read)?;
    Ok(Json(m.image_get(&name)?))
}

#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "image",
    summary = "Import a disk image (copied in as a checked standalone qcow2)",
    request_body = drover_api::ImageImportRequest,
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
async fn image_import(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::ImageImportRequest>,
) -> Res<drover_api::DiskImage> {
    Ok(Json(
        detached(async move { m.image_import(&req, &who.0).await }).await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/images/{name}",
    tag = "image",
    summary = "Delete a disk image (refused while a VM uses it)",
    params(("name" = String, Path, description = "The image's name")),
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
async fn image_delete(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::DiskImage> {
    Ok(Json(m.image_delete(&name, &who.0).await?))
}

#[utoipa::path(
    post,
    path = "/v1/image/inject-agent",
    tag = "image",
    summary = "Install the agent package offline into a stopped disk (an image no VM uses, or a file no running VM uses)",
    request_body = drover_api::InjectAgentRequest,
    responses((status = 200, description = "Done", body = drover_api::AgentInjected)),
)]
async fn image_inject_agent(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::InjectAgentRequest>,
) -> Res<drover_api::AgentInjected> {
    Ok(Json(
        detached(async move { m.image_inject_agent(&req, &who.0).await }).await?,
    ))
}

/// Streams progress lines, then the result, as NDJSON.
#[utoipa::path(
    post,
    path = "/v1/image/build",
    tag = "image",
    summary = "Build the guest image: NDJSON lines of StreamItem (progress text, then the image or the error)",
    request_body = ImageBuildRequest,
    responses(
        (status = 200, description = "Done", body = StreamItem<drover_api::ImageInfo>, content_type = "application/x-ndjson"),
    ),
)]
async fn image_build(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<ImageBuildRequest>,
) -> Response {
    if let Err(f) = need(&who, Permission::Admin) {
        return f.into_response();
    }
    ndjson(move |progress| async move {
        match req.distro {
            Some(distro) => m.build_distro_image(&distro, req.force, progress).await,
            None => m.build_image(req.force, progress).await,
        }
    })
}

/// Run `work` in its own task (a client that hangs up cannot cut it short), streaming its
/// progress lines and then its outcome as NDJSON [`StreamItem`]s.
fn ndjson<T, F, Fut>(work: F) -> Response
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
async fn migrate(
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
async fn migrate_cancel(
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
async fn incoming_prepare(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::IncomingRequest>,
) -> Res<drover_api::IncomingReady> {
    Ok(Json(
        detached(async move { m.incoming_prepare(req, &who.0).await }).await?,
    ))
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
async fn incoming_commit(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(step): Body<drover_api::MigrationStep>,
) -> Res<drover_api::VmInfo> {
    Ok(Json(
        detached(async move { m.incoming_commit(&name, step, &who.0).await }).await?,
    ))
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
async fn incoming_abort(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
    Body(step): Body<drover_api::MigrationStep>,
) -> Res<Empty> {
    detached(async move { m.incoming_abort(&name, step, &who.0).await }).await?;
    Ok(Json(Empty {}))
}

/// The answer to a guest principal's revocation.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Revoked {
    /// The principal revoked.
    revoked: String,
}

/// The answer to a migration's cancel.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Cancelling {
    /// The VM whose migration is being cancelled.
    cancelling: String,
}

/// An empty JSON object.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Empty {}

use futures_util::StreamExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt as _;

    #[test]
    fn every_route_names_what_it_needs() {
        use axum::http::Method;
        use Permission::*;
        let get = Method::GET;
        let post = Method::POST;
        let del = Method::DELETE;
        for (m, route, need, limit) in [
            (&get, "/metrics", Read, SMALL_BODY),
            (&get, "/v1/host", Read, SMALL_BODY),
            (&get, "/v1/vms", Read, SMALL_BODY),
            (&post, "/v1/vms", Lifecycle, SMALL_BODY),
            (&get, "/v1/vms/{name}", Read, SMALL_BODY),
            (&del, "/v1/vms/{name}", Lifecycle, SMALL_BODY),
            (&post, "/v1/vms/{name}/start", Lifecycle, SMALL_BODY),
            (&post, "/v1/vms/{name}/stop", Lifecycle, SMALL_BODY),
            (&post, "/v1/vms/{name}/restart", Lifecycle, SMALL_BODY),
            (&post, "/v1/vms/{name}/hibernate", Lifecycle, SMALL_BODY),
            (&post, "/v1/vms/{name}/resume", Lifecycle, SMALL_BODY),
            (&get, "/v1/vms/{name}/agent", Read, SMALL_BODY),
            (&post, "/v1/vms/{name}/exec", Exec, EXEC_BODY),
            (&get, "/v1/vms/{name}/console", Read, SMALL_BODY),
            (&get, "/v1/vms/{name}/console/ws", Read, SMALL_BODY),
            (&post, "/v1/vms/{name}/attach", Change, SMALL_BODY),
            (&post, "/v1/vms/{name}/detach", Change, SMALL_BODY),
            (&post, "/v1/vms/{name}/set", Change, SMALL_BODY),
            (&get, "/v1/vms/{name}/config", Read, SMALL_BODY),
            (&get, "/v1/vms/{name}/config/diff", Read, SMALL_BODY),
            (&get, "/v1/vms/{name}/config/{gen}", Read, SMALL_BODY),
            (&post, "/v1/vms/{name}/config/promote", Change, SMALL_BODY),
            (&post, "/v1/vms/{name}/config/persist", Change, SMALL_BODY),
            (&get, "/v1/vms/{name}/journal", Read, SMALL_BODY),
            (&get, "/v1/vms/{name}/guest-access", GuestAccess, SMALL_BODY),
            (
                &post,
                "/v1/vms/{name}/guest-access",
                GuestAccess,
                SMALL_BODY,
            ),
            (
                &del,
                "/v1/vms/{name}/guest-access/{principal}",
                GuestAccess,
                SMALL_BODY,
            ),
            (&get, "/v1/vms/{name}/audit", GuestAccess, SMALL_BODY),
            (&get, "/v1/vms/{name}/states", Read, SMALL_BODY),
            (&post, "/v1/vms/{name}/states", Lifecycle, SMALL_BODY),
            (&get, "/v1/vms/{name}/states/{state}", Read, SMALL_BODY),
            (&del, "/v1/vms/{name}/states/{state}", Lifecycle, SMALL_BODY),
            (
                &post,
                "/v1/vms/{name}/states/{state}/restore",
                Lifecycle,
                SMALL_BODY,
            ),
            (
                &post,
                "/v1/vms/{name}/states/{state}/clone",
                Lifecycle,
                SMALL_BODY,
            ),
            (&post, "/v1/vms/{name}/migrate", Lifecycle, SMALL_BODY),
            (
                &post,
                "/v1/vms/{name}/migrate/cancel",
                Lifecycle,
                SMALL_BODY,
            ),
            (&post, "/v1/migrations/incoming", Admin, INCOMING_BODY),
            (&post, "/v1/migrations/{name}/commit", Admin, SMALL_BODY),
            (&post, "/v1/migrations/{name}/abort", Admin, SMALL_BODY),
            (&get, "/v1/image", Read, SMALL_BODY),
            (&post, "/v1/image/build", Admin, SMALL_BODY),
            (&post, "/v1/image/inject-agent", Admin, SMALL_BODY),
            (&get, "/v1/auth/roles", Admin, SMALL_BODY),
            (&post, "/v1/auth/roles", Admin, SMALL_BODY),
            (&get, "/v1/auth/tokens", Admin, SMALL_BODY),
            (&post, "/v1/auth/tokens", Admin, SMALL_BODY),
            (&del, "/v1/auth/tokens/{name}", Admin, SMALL_BODY),
            (&get, "/v1/auth/whoami", Read, SMALL_BODY),
            (&Method::PUT, "/v1/somewhere/new", Admin, SMALL_BODY),
        ] {
            assert_eq!(route_rule(m, route), (need, limit), "{m} {route}");
        }
    }

    /// A body whose first read is recorded: the gate must answer before it.
    fn watched_body(len: usize, read: Arc<AtomicBool>) -> axum::body::Body {
        let chunk = axum::body::Bytes::from(vec![b'x'; 1 << 20]);
        let n = len.div_ceil(1 << 20);
        let stream = futures_util::stream::iter((0..n).map(move |_| {
            read.store(true, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(chunk.clone())
        }));
        axum::body::Body::from_stream(stream)
    }

    async fn call(
        app: &Router,
        uid: Option<u32>,
        method: &str,
        uri: &str,
        length: Option<usize>,
        body: axum::body::Body,
    ) -> (StatusCode, ApiError) {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(n) = length {
            b = b.header("content-length", n.to_string());
        }
        let mut req = b.body(body).unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(Peer { uid, remote: None }));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let err = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            ApiError::new(ErrorCode::Internal, String::from_utf8_lossy(&bytes))
        });
        (status, err)
    }

    #[tokio::test]
    async fn callers_are_checked_before_bodies_are_read_and_bodies_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        m.set_role(&Caller::daemon(), 1001, Some(Role::Viewer))
            .unwrap();
        let app = router(m);
        let big = 60 << 20;
        for uid in [Some(1000), Some(1001), None] {
            let read = Arc::new(AtomicBool::new(false));
            let (status, e) = call(
                &app,
                uid,
                "POST",
                "/v1/migrations/incoming",
                Some(big),
                watched_body(big, read.clone()),
            )
            .await;
            assert_eq!(
                (status, e.code),
                (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
                "{uid:?}: {}",
                e.message
            );
            assert!(!read.load(Ordering::SeqCst), "{uid:?}: the body was read");
        }
        // An admin's body over the route's limit: 413 on the declared length, unread.
        let read = Arc::new(AtomicBool::new(false));
        let (status, e) = call(
            &app,
            Some(0),
            "POST",
            "/v1/vms",
            Some(big),
            watched_body(big, read.clone()),
        )
        .await;
        assert_eq!(
            (status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge)
        );
        assert!(!read.load(Ordering::SeqCst));
        // ... and without a declared length, cut off at the limit as it streams.
        let read = Arc::new(AtomicBool::new(false));
        let (status, e) = call(
            &app,
            Some(0),
            "POST",
            "/v1/vms",
            None,
            watched_body(2 << 20, read),
        )
        .await;
        assert_eq!(
            (status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge),
            "{}",
            e.message
        );
        // A small body still gets through to validation.
        let (status, e) = call(
            &app,
            Some(0),
            "POST",
            "/v1/vms",
            None,
            axum::body::Body::from("{}"),
        )
        .await;
        assert_eq!(
            (status, e.code),
            (StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument),
            "{}",
            e.message
        );
        // A viewer reads, and may not create.
        let (status, _) = call(
            &app,
            Some(1001),
            "GET",
            "/v1/vms",
            None,
            axum::body::Body::empty(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(
            &app,
            Some(1001),
            "POST",
            "/v1/vms",
            None,
            axum::body::Body::from("{}"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    /// GET /metrics as `peer` (with `token` as a bearer token): the status and the body.
    async fn scrape(app: &Router, peer: Peer, token: Option<&str>) -> (StatusCode, String) {
        let mut b = axum::http::Request::builder().uri("/metrics");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let mut req = b.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn metrics_answer_viewers_on_both_doors_and_nobody_else() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        m.set_role(&Caller::daemon(), 1001, Some(Role::Viewer))
            .unwrap();
        let tokens = Arc::new(TokenStore::new(&dir.path().join("tokens")));
        let (viewer, _) = tokens.create(Role::Viewer, Some("prometheus")).unwrap();
        let app = router_with(m, Some(tokens));
        let local = |uid| Peer {
            uid: Some(uid),
            remote: None,
        };
        let tcp = Peer {
            uid: None,
            remote: Some(([127, 0, 0, 1], 40000).into()),
        };
        for (peer, token) in [(local(1001), None), (tcp.clone(), Some(viewer.as_str()))] {
            let (status, text) = scrape(&app, peer, token).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            assert!(text.contains("drover_vms{state=\"running\"} 0"), "{text}");
            assert!(text.trim_end().ends_with("# EOF"), "{text}");
        }
        let (status, _) = scrape(&app, local(1000), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "a local user without a role");
        for token in [None, Some("drv_not_a_token")] {
            let (status, _) = scrape(&app, tcp.clone(), token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        }
    }

    /// A GET of `uri` from local uid `uid`.
    fn local_get(uid: u32, uri: &str) -> axum::http::Request<axum::body::Body> {
        let mut req = axum::http::Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(Peer {
                uid: Some(uid),
                remote: None,
            }));
        req
    }

    /// The lines of an NDJSON answer, decoded.
    fn ndjson_lines<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// The router serves every operation of the document and, on those paths, no other
    /// method; every route is registered through `routes()` (no plain `.route(`), so nothing
    /// is served that the document does not list.
    #[tokio::test]
    async fn the_router_serves_exactly_the_documented_operations() {
        let src = include_str!("api.rs");
        let code = &src[..src.find("#[cfg(test)]").unwrap_or(src.len())];
        assert_eq!(
            code.matches(concat!(".route", "(")).count(),
            WEB_ROUTES.len(),
            "a route added with .route() is not in the API document: use a #[utoipa::path] handler in routes() (only the web console's pages are served outside it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let app = router(Manager::for_tests(dir.path(), Default::default()).await);
        let doc = serde_json::to_value(openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() > 35, "{paths:?}");
        let mut operations = 0;
        for (path, item) in paths {
            let uri = path
                .replace("{gen}", "1")
                .replace("{name}", "nosuchvm")
                .replace("{state}", "s1")
                .replace("{principal}", "p1");
            for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
                let documented = item.get(method.to_lowercase()).is_some();
                // uid 1000 has no role: the gate answers every route it reaches with 403,
                // before any handler runs (the document alone is public). A method the path
                // lacks is asked as root, past the gate, to see axum's 405.
                let uid = if documented { 1000 } else { 0 };
                let (status, e) = call(
                    &app,
                    Some(uid),
                    method,
                    &uri,
                    None,
                    axum::body::Body::empty(),
                )
                .await;
                let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
                    || (status == StatusCode::NOT_FOUND && e.message == "no such API route");
                if documented {
                    operations += 1;
                    assert!(
                        !unrouted,
                        "{method} {path}: documented, not served ({status})"
                    );
                    let want = if PUBLIC_ROUTES.contains(&path.as_str()) {
                        StatusCode::OK
                    } else {
                        StatusCode::FORBIDDEN
                    };
                    assert_eq!(status, want, "{method} {path}: {}", e.message);
                } else {
                    assert!(
                        unrouted,
                        "{method} {path}: served, not documented ({status})"
                    );
                }
            }
        }
        assert!(operations > 40, "{operations}");
        for (m, p, _) in ROUTE_ERRORS {
            assert!(
                paths
                    .get(*p)
                    .is_some_and(|i| i.get(m.to_lowercase()).is_some()),
                "ROUTE_ERRORS names {m} {p}, which is not served"
            );
        }
        let (status, e) = call(
            &app,
            Some(0),
            "GET",
            "/v1/nothing",
            None,
            axum::body::Body::empty(),
        )
        .await;
        assert_eq!(
            (status, e.code),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );
    }

    /// Answers of real handlers (error answers included) validate against the document, with
    /// every object closed (`unevaluatedProperties: false`), so a field the type has and the
    /// document lacks, or the other way round, fails here.
    #[tokio::test]
    async fn answers_validate_against_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        m.set_role(&Caller::daemon(), 1001, Some(Role::Viewer))
            .unwrap();
        let app = router(m.clone());
        let doc = serde_json::to_value(openapi()).unwrap();
        m.events().emit(
            "web1",
            drover_api::EventKind::Created,
            serde_json::json!({}),
        );
        for (uid, method, uri, body, status) in [
            (0, "GET", "/v1/host", "", 200),
            (0, "GET", "/v1/vms", "", 200),
            (0, "GET", "/v1/auth/roles", "", 200),
            (0, "GET", "/v1/vms/nosuchvm", "", 404),
            (0, "POST", "/v1/vms", "{\"name\": 5}", 400),
            (0, "POST", "/v1/vms/nosuchvm/start", "", 404),
            (1001, "POST", "/v1/vms", "{}", 403),
            (1001, "GET", "/v1/events?follow=maybe", "", 400),
        ] {
            let mut req = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::from(body))
                .unwrap();
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(Peer {
                    uid: Some(uid),
                    remote: None,
                }));
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{method} {uri}");
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let route = uri.split('?').next().unwrap().replace("nosuchvm", "{name}");
            crate::openapi_check::validate(&doc, method, &route, status, &answer)
                .unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
        }
        // A renamed field is caught, whichever side has the new name.
        assert!(crate::openapi_check::validate_schema(
            &doc,
            "ApiError",
            &serde_json::json!({"code": "not_found", "messages": "x"})
        )
        .is_err());
        assert!(crate::openapi_check::validate_schema(
            &doc,
            "ApiError",
            &serde_json::json!({"code": "not_found", "message": "x"})
        )
        .is_ok());
        // The event stream's lines are Events.
        let req = local_get(1001, "/v1/events");
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let lines: Vec<serde_json::Value> = ndjson_lines(&bytes);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["kind"], "created");
        crate::openapi_check::validate(&doc, "GET", "/v1/events", 200, &lines[0]).unwrap();
    }

    /// A follower that does not read falls behind: it gets one `lagged` line saying how many
    /// events it missed, and its stream ends (nothing is buffered for it beyond the channel).
    #[tokio::test]
    async fn a_follower_that_does_not_read_is_told_it_lagged_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        let app = router(m.clone());
        let req = local_get(0, "/v1/events?follow=true");
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for _ in 0..crate::events::CAPACITY + 10 {
            m.events()
                .emit("a", drover_api::EventKind::Started, serde_json::json!({}));
        }
        let bytes = tokio::time::timeout(
            Duration::from_secs(5),
            axum::body::to_bytes(resp.into_body(), 1 << 20),
        )
        .await
        .expect("the lagging stream ended")
        .unwrap();
        let lines: Vec<drover_api::Event> = ndjson_lines(&bytes);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].kind, drover_api::EventKind::Lagged);
        assert_eq!(lines[0].details["missed"], 10);
    }

    /// Follow streams end when droverd stops, rather than hold its shutdown for the grace time.
    #[tokio::test]
    async fn follow_streams_end_when_droverd_stops() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        let app = router(m.clone());
        let req = local_get(0, "/v1/events?follow=true&vm=a");
        let resp = app.oneshot(req).await.unwrap();
        m.events()
            .emit("a", drover_api::EventKind::Created, serde_json::json!({}));
        m.events()
            .emit("b", drover_api::EventKind::Created, serde_json::json!({}));
        let reader = tokio::spawn(axum::body::to_bytes(resp.into_body(), 1 << 20));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reader.is_finished(), "a follow stream stays open");
        m.begin_shutdown();
        let bytes = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the stream ended at shutdown")
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.lines().count(), 1, "only VM a's event: {text}");
    }

    /// The document is public on TCP, with no token or a wrong one, and a wrong one sent with
    /// it does not count against the address.
    #[tokio::test]
    async fn the_document_needs_no_token_and_wrong_ones_sent_with_it_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manager::for_tests(dir.path(), Default::default()).await;
        let tokens = Arc::new(TokenStore::new(&dir.path().join("tokens")));
        let (viewer, _) = tokens.create(Role::Viewer, Some("v")).unwrap();
        let app = router_with(m, Some(tokens));
        let tcp = Peer {
            uid: None,
            remote: Some(([127, 0, 0, 1], 40000).into()),
        };
        let get = |uri: &'static str, token: Option<String>| {
            let app = app.clone();
            let tcp = tcp.clone();
            async move {
                let mut b = axum::http::Request::builder().uri(uri);
                if let Some(t) = token {
                    b = b.header("authorization", format!("Bearer {t}"));
                }
                let mut req = b.body(axum::body::Body::empty()).unwrap();
                req.extensions_mut().insert(axum::extract::ConnectInfo(tcp));
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status();
                let bytes = axum::body::to_bytes(resp.into_body(), 4 << 20)
                    .await
                    .unwrap();
                (status, bytes)
            }
        };
        let (status, bytes) = get("/v1/openapi.json", None).await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for _ in 0..TOKEN_FAILURES + 2 {
            let (status, _) = get("/v1/openapi.json", Some("drv_wrong".into())).await;
            assert_eq!(status, StatusCode::OK);
        }
        let (status, _) = get("/v1/host", Some(viewer)).await;
        assert_eq!(status, StatusCode::OK, "the address was not blocked");
        let (status, _) = get("/v1/events", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "events need a token");
    }

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

    #[test]
    fn wrong_tokens_from_one_address_are_rate_limited() {
        let f = TokenFailures::default();
        let ip: std::net::IpAddr = [10, 0, 0, 9].into();
        for _ in 0..TOKEN_FAILURES {
            assert!(!f.blocked(ip));
            f.failed(ip);
        }
        assert!(f.blocked(ip));
        assert!(!f.blocked([10, 0, 0, 8].into()));
    }

    #[test]
    fn tcp_callers_need_a_known_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TokenStore::new(&dir.path().join("tokens")));
        let (t, _) = store.create(Role::Viewer, Some("ci")).unwrap();
        let code = |r: Result<Caller, Failure>| r.err().map(|f| f.0.code);
        assert_eq!(
            code(token_caller(Some(&store), None)),
            Some(ErrorCode::Unauthenticated)
        );
        assert_eq!(
            code(token_caller(Some(&store), Some("Basic eDp5"))),
            Some(ErrorCode::Unauthenticated)
        );
        assert_eq!(
            code(token_caller(Some(&store), Some("Bearer drv_wrong"))),
            Some(ErrorCode::Unauthenticated)
        );
        assert_eq!(
            code(token_caller(None, Some(&format!("Bearer {t}")))),
            Some(ErrorCode::Unauthenticated)
        );
        let c = token_caller(Some(&store), Some(&format!("Bearer {t}")))
            .ok()
            .unwrap();
        assert_eq!((c.name.as_str(), c.role), ("token ci", Some(Role::Viewer)));
        assert_eq!(ErrorCode::Unauthenticated.http_status(), 401);
    }
}
