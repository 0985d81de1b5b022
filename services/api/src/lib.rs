//! The REST face of the control plane: axum routes over `loraforge-core`. Handlers check
//! the caller, parse the request, call one core operation and shape the answer; the rules
//! live in the core. Every error is `application/problem+json` ([`problem`]), and the
//! OpenAPI document is built from the same route list that serves ([`openapi`]).
//!
//! Users: `/v1/me`, `/v1/keys…`, `/v1/jobs…`, `/v1/adapters…`, `/v1/base-models…`,
//! `/v1/datasets…`, `/v1/webhooks…`, `/v1/safety-policy`; OpenAI-compatible fine-tuning:
//! `/v1/files…`, `/v1/fine_tuning/jobs…` (`routes::openai`, with OpenAI's error body); workers:
//! `/v1/worker/jobs/{id}…`; probes: `/healthz`, `/readyz`; `/metrics`, `/openapi.json`; the web
//! UI at `/` (`web.rs`).

mod auth;
mod extract;
pub mod metrics;
pub mod openapi;
pub mod problem;
mod routes;
mod web;

pub use auth::Caller;
pub use problem::ApiError;

use axum::extract::Request;
use axum::response::IntoResponse;
use axum::Router;
use loraforge_core::Context;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// What every handler shares: the core's context and the metrics registry.
#[derive(Clone)]
pub struct ApiState {
    pub core: Context,
    pub registry: Arc<Registry>,
}

impl std::ops::Deref for ApiState {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.core
    }
}

/// Bodies larger than this are refused before they are read.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The whole API. `registry` must already hold the core's metrics; the HTTP request
/// metrics are added to it here.
pub fn router(core: Context, mut registry: Registry) -> Router {
    let http = metrics::HttpMetrics::new(&mut registry);
    let state = ApiState {
        core,
        registry: Arc::new(registry),
    };
    let request_timeout = state.settings.request_timeout;
    let (router, _) = openapi::routes().split_for_parts();
    router
        .merge(web::routes())
        .fallback(|| async { ApiError::from(loraforge_core::Error::NotFound("route")) })
        .layer(axum::middleware::from_fn_with_state(http, metrics::track))
        .layer(axum::middleware::from_fn(reject_nul_in_uri))
        .layer(axum::middleware::from_fn(close_after_refused_body))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// A request refused before its body was read (401, 413, …) leaves that body unread on the
/// connection, which then cannot carry another request: say so with `Connection: close`, so
/// keep-alive clients open a new one instead of seeing the old one fail.
async fn close_after_refused_body(
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let headers = req.headers();
    let has_body = headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let mut response = next.run(req).await;
    if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
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
        let refused = ApiError::malformed("NUL characters (%00) are not accepted");
        // The OpenAI-compatible routes answer in OpenAI's error shape, as their document says.
        let openai = ["/v1/files", "/v1/fine_tuning/"]
            .iter()
            .any(|p| uri.path().starts_with(p));
        return match openai {
            true => routes::openai::OpenAiError(refused).into_response(),
            false => refused.into_response(),
        };
    }
    next.run(req).await
}
