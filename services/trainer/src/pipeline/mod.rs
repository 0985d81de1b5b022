//! One job from its spec to its artifact, the same for `loraforge-trainer train` (a spec on the
//! command line, the artifact into a directory) and `loraforge-trainer run` (a job of the
//! control plane, the artifact published to object storage): the inputs made local, the
//! adapter trained, the safety evaluation where the job's policy asks for it, and the artifact
//! written. What differs between the two (where events go, where checkpoints and the artifact
//! go, what the job starts from) is the [`Host`]'s.

pub mod local;

use crate::data::inputs::{fetch_inputs, LocalInputs};
use crate::eval::safety::{self, baseline::BaselineCache};
use crate::export::{write_artifact, PeftAdapter, Provenance};
use crate::training::checkpoint::{CheckpointStore, SavedCheckpoint};
use crate::training::{train, Reporter, TrainOutcome, TrainingInputs};
use anyhow::Result;
use loraforge_spec::manifest::ReplayRecord;
use loraforge_spec::safety::SafetyReport;
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{AdapterManifest, DigestRef, FileDigest, JobStatus, ResolvedJobSpec};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tch::Device;
use tokio::runtime::Runtime;

/// A job to run, and what it runs with.
pub struct Job<'a> {
    /// Its inputs are URIs: the control plane resolved any registered names.
    pub spec: &'a ResolvedJobSpec,
    pub device: Device,
    /// For downloads (inputs, checkpoints) and uploads.
    pub runtime: &'a Runtime,
    /// Downloaded inputs go here.
    pub scratch: &'a Path,
    /// Checked before every training step and between evaluation phases.
    pub cancel: &'a AtomicBool,
}

/// What a job starts from besides its spec's inputs.
#[derive(Default)]
pub struct StartingPoint {
    /// The adapter version to continue from (the job's parent).
    pub parent: Option<PeftAdapter>,
    /// The checkpoint to resume from (an earlier attempt's).
    pub resume: Option<SavedCheckpoint>,
}

/// Where a job runs: what it starts from, where its events, checkpoints and artifact go.
pub trait Host {
    /// What [`Host::publish`] answers.
    type Published;

    /// What the job starts from; downloads go under `scratch`.
    fn starting_point(&mut self, _scratch: &Path) -> Result<StartingPoint> {
        Ok(StartingPoint::default())
    }

    /// The job moved to another stage (`running`, `evaluating`).
    fn stage(&mut self, _status: JobStatus) -> Result<()> {
        Ok(())
    }

    /// Where training saves checkpoints, if anywhere, and where events go.
    fn training_sinks(&mut self) -> (Option<&mut dyn CheckpointStore>, &mut dyn Reporter);

    /// Whether the safety evaluation runs after training (the job's policy says).
    fn evaluates(&self) -> bool {
        false
    }

    /// What the job's safety policy adds to the refusal judge.
    fn judge_additions(&self) -> safety::judge::JudgeAdditions {
        Default::default()
    }

    /// Where the base model's side of the evaluation is kept between jobs, if anywhere.
    fn baselines(&self) -> Option<Box<dyn BaselineCache>> {
        None
    }

    /// Called after training and evaluation, whatever their outcome: every event reported is
    /// delivered by the time it returns, or cannot be.
    fn events_done(&mut self) {}

    /// The artifact's lineage (a worker reserves its version here) and the directory it is
    /// written to.
    fn destination(
        &mut self,
        inputs: &LocalInputs,
        device: Device,
    ) -> Result<(PathBuf, Provenance)>;

    /// Publishes the artifact written into `dir`.
    fn publish(
        &mut self,
        dir: &Path,
        manifest: AdapterManifest,
        files: Vec<FileDigest>,
    ) -> Result<Self::Published>;
}

/// Runs `job` on `host`: fetch inputs, train, evaluate (where the host says), write the
/// artifact and publish it.
pub fn run<H: Host>(job: &Job, host: &mut H) -> Result<H::Published> {
    let inputs = fetch_inputs(job.runtime, job.spec, job.scratch)?;
    let start = host.starting_point(job.scratch)?;
    host.stage(JobStatus::Running)?;
    let trained = train_and_evaluate(job, &inputs, start, host);
    host.events_done();
    let (outcome, evaluation) = trained?;

    let (dir, mut provenance) = host.destination(&inputs, job.device)?;
    provenance.replay = replay_record(job.spec, &inputs, outcome.replay_examples);
    let (manifest, files) = write_artifact(
        &dir,
        job.spec,
        provenance,
        outcome.metrics,
        &outcome.adapter,
        evaluation,
    )?;
    host.publish(&dir, manifest, files)
}

/// What the manifest records of `safety.replay`: the fraction, the source, and the count mixed.
fn replay_record(
    spec: &ResolvedJobSpec,
    inputs: &LocalInputs,
    examples: Option<usize>,
) -> Option<ReplayRecord> {
    let (replay, examples) = (spec.safety.replay.as_ref()?, examples?);
    let source = match &inputs.replay {
        Some((_, digest)) => digest.clone(),
        None => DigestRef {
            uri: crate::data::replay::BUILTIN_URI.to_string(),
            sha256: crate::data::replay::builtin_digest(),
        },
    };
    Some(ReplayRecord {
        fraction: replay.fraction,
        source,
        examples: examples as u64,
    })
}

/// Trains the adapter, then measures it for the publish gate where the host asks for that
/// (the control plane judges the measurements against the job's policy).
fn train_and_evaluate<H: Host>(
    job: &Job,
    inputs: &LocalInputs,
    start: StartingPoint,
    host: &mut H,
) -> Result<(TrainOutcome, Option<SafetyReport>)> {
    let training_inputs = TrainingInputs {
        model_dir: &inputs.model_dir,
        train_data: &inputs.dataset,
        validation_data: inputs.validation.as_deref(),
        replay_data: inputs.replay.as_ref().map(|(path, _)| path.as_path()),
        parent: start.parent.as_ref(),
        resume: start.resume,
    };
    let (checkpoints, reporter) = host.training_sinks();
    let outcome = train(
        job.spec,
        training_inputs,
        job.device,
        checkpoints,
        reporter,
        job.cancel,
    )?;
    if !host.evaluates() {
        return Ok((outcome, None));
    }
    host.stage(JobStatus::Evaluating)?;
    let settings = safety::Settings {
        seq_len: job.spec.training.seq_len as usize,
        validation_batch_size: job.spec.training.batch_size as usize,
        // Semantic where the worker has the encoder (LORAFORGE_JUDGE_MODEL), else keywords.
        judge: safety::judge::JudgeConfig {
            additions: host.judge_additions(),
            ..safety::judge::JudgeConfig::from_env()
        },
        ..Default::default()
    };
    let cache = host.baselines();
    let reuse = cache.as_deref().map(|cache| safety::Reuse {
        cache,
        model_digest: &inputs.base_model.sha256,
    });
    let reporter = host.training_sinks().1;
    let context = safety::Context {
        device: job.device,
        cancel: job.cancel,
        reuse,
        progress: &mut |p| {
            reporter.report(EventPayload::Evaluation {
                done: p.done,
                total: p.total,
            })
        },
    };
    let report = safety::evaluate(
        &inputs.model_dir,
        &outcome.adapter,
        inputs.validation.as_deref(),
        &settings,
        context,
    )?;
    host.training_sinks().1.report(EventPayload::Safety {
        report: report.clone(),
    });
    Ok((outcome, Some(report)))
}
