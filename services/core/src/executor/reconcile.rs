//! Reconciling the executor's workers with the jobs table, at start and every
//! `LORAFORGE_RECONCILE_SECS`: a worker whose attempt is no longer current (or whose job is
//! finished or gone) is removed, and an attempt in flight whose worker vanished is settled
//! as [`Outcome::Infrastructure`]. Only executors that can list every worker (a cluster's)
//! take part; the others answer `None`.
//!
//! The order of reads makes it safe beside a scheduler that claims and launches meanwhile,
//! on this replica or another: the workers are listed first and the jobs read after, so
//! every listed worker's claim is already visible (a worker is launched only after its
//! claim commits); and an attempt is called vanished only if it was claimed well before
//! the listing began ([`LAUNCH_GRACE`]).

use super::{ExecutorError, WorkerRef};
use crate::jobs::attempts::{self, Outcome};

use crate::Context;
use loraforge_spec::JobStatus;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::watch;

/// How long a claimed attempt may go without a visible worker: launching takes seconds.
pub const LAUNCH_GRACE: Duration = Duration::from_secs(60);

pub async fn run(ctx: Context, mut stop: watch::Receiver<bool>) {
    loop {
        match reconcile(&ctx).await {
            Ok(Some(r)) if r.removed + r.vanished > 0 => {
                tracing::info!(
                    removed = r.removed,
                    vanished = r.vanished,
                    "reconciled workers"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconciling workers failed"),
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(ctx.settings.reconcile_interval) => {}
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Workers removed: their attempt is over.
    pub removed: usize,
    /// Attempts settled because their worker was gone.
    pub vanished: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// An attempt the jobs table says is in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub worker: WorkerRef,
    pub claimed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a pass will do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<WorkerRef>,
    pub vanished: Vec<WorkerRef>,
}

/// The decision, from the workers listed at `listed_at` and the attempts in flight read
/// after it. Only an executor that `sees_every_worker` may call an attempt's worker
/// vanished: another machine's worker is not in a local listing (its lease decides).
pub fn plan(
    workers: &[WorkerRef],
    in_flight: &[InFlight],
    listed_at: chrono::DateTime<chrono::Utc>,
    sees_every_worker: bool,
) -> Plan {
    let current: HashSet<WorkerRef> = in_flight.iter().map(|f| f.worker).collect();
    let seen: HashSet<WorkerRef> = workers.iter().copied().collect();
    let grace = chrono::Duration::from_std(LAUNCH_GRACE).unwrap_or(chrono::Duration::MAX);
    Plan {
        remove: workers
            .iter()
            .filter(|w| !current.contains(w))
            .copied()
            .collect(),
        vanished: in_flight
            .iter()
            .filter(|f| sees_every_worker && !seen.contains(&f.worker))
            .filter(|f| f.claimed_at.is_none_or(|t| t + grace < listed_at))
            .map(|f| f.worker)
            .collect(),
    }
}

/// One pass; `None` when the executor cannot list its workers.
pub async fn reconcile(ctx: &Context) -> Result<Option<Reconciled>, ReconcileError> {
    let listed_at = chrono::Utc::now();
    let Some(workers) = ctx.executor.workers().await? else {
        return Ok(None);
    };
    let in_flight = sqlx::query!(
        r#"SELECT id, attempt, attempt_started_at FROM jobs
           WHERE status <> ALL($1) AND status <> 'queued' AND attempt > 0"#,
        &JobStatus::FINAL[..] as &[&str],
    )
    .fetch_all(&ctx.pool)
    .await?;
    let in_flight: Vec<InFlight> = in_flight
        .into_iter()
        .map(|r| InFlight {
            worker: WorkerRef {
                job_id: r.id,
                attempt: r.attempt,
            },
            claimed_at: r.attempt_started_at,
        })
        .collect();
    let plan = plan(
        &workers,
        &in_flight,
        listed_at,
        ctx.executor.sees_every_worker(),
    );
    for worker in &plan.remove {
        tracing::info!(job_id = %worker.job_id, attempt = worker.attempt, "removing the worker of an attempt that is over");
        ctx.executor.remove(*worker).await?;
    }
    for worker in &plan.vanished {
        let outcome = Outcome::Infrastructure {
            message: format!(
                "the worker of attempt {} vanished (its {} resources are gone)",
                worker.attempt,
                ctx.executor.name()
            ),
        };
        let settled = attempts::settle_now(ctx, worker.job_id, worker.attempt, outcome).await?;
        tracing::warn!(job_id = %worker.job_id, attempt = worker.attempt, ?settled, "worker vanished");
    }
    let done = Reconciled {
        removed: plan.remove.len(),
        vanished: plan.vanished.len(),
    };
    Ok(Some(done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn w(attempt: i32, job: u128) -> WorkerRef {
        WorkerRef {
            job_id: Uuid::from_u128(job),
            attempt,
        }
    }

    #[test]
    fn stale_workers_go_and_vanished_attempts_are_found_after_the_grace() {
        let now = chrono::Utc::now();
        let long_ago = Some(now - chrono::Duration::minutes(10));
        let just_now = Some(now - chrono::Duration::seconds(5));
        let workers = [w(1, 1), w(2, 2), w(3, 3)];
        let in_flight = [
            // job 1: its worker runs: kept.
            InFlight {
                worker: w(1, 1),
                claimed_at: long_ago,
            },
            // job 2 moved on to attempt 3: the attempt-2 worker is stale.
            InFlight {
                worker: w(3, 2),
                claimed_at: just_now,
            },
            // job 4: claimed long ago, no worker: vanished.
            InFlight {
                worker: w(1, 4),
                claimed_at: long_ago,
            },
        ];
        // job 3 is finished (not in flight): its worker goes.
        let p = plan(&workers, &in_flight, now, true);
        assert_eq!(p.remove, vec![w(2, 2), w(3, 3)]);
        assert_eq!(
            p.vanished,
            vec![w(1, 4)],
            "attempt 3 of job 2 is within the launch grace"
        );
        // A local listing knows only this machine's workers: it removes, never vanishes.
        let p = plan(&workers, &in_flight, now, false);
        assert_eq!(p.remove, vec![w(2, 2), w(3, 3)]);
        assert!(p.vanished.is_empty());
    }
}
