//! The job queue and lifecycle. Every status change goes through [`transition`],
//! which enforces `JobStatus::can_become` in SQL and records a status event in the
//! same transaction, so the event log and the job row never disagree.

use crate::webhooks;
use chrono::{DateTime, Utc};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{ErrorKind, JobSpec, JobStatus};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// NOTIFY channel that wakes the scheduler when work arrives.
pub const QUEUE_CHANNEL: &str = "loraforge_jobs";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub project: String,
    pub adapter_name: String,
    pub spec: Json<JobSpec>,
    pub status: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub adapter_version: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub parent_adapter: Option<String>,
    pub parent_version: Option<i32>,
    pub safety_policy: Option<Json<loraforge_spec::safety::EffectivePolicy>>,
}

/// The columns of [`JobRow`], as a literal so queries stay static strings.
macro_rules! job_columns {
    () => {
        "id, project, adapter_name, spec, status, error_kind, error_message, attempt, \
         max_attempts, adapter_version, created_at, updated_at, started_at, finished_at, parent_adapter, parent_version, safety_policy"
    };
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        self.status.parse().unwrap_or(JobStatus::Failed)
    }
}

/// A job as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub project: String,
    pub adapter_name: String,
    pub status: JobStatus,
    pub error: Option<JobErrorView>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub adapter_version: Option<AdapterVersionRef>,
    pub spec: JobSpec,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobErrorView {
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdapterVersionRef {
    pub name: String,
    pub version: i32,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        let status = r.status();
        JobView {
            error: r.error_kind.map(|kind| JobErrorView {
                kind,
                message: r.error_message.unwrap_or_default(),
            }),
            adapter_version: r.adapter_version.map(|version| AdapterVersionRef {
                name: r.adapter_name.clone(),
                version,
            }),
            id: r.id,
            project: r.project,
            adapter_name: r.adapter_name,
            status,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            spec: r.spec.0,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

pub struct NewJob<'a> {
    pub project: &'a str,
    /// The spec with registered names resolved to URIs.
    pub spec: &'a JobSpec,
    pub base_model_name: Option<&'a str>,
    pub dataset_name: Option<&'a str>,
    pub parent: Option<(&'a str, i32)>,
    /// The safety policy fixed for this job at submission.
    pub safety: &'a loraforge_spec::safety::EffectivePolicy,
    pub idempotency_key: Option<&'a str>,
    pub request_sha256: &'a [u8],
    pub max_attempts: i32,
}

pub enum Submitted {
    Created(JobRow),
    /// Same Idempotency-Key, same body: the job created the first time.
    Replayed(JobRow),
    /// Same Idempotency-Key, different body.
    KeyReused,
}

/// Inserts a validated job as `queued`, with its first event and a queue wake-up,
/// in one transaction; honours the Idempotency-Key.
pub async fn submit(pool: &PgPool, new: NewJob<'_>) -> Result<Submitted, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id = Uuid::new_v4();
    let inserted: Option<JobRow> = sqlx::query_as(concat!(
        "INSERT INTO jobs (id, project, adapter_name, spec, status, idempotency_key, request_sha256, max_attempts,
                           base_model_name, dataset_name, parent_adapter, parent_version, safety_policy)
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (project, idempotency_key) DO NOTHING
         RETURNING ",
        job_columns!()
    ))
    .bind(id)
    .bind(new.project)
    .bind(new.spec.adapter_name.as_str())
    .bind(Json(new.spec))
    .bind(new.idempotency_key)
    .bind(new.request_sha256)
    .bind(new.max_attempts)
    .bind(new.base_model_name)
    .bind(new.dataset_name)
    .bind(new.parent.map(|p| p.0))
    .bind(new.parent.map(|p| p.1))
    .bind(Json(new.safety))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = inserted else {
        tx.rollback().await?;
        let (existing, sha): (Uuid, Vec<u8>) = sqlx::query_as(
            "SELECT id, request_sha256 FROM jobs WHERE project = $1 AND idempotency_key = $2",
        )
        .bind(new.project)
        .bind(new.idempotency_key)
        .fetch_one(pool)
        .await?;
        if sha != new.request_sha256 {
            return Ok(Submitted::KeyReused);
        }
        let row = get(pool, new.project, existing)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        return Ok(Submitted::Replayed(row));
    };
    record_event(
        &mut tx,
        id,
        &EventPayload::Status {
            status: JobStatus::Queued,
            message: None,
        },
    )
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(QUEUE_CHANNEL)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Submitted::Created(job))
}

pub async fn get(pool: &PgPool, project: &str, id: Uuid) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE project = $1 AND id = $2"
    ))
    .bind(project)
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn record_event(
    conn: &mut PgConnection,
    job_id: Uuid,
    event: &EventPayload,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO job_events (job_id, kind, payload) VALUES ($1, $2, $3)")
        .bind(job_id)
        .bind(event.kind())
        .bind(Json(event))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn record_events(
    pool: &PgPool,
    job_id: Uuid,
    events: &[EventPayload],
) -> Result<(), sqlx::Error> {
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    let payloads: Vec<Json<&EventPayload>> = events.iter().map(Json).collect();
    sqlx::query(
        "INSERT INTO job_events (job_id, kind, payload)
         SELECT $1, k, p FROM UNNEST($2::text[], $3::jsonb[]) AS t(k, p)",
    )
    .bind(job_id)
    .bind(kinds)
    .bind(payloads)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EventRow {
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    /// The event itself: `kind` and its fields (see the worker protocol).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub payload: Json<serde_json::Value>,
}

/// Events of a job after `after` (exclusive), oldest first.
pub async fn events(
    pool: &PgPool,
    job_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, created_at, payload FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(job_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// What else changes with a transition.
#[derive(Debug, Default)]
pub struct TransitionEffects<'a> {
    pub error: Option<(ErrorKind, &'a str)>,
    /// Hand the job back to the queue: drop the lease and the worker token.
    pub release_lease: bool,
}

/// Moves a job to `to` if the lifecycle allows it from its current status (checked in
/// the UPDATE itself, so concurrent transitions cannot both win). Returns false if not.
pub async fn transition(
    conn: &mut PgConnection,
    job_id: Uuid,
    to: JobStatus,
    message: Option<&str>,
    effects: TransitionEffects<'_>,
) -> Result<bool, sqlx::Error> {
    let from: Vec<&str> = JobStatus::ALL
        .iter()
        .filter(|s| s.can_become(to))
        .map(|s| s.as_str())
        .collect();
    let (error_kind, error_message) = match effects.error {
        Some((k, m)) => (Some(k.as_str()), Some(m)),
        None => (None, None),
    };
    let updated: Option<(String, String)> = sqlx::query_as(
        "UPDATE jobs SET status = $2, updated_at = now(),
                error_kind = COALESCE($4, error_kind), error_message = COALESCE($5, error_message),
                started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now()) ELSE started_at END,
                finished_at = CASE WHEN $2 IN ('succeeded', 'failed', 'cancelled') THEN now() ELSE finished_at END,
                lease_expires_at = CASE WHEN $6 OR $2 IN ('succeeded', 'failed', 'cancelled') THEN NULL
                                        ELSE lease_expires_at END,
                worker_token_sha256 = CASE WHEN $6 OR $2 IN ('succeeded', 'failed', 'cancelled') THEN NULL
                                           ELSE worker_token_sha256 END
         WHERE id = $1 AND status = ANY($3)
         RETURNING project, adapter_name",
    )
    .bind(job_id)
    .bind(to.as_str())
    .bind(&from)
    .bind(error_kind)
    .bind(error_message)
    .bind(effects.release_lease)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((project, adapter_name)) = updated else {
        return Ok(false);
    };
    let message = message.or(error_message).map(str::to_string);
    record_event(
        conn,
        job_id,
        &EventPayload::Status {
            status: to,
            message,
        },
    )
    .await?;
    let hook = match to {
        JobStatus::Succeeded => Some(webhooks::JOB_SUCCEEDED),
        JobStatus::Failed => Some(webhooks::JOB_FAILED),
        _ => None,
    };
    if let Some(event) = hook {
        let data = serde_json::json!({
            "job_id": job_id, "adapter_name": adapter_name, "status": to,
            "error": effects.error.map(|(kind, message)| serde_json::json!({"kind": kind, "message": message})),
        });
        webhooks::enqueue(conn, &project, event, data).await?;
    }
    Ok(true)
}

/// A job claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job_id: Uuid,
    pub attempt: i32,
}

/// Claims the next queued job (priority, then age) as a lease: a short transaction
/// with `FOR UPDATE SKIP LOCKED`, never one held while the job runs.
pub async fn claim(
    pool: &PgPool,
    lease: Duration,
    token_sha256: &[u8],
) -> Result<Option<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(Uuid, i32)> = sqlx::query_as(
        "UPDATE jobs SET status = 'scheduled', attempt = attempt + 1, updated_at = now(),
                lease_expires_at = now() + make_interval(secs => $1), worker_token_sha256 = $2
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
                     ORDER BY priority DESC, created_at, id
                     FOR UPDATE SKIP LOCKED LIMIT 1)
         RETURNING id, attempt",
    )
    .bind(lease.as_secs_f64())
    .bind(token_sha256)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((job_id, attempt)) = claimed else {
        tx.rollback().await?;
        return Ok(None);
    };
    let message = format!("attempt {attempt}");
    record_event(
        &mut tx,
        job_id,
        &EventPayload::Status {
            status: JobStatus::Scheduled,
            message: Some(message),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Claimed { job_id, attempt }))
}

/// The job a worker token belongs to, if the token is current and the job unfinished.
pub async fn authenticate_worker(
    pool: &PgPool,
    job_id: Uuid,
    token_sha256: &[u8],
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE id = $1 AND worker_token_sha256 = $2
           AND status NOT IN ('succeeded', 'failed', 'cancelled')"
    ))
    .bind(job_id)
    .bind(token_sha256)
    .fetch_optional(pool)
    .await
}

/// Extends the lease; returns the job's status after the heartbeat.
pub async fn heartbeat(
    pool: &PgPool,
    job_id: Uuid,
    lease: Duration,
) -> Result<Option<JobStatus>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $2)
         WHERE id = $1 AND lease_expires_at IS NOT NULL RETURNING status",
    )
    .bind(job_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(status.and_then(|s| s.parse().ok()))
}

/// How a worker process ended, as an executor saw it.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub job_id: Uuid,
    pub attempt: i32,
    pub success: bool,
    /// Exit code or signal, and the end of the worker's log.
    pub description: String,
}

/// Settles a job whose worker is gone. A worker that reported its own outcome has
/// already moved the job on, and this does nothing; otherwise a cancel becomes
/// `cancelled` and anything else a system error, retried while attempts remain.
/// Returns the storage prefixes of versions that failed with it, whose objects should go.
pub async fn worker_exited(
    pool: &PgPool,
    exit: &WorkerExit,
    backoff: Duration,
) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let status: Option<(String, i32, i32)> =
        sqlx::query_as("SELECT status, attempt, max_attempts FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(exit.job_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, attempt, max_attempts)) = status else {
        return Ok(Vec::new());
    };
    let status: JobStatus = status.parse().unwrap_or(JobStatus::Failed);
    if attempt != exit.attempt || status.is_final() || status == JobStatus::Queued {
        return Ok(Vec::new());
    }
    if status == JobStatus::CancelRequested {
        transition(
            &mut tx,
            exit.job_id,
            JobStatus::Cancelled,
            Some("worker stopped"),
            TransitionEffects::default(),
        )
        .await?;
    } else {
        let message = format!(
            "worker exited before reporting a result: {}",
            exit.description
        );
        if retry_or_fail(
            &mut tx,
            exit.job_id,
            attempt,
            max_attempts,
            &message,
            backoff,
        )
        .await?
        {
            tx.commit().await?;
            return Ok(Vec::new());
        }
    }
    let prefixes = crate::registry::fail_pending_version(&mut tx, exit.job_id).await?;
    tx.commit().await?;
    Ok(prefixes)
}

/// After a system error: back to the queue, claimable after an exponential backoff,
/// while attempts remain (returns true); else `failed{system_error}` (returns false).
/// A pending version stays reserved for the next attempt, which re-uploads its files.
pub async fn retry_or_fail(
    conn: &mut PgConnection,
    job_id: Uuid,
    attempt: i32,
    max_attempts: i32,
    message: &str,
    backoff: Duration,
) -> Result<bool, sqlx::Error> {
    if attempt < max_attempts {
        let delay = backoff.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(16));
        let note = format!("attempt {attempt} failed, retrying in {delay:.1}s: {message}");
        let effects = TransitionEffects {
            error: None,
            release_lease: true,
        };
        if transition(conn, job_id, JobStatus::Queued, Some(&note), effects).await? {
            sqlx::query(
                "UPDATE jobs SET not_before = now() + make_interval(secs => $2) WHERE id = $1",
            )
            .bind(job_id)
            .bind(delay)
            .execute(&mut *conn)
            .await?;
            return Ok(true);
        }
        return Ok(false);
    }
    let message = format!("{message} (attempt {attempt} of {max_attempts}; no attempts left)");
    let effects = TransitionEffects {
        error: Some((ErrorKind::SystemError, &message)),
        release_lease: true,
    };
    transition(conn, job_id, JobStatus::Failed, None, effects).await?;
    Ok(false)
}
