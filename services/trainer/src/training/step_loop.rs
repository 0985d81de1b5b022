//! The optimizer steps of a run, from the first (or the one after a checkpoint) to the last:
//! each takes its micro-batches, accumulates their gradients, clips, steps AdamW and the
//! method's hooks, reports progress, and validates or checkpoints where the job says.

use super::attach::AdaptedModel;
use super::checkpoint::{checkpoint_of, restore, CheckpointStore, SavedCheckpoint, TrainingState};
use super::optimizer::learning_rate;
use super::profile::{Phase, StepProfile};
use super::seeds::{derive_seed, SeedUse};
use super::{log, Reporter};
use crate::calibration::Calibration;
use crate::data::{Batch, ExampleSet, TrainingRows};
use crate::error::{user_error, Failure};
use crate::eval::validation::{summed_loss_of, validation_loss};
use crate::method::{RankAllocation, StepInfo};
use crate::model::gpu_memory::GpuMemoryMonitor;
use anyhow::Result;
use chrono::{DateTime, Utc};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{JobSpec, TrainingConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How many steps a run takes and how many rows each consumes.
pub struct Plan {
    pub total_steps: u32,
    /// Rows after which the data is used up (`training.epochs`), if the job limits them.
    row_limit: Option<u64>,
    batch_size: u64,
    accumulation: u64,
    /// Steps after this one count toward `final_loss` (the last tenth).
    pub tail_start: u32,
}

impl Plan {
    pub fn new(
        training: &TrainingConfig,
        rows_per_epoch: u64,
        reporter: &mut dyn Reporter,
    ) -> Plan {
        let (batch_size, accumulation) = (
            u64::from(training.batch_size),
            u64::from(training.gradient_accumulation_steps),
        );
        let row_limit = training
            .epochs
            .map(|epochs| u64::from(epochs) * rows_per_epoch);
        let total_steps = match row_limit {
            Some(limit) => limit
                .div_ceil(batch_size * accumulation)
                .min(u64::from(training.max_steps)) as u32,
            None => training.max_steps,
        };
        if total_steps < training.max_steps {
            reporter.report(log(format!(
                "training.epochs = {} ends training after {total_steps} steps, before max_steps ({})",
                training.epochs.unwrap_or_default(),
                training.max_steps
            )));
        }
        Plan {
            total_steps,
            row_limit,
            batch_size,
            accumulation,
            tail_start: total_steps - (total_steps / 10).max(1),
        }
    }
}

/// What one optimizer step reports.
struct StepOutcome {
    /// Mean over the step's target tokens.
    loss: f64,
    /// Tokens the step read.
    tokens: u64,
    /// Global gradient norm before clipping.
    grad_norm: f64,
}

/// Where a run's steps report, save checkpoints, and learn that they must stop.
pub struct Hooks<'h> {
    pub checkpoints: Option<&'h mut dyn CheckpointStore>,
    pub reporter: &'h mut dyn Reporter,
    pub cancel: &'h AtomicBool,
}

/// A run in progress: the adapted model, its data and its plan.
pub struct Run<'a> {
    pub spec: &'a JobSpec,
    pub adapted: AdaptedModel,
    pub plan: Plan,
    rows: TrainingRows<'a>,
    pub validation: Option<ExampleSet<'a>>,
    last_ranks: Option<RankAllocation>,
    /// The GPU's memory in use, sampled while the run trains (none on the CPU).
    pub gpu_memory: Option<GpuMemoryMonitor>,
    /// Where each step's time goes, when the environment asks (`profile`).
    profile: StepProfile,
}

impl<'a> Run<'a> {
    pub fn new(
        spec: &'a JobSpec,
        adapted: AdaptedModel,
        plan: Plan,
        rows: TrainingRows<'a>,
        validation: Option<ExampleSet<'a>>,
        gpu_memory: Option<GpuMemoryMonitor>,
    ) -> Run<'a> {
        let profile = StepProfile::from_env(adapted.device);
        Run {
            spec,
            adapted,
            plan,
            rows,
            validation,
            last_ranks: None,
            gpu_memory,
            profile,
        }
    }

    /// The state to continue from: a checkpoint's, put back into the adapter and optimizer, or
    /// a fresh one, for which the method first calibrates (unless it starts from a parent
    /// adapter): [`crate::method::AdapterMethod::calibrate`].
    pub fn start(
        &mut self,
        resume: Option<SavedCheckpoint>,
        template_clock: DateTime<Utc>,
        reporter: &mut dyn Reporter,
    ) -> Result<TrainingState> {
        let Some(saved) = resume else {
            if !self.adapted.from_parent {
                self.calibrate(reporter)?;
            }
            return Ok(TrainingState::start(self.plan.total_steps, template_clock));
        };
        let adapted = &mut self.adapted;
        restore(
            adapted.method.as_ref(),
            &mut adapted.optimizer,
            &saved.checkpoint,
            self.plan.total_steps,
        )?;
        reporter.report(EventPayload::Checkpoint {
            step: saved.checkpoint.state.step,
            prefix: saved.prefix,
            resumed: true,
        });
        Ok(saved.checkpoint.state)
    }

    /// The method's calibration hook, on the training rows in training order.
    fn calibrate(&mut self, reporter: &mut dyn Reporter) -> Result<()> {
        let started = Instant::now();
        let adapted = &mut self.adapted;
        let rows_read = {
            let mut calibration = Calibration::new(
                &mut adapted.model,
                &mut self.rows,
                self.plan.row_limit,
                adapted.pad_id,
                adapted.device,
                &self.spec.training,
                &mut *reporter,
                adapted.trace.as_mut(),
            );
            let available = calibration.rows_left();
            adapted.method.calibrate(&mut calibration)?;
            available - calibration.rows_left()
        };
        if rows_read == 0 {
            return Ok(());
        }
        adapted.calibrated(self.spec.training.weight_decay)?;
        reporter.report(log(format!(
            "calibrated {} on the first {rows_read} training rows in {:.1} s",
            self.spec.method.name(),
            started.elapsed().as_secs_f64()
        )));
        Ok(())
    }

    /// Runs the steps after `state.step` up to the last, checking `hooks.cancel` before each.
    pub fn run_steps(&mut self, state: &mut TrainingState, hooks: &mut Hooks) -> Result<()> {
        let total_steps = self.plan.total_steps;
        let (started, seconds_before, first_step) =
            (Instant::now(), state.train_seconds, state.step + 1);
        let mut tokens_this_attempt = 0u64;
        for step in first_step..=total_steps {
            if hooks.cancel.load(Ordering::Relaxed) {
                return Err(Failure::Cancelled.into());
            }
            let training = &self.spec.training;
            let lr = learning_rate(
                training.schedule,
                training.learning_rate,
                step,
                training.warmup_steps,
                total_steps,
            );
            let StepOutcome {
                loss,
                tokens: step_tokens,
                grad_norm,
            } = self.step(step, lr, state, hooks.reporter)?;

            tokens_this_attempt += step_tokens;
            state.step = step;
            state.tokens += step_tokens;
            state.initial_loss.get_or_insert(loss);
            if step > self.plan.tail_start {
                state.tail_loss_sum += loss;
            }
            let elapsed = started.elapsed().as_secs_f64();
            state.train_seconds = seconds_before + elapsed;
            hooks.reporter.report(EventPayload::Progress {
                step,
                total_steps,
                loss,
                lr,
                tokens_per_second: tokens_this_attempt as f64 / elapsed.max(1e-9),
                eta_seconds: Some(
                    elapsed / f64::from(step + 1 - first_step) * f64::from(total_steps - step),
                ),
                grad_norm: Some(grad_norm),
                peak_gpu_memory_bytes: self.gpu_memory.as_ref().map(|m| m.peak_bytes()),
            });
            // The last step is always validated after the loop, and never needs a checkpoint.
            if step == total_steps {
                break;
            }
            if self
                .spec
                .training
                .eval_every
                .is_some_and(|every| step % every == 0)
            {
                self.validate(step, hooks.reporter)?;
            }
            if self
                .spec
                .training
                .checkpoint_every
                .is_some_and(|every| step % every == 0)
            {
                self.save_checkpoint(state, hooks)?;
            }
        }
        let timeline = crate::model::timeline::summary();
        for line in self.profile.summary().into_iter().chain(timeline).flatten() {
            hooks.reporter.report(log(line));
        }
        Ok(())
    }

    /// One optimizer step: the step's micro-batches forward and backward, the accumulated
    /// gradients clipped, AdamW and the method's hooks.
    fn step(
        &mut self,
        step: u32,
        lr: f64,
        state: &mut TrainingState,
        reporter: &mut dyn Reporter,
    ) -> Result<StepOutcome> {
        let training = &self.spec.training;
        let (plan, adapted, profile) = (&self.plan, &mut self.adapted, &mut self.profile);
        crate::model::timeline::begin_step(adapted.device);
        profile.start_step();
        adapted.method.before_step(step);
        profile.lap(Phase::Hooks);
        let mut micro_batches = Vec::with_capacity(plan.accumulation as usize);
        while (micro_batches.len() as u64) < plan.accumulation {
            let end =
                (state.rows_consumed + plan.batch_size).min(plan.row_limit.unwrap_or(u64::MAX));
            if end <= state.rows_consumed {
                break;
            }
            let batch_rows = (state.rows_consumed..end)
                .map(|k| self.rows.row(k))
                .collect::<Result<Vec<_>>>()?;
            micro_batches.push(Batch::from_rows(
                &batch_rows,
                adapted.pad_id,
                adapted.device,
            ));
            state.rows_consumed = end;
        }
        if let Some(trace) = adapted.trace.as_mut() {
            trace.record_batches(step, &micro_batches);
        }
        profile.lap(Phase::Data);
        // The step's loss is the mean over all its target tokens, however they are split into
        // micro-batches: accumulating k batches of b rows is one batch of k * b rows.
        let targets = micro_batches.iter().map(|b| b.targets).sum::<u64>().max(1) as f64;
        adapted.optimizer.zero_grads(&adapted.trained);
        profile.lap(Phase::Optimizer);
        let mut loss_sum = 0.0;
        for (micro, batch) in micro_batches.iter().enumerate() {
            let dropout_index = u64::from(step) * plan.accumulation + micro as u64;
            tch::manual_seed(derive_seed(training.seed, SeedUse::Dropout, dropout_index) as i64);
            let pass = adapted.model.training_pass(
                &batch.input_ids,
                true,
                training.gradient_checkpointing,
            );
            let loss = summed_loss_of(&adapted.model, &pass.hidden, &batch.labels);
            loss_sum += loss.double_value(&[]);
            // The method's own loss term counts once per step, spread over its micro-batches.
            let objective = match adapted.method.extra_loss() {
                Some(extra) => loss / targets + extra / micro_batches.len() as f64,
                None => loss / targets,
            };
            profile.lap(Phase::Forward);
            objective.backward();
            pass.backward();
            profile.lap(Phase::Backward);
        }
        let loss = loss_sum / targets;
        if !loss.is_finite() {
            return Err(user_error(format!(
                "training loss became {loss} at step {step}: the run diverged (lower \
                 training.learning_rate, now {}, or set training.max_grad_norm) or the base weights are not finite",
                training.learning_rate
            )));
        }
        let info = StepInfo {
            index: step,
            total: plan.total_steps,
            lr,
        };
        // The norm is the raw gradients'; clipping scales what the method's adjustment leaves.
        let total_norm = adapted.optimizer.total_grad_norm(&adapted.trained);
        profile.lap(Phase::Clip);
        adapted.method.adjust_gradients(info);
        profile.lap(Phase::Hooks);
        if let (Some(max_norm), Some(total)) = (training.max_grad_norm, &total_norm) {
            adapted
                .optimizer
                .scale_to_norm(&adapted.trained, total, max_norm);
        }
        let norm = total_norm.map_or(0.0, |t| t.double_value(&[]));
        profile.lap(Phase::Clip);
        adapted.optimizer.step(lr);
        profile.lap(Phase::Optimizer);
        adapted.method.after_step(info);
        if let Some(ranks) = adapted
            .method
            .rank_allocation()
            .filter(|r| self.last_ranks.as_ref() != Some(r))
        {
            reporter.report(ranks.event(step));
            self.last_ranks = Some(ranks);
        }
        profile.lap(Phase::Hooks);
        Ok(StepOutcome {
            loss,
            tokens: micro_batches.iter().map(|b| b.tokens).sum(),
            grad_norm: norm,
        })
    }

    /// Reports the validation loss after `step`, where the run has validation data; returns it.
    pub fn validate(&self, step: u32, reporter: &mut dyn Reporter) -> Result<Option<f64>> {
        let Some(examples) = &self.validation else {
            return Ok(None);
        };
        let adapted = &self.adapted;
        let (loss, tokens) = validation_loss(
            &adapted.model,
            examples,
            self.spec.training.seq_len as usize,
            self.plan.batch_size as usize,
            adapted.pad_id,
            adapted.device,
        )?;
        reporter.report(EventPayload::Eval { step, loss, tokens });
        Ok(Some(loss))
    }

    /// Saves a checkpoint of the run after `state.step`, where the run has a checkpoint store.
    fn save_checkpoint(&self, state: &TrainingState, hooks: &mut Hooks) -> Result<()> {
        let Some(store) = hooks.checkpoints.as_deref_mut() else {
            return Ok(());
        };
        let reporter = &mut *hooks.reporter;
        // Announced, and recorded, before it can be resumed from: every checkpoint a retry may
        // continue from is in the job's events.
        let mut announce = |prefix: &str| {
            reporter.report(EventPayload::Checkpoint {
                step: state.step,
                prefix: prefix.to_string(),
                resumed: false,
            });
            reporter.flush()
        };
        let adapted = &self.adapted;
        store.save(
            &checkpoint_of(adapted.method.as_ref(), &adapted.optimizer, state),
            &mut announce,
        )
    }
}
