//! The host's own routes: `/v1/host`, `/metrics` (Prometheus) and `/v1/openapi.json` (this
//! API's document, the one route that needs no caller).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::extract::Who;
use super::gate::{need, Failure, Res};
use super::openapi;

#[utoipa::path(
    get,
    path = "/v1/host",
    tag = "host",
    summary = "The host: accelerator, QEMU, resources",
    responses(
        (status = 200, description = "Done", body = drover_api::HostInfo),
    ),
)]
pub(super) async fn host(State(m): State<Manager>, who: Who) -> Res<drover_api::HostInfo> {
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
pub(super) async fn metrics(State(m): State<Manager>, who: Who) -> Result<Response, Failure> {
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
    path = "/v1/openapi.json",
    tag = "host",
    summary = "This document (OpenAPI 3.1)",
    responses((status = 200, description = "The document", body = Object)),
)]
pub(super) async fn openapi_json() -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{router_with, Peer};
    use crate::auth::{Caller, Role, TokenStore};
    use axum::http::StatusCode;
    use axum::Router;
    use std::sync::Arc;
    use tower::ServiceExt as _;

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
}
