//! The lease monitor: a worker that stops heartbeating loses its job. The job goes
//! back to the queue (attempt + 1 on the next claim) until `max_attempts`, then fails
//! as a system error; a job whose cancel was pending is simply cancelled.

use crate::app::AppState;
use crate::jobs::{self, TransitionEffects};
use crate::registry;
use loraforge_spec::JobStatus;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let period = (state.settings.lease / 4).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = expire_leases(&state).await {
            tracing::warn!(error = %e, "lease monitor pass failed");
        }
    }
}

/// One pass; returns how many jobs it took back.
pub async fn expire_leases(state: &AppState) -> Result<usize, sqlx::Error> {
    let expired: Vec<(Uuid, String, i32, i32)> = sqlx::query_as(
        "SELECT id, status, attempt, max_attempts FROM jobs
         WHERE lease_expires_at < now() AND status NOT IN ('queued', 'succeeded', 'failed', 'cancelled')",
    )
    .fetch_all(&state.pool)
    .await?;
    for (job_id, status, attempt, max_attempts) in &expired {
        // The worker may still be alive but cut off: make sure it stops.
        if let Err(e) = state.executor.stop(*job_id).await {
            tracing::warn!(%job_id, error = %e, "could not stop the worker of an expired lease");
        }
        let mut tx = state.pool.begin().await?;
        let message = format!("lease of attempt {attempt} expired");
        let released = TransitionEffects {
            error: None,
            release_lease: true,
        };
        if status == JobStatus::CancelRequested.as_str() {
            jobs::transition(
                &mut tx,
                *job_id,
                JobStatus::Cancelled,
                Some(&message),
                released,
            )
            .await?;
        } else if !jobs::retry_or_fail(
            &mut tx,
            *job_id,
            *attempt,
            *max_attempts,
            &message,
            state.settings.retry_backoff,
        )
        .await?
        {
            let prefixes = registry::fail_pending_version(&mut tx, *job_id).await?;
            tx.commit().await?;
            registry::delete_objects(&state.store, &prefixes).await;
            continue;
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(jobs::QUEUE_CHANNEL)
            .bind(job_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::warn!(%job_id, attempt, "lease expired");
    }
    Ok(expired.len())
}
