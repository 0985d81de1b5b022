//! An OpenAI-compatible face of the fine-tuning API, so that scripts written for the `openai`
//! SDK work by changing the base URL: `/v1/files` (a file is a registered dataset) and
//! `/v1/fine_tuning/jobs…` (a job is one of ours). Every operation maps onto the same core
//! functions the native routes call; what is OpenAI's here is the shapes: the objects, the
//! lists (`after`/`limit`, `has_more`), the ids (`file-…`, `ftjob-…`) and the error body
//! `{"error": {"message", "type", "param", "code"}}` (on these routes only).
//! docs/openai-api.md has the mapping table.

pub mod files;
pub mod jobs;

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::problem::{ApiError, Described};
use crate::ApiState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use loraforge_core::Error;
use loraforge_spec::{FieldError, SpecError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// OpenAI's error body.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiErrorBody)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiErrorDetail)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, or `server_error` for our failures.
    #[serde(rename = "type")]
    pub type_: String,
    /// The request field at fault, in OpenAI's names (`model`, `training_file`, …).
    pub param: Option<String>,
    /// The stable code the native API's problem documents carry (`validation_failed`,
    /// `not_found`, …); `invalid_api_key` for a missing or wrong key.
    pub code: Option<String>,
}

/// An error answered in OpenAI's shape. Request problems are 400 here (OpenAI's status for
/// them) where the native API says 422.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<Error> for OpenAiError {
    fn from(e: Error) -> Self {
        OpenAiError(e.into())
    }
}

impl From<SpecError> for OpenAiError {
    fn from(e: SpecError) -> Self {
        OpenAiError(e.into())
    }
}

impl From<sqlx::Error> for OpenAiError {
    fn from(e: sqlx::Error) -> Self {
        OpenAiError(e.into())
    }
}

impl OpenAiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        OpenAiError(ApiError::invalid(param, message))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let Described {
            status,
            code,
            detail,
            errors,
            ..
        } = self.0.describe();
        let status = match status {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        let message = if errors.is_empty() {
            detail
        } else {
            errors
                .iter()
                .map(|e| match e.field.as_str() {
                    "" => e.message.clone(),
                    field => format!("{field}: {}", e.message),
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message,
                type_: if status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                }
                .into(),
                param: errors
                    .first()
                    .map(|e| e.field.clone())
                    .filter(|f| !f.is_empty()),
                code: Some(if status == StatusCode::UNAUTHORIZED {
                    "invalid_api_key".into()
                } else {
                    code.into()
                }),
            },
        };
        (status, Json(body)).into_response()
    }
}

/// Renames the fields of a validation error (`dataset.train` -> `training_file`), leaving
/// other errors as they are.
pub(crate) fn rename_fields(e: OpenAiError, rename: impl Fn(&str) -> String) -> OpenAiError {
    match e.0 {
        ApiError::Core(Error::Invalid(mut spec)) => {
            for FieldError { field, .. } in &mut spec.errors {
                *field = rename(field);
            }
            OpenAiError(ApiError::Core(Error::Invalid(spec)))
        }
        other => OpenAiError(other),
    }
}

/// The caller, or an OpenAI-shaped 401/403.
pub struct OaCaller(pub Caller);

impl std::ops::Deref for OaCaller {
    type Target = Caller;
    fn deref(&self) -> &Caller {
        &self.0
    }
}

impl FromRequestParts<ApiState> for OaCaller {
    type Rejection = OpenAiError;
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, OpenAiError> {
        Ok(OaCaller(Caller::from_request_parts(parts, state).await?))
    }
}

/// A path parameter; one that names nothing is a 404.
pub struct OaPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for OaPath<T> {
    type Rejection = OpenAiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, OpenAiError> {
        Ok(OaPath(ApiPath::from_request_parts(parts, state).await?.0))
    }
}

/// Query parameters.
pub struct OaQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for OaQuery<T> {
    type Rejection = OpenAiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, OpenAiError> {
        Ok(OaQuery(ApiQuery::from_request_parts(parts, state).await?.0))
    }
}

/// A JSON body.
pub struct OaJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OaJson<T> {
    type Rejection = OpenAiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, OpenAiError> {
        Ok(OaJson(ApiJson::from_request(req, state).await?.0))
    }
}

/// One page of a list, as OpenAI's list endpoints answer: pass the last item's id as
/// `after` for the next page while `has_more`.
#[derive(Serialize)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

/// A list type of the OpenAPI document (`$name`, shown as `$schema`) for pages of `$item`.
macro_rules! list_type {
    ($name:ident, $schema:ident, $item:ty) => {
        /// A page of a list; pass `last_id` as `after` for the next while `has_more`.
        #[derive(serde::Serialize, utoipa::ToSchema)]
        #[schema(as = $schema)]
        pub struct $name {
            /// Always `list`.
            pub object: &'static str,
            pub data: Vec<$item>,
            pub has_more: bool,
            pub first_id: Option<String>,
            pub last_id: Option<String>,
        }

        impl From<$crate::routes::openai::ListPage<$item>> for $name {
            fn from(p: $crate::routes::openai::ListPage<$item>) -> Self {
                $name {
                    object: p.object,
                    data: p.data,
                    has_more: p.has_more,
                    first_id: p.first_id,
                    last_id: p.last_id,
                }
            }
        }
    };
}
pub(crate) use list_type;

/// Objects with an id, for [`ListPage`].
pub trait HasId {
    fn id(&self) -> &str;
}

impl<T: HasId> ListPage<T> {
    /// A page from up to `limit + 1` items fetched: the extra one only says there is more.
    pub fn of(mut items: Vec<T>, limit: usize) -> ListPage<T> {
        let has_more = items.len() > limit;
        items.truncate(limit);
        ListPage {
            object: "list",
            first_id: items.first().map(|i| i.id().to_string()),
            last_id: items.last().map(|i| i.id().to_string()),
            data: items,
            has_more,
        }
    }
}

/// The page size a `limit` parameter asks for, checked against `1..=max`.
pub(crate) fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<usize, OpenAiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(OpenAiError::invalid(
            "limit",
            format!("must be between 1 and {max}"),
        ));
    }
    Ok(limit as usize)
}

/// OpenAI's timestamps: Unix seconds.
pub(crate) fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// The error responses of these routes, for their OpenAPI entries.
pub mod errors {
    use super::ErrorBody;

    macro_rules! error_responses {
        ($($name:ident = $status:literal),* $(,)?) => {$(
            #[derive(utoipa::IntoResponses)]
            #[response(status = $status, description = "OpenAI-style error", content_type = "application/json")]
            pub struct $name(#[allow(dead_code)] ErrorBody);
        )*};
    }

    error_responses! {
        BadRequest = 400,
        Unauthorized = 401,
        NotFound = 404,
        Conflict = 409,
        TooLarge = 413,
    }
}
