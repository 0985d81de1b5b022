//! Prometheus metrics in the text exposition format, read from the database at scrape
//! time (so every replica reports the same truth): jobs by status, queue depth, retries,
//! ready versions, pending webhook deliveries, and this replica's free worker slots and
//! registry read-cache hits.

use crate::app::AppState;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;

pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(&state.pool)
            .await?;
    let (queued_ready, retried): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())),
                count(*) FILTER (WHERE attempt > 1)
         FROM jobs",
    )
    .fetch_one(&state.pool)
    .await?;
    let versions: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM adapter_versions GROUP BY status")
            .fetch_all(&state.pool)
            .await?;
    let pending_hooks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
            .fetch_one(&state.pool)
            .await?;
    let durations: Option<(f64, f64, i64)> = sqlx::query_as(
        "SELECT COALESCE(sum(extract(epoch FROM finished_at - created_at)), 0)::float8,
                COALESCE(max(extract(epoch FROM finished_at - created_at)), 0)::float8, count(*)
         FROM jobs WHERE status = 'succeeded'",
    )
    .fetch_optional(&state.pool)
    .await?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP loraforge_jobs Jobs by status.\n# TYPE loraforge_jobs gauge"
    );
    for (status, n) in &by_status {
        let _ = writeln!(out, "loraforge_jobs{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP loraforge_queue_depth Queued jobs claimable now.\n# TYPE loraforge_queue_depth gauge");
    let _ = writeln!(out, "loraforge_queue_depth {queued_ready}");
    let _ = writeln!(out, "# HELP loraforge_jobs_retried Jobs that needed more than one attempt.\n# TYPE loraforge_jobs_retried gauge");
    let _ = writeln!(out, "loraforge_jobs_retried {retried}");
    let _ = writeln!(out, "# HELP loraforge_adapter_versions Adapter versions by status.\n# TYPE loraforge_adapter_versions gauge");
    for (status, n) in &versions {
        let _ = writeln!(out, "loraforge_adapter_versions{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP loraforge_webhook_deliveries_pending Webhook deliveries not yet delivered.\n# TYPE loraforge_webhook_deliveries_pending gauge");
    let _ = writeln!(out, "loraforge_webhook_deliveries_pending {pending_hooks}");
    let (hits, misses) = state.read_cache.counts();
    let _ = writeln!(out, "# HELP loraforge_registry_cache_requests_total This replica's resolve and version reads, by whether the read cache answered.\n# TYPE loraforge_registry_cache_requests_total counter");
    let _ = writeln!(out, "loraforge_registry_cache_requests_total{{result=\"hit\"}} {hits}\nloraforge_registry_cache_requests_total{{result=\"miss\"}} {misses}");
    if let Some((sum, max, count)) = durations {
        let _ = writeln!(out, "# HELP loraforge_job_duration_seconds Submission to success of succeeded jobs.\n# TYPE loraforge_job_duration_seconds summary");
        let _ = writeln!(out, "loraforge_job_duration_seconds_sum {sum}\nloraforge_job_duration_seconds_count {count}");
        let _ = writeln!(out, "# HELP loraforge_job_duration_seconds_max Longest successful job.\n# TYPE loraforge_job_duration_seconds_max gauge");
        let _ = writeln!(out, "loraforge_job_duration_seconds_max {max}");
    }
    let _ = writeln!(out, "# HELP loraforge_executor_free_slots Workers this replica could still start.\n# TYPE loraforge_executor_free_slots gauge");
    let _ = writeln!(
        out,
        "loraforge_executor_free_slots{{executor=\"{}\"}} {}",
        state.executor.name(),
        state.executor.free_slots()
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
