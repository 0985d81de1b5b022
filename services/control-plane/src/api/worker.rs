//! Worker routes (see `loraforge_spec::worker` for the protocol). Every call carries
//! the attempt's bearer token; a stale or foreign token is refused.

use super::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::{self, JobRow, TransitionEffects};
use crate::registry;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use loraforge_spec::worker::{
    CompleteRequest, EventBatch, EventPayload, FailRequest, HeartbeatResponse, ParentArtifact,
    ReservedVersion, StageRequest, WorkerAssignment,
};
use loraforge_spec::{ErrorKind, JobStatus};
use sha2::{Digest, Sha256};
use uuid::Uuid;

async fn authorize(
    state: &AppState,
    job_id: Uuid,
    headers: &HeaderMap,
) -> Result<JobRow, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    let sha = Sha256::digest(token.as_bytes());
    jobs::authenticate_worker(&state.pool, job_id, &sha)
        .await?
        .ok_or(ApiError::Unauthorized)
}

#[utoipa::path(get, path = "/v1/worker/jobs/{id}", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), responses((status = 200, body = WorkerAssignment), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn assignment(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Json<WorkerAssignment>, ApiError> {
    let job = authorize(&state, id, &headers).await?;
    let parent = match (&job.parent_adapter, job.parent_version) {
        (Some(adapter), Some(version)) => {
            let row = registry::get_version(&state.pool, &job.project, adapter, version)
                .await?
                .ok_or(ApiError::NotFound("parent adapter version"))?;
            Some(ParentArtifact {
                adapter_name: adapter.clone(),
                version,
                prefix: row.storage_prefix,
            })
        }
        _ => None,
    };
    let safety = match job.safety_policy {
        Some(policy) => policy.0,
        None => {
            crate::safety::effective_policy(&state.pool, &job.project, &job.spec.0.safety).await?
        }
    };
    Ok(Json(WorkerAssignment {
        parent,
        safety,
        job_id: job.id,
        attempt: job.attempt,
        project: job.project,
        spec: job.spec.0,
        storage_url: state.store.url().to_string(),
    }))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/stage", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = StageRequest, responses((status = 204, description = "moved"), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn stage(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<StageRequest>,
) -> Result<StatusCode, ApiError> {
    let job = authorize(&state, id, &headers).await?;
    if !matches!(req.status, JobStatus::Running | JobStatus::Evaluating) {
        return Err(ApiError::validation(
            "status",
            "a worker may only report running or evaluating",
        ));
    }
    let mut conn = state.pool.acquire().await?;
    if !jobs::transition(
        &mut conn,
        job.id,
        req.status,
        None,
        TransitionEffects::default(),
    )
    .await?
    {
        return Err(ApiError::Conflict {
            code: "invalid_state",
            detail: format!("job is {}; it cannot become {}", job.status, req.status),
        });
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/events", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = EventBatch, responses((status = 204, description = "recorded"), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<StatusCode, ApiError> {
    authorize(&state, id, &headers).await?;
    if batch
        .events
        .iter()
        .any(|e| matches!(e, EventPayload::Status { .. }))
    {
        return Err(ApiError::validation(
            "events",
            "status events are written by the control plane only",
        ));
    }
    if batch.events.len() > 1000 {
        return Err(ApiError::validation(
            "events",
            "at most 1000 events per batch",
        ));
    }
    jobs::record_events(&state.pool, id, &batch.events).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/heartbeat", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), responses((status = 200, body = HeartbeatResponse), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    authorize(&state, id, &headers).await?;
    let status = jobs::heartbeat(&state.pool, id, state.settings.lease).await?;
    Ok(Json(HeartbeatResponse {
        cancel_requested: status == Some(JobStatus::CancelRequested),
    }))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/versions", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), responses((status = 200, body = ReservedVersion), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn reserve_version(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Json<ReservedVersion>, ApiError> {
    let job = authorize(&state, id, &headers).await?;
    Ok(Json(registry::reserve_version(&state.pool, &job).await?))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/complete", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = CompleteRequest, responses((status = 204, description = "published"), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn complete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompleteRequest>,
) -> Result<StatusCode, ApiError> {
    let job = authorize(&state, id, &headers).await?;
    registry::complete(&state, &job, &req).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/fail", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = FailRequest, responses((status = 204, description = "recorded"), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 401, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn fail(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<FailRequest>,
) -> Result<StatusCode, ApiError> {
    let job = authorize(&state, id, &headers).await?;
    let message: String = req.message.chars().take(8000).collect();
    let mut tx = state.pool.begin().await?;
    // Only system errors are worth another attempt; the user's mistakes fail at once.
    if req.kind == ErrorKind::SystemError {
        let backoff = state.settings.retry_backoff;
        if jobs::retry_or_fail(
            &mut tx,
            job.id,
            job.attempt,
            job.max_attempts,
            &message,
            backoff,
        )
        .await?
        {
            tx.commit().await?;
            return Ok(StatusCode::NO_CONTENT);
        }
    } else {
        let effects = TransitionEffects {
            error: Some((req.kind, &message)),
            release_lease: true,
        };
        jobs::transition(&mut tx, job.id, JobStatus::Failed, None, effects).await?;
    }
    let prefixes = registry::fail_pending_version(&mut tx, job.id).await?;
    tx.commit().await?;
    registry::delete_objects(&state.store, &prefixes).await;
    Ok(StatusCode::NO_CONTENT)
}
