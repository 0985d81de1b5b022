//! `manifest.json`, published beside every adapter version: what it is, where it
//! came from (lineage) and how it did (metrics).

use crate::job::TrainingConfig;
use crate::methods::MethodConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A stored file of an artifact, as the registry records and verifies it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// An input identified by where it was read and what it contained.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRef {
    pub uri: String,
    pub sha256: String,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetrics {
    pub steps: u32,
    pub tokens: u64,
    /// Mean loss of the first step's batch.
    pub initial_loss: f64,
    /// Mean loss over the last steps (last 10% of steps, at least one).
    pub final_loss: f64,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub trainable_parameters: u64,
    /// Validation loss at the end of training, when the job has validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The most GPU memory training used, in bytes (as in the progress events); `null` on
    /// the CPU.
    #[serde(default)]
    pub peak_gpu_memory_bytes: Option<u64>,
}

pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    pub format: u32,
    pub project: String,
    pub adapter_name: String,
    pub version: i32,
    pub job_id: Uuid,
    pub method: MethodConfig,
    pub training: TrainingConfig,
    /// The base model: its URI and a digest over all its files (see `tree_digest`).
    pub base_model: DigestRef,
    pub dataset: DigestRef,
    /// The refusal examples mixed into the training data (`safety.replay`), when the job asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayRecord>,
    pub parent: Option<ParentVersion>,
    pub metrics: TrainingMetrics,
    /// Digests of the adapter files (everything but this manifest).
    pub files: Vec<FileDigest>,
    /// The safety evaluation, when the gate ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::safety::SafetyReport>,
    pub trainer: TrainerInfo,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What `safety.replay` mixed into a job's training data: part of its data lineage.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRecord {
    pub fraction: f64,
    /// The refusal dataset read, or `builtin:refusals` with the digest of the trainer's set.
    pub source: DigestRef,
    /// How many refusal examples joined the training examples.
    pub examples: u64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentVersion {
    pub adapter_name: String,
    pub version: i32,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerInfo {
    pub version: String,
    pub device: String,
}

/// Digest of a multi-file artifact (a model directory): sha256 over the sorted lines
/// `"<sha256>  <name>\n"`, the format of `sha256sum`, so it can be recomputed by hand.
pub fn tree_digest_input(files: &[FileDigest]) -> String {
    let mut sorted: Vec<&FileDigest> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .iter()
        .map(|f| format!("{}  {}\n", f.sha256, f.name))
        .collect()
}
