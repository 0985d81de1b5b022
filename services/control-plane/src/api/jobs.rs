//! User routes for jobs: submit, read, events.

use super::{ApiPath, ApiQuery};
use axum::body::Bytes;
use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::{self, EventRow, JobView, NewJob, Submitted};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_spec::model::ModelConfigSummary;
use loraforge_spec::{FieldError, JobSpec, SpecError};
use loraforge_storage::{Store, StorageError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub async fn submit(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let spec = JobSpec::parse(&body).map_err(ApiError::from)?;
    let idempotency_key = idempotency_key(&headers)?;
    check_inputs(&spec).await?;
    // Hash the parsed spec, not the bytes: the same job with other whitespace is the same job.
    let request_sha256 = Sha256::digest(serde_json::to_vec(&spec).map_err(anyhow::Error::from)?);
    let project = state.settings.default_project.as_str();
    let new = NewJob {
        project,
        spec: &spec,
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
    Ok((status, [(header::LOCATION, location)], Json(JobView::from(job))).into_response())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else { return Ok(None) };
    let key = value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string()))
        .ok_or_else(|| ApiError::validation("Idempotency-Key", "must be 1-255 visible ASCII characters"))
}

/// Checks that the base model and the dataset exist and that we can train the model,
/// before anything is stored.
async fn check_inputs(spec: &JobSpec) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Err(message) = check_model(&spec.base_model).await {
        errors.push(FieldError::new("base_model", message));
    }
    let mut datasets = vec![("dataset.train", &spec.dataset.train)];
    if let Some(v) = &spec.dataset.validation {
        datasets.push(("dataset.validation", v));
    }
    for (field, uri) in datasets {
        if let Err(message) = check_object(uri).await {
            errors.push(FieldError::new(field, message));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(SpecError { errors, malformed: false }))
    }
}

async fn check_object(uri: &str) -> Result<(), String> {
    let (store, name) = Store::open_object(uri).map_err(unreachable)?;
    match store.size(&name).await.map_err(unreachable)? {
        Some(_) => Ok(()),
        None => Err(format!("no object at {uri}")),
    }
}

async fn check_model(uri: &str) -> Result<(), String> {
    let store = Store::open(uri).map_err(unreachable)?;
    let config = match store.get("config.json").await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound(_)) => return Err(format!("{uri} has no config.json; expected a Hugging Face model directory")),
        Err(e) => return Err(unreachable(e)),
    };
    let summary: ModelConfigSummary =
        serde_json::from_slice(&config).map_err(|e| format!("{uri}/config.json is not valid: {e}"))?;
    summary.check_supported()?;
    if store.size("tokenizer.json").await.map_err(unreachable)?.is_none() {
        return Err(format!("{uri} has no tokenizer.json"));
    }
    let single = store.size("model.safetensors").await.map_err(unreachable)?;
    let sharded = store.size("model.safetensors.index.json").await.map_err(unreachable)?;
    if single.is_none() && sharded.is_none() {
        return Err(format!("{uri} has neither model.safetensors nor model.safetensors.index.json"));
    }
    Ok(())
}

fn unreachable(e: StorageError) -> String {
    match e {
        StorageError::NotFound(uri) => format!("nothing found at {uri}"),
        e => format!("cannot be read: {e}"),
    }
}

pub async fn get(State(state): State<AppState>, ApiPath(id): ApiPath<Uuid>) -> Result<Json<JobView>, ApiError> {
    let job = jobs::get(&state.pool, &state.settings.default_project, id).await?.ok_or(ApiError::NotFound("job"))?;
    Ok(Json(job.into()))
}

#[derive(Deserialize)]
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

#[derive(Serialize)]
pub struct EventsPage {
    events: Vec<EventRow>,
    /// Pass as `after` to get the next page; `null` when this page was not full.
    next_after: Option<i64>,
}

pub async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<EventsPage>, ApiError> {
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    jobs::get(&state.pool, &state.settings.default_project, id).await?.ok_or(ApiError::NotFound("job"))?;
    let events = jobs::events(&state.pool, id, q.after, q.limit).await?;
    let next_after = (events.len() as i64 == q.limit).then(|| events.last().map(|e| e.seq)).flatten();
    Ok(Json(EventsPage { events, next_after }))
}
