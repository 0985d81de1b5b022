//! The published artifact: a PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`) plus `manifest.json` with its lineage and metrics. The adapter
//! is one of PEFT's families (`loraforge_spec::peft::PeftConfig`); what its tensors do to a
//! layer is in `crate::families`.

use crate::error::user_error;
use crate::model::weights::read_safetensors;
use anyhow::{Context, Result};
use loraforge_spec::manifest::{
    ParentVersion, TrainerInfo, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE,
    MANIFEST_FORMAT,
};
use loraforge_spec::peft::PeftConfig;
use loraforge_spec::{AdapterManifest, DigestRef, FileDigest, JobSpec, TrainingMetrics};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use tch::Tensor;
use uuid::Uuid;

/// What every adapter method publishes: a PEFT adapter (fp32, contiguous, on the CPU), a plain
/// LoRA for most methods (`PeftConfig::Lora`), else the family's own format.
pub struct PeftAdapter {
    pub config: PeftConfig,
    /// PEFT keys (`base_model.model.<module>.lora_A.weight`) and tensors.
    pub tensors: Vec<(String, Tensor)>,
}

impl PeftAdapter {
    /// Writes `adapter_config.json` and `adapter_model.safetensors`; returns their digests.
    pub fn write(&self, dir: &Path) -> Result<Vec<FileDigest>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = serde_json::to_vec_pretty(&self.config)?;
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), config)?;
        Tensor::write_safetensors(&self.tensors, dir.join(ADAPTER_WEIGHTS_FILE))?;
        [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
            .iter()
            .map(|name| file_digest(&dir.join(name), name))
            .collect()
    }

    /// Reads an adapter directory as PEFT writes it (or as [`PeftAdapter::write`] does).
    pub fn load(dir: &Path) -> Result<PeftAdapter> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let bytes = std::fs::read(&config_path)
            .map_err(|e| user_error(format!("cannot read {}: {e}", config_path.display())))?;
        let config: PeftConfig = serde_json::from_slice(&bytes).map_err(|e| {
            user_error(format!(
                "{} is not a PEFT adapter config loraforge reads: {e}",
                config_path.display()
            ))
        })?;
        let mut tensors = Vec::new();
        read_safetensors(&dir.join(ADAPTER_WEIGHTS_FILE), |name, tensor| {
            tensors.push((name, tensor))
        })?;
        Ok(PeftAdapter { config, tensors })
    }
}

/// sha256 and size of a local file, read in chunks (model shards are gigabytes).
pub fn file_digest(path: &Path, name: &str) -> Result<FileDigest> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        name: name.to_string(),
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// Where an artifact came from, beyond the job spec.
pub struct Provenance {
    pub project: String,
    pub job_id: Uuid,
    pub version: i32,
    pub base_model: DigestRef,
    pub dataset: DigestRef,
    /// The adapter version training started from, if any.
    pub parent: Option<ParentVersion>,
    /// The device and dtype it was trained on, e.g. `cuda:0 bf16`.
    pub device: String,
    /// The refusal examples mixed into training (`safety.replay`), if any.
    pub replay: Option<loraforge_spec::manifest::ReplayRecord>,
}

/// Writes the adapter files and `manifest.json` into `dir`. Returns the manifest and
/// the digests of all three files, as the control plane's `complete` call wants them.
/// `evaluation` is the safety gate's report, when it ran.
pub fn write_artifact(
    dir: &Path,
    spec: &JobSpec,
    provenance: Provenance,
    metrics: TrainingMetrics,
    adapter: &PeftAdapter,
    evaluation: Option<loraforge_spec::safety::SafetyReport>,
) -> Result<(AdapterManifest, Vec<FileDigest>)> {
    let mut files = adapter.write(dir)?;
    let manifest = AdapterManifest {
        format: MANIFEST_FORMAT,
        project: provenance.project,
        adapter_name: spec.adapter_name.to_string(),
        version: provenance.version,
        job_id: provenance.job_id,
        method: spec.method.clone(),
        training: spec.training.clone(),
        base_model: provenance.base_model,
        dataset: provenance.dataset,
        replay: provenance.replay,
        parent: provenance.parent,
        metrics,
        files: files.clone(),
        evaluation,
        trainer: TrainerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            device: provenance.device,
        },
        created_at: chrono::Utc::now(),
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    files.push(file_digest(&manifest_path, MANIFEST_FILE)?);
    Ok((manifest, files))
}
