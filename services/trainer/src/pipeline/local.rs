//! The `train` command's [`Host`]: a job without a control plane. Events go to the log, the
//! artifact (version 0 of project `local`) into a directory; no checkpoints, no parent, no
//! safety evaluation.

use super::Host;
use crate::data::inputs::LocalInputs;
use crate::export::Provenance;
use crate::model::device_label;
use crate::training::checkpoint::CheckpointStore;
use crate::training::Reporter;
use anyhow::Result;
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{AdapterManifest, FileDigest};
use std::path::{Path, PathBuf};
use tch::Device;
use uuid::Uuid;

pub struct LocalHost {
    /// Where the artifact is written.
    out: PathBuf,
    reporter: LogReporter,
}

impl LocalHost {
    pub fn new(out: PathBuf) -> LocalHost {
        LocalHost {
            out,
            reporter: LogReporter,
        }
    }
}

impl Host for LocalHost {
    /// What the command prints: where the artifact is, its metrics and files.
    type Published = serde_json::Value;

    fn training_sinks(&mut self) -> (Option<&mut dyn CheckpointStore>, &mut dyn Reporter) {
        (None, &mut self.reporter)
    }

    fn destination(
        &mut self,
        inputs: &LocalInputs,
        device: Device,
    ) -> Result<(PathBuf, Provenance)> {
        let provenance = Provenance {
            project: "local".into(),
            job_id: Uuid::nil(),
            version: 0,
            base_model: inputs.base_model.clone(),
            dataset: inputs.dataset_ref.clone(),
            parent: None,
            device: device_label(device),
            // Known once training ran: `pipeline::run` fills it in.
            replay: None,
        };
        Ok((self.out.clone(), provenance))
    }

    fn publish(
        &mut self,
        dir: &Path,
        manifest: AdapterManifest,
        files: Vec<FileDigest>,
    ) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "out": dir, "metrics": manifest.metrics, "files": files }))
    }
}

/// Prints progress as log lines.
struct LogReporter;

impl Reporter for LogReporter {
    fn report(&mut self, event: EventPayload) {
        match event {
            EventPayload::Progress {
                step,
                total_steps,
                loss,
                lr,
                tokens_per_second,
                peak_gpu_memory_bytes,
                ..
            } => {
                tracing::info!(
                    step,
                    total_steps,
                    loss,
                    lr,
                    tokens_per_second,
                    peak_gpu_memory_bytes,
                    "progress"
                );
            }
            EventPayload::Eval { step, loss, tokens } => {
                tracing::info!(step, loss, tokens, "validation")
            }
            EventPayload::Evaluation { done, total } => tracing::info!(done, total, "evaluating"),
            EventPayload::Safety { report } => tracing::info!(?report, "safety evaluation"),
            EventPayload::Checkpoint {
                step,
                prefix,
                resumed,
            } => tracing::info!(step, prefix, resumed, "checkpoint"),
            EventPayload::Log { message } => tracing::info!("{message}"),
            EventPayload::Ranks {
                step,
                total,
                budget,
                per_module,
                sparsity,
            } => {
                tracing::info!(
                    step,
                    total,
                    ?budget,
                    ?per_module,
                    ?sparsity,
                    "rank allocation"
                )
            }
            EventPayload::Status { status, .. } => tracing::info!(%status, "status"),
        }
    }
}
