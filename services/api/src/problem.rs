//! Errors as `application/problem+json` (RFC 9457) with a stable `code`: the one place
//! where the core's errors become HTTP. Server-side failures are logged with their cause
//! and answered opaquely.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use loraforge_core::Error;
use loraforge_spec::{FieldError, SpecError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Core(#[from] Error),
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
    /// A request that is not even well-formed (no field to blame).
    pub fn malformed(message: impl Into<String>) -> Self {
        let mut e = SpecError::one("", message);
        e.malformed = true;
        ApiError::Core(Error::Invalid(e))
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Core(Error::invalid(field, message))
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        let ApiError::Core(e) = self;
        match e {
            Error::Invalid(e) if e.malformed => (
                StatusCode::BAD_REQUEST,
                "malformed_body",
                "Malformed request body",
            ),
            Error::Invalid(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "Invalid request",
            ),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            Error::Conflict { code, .. } => (StatusCode::CONFLICT, code, "Conflict"),
            Error::Gone(_) => (StatusCode::GONE, "gone", "Gone"),
            Error::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "Request body too large",
            ),
            Error::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            e if e.is_unavailable() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            Error::Database(_) | Error::Storage(_) | Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::Core(Error::Invalid(e))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Core(Error::Database(e))
    }
}

/// What an error says, in either error shape (problem+json here, OpenAI's in `routes::openai`).
pub(crate) struct Described<'a> {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub errors: &'a [FieldError],
}

impl ApiError {
    /// Status, code and what to tell the client; server-side failures are logged here, with
    /// their cause, and described opaquely. Call once per answer.
    pub(crate) fn describe(&self) -> Described<'_> {
        let (status, code, title) = self.parts();
        let (detail, errors): (String, &[FieldError]) = match self {
            ApiError::Core(Error::Invalid(e)) => (e.to_string(), &e.errors),
            ApiError::Core(e) if status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(error = %e, "database unavailable");
                ("the database is unavailable; try again shortly".into(), &[])
            }
            ApiError::Core(e) if status == StatusCode::INTERNAL_SERVER_ERROR => {
                tracing::error!(error = %e, "internal error");
                (
                    "the server failed to handle the request; it has been logged".into(),
                    &[],
                )
            }
            other => (other.to_string(), &[]),
        };
        Described {
            status,
            code,
            title,
            detail,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Described {
            status,
            code,
            title,
            detail,
            errors,
        } = self.describe();
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

/// The problem answers, one type per status, so each route's OpenAPI entry names the
/// ones it can give: `responses((status = 200, body = X), problems::NotFound)`.
pub mod problems {
    use super::Problem;

    macro_rules! problem_responses {
        ($($name:ident = $status:literal),* $(,)?) => {$(
            #[derive(utoipa::IntoResponses)]
            #[response(status = $status, description = "problem", content_type = "application/problem+json")]
            pub struct $name(#[allow(dead_code)] Problem);
        )*};
    }

    problem_responses! {
        BadRequest = 400,
        Unauthorized = 401,
        NotFound = 404,
        Conflict = 409,
        Gone = 410,
        TooLarge = 413,
        Unprocessable = 422,
    }
}
