//! HTTP routes. Users: `/v1/jobs…`, `/v1/adapters…`; workers: `/v1/worker/jobs/{id}…`;
//! probes: `/healthz`, `/readyz`. Every error is `application/problem+json`.

use crate::app::AppState;
use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

mod adapters;
mod inputs;
mod jobs;
mod metrics;
pub mod openapi;
mod safety;
mod webhooks;
mod worker;

/// Bodies larger than this are refused before they are read.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/jobs", post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/jobs/{id}/events/stream", get(jobs::stream_events))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/adapters", get(adapters::list))
        .route("/v1/adapters/{name}/versions", get(adapters::versions))
        .route(
            "/v1/adapters/{name}/versions/{version}",
            get(adapters::version).delete(adapters::delete_version),
        )
        .route(
            "/v1/adapters/{name}/versions/{version}/lineage",
            get(adapters::lineage),
        )
        .route(
            "/v1/adapters/{name}/versions/{version}/descendants",
            get(adapters::descendants),
        )
        .route(
            "/v1/adapters/{name}/versions/{version}/files/{file}",
            get(adapters::download),
        )
        .route(
            "/v1/adapters/{name}/versions/{version}/files/{file}/url",
            get(adapters::presign),
        )
        .route(
            "/v1/adapters/{name}/versions/{version}/tags/{tag}",
            put(adapters::put_tag).delete(adapters::delete_tag),
        )
        .route(
            "/v1/adapters/{name}/aliases/{alias}",
            put(adapters::put_alias).delete(adapters::delete_alias),
        )
        .route("/v1/adapters/{name}/resolve", get(adapters::resolve))
        .route(
            "/v1/base-models",
            post(inputs::register_base_model).get(inputs::list_base_models),
        )
        .route("/v1/base-models/{name}", get(inputs::get_base_model))
        .route(
            "/v1/datasets",
            post(inputs::register_dataset).get(inputs::list_datasets),
        )
        .route("/v1/datasets/{name}", get(inputs::get_dataset))
        .route("/v1/safety-policy", get(safety::get).put(safety::put))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route("/v1/webhooks/{id}", axum::routing::delete(webhooks::delete))
        .route("/v1/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/v1/worker/jobs/{id}", get(worker::assignment))
        .route("/v1/worker/jobs/{id}/stage", post(worker::stage))
        .route("/v1/worker/jobs/{id}/events", post(worker::events))
        .route("/v1/worker/jobs/{id}/heartbeat", post(worker::heartbeat))
        .route(
            "/v1/worker/jobs/{id}/versions",
            post(worker::reserve_version),
        )
        .route("/v1/worker/jobs/{id}/complete", post(worker::complete))
        .route("/v1/worker/jobs/{id}/fail", post(worker::fail))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::registry::cache::evict_on_write,
        ))
        .layer(axum::middleware::from_fn(reject_nul_in_uri))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Postgres cannot hold NUL in text; a `%00` anywhere in the path or query is refused
/// here rather than failing deep inside a query.
async fn reject_nul_in_uri(req: Request, next: axum::middleware::Next) -> axum::response::Response {
    let uri = req.uri();
    let has_nul = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
    };
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return ApiError::Malformed(loraforge_spec::SpecError::one(
            "",
            "NUL characters (%00) are not accepted",
        ))
        .into_response();
    }
    next.run(req).await
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(ApiError::Unavailable)?;
    Ok("ready")
}

/// A raw body within the size limit; over it, a 413 problem (axum answers plain text).
pub struct ApiBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge(MAX_BODY_BYTES)
                } else {
                    ApiError::Malformed(loraforge_spec::SpecError::one("", e.body_text()))
                }
            })
    }
}

/// A JSON body parsed with field paths in its errors (axum's `Json` answers plain text).
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
            .map_err(|_| ApiError::NotFound("resource"))
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
            .map_err(|e| ApiError::validation("query", e.body_text()))
    }
}
