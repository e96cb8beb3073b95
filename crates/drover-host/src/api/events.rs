//! `/v1/events`: VM, state and migration events as NDJSON, recent ones or a live stream.

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use drover_api::{ApiError, ErrorCode};
use futures_util::StreamExt as _;
use serde::Deserialize;

use super::extract::{Who, Q};
use super::gate::{need, Failure};

/// `GET /v1/events?follow=&vm=&since=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
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
pub(super) async fn events(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::router;
    use crate::api::tests::{local_get, ndjson_lines};
    use axum::http::StatusCode;
    use std::time::Duration;
    use tower::ServiceExt as _;

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
}
