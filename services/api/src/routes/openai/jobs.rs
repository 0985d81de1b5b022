//! `/v1/fine_tuning/jobs…`: OpenAI's fine-tuning jobs over ours. A request becomes a
//! `JobSpec` (validated and submitted exactly as `POST /v1/jobs` would), a job row becomes a
//! `fine_tuning.job`, job events become `fine_tuning.job.event`s and checkpoint events
//! `fine_tuning.job.checkpoint`s. Ids: `ftjob-<job uuid, 32 hex digits>`,
//! `ftevent-<event seq>`, `ftckpt-<event seq>`.

use super::files::{self, file_id};
use super::{
    errors, page_limit, rename_fields, unix, HasId, ListPage, OaCaller, OaJson, OaPath, OaQuery,
    OpenAiError,
};
use crate::ApiState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_core::jobs::{self, submission, submission::Submitted, EventRow, JobCursor, JobRow};
use loraforge_core::registry::inputs::{self, InputKind};
use loraforge_core::Error;
use loraforge_spec::job::MAX_STEPS;
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{AdapterName, JobSpec, JobStatus};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use uuid::Uuid;

/// The learning rate `learning_rate_multiplier` multiplies (a usual LoRA learning rate).
pub const BASE_LEARNING_RATE: f64 = 2e-4;
/// `n_epochs` when it is `auto` (or not given) and no step limit is: OpenAI's usual choice
/// for small files.
pub const AUTO_EPOCHS: u32 = 3;
/// The method of a `supervised` job without the extension's `method`.
fn default_method() -> Value {
    json!({"type": "lora", "r": 8})
}

const JOB_ID: &str = "ftjob-";
const EVENT_ID: &str = "ftevent-";
const CHECKPOINT_ID: &str = "ftckpt-";

// --- The request ---------------------------------------------------------------------------

/// `POST /v1/fine_tuning/jobs`, as OpenAI defines it, plus the `loraforge` extension.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OpenAiCreateJob)]
pub struct CreateJobRequest {
    /// The name of a registered base model.
    pub model: String,
    /// A file id (`file-…`) or a registered dataset's name.
    pub training_file: String,
    #[serde(default)]
    pub validation_file: Option<String>,
    /// Deprecated by OpenAI in favour of `method.supervised.hyperparameters`; either works.
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
    #[serde(default)]
    pub method: Option<MethodRequest>,
    /// The adapter's name (lowercased); default `<model>-ft`.
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Not supported: a non-empty list is refused.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub integrations: Option<Vec<Value>>,
    /// Accepted and not stored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    #[allow(dead_code)]
    pub metadata: Option<Value>,
    /// What OpenAI's request cannot say: any of our adapter methods, any training setting.
    #[serde(default)]
    pub loraforge: Option<Extension>,
}

/// Each `"auto"` or a number.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[schema(as = OpenAiHyperparameters)]
pub struct Hyperparameters {
    /// `"auto"` (4) or a number: `training.batch_size`.
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    pub batch_size: Option<Value>,
    /// `"auto"` (1) or a number: `training.learning_rate` = 2e-4 × this.
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    pub learning_rate_multiplier: Option<Value>,
    /// `"auto"` (3) or a number: `training.epochs`.
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    pub n_epochs: Option<Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OpenAiMethodRequest)]
pub struct MethodRequest {
    /// `supervised` only.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub supervised: Option<SupervisedRequest>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OpenAiSupervisedRequest)]
pub struct SupervisedRequest {
    #[serde(default)]
    pub hyperparameters: Option<Hyperparameters>,
}

/// The `loraforge` object of a job request (with the SDK: `extra_body={"loraforge": {…}}`).
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OpenAiLoraforgeOptions)]
pub struct Extension {
    /// Any of our methods, as `JobSpec.method` (`{"type": "adalora", …}`); default
    /// `{"type": "lora", "r": 8}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub method: Option<Value>,
    /// `JobSpec.training` fields, over what the hyperparameters say (`max_steps`,
    /// `seq_len`, `schedule`, …).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub training: Option<Map<String, Value>>,
    /// The adapter's name, over `suffix`.
    #[serde(default)]
    pub adapter_name: Option<String>,
    #[serde(default)]
    pub validation_fraction: Option<f64>,
    /// As `JobSpec.parent`, `safety` and `resources`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parent: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub safety: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub resources: Option<Value>,
}

/// A hyperparameter: `None` for absent or `"auto"`.
fn hyperparameter<T: serde::de::DeserializeOwned>(
    name: &str,
    value: &Option<Value>,
) -> Result<Option<T>, OpenAiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            OpenAiError::invalid(
                &format!("hyperparameters.{name}"),
                format!("must be \"auto\" or a positive number, not {v}"),
            )
        }),
    }
}

/// The hyperparameters of a `supervised` request: top-level (deprecated by OpenAI) or under
/// `method`, not both.
fn chosen_hyperparameters(
    top: Option<Hyperparameters>,
    method: Option<MethodRequest>,
) -> Result<Hyperparameters, OpenAiError> {
    let Some(method) = method else {
        return Ok(top.unwrap_or_default());
    };
    if method.type_ != "supervised" {
        return Err(OpenAiError::invalid(
            "method.type",
            format!(
                "{:?} is not supported, only \"supervised\"; the loraforge extension's \"method\" \
                 picks the adapter method",
                method.type_
            ),
        ));
    }
    match (top, method.supervised.and_then(|s| s.hyperparameters)) {
        (Some(_), Some(_)) => Err(OpenAiError::invalid(
            "hyperparameters",
            "give them once: in method.supervised.hyperparameters (or the deprecated top level)",
        )),
        (top, under_method) => Ok(under_method.or(top).unwrap_or_default()),
    }
}

/// The job spec a request asks for, as JSON (validated by `JobSpec::parse` after).
async fn spec_of(
    state: &ApiState,
    project: &str,
    req: CreateJobRequest,
) -> Result<Value, OpenAiError> {
    if req.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(OpenAiError::invalid(
            "integrations",
            "not supported here; a job's metrics are its events (GET …/events)",
        ));
    }
    let hyperparameters = chosen_hyperparameters(req.hyperparameters, req.method)?;
    let batch_size: Option<u32> = hyperparameter("batch_size", &hyperparameters.batch_size)?;
    let multiplier: Option<f64> = hyperparameter(
        "learning_rate_multiplier",
        &hyperparameters.learning_rate_multiplier,
    )?;
    let n_epochs: Option<u32> = hyperparameter("n_epochs", &hyperparameters.n_epochs)?;

    // `model` names a registered base model; a newcomer's typo gets the list of them.
    let model_known = AdapterName::parse(&req.model).is_ok()
        && inputs::get(&state.pool, project, InputKind::BaseModel, &req.model)
            .await?
            .is_some();
    if !model_known {
        let why =
            inputs::unknown_name(&state.pool, project, InputKind::BaseModel, &req.model).await?;
        return Err(OpenAiError::invalid("model", why));
    }
    let dataset = |param: &'static str, id: String| async move {
        match files::find_dataset(state, project, &id).await? {
            Some(row) => Ok(row.name),
            None => {
                let why =
                    inputs::unknown_name(&state.pool, project, InputKind::Dataset, &id).await?;
                Err(OpenAiError::invalid(
                    param,
                    format!("{why}. A file id is `file-` and a dataset's name: POST /v1/files uploads one"),
                ))
            }
        }
    };
    let train = dataset("training_file", req.training_file).await?;
    let validation = match req.validation_file {
        Some(id) => Some(dataset("validation_file", id).await?),
        None => None,
    };

    let ext = req.loraforge.unwrap_or_default();
    let adapter_name = match (ext.adapter_name, req.suffix) {
        (Some(name), _) => name,
        (None, Some(suffix)) => suffix.to_lowercase(),
        (None, None) => default_adapter_name(&req.model),
    };
    let ext_training = ext.training.unwrap_or_default();
    // `auto` epochs only where nothing else bounds the run.
    let epochs = n_epochs.or((!ext_training.contains_key("max_steps")).then_some(AUTO_EPOCHS));
    let mut training = json!({
        "max_steps": MAX_STEPS,
        "learning_rate": BASE_LEARNING_RATE * multiplier.unwrap_or(1.0),
    });
    if let Some(b) = batch_size {
        training["batch_size"] = b.into();
    }
    if let Some(e) = epochs {
        training["epochs"] = e.into();
    }
    if let Some(seed) = req.seed {
        training["seed"] = seed.into();
    }
    for (key, value) in ext_training {
        training[key] = value;
    }
    let mut dataset = json!({"train": train});
    if let Some(v) = validation {
        dataset["validation"] = v.into();
    }
    if let Some(f) = ext.validation_fraction {
        dataset["validation_fraction"] = f.into();
    }
    let mut spec = json!({
        "adapter_name": adapter_name,
        "base_model": req.model,
        "dataset": dataset,
        "method": ext.method.unwrap_or_else(default_method),
        "training": training,
    });
    for (key, value) in [
        ("parent", ext.parent),
        ("safety", ext.safety),
        ("resources", ext.resources),
    ] {
        if let Some(v) = value {
            spec[key] = v;
        }
    }
    Ok(spec)
}

/// `<model>-ft`, the model's part cut to fit a name.
fn default_adapter_name(model: &str) -> String {
    let mut base: String = model.chars().take(60).collect();
    while base.ends_with(['-', '.', '_']) {
        base.pop();
    }
    format!("{base}-ft")
}

/// Our field names in OpenAI's, where the request had them.
fn openai_param(field: &str, suffix_given: bool) -> String {
    match field {
        "base_model" => "model".into(),
        "dataset.train" => "training_file".into(),
        "dataset.validation" => "validation_file".into(),
        "dataset.validation_fraction" => "loraforge.validation_fraction".into(),
        "adapter_name" if suffix_given => "suffix".into(),
        "training.batch_size" => "hyperparameters.batch_size".into(),
        "training.learning_rate" => "hyperparameters.learning_rate_multiplier".into(),
        "training.epochs" => "hyperparameters.n_epochs".into(),
        "training.seed" => "seed".into(),
        other => format!("loraforge.{other}"),
    }
}

/// Creates a job.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "openai", operation_id = "openai_create_job",
    request_body = CreateJobRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the same job")),
    responses((status = 200, body = FineTuningJob), errors::BadRequest, errors::Unauthorized, errors::Conflict))]
pub async fn create(
    State(state): State<ApiState>,
    caller: OaCaller,
    headers: HeaderMap,
    OaJson(req): OaJson<CreateJobRequest>,
) -> Result<Json<FineTuningJob>, OpenAiError> {
    caller.require(Scope::Submit)?;
    let suffix_given = req.suffix.is_some()
        && req
            .loraforge
            .as_ref()
            .is_none_or(|e| e.adapter_name.is_none());
    let key = crate::routes::jobs::idempotency_key(&headers)?;
    let spec = spec_of(&state, &caller.project, req).await?;
    let submitted = async {
        let bytes = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        let spec = JobSpec::parse(&bytes)?;
        submission::submit(&state, &caller.project, spec, key.as_deref()).await
    }
    .await
    .map_err(|e| rename_fields(e.into(), |f| openai_param(f, suffix_given)))?;
    let job = match submitted {
        Submitted::Created(job) | Submitted::Replayed(job) => job,
    };
    Ok(Json(one_job(&state, job).await?))
}

// --- The job object ------------------------------------------------------------------------

/// OpenAI's `fine_tuning.job`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiFineTuningJob)]
pub struct FineTuningJob {
    /// `ftjob-` and our job id's 32 hex digits.
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub error: Option<JobError>,
    /// The published adapter as `name@version` (what `GET /v1/adapters/{name}/resolve`
    /// accepts); `null` until the job succeeds.
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<i64>,
    pub hyperparameters: HyperparametersOut,
    /// The registered base model's name (its URI for a native job that named none).
    pub model: String,
    /// The project.
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub seed: u64,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled` (`validating_files` never:
    /// files are checked at upload, jobs at submission).
    pub status: &'static str,
    pub trained_tokens: Option<u64>,
    pub training_file: String,
    pub validation_file: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub integrations: Vec<Value>,
    /// From the newest progress event's ETA, while running.
    pub estimated_finish: Option<i64>,
    pub method: MethodOut,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub user_provided_suffix: Option<String>,
    /// The job as we know it.
    pub loraforge: JobExtension,
}

impl HasId for FineTuningJob {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiJobError)]
pub struct JobError {
    /// Our error kind: `user_error`, `system_error`, `safety_blocked`, …
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiHyperparametersOut)]
pub struct HyperparametersOut {
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
    /// `null` for a job bounded by steps alone.
    pub n_epochs: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiMethod)]
pub struct MethodOut {
    /// Always `supervised`, whatever the adapter method (`loraforge.method`).
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub supervised: SupervisedOut,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiSupervised)]
pub struct SupervisedOut {
    pub hyperparameters: HyperparametersOut,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiJobLoraforge)]
pub struct JobExtension {
    pub job_id: Uuid,
    /// Our status, finer than OpenAI's.
    pub status: JobStatus,
    pub adapter_name: String,
    /// The adapter method (`lora`, `adalora`, …).
    pub method: String,
    pub attempt: i32,
}

/// OpenAI's status for ours.
pub fn openai_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued | JobStatus::Scheduled => "queued",
        JobStatus::Running | JobStatus::Evaluating | JobStatus::Publishing => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::CancelRequested | JobStatus::Cancelled => "cancelled",
    }
}

pub fn job_id(id: Uuid) -> String {
    format!("{JOB_ID}{}", id.simple())
}

/// Our id from `ftjob-…` (or a plain UUID); `None` names no job.
pub fn parse_job_id(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id.strip_prefix(JOB_ID).unwrap_or(id)).ok()
}

/// What a job's object needs besides its row.
#[derive(Default)]
struct Related {
    /// Job -> (base model name, dataset name).
    names: HashMap<Uuid, (Option<String>, Option<String>)>,
    /// Job -> ETA seconds of the newest progress event.
    eta: HashMap<Uuid, f64>,
    /// Dataset URI -> name, for validation files.
    datasets: HashMap<String, String>,
}

impl Related {
    async fn of(state: &ApiState, project: &str, rows: &[JobRow]) -> Result<Related, OpenAiError> {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let names = jobs::input_names(&state.pool, &ids)
            .await?
            .into_iter()
            .map(|(id, model, dataset)| (id, (model, dataset)))
            .collect();
        let running: Vec<Uuid> = rows
            .iter()
            .filter(|r| !r.status.is_final())
            .map(|r| r.id)
            .collect();
        let eta = jobs::latest_progress_of(&state.pool, &running)
            .await?
            .into_iter()
            .filter_map(|(id, event)| match event {
                EventPayload::Progress {
                    eta_seconds: Some(eta),
                    ..
                } => Some((id, eta)),
                _ => None,
            })
            .collect();
        let datasets = if rows.iter().any(|r| r.spec.dataset.validation.is_some()) {
            inputs::list(&state.pool, project, InputKind::Dataset)
                .await?
                .into_iter()
                .map(|d| (d.uri, d.name))
                .collect()
        } else {
            HashMap::new()
        };
        Ok(Related {
            names,
            eta,
            datasets,
        })
    }

    fn job(&self, row: JobRow) -> FineTuningJob {
        let spec = &row.spec;
        let (model, dataset) = self.names.get(&row.id).cloned().unwrap_or_default();
        let hyperparameters = || HyperparametersOut {
            batch_size: spec.training.batch_size,
            learning_rate_multiplier: spec.training.learning_rate / BASE_LEARNING_RATE,
            n_epochs: spec.training.epochs,
        };
        let validation_file = spec
            .validation_uri()
            .map(|uri| match self.datasets.get(uri) {
                Some(name) => file_id(name),
                None => uri.to_string(),
            });
        let estimated_finish = self
            .eta
            .get(&row.id)
            .filter(|eta| eta.is_finite() && **eta >= 0.0)
            .map(|eta| unix(chrono::Utc::now()) + eta.round() as i64);
        FineTuningJob {
            id: job_id(row.id),
            object: "fine_tuning.job",
            created_at: unix(row.created_at),
            error: (row.status == JobStatus::Failed).then(|| JobError {
                code: row.error_kind.map_or("system_error", |k| k.as_str()).into(),
                message: row.error_message.clone().unwrap_or_default(),
                param: None,
            }),
            fine_tuned_model: (row.status == JobStatus::Succeeded)
                .then(|| {
                    row.adapter_version
                        .map(|v| format!("{}@{v}", row.adapter_name))
                })
                .flatten(),
            finished_at: row.finished_at.map(unix),
            hyperparameters: hyperparameters(),
            model: model.unwrap_or_else(|| spec.base_model_uri().to_string()),
            organization_id: row.project.clone(),
            result_files: Vec::new(),
            seed: spec.training.seed,
            status: openai_status(row.status),
            trained_tokens: None,
            training_file: dataset.map_or_else(|| spec.train_uri().to_string(), |d| file_id(&d)),
            validation_file,
            integrations: Vec::new(),
            estimated_finish,
            method: MethodOut {
                type_: "supervised",
                supervised: SupervisedOut {
                    hyperparameters: hyperparameters(),
                },
            },
            metadata: None,
            user_provided_suffix: None,
            loraforge: JobExtension {
                job_id: row.id,
                status: row.status,
                method: spec.method.name().to_string(),
                adapter_name: row.adapter_name.clone(),
                attempt: row.attempt,
            },
        }
    }
}

async fn one_job(state: &ApiState, row: JobRow) -> Result<FineTuningJob, OpenAiError> {
    let related = Related::of(state, &row.project, std::slice::from_ref(&row)).await?;
    Ok(related.job(row))
}

/// The caller's job that a path id names.
async fn find_job(state: &ApiState, project: &str, id: &str) -> Result<JobRow, OpenAiError> {
    let id = parse_job_id(id).ok_or(Error::NotFound("fine-tuning job"))?;
    Ok(jobs::get(&state.pool, project, id)
        .await?
        .ok_or(Error::NotFound("fine-tuning job"))?)
}

// --- Routes --------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The last id of the previous page.
    after: Option<String>,
    limit: Option<i64>,
}

super::list_type!(JobList, OpenAiJobList, FineTuningJob);
super::list_type!(EventList, OpenAiEventList, JobEvent);
super::list_type!(CheckpointList, OpenAiCheckpointList, JobCheckpoint);

/// The project's jobs, newest first (default 20 a page, at most 100).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "openai", operation_id = "openai_list_jobs", params(PageQuery),
    responses((status = 200, body = JobList), errors::BadRequest, errors::Unauthorized))]
pub async fn list(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaQuery(q): OaQuery<PageQuery>,
) -> Result<Json<JobList>, OpenAiError> {
    caller.require(Scope::Read)?;
    let limit = page_limit(q.limit, 20, 100)?;
    let cursor = match &q.after {
        Some(after) => {
            let job = find_job(&state, &caller.project, after)
                .await
                .map_err(|_| OpenAiError::invalid("after", format!("no job {after:?}")))?;
            Some(JobCursor::after(&job))
        }
        None => None,
    };
    let rows = jobs::list(
        &state.pool,
        &caller.project,
        &[],
        None,
        cursor,
        limit as i64 + 1,
    )
    .await?;
    let related = Related::of(&state, &caller.project, &rows).await?;
    let items = rows.into_iter().map(|r| related.job(r)).collect();
    Ok(Json(ListPage::of(items, limit).into()))
}

#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}", tag = "openai", operation_id = "openai_retrieve_job",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = FineTuningJob), errors::Unauthorized, errors::NotFound))]
pub async fn retrieve(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
) -> Result<Json<FineTuningJob>, OpenAiError> {
    caller.require(Scope::Read)?;
    let row = find_job(&state, &caller.project, &id).await?;
    Ok(Json(one_job(&state, row).await?))
}

/// Cancels a job: a queued one at once, a running one is stopped (`cancelled` from then on,
/// `loraforge.status` says `cancel_requested` until the worker is gone).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", tag = "openai", operation_id = "openai_cancel_job",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = FineTuningJob), errors::Unauthorized, errors::NotFound, errors::Conflict))]
pub async fn cancel(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
) -> Result<Json<FineTuningJob>, OpenAiError> {
    caller.require(Scope::Submit)?;
    let row = find_job(&state, &caller.project, &id).await?;
    let row = jobs::cancel(&state, &caller.project, row.id).await?;
    Ok(Json(one_job(&state, row).await?))
}

// --- Events --------------------------------------------------------------------------------

/// OpenAI's `fine_tuning.job.event`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiJobEvent)]
pub struct JobEvent {
    /// `ftevent-` and the event's sequence number.
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    pub message: String,
    /// `metrics` for training and validation losses, else `message`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// The event as the native API shows it (`kind` and its fields); progress events add
    /// OpenAI's `train_loss`, eval events `valid_loss`.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl HasId for JobEvent {
    fn id(&self) -> &str {
        &self.id
    }
}

fn status_message(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued => "Job queued",
        JobStatus::Scheduled => "Job scheduled on a worker",
        JobStatus::Running => "Fine-tuning job started",
        JobStatus::Evaluating => "Evaluating the adapter (safety gate)",
        JobStatus::Publishing => "Publishing the adapter",
        JobStatus::Succeeded => "The job has successfully completed",
        JobStatus::Failed => "The job failed",
        JobStatus::CancelRequested => "Cancellation requested",
        JobStatus::Cancelled => "The job was cancelled",
    }
}

/// One of our events as OpenAI's.
pub fn job_event(row: EventRow) -> JobEvent {
    let payload = row.payload.0;
    let mut data = serde_json::to_value(&payload).unwrap_or(Value::Null);
    let (level, type_, message) = match &payload {
        EventPayload::Status { status, message } => (
            match status {
                JobStatus::Failed => "error",
                JobStatus::CancelRequested | JobStatus::Cancelled => "warn",
                _ => "info",
            },
            "message",
            match message {
                Some(m) => format!("{}: {m}", status_message(*status)),
                None => status_message(*status).to_string(),
            },
        ),
        EventPayload::Progress {
            step,
            total_steps,
            loss,
            ..
        } => {
            data["train_loss"] = json!(loss);
            (
                "info",
                "metrics",
                format!("Step {step}/{total_steps}: training loss={loss:.4}"),
            )
        }
        EventPayload::Eval { step, loss, .. } => {
            data["valid_loss"] = json!(loss);
            (
                "info",
                "metrics",
                format!("Step {step}: validation loss={loss:.4}"),
            )
        }
        EventPayload::Checkpoint { step, resumed, .. } => (
            "info",
            "message",
            if *resumed {
                format!("Resumed from the checkpoint of step {step}")
            } else {
                format!("Checkpoint saved at step {step}")
            },
        ),
        EventPayload::Log { message } => ("info", "message", message.clone()),
        EventPayload::Evaluation { done, total } => (
            "info",
            "message",
            format!("Safety evaluation: {done}/{total} prompts"),
        ),
        EventPayload::Safety { report } => (
            "info",
            "message",
            format!(
                "Safety evaluation: refusal rate {:.2} (base {:.2}), perplexity {:.2} (base {:.2})",
                report.refusal_rate_adapted,
                report.refusal_rate_base,
                report.perplexity_adapted,
                report.perplexity_base
            ),
        ),
        EventPayload::Ranks { step, total, .. } => (
            "info",
            "metrics",
            format!("Step {step}: total rank {total}"),
        ),
    };
    JobEvent {
        id: format!("{EVENT_ID}{}", row.seq),
        object: "fine_tuning.job.event",
        created_at: unix(row.created_at),
        level,
        message,
        type_,
        data,
    }
}

/// The sequence number in an event or checkpoint id.
fn parse_seq(param: &str, prefix: &str, id: &str) -> Result<i64, OpenAiError> {
    id.strip_prefix(prefix)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            OpenAiError::invalid(param, format!("{id:?} is not an id this API returned"))
        })
}

/// The job's events, newest first (default 20 a page, at most 1000).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", tag = "openai", operation_id = "openai_list_job_events",
    params(("fine_tuning_job_id" = String, Path), PageQuery),
    responses((status = 200, body = EventList), errors::BadRequest, errors::Unauthorized, errors::NotFound))]
pub async fn events(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
    OaQuery(q): OaQuery<PageQuery>,
) -> Result<Json<EventList>, OpenAiError> {
    caller.require(Scope::Read)?;
    let job = find_job(&state, &caller.project, &id).await?;
    let limit = page_limit(q.limit, 20, 1000)?;
    let before = q
        .after
        .as_deref()
        .map(|a| parse_seq("after", EVENT_ID, a))
        .transpose()?;
    let rows =
        jobs::events_newest_first(&state.pool, job.id, before, None, limit as i64 + 1).await?;
    let items = rows.into_iter().map(job_event).collect();
    Ok(Json(ListPage::of(items, limit).into()))
}

// --- Checkpoints ---------------------------------------------------------------------------

/// OpenAI's `fine_tuning.job.checkpoint`: a checkpoint the job saved (its adapter, optimizer
/// and data position under `checkpoints/<job>/<step>` in the store, kept while the job runs).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiJobCheckpoint)]
pub struct JobCheckpoint {
    /// `ftckpt-` and the checkpoint event's sequence number.
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    /// The checkpoint's folder in the artifact store.
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub metrics: CheckpointMetrics,
    pub step_number: u32,
}

impl HasId for JobCheckpoint {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiCheckpointMetrics)]
pub struct CheckpointMetrics {
    pub step: u32,
    /// The loss of the last step up to the checkpoint.
    pub train_loss: Option<f64>,
    /// The validation loss at the checkpoint's step, where one was computed there.
    pub valid_loss: Option<f64>,
}

/// The job's checkpoints, newest first (default 10 a page, at most 100).
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", tag = "openai", operation_id = "openai_list_job_checkpoints",
    params(("fine_tuning_job_id" = String, Path), PageQuery),
    responses((status = 200, body = CheckpointList), errors::BadRequest, errors::Unauthorized, errors::NotFound))]
pub async fn checkpoints(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
    OaQuery(q): OaQuery<PageQuery>,
) -> Result<Json<CheckpointList>, OpenAiError> {
    caller.require(Scope::Read)?;
    let job = find_job(&state, &caller.project, &id).await?;
    let limit = page_limit(q.limit, 10, 100)?;
    let mut before = q
        .after
        .as_deref()
        .map(|a| parse_seq("after", CHECKPOINT_ID, a))
        .transpose()?;
    // Saved checkpoints only (a resumption is a checkpoint event too), one more than a page.
    let mut saved = Vec::new();
    'pages: loop {
        let batch =
            jobs::events_newest_first(&state.pool, job.id, before, Some("checkpoint"), 100).await?;
        let Some(last) = batch.last() else { break };
        before = Some(last.seq);
        let exhausted = batch.len() < 100;
        for row in batch {
            if matches!(
                row.payload.0,
                EventPayload::Checkpoint { resumed: false, .. }
            ) {
                saved.push(row);
                if saved.len() > limit {
                    break 'pages;
                }
            }
        }
        if exhausted {
            break;
        }
    }
    let mut items = Vec::with_capacity(saved.len());
    for row in saved {
        let EventPayload::Checkpoint {
            step, ref prefix, ..
        } = row.payload.0
        else {
            continue;
        };
        let last_of = |kind: &'static str| {
            jobs::events_newest_first(&state.pool, job.id, Some(row.seq), Some(kind), 1)
        };
        let train_loss = last_of("progress")
            .await?
            .into_iter()
            .find_map(|e| match e.payload.0 {
                EventPayload::Progress { loss, .. } => Some(loss),
                _ => None,
            });
        let valid_loss = last_of("eval")
            .await?
            .into_iter()
            .find_map(|e| match e.payload.0 {
                EventPayload::Eval { step: at, loss, .. } if at == step => Some(loss),
                _ => None,
            });
        items.push(JobCheckpoint {
            id: format!("{CHECKPOINT_ID}{}", row.seq),
            object: "fine_tuning.job.checkpoint",
            created_at: unix(row.created_at),
            fine_tuned_model_checkpoint: state.store.uri_of(prefix),
            fine_tuning_job_id: job_id(job.id),
            metrics: CheckpointMetrics {
                step,
                train_loss,
                valid_loss,
            },
            step_number: step,
        });
    }
    Ok(Json(ListPage::of(items, limit).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let id = Uuid::new_v4();
        assert_eq!(parse_job_id(&job_id(id)), Some(id));
        assert_eq!(parse_job_id(&id.to_string()), Some(id));
        assert_eq!(parse_job_id("ftjob-nope"), None);
        assert_eq!(parse_seq("after", EVENT_ID, "ftevent-42").unwrap(), 42);
        assert!(parse_seq("after", EVENT_ID, "ftckpt-42").is_err());
    }

    #[test]
    fn default_adapter_names_are_names() {
        assert_eq!(default_adapter_name("tiny"), "tiny-ft");
        let long = default_adapter_name(&"m".repeat(63));
        assert!(AdapterName::parse(&long).is_ok(), "{long}");
    }

    #[test]
    fn statuses_map_onto_openais() {
        for status in JobStatus::ALL {
            assert!(["queued", "running", "succeeded", "failed", "cancelled"]
                .contains(&openai_status(status)));
        }
    }
}
