//! Tests of the whole router: the door before any handler, the routes against the document,
//! and the helpers the features' own tests share.

use super::gate::TOKEN_FAILURES;
use super::*;
use crate::auth::Caller;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicBool, Ordering};
use tower::ServiceExt as _;

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
    let err = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, String::from_utf8_lossy(&bytes)));
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

/// A GET of `uri` from local uid `uid`.
pub(super) fn local_get(uid: u32, uri: &str) -> axum::http::Request<axum::body::Body> {
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
pub(super) fn ndjson_lines<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
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
    // The module root and every file of its tree as they are in the source (so a file added
    // later is read too), each up to its tests; this file is all tests.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut files = vec![std::path::PathBuf::from(format!("{root}.rs"))];
    files.extend(
        std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs")),
    );
    let routed: usize = files
        .iter()
        .map(|f| {
            let src = std::fs::read_to_string(f).unwrap();
            // Up to an inline test module (api.rs's `mod tests;` names this file).
            let code = &src[..src.find("#[cfg(test)]\nmod tests {").unwrap_or(src.len())];
            code.matches(concat!(".route", "(")).count()
        })
        .sum();
    assert_eq!(
        routed,
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
