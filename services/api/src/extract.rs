//! Request extractors that answer problem+json instead of axum's plain-text rejections.

use crate::problem::ApiError;
use crate::MAX_BODY_BYTES;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use loraforge_core::Error;
use serde::de::DeserializeOwned;

/// A raw body within the size limit; over it, a 413 problem.
pub struct ApiBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::Core(Error::TooLarge(format!(
                        "the request body is larger than {MAX_BODY_BYTES} bytes"
                    )))
                } else {
                    ApiError::malformed(e.body_text())
                }
            })
    }
}

/// A JSON body parsed with field paths in its errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        loraforge_spec::error::parse_json(&bytes)
            .map(ApiJson)
            .map_err(ApiError::from)
    }
}

/// Path parameters; a value that cannot name anything (a bad UUID) is simply not found.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|_| Error::NotFound("resource").into())
    }
}

/// Query parameters, with a problem+json answer naming what is wrong.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::invalid("query", e.body_text()))
    }
}

/// The bearer token of the `Authorization` header, if any.
pub fn bearer(parts: &axum::http::HeaderMap) -> Option<&str> {
    parts
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}
