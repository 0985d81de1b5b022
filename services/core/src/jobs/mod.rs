//! The job queue and lifecycle. Every status change goes through [`transition`],
//! which enforces `JobStatus::can_become` in SQL and records a status event in the
//! same transaction, so the event log and the job row never disagree. How an attempt
//! ends is decided in [`attempts`] alone; what a submission must satisfy, in [`submission`].

pub mod attempts;
pub mod submission;
pub mod worker;

use crate::error::{Error, Result};
use crate::webhooks;
use crate::Context;
use chrono::{DateTime, Utc};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{ErrorKind, JobStatus, ResolvedJobSpec};
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
    pub spec: Json<ResolvedJobSpec>,
    pub status: JobStatus,
    pub error_kind: Option<ErrorKind>,
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

impl JobRow {
    /// The parent version it continues from, if any.
    pub fn parent(&self) -> Option<(String, i32)> {
        match (&self.parent_adapter, self.parent_version) {
            (Some(adapter), Some(version)) => Some((adapter.clone(), version)),
            _ => None,
        }
    }
}

/// `sqlx::query_as!` of [`JobRow`]s: `$head`, the columns of [`JobRow`] with their Rust
/// types, then `$tail`. The macros take string literals only, so the one column list lives
/// here, next to the struct, and every query that reads whole jobs goes through it.
macro_rules! query_jobs {
    ($head:literal, $tail:literal $(, $arg:expr)* $(,)?) => {{
        // The column types below, in scope wherever this expands.
        use loraforge_spec::safety::EffectivePolicy;
        use loraforge_spec::{ErrorKind, JobStatus, ResolvedJobSpec};
        use sqlx::types::Json;
        sqlx::query_as!(
            $crate::jobs::JobRow,
            $head
                + r#"id, project, adapter_name, spec AS "spec: Json<ResolvedJobSpec>",
                     status AS "status: JobStatus", error_kind AS "error_kind: ErrorKind",
                     error_message, attempt, max_attempts, adapter_version, created_at, updated_at,
                     started_at, finished_at, parent_adapter, parent_version,
                     safety_policy AS "safety_policy: Json<EffectivePolicy>""#
                + $tail
            $(, $arg)*
        )
    }};
}
pub(crate) use query_jobs;

pub async fn get(pool: &PgPool, project: &str, id: Uuid) -> Result<Option<JobRow>, sqlx::Error> {
    query_jobs!(
        "SELECT ",
        " FROM jobs WHERE project = $1 AND id = $2",
        project,
        id
    )
    .fetch_optional(pool)
    .await
}

/// The job a project submitted with this idempotency key, if any.
pub async fn by_idempotency_key(
    pool: &PgPool,
    project: &str,
    key: &str,
) -> Result<Option<JobRow>, sqlx::Error> {
    query_jobs!(
        "SELECT ",
        " FROM jobs WHERE project = $1 AND idempotency_key = $2",
        project,
        key
    )
    .fetch_optional(pool)
    .await
}

/// The newest training progress of a job: (step, total steps, loss).
pub async fn latest_progress(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(u32, u32, f64)>, sqlx::Error> {
    Ok(latest_progress_of(pool, &[id])
        .await?
        .into_iter()
        .find_map(|(_, event)| match event {
            EventPayload::Progress {
                step,
                total_steps,
                loss,
                ..
            } => Some((step, total_steps, loss)),
            _ => None,
        }))
}

/// The job, or `NotFound`.
pub async fn find(pool: &PgPool, project: &str, id: Uuid) -> Result<JobRow> {
    get(pool, project, id).await?.ok_or(Error::NotFound("job"))
}

/// Filters and paging of the job list (newest first).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    /// Only jobs in one of these states, comma-separated (`queued,running`).
    #[param(
        pattern = r"^((queued|scheduled|running|evaluating|publishing|succeeded|failed|cancel_requested|cancelled)(,(queued|scheduled|running|evaluating|publishing|succeeded|failed|cancel_requested|cancelled))*)?$"
    )]
    pub status: Option<String>,
    /// Only jobs of this adapter.
    pub adapter: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(
        pattern = r"^[0-9]{1,18}_[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

impl JobFilter {
    /// The states named by `status`; empty for all.
    pub fn statuses(&self) -> Result<Vec<JobStatus>> {
        let Some(list) = self.status.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(|s| s.parse().map_err(|m| Error::invalid("status", m)))
            .collect()
    }

    pub fn cursor(&self) -> Result<Option<JobCursor>> {
        self.cursor.as_deref().map(JobCursor::parse).transpose()
    }
}

/// Where a page of the job list ends: the last job's creation time and id (the list's
/// order), written `<microseconds>_<uuid>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl JobCursor {
    pub fn after(job: &JobRow) -> JobCursor {
        JobCursor {
            created_at: job.created_at,
            id: job.id,
        }
    }

    pub fn parse(s: &str) -> Result<JobCursor> {
        let bad = || Error::invalid("cursor", "not a cursor this API returned");
        let (micros, id) = s.split_once('_').ok_or_else(bad)?;
        // What `Display` writes (the API document's pattern says the same): 1-18 digits, the
        // time of some job (1970 to about 33,600, all of which Postgres holds), and a
        // hyphenated UUID.
        if micros.is_empty() || micros.len() > 18 || !micros.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if id.len() != 36 {
            return Err(bad());
        }
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        Ok(JobCursor {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for JobCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.created_at.timestamp_micros(), self.id)
    }
}

/// A project's jobs, newest first: those in `statuses` (all when empty), of `adapter` if
/// given, after `cursor`.
pub async fn list(
    pool: &PgPool,
    project: &str,
    statuses: &[JobStatus],
    adapter: Option<&str>,
    cursor: Option<JobCursor>,
    limit: i64,
) -> Result<Vec<JobRow>, sqlx::Error> {
    query_jobs!(
        "SELECT ",
        " FROM jobs
         WHERE project = $1 AND (cardinality($2::text[]) = 0 OR status = ANY($2))
           AND ($3::text IS NULL OR adapter_name = $3)
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
         ORDER BY created_at DESC, id DESC LIMIT $6",
        project,
        statuses as &[JobStatus],
        adapter,
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit,
    )
    .fetch_all(pool)
    .await
}

/// The newest progress event of each of `jobs` that has one (one index lookup per job).
pub async fn latest_progress_of(
    pool: &PgPool,
    jobs: &[Uuid],
) -> Result<Vec<(Uuid, EventPayload)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT j.id AS "id!", p.payload AS "payload!: Json<EventPayload>"
           FROM UNNEST($1::uuid[]) AS j(id)
           CROSS JOIN LATERAL (SELECT payload FROM job_events e
                               WHERE e.job_id = j.id AND e.kind = 'progress'
                               ORDER BY e.seq DESC LIMIT 1) p"#,
        jobs,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.payload.0)).collect())
}

pub async fn record_event(
    conn: &mut PgConnection,
    job_id: Uuid,
    event: &EventPayload,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO job_events (job_id, kind, payload) VALUES ($1, $2, $3)",
        job_id,
        event.kind(),
        Json(event) as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Most events one worker call may carry.
pub const MAX_EVENTS_PER_BATCH: usize = 1000;

/// Records what a worker reports. Status events are the control plane's own (written by
/// [`transition`]); a worker may not send them.
pub async fn record_worker_events(
    ctx: &Context,
    job: &JobRow,
    events: &[EventPayload],
) -> Result<()> {
    if events
        .iter()
        .any(|e| matches!(e, EventPayload::Status { .. }))
    {
        return Err(Error::invalid(
            "events",
            "status events are written by the control plane only",
        ));
    }
    if events.len() > MAX_EVENTS_PER_BATCH {
        return Err(Error::invalid(
            "events",
            format!("at most {MAX_EVENTS_PER_BATCH} events per batch"),
        ));
    }
    let kinds: Vec<&str> = events.iter().map(|e| e.kind()).collect();
    let payloads: Vec<Json<&EventPayload>> = events.iter().map(Json).collect();
    sqlx::query!(
        "INSERT INTO job_events (job_id, kind, payload)
         SELECT $1, k, p FROM UNNEST($2::text[], $3::jsonb[]) AS t(k, p)",
        job.id,
        &kinds[..] as &[&str],
        &payloads[..] as &[Json<&EventPayload>],
    )
    .execute(&ctx.pool)
    .await?;
    for event in events {
        ctx.metrics.training.observe(job, event);
    }
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    pub payload: Json<EventPayload>,
}

/// Events of a job after `after` (exclusive), oldest first.
pub async fn events(
    pool: &PgPool,
    job_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as!(
        EventRow,
        r#"SELECT seq, created_at, payload AS "payload: Json<EventPayload>"
           FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"#,
        job_id,
        after,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// Events of a job newest first, before `before` (exclusive; `None`: from the newest), of
/// one `kind` if given.
pub async fn events_newest_first(
    pool: &PgPool,
    job_id: Uuid,
    before: Option<i64>,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as!(
        EventRow,
        r#"SELECT seq, created_at, payload AS "payload: Json<EventPayload>"
           FROM job_events
           WHERE job_id = $1 AND ($2::bigint IS NULL OR seq < $2) AND ($3::text IS NULL OR kind = $3)
           ORDER BY seq DESC LIMIT $4"#,
        job_id,
        before,
        kind,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// The names the jobs' inputs were registered under, where they named registered inputs:
/// (job, base model name, dataset name).
pub async fn input_names(
    pool: &PgPool,
    jobs: &[Uuid],
) -> Result<Vec<(Uuid, Option<String>, Option<String>)>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT id, base_model_name, dataset_name FROM jobs WHERE id = ANY($1)",
        jobs,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.id, r.base_model_name, r.dataset_name))
        .collect())
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
/// Leaving a job final also drops its lease and worker token.
pub async fn transition(
    conn: &mut PgConnection,
    job_id: Uuid,
    to: JobStatus,
    message: Option<&str>,
    effects: TransitionEffects<'_>,
) -> Result<bool, sqlx::Error> {
    let from: Vec<JobStatus> = JobStatus::ALL
        .into_iter()
        .filter(|s| s.can_become(to))
        .collect();
    let (error_kind, error_message) = match effects.error {
        Some((k, m)) => (Some(k), Some(m)),
        None => (None, None),
    };
    let release = effects.release_lease || to.is_final();
    let updated = sqlx::query!(
        "UPDATE jobs SET status = $2, updated_at = now(),
                error_kind = COALESCE($4, error_kind), error_message = COALESCE($5, error_message),
                started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now()) ELSE started_at END,
                finished_at = CASE WHEN $7 THEN now() ELSE finished_at END,
                lease_expires_at = CASE WHEN $6 THEN NULL ELSE lease_expires_at END,
                worker_token_sha256 = CASE WHEN $6 THEN NULL ELSE worker_token_sha256 END
         WHERE id = $1 AND status = ANY($3)
         RETURNING project, adapter_name",
        job_id,
        to as JobStatus,
        &from[..] as &[JobStatus],
        error_kind as Option<ErrorKind>,
        error_message,
        release,
        to.is_final(),
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(|r| (r.project, r.adapter_name));
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

/// Wakes the schedulers of every replica (inside the caller's transaction: on commit).
pub async fn wake_scheduler(conn: &mut PgConnection, job_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT pg_notify($1, $2)",
        QUEUE_CHANNEL,
        job_id.to_string()
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A job claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job_id: Uuid,
    pub attempt: i32,
    pub project: String,
    pub spec: ResolvedJobSpec,
}

/// Claims the next queued job (priority, then age) as a lease: a short transaction
/// with `FOR UPDATE SKIP LOCKED`, never one held while the job runs.
pub async fn claim(
    pool: &PgPool,
    lease: Duration,
    token_sha256: &[u8],
) -> Result<Option<Claimed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query!(
        r#"UPDATE jobs SET status = 'scheduled', attempt = attempt + 1, updated_at = now(), attempt_started_at = now(),
                lease_expires_at = now() + make_interval(secs => $1), worker_token_sha256 = $2
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
                     ORDER BY priority DESC, created_at, id
                     FOR UPDATE SKIP LOCKED LIMIT 1)
         RETURNING id, attempt, project, spec AS "spec: Json<ResolvedJobSpec>""#,
        lease.as_secs_f64(),
        token_sha256,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = claimed else {
        tx.rollback().await?;
        return Ok(None);
    };
    let (job_id, attempt) = (row.id, row.attempt);
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
    Ok(Some(Claimed {
        job_id,
        attempt,
        project: row.project,
        spec: row.spec.0,
    }))
}

/// An attempt whose worker is waiting to start (for capacity, admission or its image)
/// cannot heartbeat yet: the executor keeps its lease, and records `event` unless it is
/// already the job's newest event (so watchers on several replicas record it once).
/// Returns whether the attempt is still current.
pub async fn note_waiting(
    pool: &PgPool,
    job_id: Uuid,
    attempt: i32,
    lease: Duration,
    event: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current = sqlx::query!(
        "UPDATE jobs SET lease_expires_at = GREATEST(lease_expires_at, now() + make_interval(secs => $3))
         WHERE id = $1 AND attempt = $2 AND status = 'scheduled'",
        job_id,
        attempt,
        lease.as_secs_f64(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if let (true, Some(message)) = (current, event) {
        let newest = sqlx::query_scalar!(
            r#"SELECT payload->>'message' AS "message" FROM job_events WHERE job_id = $1 ORDER BY seq DESC LIMIT 1"#,
            job_id,
        )
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        if newest.as_deref() != Some(message) {
            let payload = EventPayload::Log {
                message: message.to_string(),
            };
            record_event(&mut tx, job_id, &payload).await?;
        }
    }
    tx.commit().await?;
    Ok(current)
}

/// Queued jobs claimable now, and jobs whose worker holds a lease.
pub async fn queue_and_leases(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())) AS "queued!",
                  count(*) FILTER (WHERE lease_expires_at IS NOT NULL) AS "leased!"
           FROM jobs WHERE status <> ALL($1)"#,
        &JobStatus::FINAL[..] as &[&str],
    )
    .fetch_one(pool)
    .await?;
    Ok((row.queued, row.leased))
}

/// The job a worker token belongs to, if the token is current and the job unfinished.
pub async fn authenticate_worker(
    pool: &PgPool,
    job_id: Uuid,
    token_sha256: &[u8],
) -> Result<Option<JobRow>, sqlx::Error> {
    query_jobs!(
        "SELECT ",
        " FROM jobs WHERE id = $1 AND worker_token_sha256 = $2 AND status <> ALL($3)",
        job_id,
        token_sha256,
        &JobStatus::FINAL[..] as &[&str],
    )
    .fetch_optional(pool)
    .await
}

/// Extends the lease; returns the job's status after the heartbeat.
pub async fn heartbeat(
    pool: &PgPool,
    job_id: Uuid,
    lease: Duration,
) -> Result<Option<JobStatus>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $2)
           WHERE id = $1 AND lease_expires_at IS NOT NULL RETURNING status AS "status: JobStatus""#,
        job_id,
        lease.as_secs_f64(),
    )
    .fetch_optional(pool)
    .await
}

/// A worker moves its job on (`running`, `evaluating`); nothing else is its to report.
pub async fn worker_stage(pool: &PgPool, job: &JobRow, to: JobStatus) -> Result<()> {
    if !matches!(to, JobStatus::Running | JobStatus::Evaluating) {
        return Err(Error::invalid(
            "status",
            "a worker may only report running or evaluating",
        ));
    }
    // A worker that retries a stage whose answer it lost finds the job there already.
    if job.status == to {
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    if !transition(&mut conn, job.id, to, None, TransitionEffects::default()).await? {
        return Err(Error::conflict(
            "invalid_state",
            format!("job is {}; it cannot become {to}", job.status),
        ));
    }
    Ok(())
}

/// Cancels a job from any unfinished state: a queued job at once; one with a worker is
/// asked to stop (the executor signals it) and ends `cancelled` when the worker is gone.
pub async fn cancel(ctx: &Context, project: &str, id: Uuid) -> Result<JobRow> {
    // A concurrent transition can win the race; re-read and try again.
    for _ in 0..3 {
        let job = find(&ctx.pool, project, id).await?;
        if job.status.is_final() {
            return Err(Error::conflict(
                "job_finished",
                format!("job is already {}", job.status),
            ));
        }
        let target = match job.status {
            JobStatus::Queued => JobStatus::Cancelled,
            JobStatus::CancelRequested => break,
            _ => JobStatus::CancelRequested,
        };
        let mut conn = ctx.pool.acquire().await?;
        let effects = TransitionEffects {
            error: None,
            release_lease: target == JobStatus::Cancelled,
        };
        if transition(
            &mut conn,
            id,
            target,
            Some("cancelled by the user"),
            effects,
        )
        .await?
        {
            if target == JobStatus::CancelRequested {
                if let Err(e) = ctx.executor.stop(id).await {
                    tracing::warn!(job_id = %id, error = %e, "could not signal the worker; it stops at its next heartbeat");
                }
            }
            break;
        }
    }
    find(&ctx.pool, project, id).await
}

#[cfg(test)]
mod tests {
    use super::{JobCursor, JobFilter};
    use loraforge_spec::JobStatus;

    #[test]
    fn a_cursor_reads_back_as_written() {
        let cursor = JobCursor {
            created_at: chrono::DateTime::from_timestamp_micros(1_765_000_000_123_456).unwrap(),
            id: uuid::Uuid::new_v4(),
        };
        assert_eq!(JobCursor::parse(&cursor.to_string()).unwrap(), cursor);
        let id = uuid::Uuid::nil();
        for bad in [
            "".to_string(),
            "12".into(),
            "x_y".into(),
            "12_not-a-uuid".into(),
            format!("-1_{id}"),
            format!("+1_{id}"),
            format!("{}_{id}", i64::MAX),
            format!("1_{}", id.simple()),
        ] {
            assert!(JobCursor::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_status_filter_is_a_comma_separated_list() {
        let filter = |s: &str| JobFilter {
            status: Some(s.into()),
            ..JobFilter::default()
        };
        assert_eq!(
            filter("queued,running").statuses().unwrap(),
            [JobStatus::Queued, JobStatus::Running]
        );
        assert!(filter("").statuses().unwrap().is_empty());
        // Exactly the API document's pattern: no spaces, no empty items, known states.
        for bad in ["running,done", "queued, running", "queued,", ",queued"] {
            assert!(filter(bad).statuses().is_err(), "{bad:?}");
        }
    }
}
