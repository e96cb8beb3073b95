//! The extractors handlers take: the caller ([`Who`]), and a query string or JSON body whose
//! parse errors are `invalid_argument` answers rather than axum's plain-text ones.

use crate::manager::Manager;
use axum::extract::Query;
use axum::http::StatusCode;
use drover_api::{ApiError, ErrorCode};

use super::gate::{resolve_caller, Failure, Resolved};
use crate::auth::Caller;

/// The request's caller, resolved to a role.
pub struct Who(pub Caller);

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

/// A query string whose parse errors become `invalid_argument` answers (as the document says),
/// not axum's plain-text ones.
pub struct Q<T>(pub(super) T);

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
pub struct Body<T>(pub(super) T);

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
