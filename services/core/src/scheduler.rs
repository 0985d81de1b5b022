//! The scheduler loop: claims queued jobs while the executor has free slots and hands
//! them over; settles attempts whose workers exited. Woken by NOTIFY on new work, by
//! worker exits, and by a polling fallback.

use crate::executor::{WorkerExit, WorkerLaunch};
use crate::jobs::attempts::{self, Outcome};
use crate::jobs::{self, QUEUE_CHANNEL};
use crate::notify::Subscription;
use crate::Context;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

pub async fn run(
    ctx: Context,
    mut exits: mpsc::UnboundedReceiver<WorkerExit>,
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
            Some(exit) = exits.recv() => settle_exit(&ctx, exit).await,
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

async fn settle_exit(ctx: &Context, exit: WorkerExit) {
    if let Err(e) = attempts::settle_now(ctx, exit.job_id, exit.attempt, exit.outcome).await {
        tracing::error!(job_id = %exit.job_id, error = %e, "could not settle a worker exit");
    }
}

/// 256 random bits, hex: the bearer token of one attempt's worker.
fn new_worker_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
