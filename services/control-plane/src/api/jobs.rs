//! User routes for jobs: submit, read, events.

use super::{ApiBody, ApiPath, ApiQuery};
use crate::app::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::jobs::{self, EventRow, JobView, NewJob, Submitted};
use crate::registry::inputs::{self, InputKind};
use crate::registry::{self, aliases};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_spec::{FieldError, JobSpec, JobStatus, MethodConfig, ParentRef, SpecError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = loraforge_spec::JobSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the same job")),
    responses((status = 201, body = JobView), (status = 200, description = "replayed by Idempotency-Key", body = JobView), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    caller.require(Scope::Submit)?;
    let mut spec = JobSpec::parse(&body).map_err(ApiError::from)?;
    let idempotency_key = idempotency_key(&headers)?;
    let project = caller.project.as_str();
    let resolved = resolve_inputs(&state, project, &mut spec).await?;
    let safety = crate::safety::effective_policy(&state.pool, project, &spec.safety).await?;
    // Hash the resolved spec, not the bytes: the same job with other whitespace is the same job.
    let request_sha256 = Sha256::digest(serde_json::to_vec(&spec).map_err(anyhow::Error::from)?);
    let new = NewJob {
        project,
        spec: &spec,
        base_model_name: resolved.base_model_name.as_deref(),
        dataset_name: resolved.dataset_name.as_deref(),
        parent: resolved.parent.as_ref().map(|(a, v)| (a.as_str(), *v)),
        safety: &safety,
        idempotency_key: idempotency_key.as_deref(),
        request_sha256: &request_sha256,
        max_attempts: state.settings.max_attempts,
    };
    let (status, job) = match jobs::submit(&state.pool, new).await? {
        Submitted::Created(job) => (StatusCode::CREATED, job),
        Submitted::Replayed(job) => (StatusCode::OK, job),
        Submitted::KeyReused => {
            return Err(ApiError::Conflict {
                code: "idempotency_key_reused",
                detail: "this Idempotency-Key was used for a different job".into(),
            })
        }
    };
    let location = format!("/v1/jobs/{}", job.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(JobView::from(job)),
    )
        .into_response())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::validation("Idempotency-Key", "must be 1-255 visible ASCII characters")
    })
}

#[derive(Default)]
struct ResolvedInputs {
    base_model_name: Option<String>,
    dataset_name: Option<String>,
    parent: Option<(String, i32)>,
}

/// Resolves registered names to URIs (in place) and the parent reference to a version,
/// and checks that every input exists and fits, before anything is stored. All
/// problems are reported together.
async fn resolve_inputs(
    state: &AppState,
    project: &str,
    spec: &mut JobSpec,
) -> Result<ResolvedInputs, ApiError> {
    let mut errors = Vec::new();
    let mut resolved = ResolvedInputs::default();
    let roots = &state.settings.file_roots;
    match inputs::resolve(
        &state.pool,
        project,
        InputKind::BaseModel,
        "base_model",
        &spec.base_model,
    )
    .await
    {
        Ok(r) => {
            note(
                &mut errors,
                "base_model",
                inputs::check(&r.uri, roots, InputKind::BaseModel).await,
            );
            spec.base_model = r.uri;
            resolved.base_model_name = r.name;
        }
        Err(ApiError::Validation(e)) => errors.extend(e.errors),
        Err(e) => return Err(e),
    }
    match inputs::resolve(
        &state.pool,
        project,
        InputKind::Dataset,
        "dataset.train",
        &spec.dataset.train,
    )
    .await
    {
        Ok(r) => {
            note(
                &mut errors,
                "dataset.train",
                inputs::check(&r.uri, roots, InputKind::Dataset).await,
            );
            spec.dataset.train = r.uri;
            resolved.dataset_name = r.name;
        }
        Err(ApiError::Validation(e)) => errors.extend(e.errors),
        Err(e) => return Err(e),
    }
    if let Some(validation) = spec.dataset.validation.clone() {
        match inputs::resolve(
            &state.pool,
            project,
            InputKind::Dataset,
            "dataset.validation",
            &validation,
        )
        .await
        {
            Ok(r) => {
                note(
                    &mut errors,
                    "dataset.validation",
                    inputs::check(&r.uri, roots, InputKind::Dataset).await,
                );
                spec.dataset.validation = Some(r.uri);
            }
            Err(ApiError::Validation(e)) => errors.extend(e.errors),
            Err(e) => return Err(e),
        }
    }
    if let Some(parent) = &spec.parent {
        match resolve_parent(state, project, spec, parent).await {
            Ok(p) => resolved.parent = Some(p),
            Err(m) => errors.push(FieldError::new("parent", m)),
        }
    }
    if errors.is_empty() {
        Ok(resolved)
    } else {
        Err(ApiError::Validation(SpecError {
            errors,
            malformed: false,
        }))
    }
}

fn note(errors: &mut Vec<FieldError>, field: &str, checked: Result<(), String>) {
    if let Err(m) = checked {
        errors.push(FieldError::new(field, m));
    }
}

/// The parent must be a ready version whose adapter has the job's shape.
async fn resolve_parent(
    state: &AppState,
    project: &str,
    spec: &JobSpec,
    parent: &ParentRef,
) -> Result<(String, i32), String> {
    let adapter = parent.adapter.as_str();
    let found = aliases::resolve(
        &state.pool,
        &state.store,
        project,
        adapter,
        &parent.reference,
    )
    .await
    .map_err(|e| format!("{adapter}@{}: {e}", parent.reference))?;
    if found.status != "ready" {
        return Err(format!(
            "{adapter} version {} is {}, not ready",
            found.version, found.status
        ));
    }
    let row = registry::get_version(&state.pool, project, adapter, found.version)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{adapter} version {} vanished", found.version))?;
    let parent_method: MethodConfig =
        serde_json::from_value(row.method.0).map_err(|e| e.to_string())?;
    if !parent_method.same_shape(&spec.method) {
        return Err(format!(
            "{adapter} version {} has another method shape (rank or target modules)",
            found.version
        ));
    }
    Ok((adapter.to_string(), found.version))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 200, body = JobView), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<JobView>, ApiError> {
    caller.require(Scope::Read)?;
    let job = jobs::get(&state.pool, caller.project.as_str(), id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    Ok(Json(job.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Return events after this sequence number (exclusive).
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    events: Vec<EventRow>,
    /// Pass as `after` to get the next page; `null` when this page was not full.
    next_after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = Uuid, Path), EventsQuery),
    responses((status = 200, body = EventsPage), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    caller.require(Scope::Read)?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    jobs::get(&state.pool, caller.project.as_str(), id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    let events = jobs::events(&state.pool, id, q.after, q.limit).await?;
    let next_after = (events.len() as i64 == q.limit)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    Ok(Json(EventsPage { events, next_after }))
}

/// Cancels a job from any unfinished state: a queued job at once; a running one is
/// asked to stop (its worker's process group is signalled) and ends `cancelled`.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = Uuid, Path)),
    responses((status = 202, body = JobView), (status = 409, description = "already finished", body = crate::error::Problem, content_type = "application/problem+json"),
              (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    caller.require(Scope::Submit)?;
    // A concurrent transition can win the race; re-read and try again.
    for _ in 0..3 {
        let job = jobs::get(&state.pool, &caller.project, id)
            .await?
            .ok_or(ApiError::NotFound("job"))?;
        let status = job.status();
        if status.is_final() {
            return Err(ApiError::Conflict {
                code: "job_finished",
                detail: format!("job is already {status}"),
            });
        }
        let target = match status {
            JobStatus::Queued => JobStatus::Cancelled,
            JobStatus::CancelRequested => break,
            _ => JobStatus::CancelRequested,
        };
        let mut conn = state.pool.acquire().await?;
        let effects = jobs::TransitionEffects {
            error: None,
            release_lease: target == JobStatus::Cancelled,
        };
        if jobs::transition(
            &mut conn,
            id,
            target,
            Some("cancelled by the user"),
            effects,
        )
        .await?
        {
            if target == JobStatus::CancelRequested {
                if let Err(e) = state.executor.stop(id).await {
                    tracing::warn!(job_id = %id, error = %e, "could not signal the worker; it stops at its next heartbeat");
                }
            }
            break;
        }
    }
    let job = jobs::get(&state.pool, &caller.project, id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

/// Server-sent events of a job: every event after `Last-Event-ID` (or `after`), then new
/// ones as they happen; the stream ends once the job is final and all are sent.
#[utoipa::path(get, path = "/v1/jobs/{id}/events/stream", tag = "jobs", params(("id" = Uuid, Path), EventsQuery),
    responses((status = 200, description = "text/event-stream of events; `id` is the event's seq", content_type = "text/event-stream"),
              (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn stream_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<
    axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    caller.require(Scope::Read)?;
    jobs::get(&state.pool, &caller.project, id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    let resume_from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(q.after);
    let pool = state.pool.clone();
    let project = caller.project.clone();
    let stream = futures::stream::unfold(resume_from, move |after| {
        let (pool, project) = (pool.clone(), project.clone());
        async move {
            loop {
                // Read the status before the events: a final status seen here means every
                // event it wrote is already visible to the query below.
                let finished = matches!(jobs::get(&pool, &project, id).await, Ok(Some(j)) if j.status().is_final());
                let batch = jobs::events(&pool, id, after, 500).await.unwrap_or_default();
                if !batch.is_empty() {
                    let last = batch.last().map_or(after, |e| e.seq);
                    let events: Vec<Result<Event, std::convert::Infallible>> = batch
                        .iter()
                        .map(|e| Ok(Event::default().id(e.seq.to_string()).json_data(e).unwrap_or_default()))
                        .collect();
                    return Some((futures::stream::iter(events), last));
                }
                if finished {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    })
    .flatten();
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
