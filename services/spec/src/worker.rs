//! The protocol between the control plane and a worker (`loraforge-trainer run`).
//!
//! The worker gets its job id, the control-plane URL and a token for that job alone
//! (env `LORAFORGE_WORKER_TOKEN`, never argv). Then, under `/v1/worker/jobs/{id}`:
//! `GET` the assignment, `POST events`, `POST heartbeat`, `POST versions` to reserve
//! the version number (job -> publishing), upload, `POST complete` (the control plane
//! reads the stored `manifest.json`, the one declaration of what was published, and
//! verifies every file it lists; then the version is `ready`), or `POST fail`.

use crate::job::{ErrorKind, JobStatus, ResolvedJobSpec};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const TOKEN_ENV: &str = "LORAFORGE_WORKER_TOKEN";

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerAssignment {
    pub job_id: Uuid,
    pub attempt: i32,
    pub project: String,
    /// The job's spec with every input a URI (registered names resolved at submission).
    #[cfg_attr(feature = "openapi", schema(value_type = crate::job::JobSpec))]
    pub spec: ResolvedJobSpec,
    /// Root URL of the artifact store (`file:///…`, `s3://bucket/prefix`).
    pub storage_url: String,
    /// The version to continue from, when the job names a parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentArtifact>,
    /// The gate the adapter must pass: the worker evaluates when `enabled`; the control
    /// plane judges the report against the same policy.
    pub safety: crate::safety::EffectivePolicy,
}

/// A published adapter version the worker starts from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParentArtifact {
    pub adapter_name: String,
    pub version: i32,
    /// The version's folder, relative to the storage root.
    pub prefix: String,
}

/// What happened in a job, as stored in `job_events` and streamed to users.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventPayload {
    /// A lifecycle transition; written by the control plane only.
    Status {
        status: JobStatus,
        message: Option<String>,
    },
    /// One optimizer step.
    Progress {
        step: u32,
        total_steps: u32,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
        eta_seconds: Option<f64>,
        /// Global L2 norm of the step's gradients, before clipping (`null` from older workers).
        #[serde(default)]
        grad_norm: Option<f64>,
        /// The most GPU memory the run has used so far, in bytes: the device's memory in use
        /// (NVML), sampled during training, minus what was in use before the run started.
        /// `null` on the CPU (and from older workers).
        #[serde(default)]
        peak_gpu_memory_bytes: Option<u64>,
    },
    /// Validation loss at a step.
    Eval { step: u32, loss: f64, tokens: u64 },
    /// How far the safety evaluation is: `done` of `total` prompts answered or scored
    /// (both models; the base model's share is left out when a stored one is reused).
    Evaluation { done: u32, total: u32 },
    /// The safety evaluation's results (base vs adapted).
    Safety { report: crate::safety::SafetyReport },
    /// A checkpoint was saved (`resumed: false`) or training resumed from one (`true`).
    Checkpoint {
        step: u32,
        prefix: String,
        resumed: bool,
    },
    /// A free-form line from the worker (loading, device, data stats).
    Log { message: String },
    /// An adaptive-rank method's allocation after `step` (sent when it changes): the total
    /// rank, the budget the method steers the total toward, each adapted module's rank (full
    /// module path; a pruned module has 0), and for gated methods the fraction of gates at
    /// exactly zero.
    Ranks {
        step: u32,
        total: u32,
        /// AdaLoRA's scheduled budget at this step, IncreLoRA's and TriAdaptLoRA's final one;
        /// `null` for the gated methods, whose threshold alone decides.
        #[serde(default)]
        budget: Option<u32>,
        per_module: std::collections::BTreeMap<String, u32>,
        sparsity: Option<f64>,
    },
}

impl EventPayload {
    pub fn kind(&self) -> &'static str {
        match self {
            EventPayload::Status { .. } => "status",
            EventPayload::Progress { .. } => "progress",
            EventPayload::Eval { .. } => "eval",
            EventPayload::Evaluation { .. } => "evaluation",
            EventPayload::Safety { .. } => "safety",
            EventPayload::Checkpoint { .. } => "checkpoint",
            EventPayload::Log { .. } => "log",
            EventPayload::Ranks { .. } => "ranks",
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<EventPayload>,
}

/// The worker moved on to a new phase (`running` when training starts).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRequest {
    pub status: JobStatus,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The user asked to cancel: the worker should stop and exit.
    pub cancel_requested: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservedVersion {
    pub version: i32,
    /// Where to upload, relative to the storage root: `adapters/<project>/<adapter>/v<N>`.
    pub prefix: String,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub version: i32,
    /// sha256 of the `manifest.json` the worker uploaded: the manifest lists every other
    /// file with its digest, so this one value pins the whole version.
    pub manifest_sha256: String,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailRequest {
    pub kind: ErrorKind,
    pub message: String,
}
