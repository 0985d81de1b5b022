//! How an attempt ends. Every path that ends one (the worker's own report, its process
//! exiting, a lost lease, a failed launch, a rejected publish, and what a cluster executor
//! observes) names an [`Outcome`] and calls [`settle`]; this module alone decides between
//! cancelling, requeueing with backoff and failing for good, and what is cleaned up.

use super::{transition, wake_scheduler, TransitionEffects};
use crate::registry;
use crate::Context;
use loraforge_spec::{ErrorKind, JobStatus};
use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

/// Why an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The worker reported a failure itself (`POST fail`).
    WorkerFailed { kind: ErrorKind, message: String },
    /// The worker's process ended without reporting a result.
    WorkerExited { description: String },
    /// The worker stopped heartbeating.
    LeaseExpired,
    /// The executor could not start the worker.
    LaunchFailed { message: String },
    /// The files the worker published failed verification: it broke the protocol or the
    /// store lost data. Not retried: another attempt of the same worker would do the same.
    PublishRejected { reason: String },
    /// The machine under the worker failed it: its image could not be pulled or its
    /// config was refused, its node was lost, it was evicted or preempted, or its worker
    /// vanished. Retried; the next attempt resumes from the newest checkpoint.
    Infrastructure { message: String },
    /// The worker ran out of a limit it was given (memory, GPU memory). Not retried: the
    /// same job would run out again; the message names the limit and what to change.
    ResourceExhausted { message: String },
    /// The attempt outlived `training.max_duration`. The user's limit: not retried.
    DeadlineExceeded { message: String },
}

/// What an outcome calls for, attempts permitting.
enum Verdict {
    /// A system error: worth another attempt while any remain.
    Retry(String),
    /// Final whatever the attempts left.
    Fail(ErrorKind, String),
}

impl Outcome {
    fn verdict(&self, attempt: i32) -> Verdict {
        match self {
            Outcome::WorkerFailed {
                kind: ErrorKind::SystemError,
                message,
            } => Verdict::Retry(message.clone()),
            Outcome::WorkerFailed { kind, message } => Verdict::Fail(*kind, message.clone()),
            Outcome::WorkerExited { description } => Verdict::Retry(format!(
                "worker exited before reporting a result: {description}"
            )),
            Outcome::LeaseExpired => Verdict::Retry(format!("lease of attempt {attempt} expired")),
            Outcome::LaunchFailed { message } => {
                Verdict::Retry(format!("could not start the worker: {message}"))
            }
            Outcome::PublishRejected { reason } => Verdict::Fail(
                ErrorKind::SystemError,
                format!("published files failed verification: {reason}"),
            ),
            Outcome::Infrastructure { message } => Verdict::Retry(message.clone()),
            Outcome::ResourceExhausted { message } => {
                Verdict::Fail(ErrorKind::ResourceExhausted, message.clone())
            }
            // Final, as a user error is (the same job would run out of time again), but a
            // kind of its own, so clients can tell it apart (the CLI exits 7 and suggests
            // raising `training.max_duration`).
            Outcome::DeadlineExceeded { message } => {
                Verdict::Fail(ErrorKind::DeadlineExceeded, message.clone())
            }
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::WorkerFailed { .. } => "worker_failed",
            Outcome::WorkerExited { .. } => "worker_exited",
            Outcome::LeaseExpired => "lease_expired",
            Outcome::LaunchFailed { .. } => "launch_failed",
            Outcome::PublishRejected { .. } => "publish_rejected",
            Outcome::Infrastructure { .. } => "infrastructure",
            Outcome::ResourceExhausted { .. } => "resource_exhausted",
            Outcome::DeadlineExceeded { .. } => "deadline_exceeded",
        }
    }
}

/// What [`settle`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// Nothing: the attempt was already over (another path settled it, or a newer attempt
    /// owns the job).
    Stale,
    /// The user had asked to cancel; the job is `cancelled`.
    Cancelled,
    /// Back in the queue, claimable after `delay`; a pending version stays reserved for
    /// the next attempt, which uploads its files again.
    Requeued { delay: Duration },
    /// `failed` for good.
    Failed(ErrorKind),
}

/// The decision and the storage folders to delete once its transaction has committed.
#[must_use = "commit, then clean_up"]
pub struct Settlement {
    pub settled: Settled,
    orphaned_prefixes: Vec<String>,
}

impl Settlement {
    /// After the commit: deletes the objects of versions that failed with the job (best
    /// effort; what is left behind, `loraforge gc` finds).
    pub async fn clean_up(self, store: &loraforge_storage::Store) -> Settled {
        registry::delete_objects(store, &self.orphaned_prefixes).await;
        self.settled
    }
}

/// Ends attempt `attempt` of a job with `outcome`, inside the caller's transaction.
pub async fn settle(
    conn: &mut PgConnection,
    job_id: Uuid,
    attempt: i32,
    outcome: &Outcome,
    backoff: Duration,
) -> Result<Settlement, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT status AS "status: JobStatus", attempt, max_attempts FROM jobs WHERE id = $1 FOR UPDATE"#,
        job_id,
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| (r.status, r.attempt, r.max_attempts));
    let stale = Settlement {
        settled: Settled::Stale,
        orphaned_prefixes: Vec::new(),
    };
    let Some((status, current, max_attempts)) = row else {
        return Ok(stale);
    };
    if current != attempt || status.is_final() || status == JobStatus::Queued {
        return Ok(stale);
    }
    let released = |error| TransitionEffects {
        error,
        release_lease: true,
    };
    let settled = if status == JobStatus::CancelRequested {
        let note = format!("worker stopped ({})", outcome.label().replace('_', " "));
        transition(
            conn,
            job_id,
            JobStatus::Cancelled,
            Some(&note),
            released(None),
        )
        .await?;
        Settled::Cancelled
    } else {
        match outcome.verdict(attempt) {
            Verdict::Retry(message) if attempt < max_attempts => {
                let delay = backoff.mul_f64(2f64.powi(attempt.saturating_sub(1).min(16)));
                let note = format!(
                    "attempt {attempt} failed, retrying in {:.1}s: {message}",
                    delay.as_secs_f64()
                );
                if !transition(conn, job_id, JobStatus::Queued, Some(&note), released(None)).await?
                {
                    return Ok(stale);
                }
                sqlx::query!(
                    "UPDATE jobs SET not_before = now() + make_interval(secs => $2) WHERE id = $1",
                    job_id,
                    delay.as_secs_f64(),
                )
                .execute(&mut *conn)
                .await?;
                wake_scheduler(conn, job_id).await?;
                return Ok(Settlement {
                    settled: Settled::Requeued { delay },
                    orphaned_prefixes: Vec::new(),
                });
            }
            Verdict::Retry(message) => {
                let message =
                    format!("{message} (attempt {attempt} of {max_attempts}; no attempts left)");
                let error = Some((ErrorKind::SystemError, message.as_str()));
                transition(conn, job_id, JobStatus::Failed, None, released(error)).await?;
                Settled::Failed(ErrorKind::SystemError)
            }
            Verdict::Fail(kind, message) => {
                let error = Some((kind, message.as_str()));
                transition(conn, job_id, JobStatus::Failed, None, released(error)).await?;
                Settled::Failed(kind)
            }
        }
    };
    let orphaned_prefixes = registry::publish::fail_pending_version(conn, job_id).await?;
    Ok(Settlement {
        settled,
        orphaned_prefixes,
    })
}

/// [`settle`] in a transaction of its own, committed, then cleaned up and counted.
pub async fn settle_now(
    ctx: &Context,
    job_id: Uuid,
    attempt: i32,
    outcome: Outcome,
) -> Result<Settled, sqlx::Error> {
    let mut tx = ctx.pool.begin().await?;
    let settlement = settle(
        &mut tx,
        job_id,
        attempt,
        &outcome,
        ctx.settings.retry_backoff,
    )
    .await?;
    tx.commit().await?;
    let settled = settlement.clean_up(&ctx.store).await;
    ctx.metrics.attempt_settled(&outcome, &settled);
    if settled != Settled::Stale {
        tracing::info!(%job_id, attempt, outcome = outcome.label(), ?settled, "attempt settled");
        if !matches!(settled, Settled::Requeued { .. }) {
            ctx.metrics.training.forget(job_id);
        }
    }
    Ok(settled)
}
