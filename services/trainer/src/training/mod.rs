//! The training core, independent of the control plane. [`train`] runs a job's training in
//! named steps, each in its own module:
//! 1. `prepare`: tokenize the data and choose what is validated on (before the model is
//!    loaded, so a bad line fails the job at once);
//! 2. `attach`: load the base model and attach the job's adapter method, from a parent adapter
//!    where there is one, with AdamW over what it trains;
//! 3. `step_loop`: continue from a checkpoint where there is one, then run the optimizer steps
//!    with the job's schedule, gradient accumulation and clipping, validating and
//!    checkpointing (`checkpoint`) where the job says;
//! 4. here: the final validation, the metrics, and the adapter exported in PEFT's layout.
//!
//! Everything random is seeded from the job's seed and the position in the run (see `seeds`),
//! so a CPU run is reproducible, and a run resumed from a checkpoint ends where one that never
//! stopped does.

mod attach;
pub mod checkpoint;
pub mod optimizer;
mod prepare;
mod profile;
pub mod seeds;
mod step_loop;
#[cfg(test)]
mod tests;
pub mod trace;

use crate::data::TrainingRows;
use crate::export::PeftAdapter;
use crate::model::gpu_memory::GpuMemoryMonitor;
use crate::model::ModelConfig;
use anyhow::{anyhow, Result};
use attach::AdaptedModel;
use checkpoint::{CheckpointStore, SavedCheckpoint, TrainingState};
use chrono::Utc;
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{JobSpec, TrainingMetrics};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use step_loop::{Hooks, Plan, Run};
use tch::Device;

/// Where training reports what it does (the control plane's event stream, or a log).
pub trait Reporter {
    fn report(&mut self, event: EventPayload);

    /// Returns once every event reported so far is recorded; an error says it could not be.
    /// Reporters that record as they go have nothing to wait for.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

pub struct TrainOutcome {
    pub metrics: TrainingMetrics,
    pub adapter: PeftAdapter,
    /// How many refusal examples `safety.replay` mixed into the training examples.
    pub replay_examples: Option<usize>,
}

/// What a run starts from, all of it local.
pub struct TrainingInputs<'a> {
    pub model_dir: &'a Path,
    pub train_data: &'a Path,
    /// The job's separate validation file (`dataset.validation`), if it has one.
    pub validation_data: Option<&'a Path>,
    /// The refusal examples of `safety.replay.dataset`, when the job names a dataset (the
    /// built-in set otherwise).
    pub replay_data: Option<&'a Path>,
    /// The adapter version to continue from (the job's parent).
    pub parent: Option<&'a PeftAdapter>,
    /// The checkpoint to resume from (an earlier attempt's).
    pub resume: Option<SavedCheckpoint>,
}

/// Trains the adapter a job asks for, saving checkpoints into `checkpoints` where given.
/// `cancel` is checked before every step.
///
/// libtorch reports its own failures (out of memory, kernel errors) by panicking through
/// `tch`; they are caught here and returned as system errors so the job can be failed cleanly.
pub fn train(
    spec: &JobSpec,
    inputs: TrainingInputs,
    device: Device,
    checkpoints: Option<&mut dyn CheckpointStore>,
    reporter: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    crate::error::guard_libtorch("training", || {
        train_unguarded(spec, inputs, device, checkpoints, reporter, cancel)
    })
}

fn train_unguarded(
    spec: &JobSpec,
    inputs: TrainingInputs,
    device: Device,
    checkpoints: Option<&mut dyn CheckpointStore>,
    reporter: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let training = &spec.training;
    let config = ModelConfig::load(inputs.model_dir)?;
    // A resumed run renders chat templates with its first attempt's date, so its data is the same.
    let template_clock = inputs
        .resume
        .as_ref()
        .map_or_else(Utc::now, |saved| saved.checkpoint.state.template_clock);
    // Data first: a bad line fails the job before the model is loaded.
    let datasets = prepare::tokenize(spec, &inputs, &config, template_clock)?;
    let examples = prepare::select(spec, &datasets, reporter)?;
    let replay_examples = datasets.replay.as_ref().map(|r| r.examples);

    // Started before the model is loaded, so the peak counts the weights and the CUDA context.
    let gpu_memory = GpuMemoryMonitor::start(device);
    let adapted = AdaptedModel::load(
        spec,
        inputs.model_dir,
        config,
        inputs.parent,
        device,
        reporter,
    )?;

    let rows = TrainingRows::new(
        examples.train,
        training.seq_len as usize,
        training.packing,
        training.seed,
    );
    let plan = Plan::new(training, rows.rows_per_epoch(), reporter);
    let mut run = Run::new(spec, adapted, plan, rows, examples.validation, gpu_memory);
    let mut state = run.start(inputs.resume, template_clock, reporter)?;
    let mut hooks = Hooks {
        // The store's own lifetime shortened to the hooks' (a coercion `Option` does not make).
        checkpoints: checkpoints.map(|store| -> &mut dyn CheckpointStore { store }),
        reporter,
        cancel,
    };
    run.run_steps(&mut state, &mut hooks)?;

    let mut outcome = finish(run, state, hooks.reporter)?;
    outcome.replay_examples = replay_examples;
    Ok(outcome)
}

/// The end of a run: the trace written (where one was asked for), the final validation, the
/// metrics, and the adapter in PEFT's layout.
fn finish(
    mut run: Run<'_>,
    state: TrainingState,
    reporter: &mut dyn Reporter,
) -> Result<TrainOutcome> {
    if let Some(trace) = run.adapted.trace.take() {
        trace.finish(run.adapted.method.var_store())?;
    }
    let eval_loss = run.validate(state.step, reporter)?;
    let Run {
        spec,
        adapted,
        plan,
        gpu_memory: run_gpu_memory,
        ..
    } = run;
    let initial_loss = state
        .initial_loss
        .ok_or_else(|| anyhow!("training ran no step"))?;
    let metrics = TrainingMetrics {
        steps: state.step,
        tokens: state.tokens,
        initial_loss,
        final_loss: state.tail_loss_sum / f64::from(plan.total_steps - plan.tail_start),
        train_seconds: state.train_seconds,
        tokens_per_second: state.tokens as f64 / state.train_seconds.max(1e-9),
        trainable_parameters: adapted.trainable_parameters,
        eval_loss,
        peak_gpu_memory_bytes: run_gpu_memory.map(|m| m.peak_bytes()),
    };
    Ok(TrainOutcome {
        metrics,
        adapter: adapted.method.export(spec.base_model.as_str()),
        replay_examples: None,
    })
}

fn log(message: String) -> EventPayload {
    EventPayload::Log { message }
}
