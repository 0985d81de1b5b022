//! The scheduler loop: claims queued jobs while the executor has free slots and hands
//! them over; acts on what the executor reports (settles attempts whose workers exited,
//! keeps the lease of those waiting to start). Woken by NOTIFY on new work, by executor
//! reports, and by a polling fallback.

use crate::executor::{Observed, WorkerLaunch, WorkerReport};
use crate::jobs::attempts::{self, Outcome};
use crate::jobs::{self, QUEUE_CHANNEL};
use crate::notify::Subscription;
use crate::Context;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

pub async fn run(
    ctx: Context,
    mut reports: mpsc::UnboundedReceiver<WorkerReport>,
    mut stop: watch::Receiver<bool>,
) {
    // Notifications only wake us sooner; a lost one costs at most a poll interval.
    let mut wake_ups = Subscription::new(ctx.pool.clone(), QUEUE_CHANNEL);
    loop {
        if let Err(e) = fill_slots(&ctx).await {
            tracing::warn!(error = %e, "claiming jobs failed");
        }
        tokio::select! {
            _ = stop.changed() => break,
            Some(report) = reports.recv() => act_on(&ctx, report).await,
            _ = wake_ups.next() => {}
            _ = tokio::time::sleep(ctx.settings.poll_interval) => {}
        }
    }
}

/// Claims and launches while slots are free; then records what is left in the queue.
async fn fill_slots(ctx: &Context) -> Result<(), sqlx::Error> {
    while ctx.executor.free_slots() > 0 {
        let token = new_worker_token();
        let token_sha = Sha256::digest(token.as_bytes());
        let Some(claimed) = jobs::claim(&ctx.pool, ctx.settings.lease, &token_sha).await? else {
            break;
        };
        let launch = WorkerLaunch {
            job_id: claimed.job_id,
            attempt: claimed.attempt,
            project: claimed.project,
            spec: claimed.spec,
            api_url: ctx.worker_api_url.clone(),
            token,
        };
        if let Err(e) = ctx.executor.launch(launch).await {
            tracing::error!(job_id = %claimed.job_id, error = %e, "launch failed");
            let outcome = Outcome::LaunchFailed {
                message: e.to_string(),
            };
            attempts::settle_now(ctx, claimed.job_id, claimed.attempt, outcome).await?;
        }
    }
    ctx.metrics.observe_queue(&ctx.pool).await?;
    ctx.metrics
        .executor_free_slots
        .get_or_create(&vec![("executor", ctx.executor.name().to_string())])
        .set(ctx.executor.free_slots() as i64);
    Ok(())
}

async fn act_on(ctx: &Context, report: WorkerReport) {
    let WorkerReport {
        job_id, attempt, ..
    } = report;
    let done = match report.what {
        Observed::Exited(outcome) => attempts::settle_now(ctx, job_id, attempt, outcome)
            .await
            .map(drop),
        Observed::Waiting { event } => jobs::note_waiting(
            &ctx.pool,
            job_id,
            attempt,
            ctx.settings.lease,
            event.as_deref(),
        )
        .await
        .map(drop),
    };
    if let Err(e) = done {
        tracing::error!(%job_id, attempt, error = %e, "could not act on a worker report");
    }
}

/// 256 random bits, hex: the bearer token of one attempt's worker.
fn new_worker_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
