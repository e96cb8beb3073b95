//! The door every API route goes through: who the caller is (the unix peer's uid, or on TCP a
//! bearer token, rate-limited per address), what each route needs of it ([`route_rule`]), and
//! the error answer ([`Failure`]) that every refusal and failed call becomes.

use crate::auth::{bearer, Caller, Permission, TokenStore};
use crate::error::HostError;
use crate::manager::Manager;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_api::{ApiError, ErrorCode};
use std::sync::Arc;
use std::time::Duration;

use super::extract::Who;

/// Who is on the other end of an API connection: a local process (unix socket peer
/// credentials) or a TCP client (which must then bring a bearer token).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The peer's uid, when the unix socket reports it.
    pub uid: Option<u32>,
    /// The TCP client's address; set for every connection that came in over TCP (TLS).
    pub remote: Option<std::net::SocketAddr>,
}

/// The caller [`gate`] resolved, for the handlers after it.
#[derive(Clone)]
pub(super) struct Resolved(pub(super) Caller);

/// Wrong tokens per TCP address: past [`TOKEN_FAILURES`] in [`TOKEN_WINDOW`], the address is
/// refused (429) without looking at its tokens until the window has passed.
pub(super) const TOKEN_FAILURES: u32 = 10;
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
pub(super) fn resolve_caller(
    parts: &axum::http::request::Parts,
    m: &Manager,
) -> Result<Caller, Failure> {
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
pub(super) const INCOMING_BODY: usize = 64 << 20;

/// What a route needs of its caller, and the largest body it takes. Checked by [`gate`] before
/// any byte of the body is read; handlers and the manager check finer rules after.
pub(super) fn route_rule(method: &axum::http::Method, route: &str) -> (Permission, usize) {
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
pub(super) async fn gate(
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
pub(super) fn need(who: &Who, p: Permission) -> Result<(), Failure> {
    who.0.require(p).map_err(Failure::from)
}

/// An error answer.
pub struct Failure(pub(super) ApiError);

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

pub(super) type Res<T> = Result<Json<T>, Failure>;

/// Routes anyone who reaches the API may read, with or without a token (a token is not even
/// looked at, so a wrong one is not counted against its address). The document is the same
/// for every droverd of a version and says nothing about the host.
pub(super) const PUBLIC_ROUTES: [&str; 1] = ["/v1/openapi.json"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

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
