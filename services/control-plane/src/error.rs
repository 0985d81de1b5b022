//! API errors, rendered as `application/problem+json` (RFC 9457) with a stable `code`.
//! Server-side failures are logged with their cause and answered opaquely.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use loraforge_spec::{FieldError, SpecError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("malformed request body: {0}")]
    Malformed(SpecError),
    /// The body is JSON but some fields are wrong.
    #[error("validation failed: {0}")]
    Validation(SpecError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("{0}")]
    Gone(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// An RFC 9457 problem document.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// Stable, machine-readable: `validation_failed`, `not_found`, `idempotency_key_reused`, …
    pub code: String,
    pub detail: String,
    /// The first offending field, when the problem is about the request's content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation(SpecError::one(field, message))
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Malformed(_) => (
                StatusCode::BAD_REQUEST,
                "malformed_body",
                "Malformed request body",
            ),
            ApiError::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "Invalid request",
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            ApiError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "Request body too large",
            ),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code, "Conflict"),
            ApiError::Gone(_) => (StatusCode::GONE, "gone", "Gone"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        if e.malformed {
            ApiError::Malformed(e)
        } else {
            ApiError::Validation(e)
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if database_unavailable(&e) {
            ApiError::Unavailable(e)
        } else {
            ApiError::Internal(e.into())
        }
    }
}

/// Errors that mean "Postgres is not there right now" rather than "this request broke":
/// no connection, or the server refusing or dropping connections (SQLSTATE classes 08
/// and 57P, and 55000 for a database not accepting connections).
pub fn database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "55000"),
        _ => false,
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let (detail, errors): (String, &[FieldError]) = match &self {
            ApiError::Malformed(e) | ApiError::Validation(e) => (e.to_string(), &e.errors),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                (
                    "the server failed to handle the request; it has been logged".into(),
                    &[],
                )
            }
            ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "database unavailable");
                ("the database is unavailable; try again shortly".into(), &[])
            }
            other => (other.to_string(), &[]),
        };
        let problem = Problem {
            type_: format!("urn:loraforge:problem:{code}"),
            title: title.into(),
            status: status.as_u16(),
            code: code.into(),
            detail,
            field: errors.first().map(|e| e.field.clone()),
            errors: errors.to_vec(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}
