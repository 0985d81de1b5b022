//! The typed answers of the API: what a job, an event, a version and its lineage look
//! like to a client. One module, so the OpenAPI document (and the web UI's client generated
//! from it) describes exactly what is sent.

use crate::jobs::{EventRow, JobRow};
use crate::registry::lineage::Graph;
use crate::registry::{VersionRow, VersionStatus};
use chrono::{DateTime, Utc};
use loraforge_spec::safety::{SafetyReport, SafetyVerdict};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{
    ErrorKind, FileDigest, JobSpec, JobStatus, MethodConfig, TrainingConfig, TrainingMetrics,
};
use loraforge_storage::Store;
use serde::Serialize;
use uuid::Uuid;

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
    /// The spec as stored: registered names already resolved to URIs.
    pub spec: JobSpec,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A row of the job list: the job, and how far its training has come.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobSummary {
    #[serde(flatten)]
    pub job: JobView,
    /// From the newest progress event; `null` before the first step.
    pub progress: Option<JobProgress>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobProgress {
    pub step: u32,
    pub total_steps: u32,
    /// The loss of that step.
    pub loss: f64,
}

impl JobProgress {
    /// What a progress event says; `None` for any other event.
    pub fn of(event: &EventPayload) -> Option<JobProgress> {
        match *event {
            EventPayload::Progress {
                step,
                total_steps,
                loss,
                ..
            } => Some(JobProgress {
                step,
                total_steps,
                loss,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobErrorView {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AdapterVersionRef {
    pub name: String,
    pub version: i32,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
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
            status: r.status,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            spec: r.spec.0.into_inner(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

/// One event of a job: its sequence number (the SSE `id`), when, and what happened.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    /// The event itself: `kind` and its fields.
    #[serde(flatten)]
    pub payload: EventPayload,
}

impl From<EventRow> for EventView {
    fn from(e: EventRow) -> Self {
        EventView {
            seq: e.seq,
            created_at: e.created_at,
            payload: e.payload.0,
        }
    }
}

/// A version as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionView {
    pub adapter_name: String,
    pub version: i32,
    pub status: VersionStatus,
    /// Where the files are: the version's folder in the artifact store.
    pub uri: String,
    pub files: Vec<FileDigest>,
    pub method: MethodConfig,
    /// The training settings of the job that made it.
    pub hyperparameters: TrainingConfig,
    pub metrics: Option<TrainingMetrics>,
    pub tags: Vec<String>,
    pub base_model: String,
    pub parent: Option<ParentView>,
    /// The safety evaluation (base vs adapted) and the gate's verdict, when it ran.
    pub evaluation: Option<SafetyReport>,
    pub safety_verdict: Option<SafetyVerdict>,
    pub job_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ParentView {
    pub adapter_name: String,
    pub version: i32,
}

fn parent_view(row: &VersionRow) -> Option<ParentView> {
    row.parent().map(|(adapter_name, version)| ParentView {
        adapter_name,
        version,
    })
}

impl VersionView {
    pub fn new(row: VersionRow, store: &Store) -> VersionView {
        VersionView {
            parent: parent_view(&row),
            uri: store.uri_of(&row.storage_prefix),
            base_model: row.base_model_uri,
            tags: row.tags,
            evaluation: row.evaluation.map(|e| e.0),
            safety_verdict: row.safety_verdict.map(|v| v.0),
            adapter_name: row.adapter_name,
            version: row.version,
            status: row.status,
            files: row.files.0,
            method: row.method.0,
            hyperparameters: row.hyperparameters.0,
            metrics: row.metrics.map(|m| m.0),
            job_id: row.job_id,
            created_at: row.created_at,
            ready_at: row.ready_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageView {
    pub adapter_name: String,
    pub version: i32,
    pub job_id: Uuid,
    pub base_model: LineageInput,
    pub dataset: LineageInput,
    pub parent: Option<ParentView>,
    /// Ancestors and their inputs up to the requested depth, as a graph.
    pub graph: Graph,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageInput {
    pub uri: String,
    /// Known once the worker has read the input; `null` before.
    pub sha256: Option<String>,
    /// The registered name, when the job named it so.
    pub name: Option<String>,
}

impl LineageView {
    pub fn new(row: VersionRow, graph: Graph) -> LineageView {
        LineageView {
            parent: parent_view(&row),
            adapter_name: row.adapter_name,
            version: row.version,
            job_id: row.job_id,
            base_model: LineageInput {
                uri: row.base_model_uri,
                sha256: row.base_model_sha256,
                name: row.base_model_name,
            },
            dataset: LineageInput {
                uri: row.dataset_uri,
                sha256: row.dataset_sha256,
                name: row.dataset_name,
            },
            graph,
        }
    }
}
