//! `/metrics`: the core's families (`loraforge_core::metrics`) and this face's own, HTTP
//! requests by route and status with their latency.

use crate::problem::ApiError;
use crate::ApiState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
}

impl HttpMetrics {
    pub fn new(registry: &mut Registry) -> Arc<HttpMetrics> {
        let m = HttpMetrics {
            requests: Family::default(),
            // 0.5 ms to about 16 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
        };
        let r = registry.sub_registry_with_prefix("loraforge_http");
        r.register(
            "requests",
            "HTTP requests by method, route (the matched pattern) and status.",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency by method and route, until the response head.",
            m.latency.clone(),
        );
        Arc::new(m)
    }
}

/// Middleware: counts and times every request by its route pattern (never the raw path,
/// whose ids would make a series per job).
pub async fn track(State(m): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16().to_string();
    m.latency
        .get_or_create(&vec![("method", method.clone()), ("route", route.clone())])
        .observe(seconds);
    m.requests
        .get_or_create(&vec![
            ("method", method),
            ("route", route),
            ("status", status),
        ])
        .inc();
    response
}

/// The Prometheus text exposition of every family.
pub async fn metrics(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    state.metrics.refresh_totals(&state.pool).await?;
    let mut text = String::new();
    encode(&mut text, &state.registry)
        .map_err(|e| loraforge_core::Error::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}
