//! Worker routes (see `loraforge_spec::worker` for the protocol). Every call carries
//! the attempt's bearer token; a stale or foreign token is refused.

use crate::auth::WorkerJob;
use crate::extract::ApiJson;
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use loraforge_core::jobs::attempts::{self, Outcome};
use loraforge_core::jobs::{self, worker};
use loraforge_core::registry::publish;
use loraforge_spec::worker::{
    CompleteRequest, EventBatch, FailRequest, HeartbeatResponse, ReservedVersion, StageRequest,
    WorkerAssignment,
};
use loraforge_spec::JobStatus;

#[utoipa::path(get, path = "/v1/worker/jobs/{id}", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = WorkerAssignment), problems::Unauthorized, problems::NotFound))]
pub async fn assignment(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
) -> Result<Json<WorkerAssignment>, ApiError> {
    Ok(Json(worker::assignment(&state, job).await?))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/stage", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = StageRequest,
    responses((status = 204, description = "moved"), problems::BadRequest, problems::Unauthorized, problems::NotFound, problems::Conflict, problems::Unprocessable))]
pub async fn stage(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
    ApiJson(req): ApiJson<StageRequest>,
) -> Result<StatusCode, ApiError> {
    jobs::worker_stage(&state.pool, &job, req.status).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/events", tag = "worker", operation_id = "report_events", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = EventBatch,
    responses((status = 204, description = "recorded"), problems::BadRequest, problems::Unauthorized, problems::NotFound, problems::Unprocessable))]
pub async fn events(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<StatusCode, ApiError> {
    jobs::record_worker_events(&state, &job, &batch.events).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/heartbeat", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = HeartbeatResponse), problems::Unauthorized, problems::NotFound))]
pub async fn heartbeat(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let status = jobs::heartbeat(&state.pool, job.id, state.settings.lease).await?;
    Ok(Json(HeartbeatResponse {
        cancel_requested: status == Some(JobStatus::CancelRequested),
    }))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/versions", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)),
    responses((status = 200, body = ReservedVersion), problems::Unauthorized, problems::NotFound, problems::Conflict))]
pub async fn reserve_version(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
) -> Result<Json<ReservedVersion>, ApiError> {
    Ok(Json(publish::reserve_version(&state.pool, &job).await?))
}

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/complete", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = CompleteRequest,
    responses((status = 204, description = "published"), problems::BadRequest, problems::Unauthorized, problems::NotFound, problems::Conflict, problems::Unprocessable))]
pub async fn complete(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
    ApiJson(req): ApiJson<CompleteRequest>,
) -> Result<StatusCode, ApiError> {
    publish::complete(&state, &job, &req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Longest failure message kept (the worker's log tail is in its own file).
const MAX_FAILURE_MESSAGE: usize = 8000;

#[utoipa::path(post, path = "/v1/worker/jobs/{id}/fail", tag = "worker", security(("worker_token" = [])), params(("id" = Uuid, Path)), request_body = FailRequest,
    responses((status = 204, description = "recorded"), problems::BadRequest, problems::Unauthorized, problems::NotFound, problems::Unprocessable))]
pub async fn fail(
    State(state): State<ApiState>,
    WorkerJob(job): WorkerJob,
    ApiJson(req): ApiJson<FailRequest>,
) -> Result<StatusCode, ApiError> {
    let outcome = Outcome::WorkerFailed {
        kind: req.kind,
        message: req.message.chars().take(MAX_FAILURE_MESSAGE).collect(),
    };
    attempts::settle_now(&state, job.id, job.attempt, outcome).await?;
    Ok(StatusCode::NO_CONTENT)
}
