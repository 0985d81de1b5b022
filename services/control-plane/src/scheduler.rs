//! The scheduler loop: claims queued jobs while the executor has free slots and
//! hands them over; settles jobs whose workers exited. Woken by NOTIFY on new work,
//! by worker exits, and by a polling fallback.

use crate::app::AppState;
use crate::executor::WorkerLaunch;
use crate::jobs::{self, TransitionEffects, WorkerExit, QUEUE_CHANNEL};
use crate::registry;
use loraforge_spec::{ErrorKind, JobStatus};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};

pub async fn run(
    state: AppState,
    mut exits: mpsc::UnboundedReceiver<WorkerExit>,
    mut stop: watch::Receiver<bool>,
) {
    let mut listener = match listen(&state).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; the scheduler polls only");
            None
        }
    };
    loop {
        if let Err(e) = fill_slots(&state).await {
            tracing::warn!(error = format!("{e:#}"), "claiming jobs failed");
        }
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            Some(exit) = exits.recv() => settle_exit(&state, exit).await,
            result = notified => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                    listener = None;
                }
            }
            _ = tokio::time::sleep(state.settings.poll_interval) => {
                if listener.is_none() {
                    listener = listen(&state).await.ok();
                }
            }
        }
    }
}

async fn listen(state: &AppState) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(&state.pool).await?;
    listener.listen(QUEUE_CHANNEL).await?;
    Ok(listener)
}

async fn fill_slots(state: &AppState) -> anyhow::Result<()> {
    while state.executor.free_slots() > 0 {
        let token = new_worker_token();
        let token_sha = Sha256::digest(token.as_bytes());
        let Some(claimed) = jobs::claim(&state.pool, state.settings.lease, &token_sha).await?
        else {
            return Ok(());
        };
        let launch = WorkerLaunch {
            job_id: claimed.job_id,
            attempt: claimed.attempt,
            api_url: state.worker_api_url.clone(),
            token,
        };
        if let Err(e) = state.executor.launch(launch).await {
            let message = e.to_string();
            tracing::error!(job_id = %claimed.job_id, error = %message, "launch failed");
            let mut conn = state.pool.acquire().await?;
            let effects = TransitionEffects {
                error: Some((ErrorKind::SystemError, &message)),
                release_lease: true,
            };
            jobs::transition(&mut conn, claimed.job_id, JobStatus::Failed, None, effects).await?;
        }
    }
    Ok(())
}

async fn settle_exit(state: &AppState, exit: WorkerExit) {
    match jobs::worker_exited(&state.pool, &exit, state.settings.retry_backoff).await {
        Ok(prefixes) => registry::delete_objects(&state.store, &prefixes).await,
        Err(e) => {
            tracing::error!(job_id = %exit.job_id, error = %e, "could not settle a worker exit")
        }
    }
}

/// 256 random bits, hex: the bearer token of one attempt's worker.
fn new_worker_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
