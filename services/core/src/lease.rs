//! The lease monitor: a worker that stops heartbeating loses its job. Its executor is
//! told to stop it (it may be alive but cut off), and the attempt is settled as
//! [`Outcome::LeaseExpired`]: back to the queue while attempts remain, else failed; a job
//! whose cancel was pending is simply cancelled.

use crate::jobs::attempts::{self, Outcome};
use crate::Context;
use loraforge_spec::JobStatus;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub async fn run(ctx: Context, mut stop: watch::Receiver<bool>) {
    let period = (ctx.settings.lease / 4).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = expire_leases(&ctx).await {
            tracing::warn!(error = %e, "lease monitor pass failed");
        }
    }
}

/// One pass; returns how many attempts it ended.
pub async fn expire_leases(ctx: &Context) -> Result<usize, sqlx::Error> {
    let expired: Vec<(Uuid, i32)> = sqlx::query!(
        "SELECT id, attempt FROM jobs WHERE lease_expires_at < now() AND status <> ALL($1)",
        &JobStatus::FINAL[..] as &[&str],
    )
    .fetch_all(&ctx.pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r.attempt))
    .collect();
    for (job_id, attempt) in &expired {
        if let Err(e) = ctx.executor.stop(*job_id).await {
            tracing::warn!(%job_id, error = %e, "could not stop the worker of an expired lease");
        }
        attempts::settle_now(ctx, *job_id, *attempt, Outcome::LeaseExpired).await?;
        tracing::warn!(%job_id, attempt, "lease expired");
    }
    if !expired.is_empty() {
        ctx.metrics.observe_queue(&ctx.pool).await?;
    }
    Ok(expired.len())
}
