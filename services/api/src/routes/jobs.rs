//! User routes for jobs: submit, list, read, events (paged and streamed), cancel.

use crate::auth::Caller;
use crate::extract::{ApiBody, ApiPath, ApiQuery};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use loraforge_core::auth::Scope;
use loraforge_core::jobs::{self, submission, submission::Submitted, JobCursor, JobFilter};
use loraforge_core::views::{EventView, JobProgress, JobSummary, JobView};
use loraforge_spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::time::Duration;
use uuid::Uuid;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security(("api_key" = ["submit"])), request_body = loraforge_spec::JobSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the same job",
        pattern = "^[!-~]{1,255}$")),
    responses((status = 201, body = JobView), (status = 200, description = "replayed by Idempotency-Key", body = JobView),
              problems::BadRequest, problems::Conflict, problems::Unprocessable))]
pub async fn submit(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    caller.require(Scope::Submit)?;
    let spec = JobSpec::parse(&body)?;
    let key = idempotency_key(&headers)?;
    let (status, job) =
        match submission::submit(&state, &caller.project, spec, key.as_deref()).await? {
            Submitted::Created(job) => (StatusCode::CREATED, job),
            Submitted::Replayed(job) => (StatusCode::OK, job),
        };
    let location = format!("/v1/jobs/{}", job.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(JobView::from(job)),
    )
        .into_response())
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::invalid("Idempotency-Key", "must be 1-255 visible ASCII characters")
    })
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

#[derive(Serialize, utoipa::ToSchema)]
pub struct JobPage {
    jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// The project's jobs, newest first, each with its latest training progress.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs", params(JobFilter),
    responses((status = 200, body = JobPage), problems::Unprocessable))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<JobFilter>,
) -> Result<Json<JobPage>, ApiError> {
    caller.require(Scope::Read)?;
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    let rows = jobs::list(
        &state.pool,
        &caller.project,
        &filter.statuses()?,
        filter.adapter.as_deref(),
        filter.cursor()?,
        limit,
    )
    .await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|j| JobCursor::after(j).to_string()))
        .flatten();
    let ids: Vec<Uuid> = rows.iter().map(|j| j.id).collect();
    let mut progress: std::collections::HashMap<Uuid, JobProgress> =
        jobs::latest_progress_of(&state.pool, &ids)
            .await?
            .into_iter()
            .filter_map(|(id, event)| Some((id, JobProgress::of(&event)?)))
            .collect();
    let jobs = rows
        .into_iter()
        .map(|row| JobSummary {
            progress: progress.remove(&row.id),
            job: row.into(),
        })
        .collect();
    Ok(Json(JobPage { jobs, next_cursor }))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "get_job", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), problems::NotFound))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<JobView>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        jobs::find(&state.pool, &caller.project, id).await?.into(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Return events after this sequence number (exclusive).
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    events: Vec<EventView>,
    /// Pass as `after` to get the next page; `null` when this page was not full.
    next_after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = Uuid, Path), EventsQuery),
    responses((status = 200, body = EventsPage), problems::NotFound, problems::Unprocessable))]
pub async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    caller.require(Scope::Read)?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 1000"));
    }
    jobs::find(&state.pool, &caller.project, id).await?;
    let events: Vec<EventView> = jobs::events(&state.pool, id, q.after, q.limit)
        .await?
        .into_iter()
        .map(EventView::from)
        .collect();
    let next_after = (events.len() as i64 == q.limit)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    Ok(Json(EventsPage { events, next_after }))
}

/// Cancels a job from any unfinished state: a queued job at once; a running one is
/// asked to stop (its worker is signalled) and ends `cancelled`.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security(("api_key" = ["submit"])), params(("id" = Uuid, Path)),
    responses((status = 202, body = JobView), problems::Conflict, problems::NotFound))]
pub async fn cancel(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    caller.require(Scope::Submit)?;
    let job = jobs::cancel(&state, &caller.project, id).await?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Which attempt's worker (default: the newest).
    #[param(minimum = 1)]
    attempt: Option<i32>,
    /// At most this many bytes, from the end (default 65536, at most 1048576).
    #[param(minimum = 1, maximum = 1048576)]
    tail_bytes: Option<u64>,
}

const DEFAULT_LOG_BYTES: u64 = 64 * 1024;
const MAX_LOG_BYTES: u64 = 1024 * 1024;
/// The response header naming the attempt whose log this is.
pub const ATTEMPT_HEADER: &str = "x-loraforge-attempt";

/// What the job's worker printed (stdout and stderr), the end of it: where the executor
/// keeps it (the local executor: every attempt's log file; kubernetes: the Pod's log while
/// the Pod exists). 404 where there is none; the job's events and its error (which carries
/// a failed worker's last lines) remain.
#[utoipa::path(get, path = "/v1/jobs/{id}/logs", tag = "jobs", operation_id = "job_logs", params(("id" = Uuid, Path), LogsQuery),
    responses((status = 200, description = "the worker's output, UTF-8 text; the `X-Loraforge-Attempt` header names the attempt", content_type = "text/plain"),
              problems::NotFound, problems::Unprocessable))]
pub async fn logs(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let tail = q.tail_bytes.unwrap_or(DEFAULT_LOG_BYTES);
    if !(1..=MAX_LOG_BYTES).contains(&tail) {
        return Err(ApiError::invalid(
            "tail_bytes",
            format!("must be between 1 and {MAX_LOG_BYTES}"),
        ));
    }
    let job = jobs::find(&state.pool, &caller.project, id).await?;
    let attempt = q.attempt.unwrap_or(job.attempt);
    if attempt < 1 || attempt > job.attempt {
        return Err(loraforge_core::Error::NotFound("attempt").into());
    }
    let worker = loraforge_core::executor::WorkerRef {
        job_id: id,
        attempt,
    };
    let log = state.executor.worker_log(worker, tail).await.map_err(|e| {
        tracing::warn!(job_id = %id, attempt, error = %e, "reading a worker's log failed");
        loraforge_core::Error::NotFound("worker log")
    })?;
    let log = log.ok_or(loraforge_core::Error::NotFound("worker log"))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static(ATTEMPT_HEADER),
                attempt.to_string(),
            ),
        ],
        log,
    )
        .into_response())
}

/// How often the stream looks for new events.
const STREAM_POLL: Duration = Duration::from_millis(500);

/// Server-sent events of a job: every event after `Last-Event-ID` (or `after`), then new
/// ones as they happen; the stream ends once the job is final and all are sent. If the
/// database fails mid-stream, the stream says so in an `error` event and ends; the client
/// resumes with `Last-Event-ID`.
/// Where a stream starts (it has no pages: it runs until the job ends).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Send events after this sequence number (`Last-Event-ID` overrides it on a reconnect).
    #[serde(default)]
    after: i64,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events/stream", tag = "jobs", params(("id" = Uuid, Path), StreamQuery),
    responses((status = 200, description = "text/event-stream of events; `id` is the event's seq", content_type = "text/event-stream"),
              problems::NotFound))]
pub async fn stream_events(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::Read)?;
    jobs::find(&state.pool, &caller.project, id).await?;
    let resume_from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(q.after);
    let pool = state.pool.clone();
    let project = caller.project.clone();
    // `None` as the cursor: an error was sent, the stream is over.
    let stream = futures::stream::unfold(Some(resume_from), move |after| {
        let (pool, project) = (pool.clone(), project.clone());
        async move {
            let after = after?;
            loop {
                match next_batch(&pool, &project, id, after).await {
                    Ok(Batch::Events(events)) => {
                        let last = events.last().map_or(after, |e| e.seq);
                        let sse: Vec<Result<Event, Infallible>> = events
                            .into_iter()
                            .map(|e| Ok(sse_event(&EventView::from(e))))
                            .collect();
                        return Some((futures::stream::iter(sse), Some(last)));
                    }
                    Ok(Batch::Finished) => return None,
                    Ok(Batch::Nothing) => tokio::time::sleep(STREAM_POLL).await,
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "event stream failed");
                        let event = Event::default()
                            .event("error")
                            .data("reading events failed; reconnect with Last-Event-ID");
                        return Some((futures::stream::iter(vec![Ok(event)]), None));
                    }
                }
            }
        }
    })
    .flatten();
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

enum Batch {
    Events(Vec<jobs::EventRow>),
    Finished,
    Nothing,
}

async fn next_batch(
    pool: &sqlx::PgPool,
    project: &str,
    id: Uuid,
    after: i64,
) -> Result<Batch, sqlx::Error> {
    // Read the status before the events: a final status seen here means every event it
    // wrote is already visible to the query below.
    let finished = jobs::get(pool, project, id)
        .await?
        .is_none_or(|j| j.status.is_final());
    let batch = jobs::events(pool, id, after, 500).await?;
    Ok(if !batch.is_empty() {
        Batch::Events(batch)
    } else if finished {
        Batch::Finished
    } else {
        Batch::Nothing
    })
}

fn sse_event(e: &EventView) -> Event {
    let data = serde_json::to_string(e).unwrap_or_default();
    Event::default().id(e.seq.to_string()).data(data)
}
