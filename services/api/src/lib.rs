//! The REST face of the control plane: axum routes over `loraforge-core`. Handlers check
//! the caller, parse the request, call one core operation and shape the answer; the rules
//! live in the core. Every error is `application/problem+json` ([`problem`]), and the
//! OpenAPI document is built from the same route list that serves ([`openapi`]).
//!
//! Users: `/v1/jobs…`, `/v1/adapters…`, `/v1/base-models…`, `/v1/datasets…`,
//! `/v1/webhooks…`, `/v1/safety-policy`; workers: `/v1/worker/jobs/{id}…`; probes:
//! `/healthz`, `/readyz`; `/metrics`, `/openapi.json`; the web UI at `/` (`web.rs`).

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
    let (router, _) = openapi::routes().split_for_parts();
    router
        .merge(web::routes())
        .fallback(|| async { ApiError::from(loraforge_core::Error::NotFound("route")) })
        .layer(axum::middleware::from_fn_with_state(http, metrics::track))
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
        return ApiError::malformed("NUL characters (%00) are not accepted").into_response();
    }
    next.run(req).await
}
