//! The training core, independent of the control plane: tokenize the data, load the base model,
//! attach the job's adapter method (starting from a parent adapter or a checkpoint where there
//! is one), run AdamW over the adapter with the job's schedule, gradient accumulation, clipping,
//! evaluation and checkpoints, and hand back the trained adapter with its metrics.
//!
//! Everything random is seeded from the job's seed and the position in the run (see `seeds`),
//! so a CPU run is reproducible, and a run resumed from a checkpoint ends where one that never
//! stopped does.

use crate::chat_template::ChatTemplate;
use crate::checkpoint::{Checkpoint, CheckpointStore, SavedCheckpoint, TrainingState};
use crate::config::ModelConfig;
use crate::data::{
    Batch, ExampleEncoder, ExampleSet, TokenizedDataset, TrainingRows, IGNORE_INDEX,
};
use crate::error::{user_error, Failure};
use crate::export::PeftAdapter;
use crate::method::{attach_method, AdapterMethod, RankAllocation, StepInfo};
use crate::model::{device_label, LlamaModel};
use crate::optimizer::{clip_grad_norm, learning_rate, zero_grads, AdamW};
use crate::seeds::{derive_seed, SeedUse};
use crate::tokenizer_config::TokenizerConfig;
use crate::trace::Trace;
use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Utc};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{JobSpec, TrainingMetrics};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};
use tokenizers::Tokenizer;

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
}

/// What a run starts from, all of it local.
pub struct TrainingInputs<'a> {
    pub model_dir: &'a Path,
    pub train_data: &'a Path,
    /// The job's separate validation file (`dataset.validation`), if it has one.
    pub validation_data: Option<&'a Path>,
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
    catch_unwind(AssertUnwindSafe(|| {
        train_unguarded(spec, inputs, device, checkpoints, reporter, cancel)
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(anyhow!("libtorch failed during training: {message}"))
    })
}

fn train_unguarded(
    spec: &JobSpec,
    inputs: TrainingInputs,
    device: Device,
    mut checkpoints: Option<&mut dyn CheckpointStore>,
    reporter: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let training = &spec.training;
    let model_dir = inputs.model_dir;
    let config = ModelConfig::load(model_dir)?;
    if i64::from(training.seq_len) > config.max_trainable_len() {
        return Err(user_error(format!(
            "training.seq_len {} exceeds what the model attends over ({}: max_position_embeddings)",
            training.seq_len,
            config.max_trainable_len()
        )));
    }
    let seq_len = training.seq_len as usize;

    // Data first: a bad line fails the job before the model is loaded.
    let template_clock = inputs
        .resume
        .as_ref()
        .map_or_else(Utc::now, |saved| saved.checkpoint.state.template_clock);
    let (train_set, validation_file) = tokenize_data(spec, &inputs, &config, template_clock)?;
    let (train_examples, validation) = match (&validation_file, spec.dataset.validation_fraction) {
        (Some(file), _) => (ExampleSet::all(&train_set), Some(ExampleSet::all(file))),
        (None, Some(fraction)) => {
            let (train, validation) = ExampleSet::split(&train_set, fraction, training.seed)?;
            (train, Some(validation))
        }
        (None, None) => (ExampleSet::all(&train_set), None),
    };
    reporter.report(log(format!(
        "dataset: {} training examples, {} tokens ({} without a token to learn left out){}",
        train_examples.len(),
        train_examples.tokens(),
        train_set.dropped,
        validation.as_ref().map_or(String::new(), |v| format!(
            "; validation: {} examples",
            v.len()
        ))
    )));
    if training.eval_every.is_some() && validation.is_none() {
        reporter.report(log("training.eval_every is set, but the job has no validation data (dataset.validation or \
             dataset.validation_fraction): nothing to evaluate"
            .into()));
    }
    // Padding is never attended to (causal attention, right padding) nor scored, so any id will do.
    let pad_id = config.pad_token_id.or(config.eos_token_id).unwrap_or(0);
    let vocab_size = config.vocab_size;

    tch::manual_seed(training.seed as i64);
    let mut model = LlamaModel::load(model_dir, config, device)?;
    let mut method = attach_method(&mut model, spec, device)?;
    if let Some(parent) = inputs.parent {
        method.start_from(parent)?;
        reporter.report(log("starting from the parent adapter's factors".into()));
    }
    let trainable: Vec<(String, Tensor)> = method
        .var_store()
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let trainable_parameters: u64 = trainable.iter().map(|(_, t)| t.numel() as u64).sum();
    reporter.report(log(format!(
        "training {} on {}, adapter fp32: {trainable_parameters} trainable parameters",
        spec.method.name(),
        device_label(device)
    )));
    let mut optimizer = AdamW::new(method.optimized_parameters(), training.weight_decay)
        .with_betas(method.adam_betas());
    // Gradients are cleared and clipped over everything the method trains, including what it
    // steps itself (SoRA's gates), as the references' Trainer clips `model.parameters()`.
    let trained = method.var_store().trainable_variables();
    let mut trace = Trace::from_env(method.var_store())?;
    let mut last_ranks: Option<RankAllocation> = None;

    let mut rows = TrainingRows::new(train_examples, seq_len, training.packing, training.seed);
    let (batch_size, accumulation) = (
        u64::from(training.batch_size),
        u64::from(training.gradient_accumulation_steps),
    );
    let row_limit = training
        .epochs
        .map(|epochs| u64::from(epochs) * rows.rows_per_epoch());
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

    let mut state = match inputs.resume {
        Some(saved) => {
            restore(
                method.as_ref(),
                &mut optimizer,
                &saved.checkpoint,
                total_steps,
            )?;
            reporter.report(EventPayload::Checkpoint {
                step: saved.checkpoint.state.step,
                prefix: saved.prefix,
                resumed: true,
            });
            saved.checkpoint.state
        }
        None => TrainingState::start(total_steps, template_clock),
    };

    // final_loss averages the last tenth of the steps.
    let tail_start = total_steps - (total_steps / 10).max(1);
    let (started, seconds_before, first_step) =
        (Instant::now(), state.train_seconds, state.step + 1);
    let mut tokens_this_attempt = 0u64;
    for step in first_step..=total_steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(Failure::Cancelled.into());
        }
        let lr = learning_rate(
            training.schedule,
            training.learning_rate,
            step,
            training.warmup_steps,
            total_steps,
        );
        method.before_step(step);
        let mut micro_batches = Vec::with_capacity(accumulation as usize);
        while (micro_batches.len() as u64) < accumulation {
            let end = (state.rows_consumed + batch_size).min(row_limit.unwrap_or(u64::MAX));
            if end <= state.rows_consumed {
                break;
            }
            let batch_rows = (state.rows_consumed..end)
                .map(|k| rows.row(k))
                .collect::<Result<Vec<_>>>()?;
            micro_batches.push(Batch::from_rows(&batch_rows, pad_id, device));
            state.rows_consumed = end;
        }
        if let Some(trace) = trace.as_mut() {
            trace.record_batches(step, &micro_batches);
        }
        // The step's loss is the mean over all its target tokens, however they are split into
        // micro-batches: accumulating k batches of b rows is one batch of k * b rows.
        let targets = micro_batches.iter().map(|b| b.targets).sum::<u64>().max(1) as f64;
        zero_grads(&trained);
        let mut loss_sum = 0.0;
        for (micro, batch) in micro_batches.iter().enumerate() {
            let dropout_index = u64::from(step) * accumulation + micro as u64;
            tch::manual_seed(derive_seed(training.seed, SeedUse::Dropout, dropout_index) as i64);
            let loss = summed_loss(&model, batch, vocab_size, true);
            loss_sum += loss.double_value(&[]);
            // The method's own loss term counts once per step, spread over its micro-batches.
            let objective = match method.extra_loss() {
                Some(extra) => loss / targets + extra / micro_batches.len() as f64,
                None => loss / targets,
            };
            objective.backward();
        }
        let loss = loss_sum / targets;
        if !loss.is_finite() {
            return Err(user_error(format!(
                "training loss became {loss} at step {step}: the run diverged (lower \
                 training.learning_rate, now {}, or set training.max_grad_norm) or the base weights are not finite",
                training.learning_rate
            )));
        }
        if let Some(max_norm) = training.max_grad_norm {
            clip_grad_norm(&trained, max_norm);
        }
        optimizer.step(lr);
        method.after_step(StepInfo {
            index: step,
            total: total_steps,
            lr,
        });
        if let Some(ranks) = method
            .rank_allocation()
            .filter(|r| last_ranks.as_ref() != Some(r))
        {
            reporter.report(ranks.event(step));
            last_ranks = Some(ranks);
        }

        let step_tokens: u64 = micro_batches.iter().map(|b| b.tokens).sum();
        tokens_this_attempt += step_tokens;
        state.step = step;
        state.tokens += step_tokens;
        state.initial_loss.get_or_insert(loss);
        if step > tail_start {
            state.tail_loss_sum += loss;
        }
        let elapsed = started.elapsed().as_secs_f64();
        state.train_seconds = seconds_before + elapsed;
        reporter.report(EventPayload::Progress {
            step,
            total_steps,
            loss,
            lr,
            tokens_per_second: tokens_this_attempt as f64 / elapsed.max(1e-9),
            eta_seconds: Some(
                elapsed / f64::from(step + 1 - first_step) * f64::from(total_steps - step),
            ),
        });
        // The last step is always evaluated below, and never needs a checkpoint.
        if step == total_steps {
            break;
        }
        if let (Some(examples), Some(every)) = (&validation, training.eval_every) {
            if step % every == 0 {
                let (loss, tokens) = evaluate(
                    &model,
                    examples,
                    seq_len,
                    batch_size as usize,
                    pad_id,
                    vocab_size,
                    device,
                )?;
                reporter.report(EventPayload::Eval { step, loss, tokens });
            }
        }
        if let (Some(store), Some(every)) = (checkpoints.as_deref_mut(), training.checkpoint_every)
        {
            if step % every == 0 {
                // Announced, and recorded, before it can be resumed from: every checkpoint a
                // retry may continue from is in the job's events.
                let mut announce = |prefix: &str| {
                    reporter.report(EventPayload::Checkpoint {
                        step,
                        prefix: prefix.to_string(),
                        resumed: false,
                    });
                    reporter.flush()
                };
                store.save(
                    &checkpoint_of(method.as_ref(), &optimizer, &state),
                    &mut announce,
                )?;
            }
        }
    }

    if let Some(trace) = trace {
        trace.finish(method.var_store())?;
    }
    let eval_loss = match &validation {
        Some(examples) => {
            let (loss, tokens) = evaluate(
                &model,
                examples,
                seq_len,
                batch_size as usize,
                pad_id,
                vocab_size,
                device,
            )?;
            reporter.report(EventPayload::Eval {
                step: state.step,
                loss,
                tokens,
            });
            Some(loss)
        }
        None => None,
    };
    let initial_loss = state
        .initial_loss
        .ok_or_else(|| anyhow!("training ran no step"))?;
    let metrics = TrainingMetrics {
        steps: state.step,
        tokens: state.tokens,
        initial_loss,
        final_loss: state.tail_loss_sum / f64::from(total_steps - tail_start),
        train_seconds: state.train_seconds,
        tokens_per_second: state.tokens as f64 / state.train_seconds.max(1e-9),
        trainable_parameters,
        eval_loss,
    };
    Ok(TrainOutcome {
        metrics,
        adapter: method.export(spec.base_model.as_str()),
    })
}

/// The training file and the validation file (if the job has one), tokenized as the model's
/// tokenizer and chat template say. `template_clock` is the run's date for chat templates.
fn tokenize_data(
    spec: &JobSpec,
    inputs: &TrainingInputs,
    config: &ModelConfig,
    template_clock: DateTime<Utc>,
) -> Result<(TokenizedDataset, Option<TokenizedDataset>)> {
    let tokenizer_path = inputs.model_dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| user_error(format!("cannot load {}: {e}", tokenizer_path.display())))?;
    let tokenizer_config = TokenizerConfig::load(inputs.model_dir)?;
    let chat_template = match tokenizer_config.chat_template.as_deref() {
        None => {
            Err("the base model has no chat template (tokenizer_config.json \"chat_template\" or chat_template.jinja)"
                .to_string())
        }
        Some(source) => ChatTemplate::new(source, &tokenizer_config, template_clock)
            .map_err(|e| format!("the base model's chat template does not compile: {e}")),
    };
    let encoder = ExampleEncoder::new(
        &tokenizer,
        &tokenizer_config,
        chat_template.as_ref().map_err(String::as_str),
        config,
    )?;
    let seq_len = spec.training.seq_len as usize;
    // Packed rows split long examples instead of cutting them, so only unpacked ones are truncated.
    let truncate_to = (!spec.training.packing).then_some(seq_len);
    let train = TokenizedDataset::build(inputs.train_data, &encoder, truncate_to)?;
    let validation = inputs
        .validation_data
        .map(|path| TokenizedDataset::build(path, &encoder, Some(seq_len)))
        .transpose()?;
    Ok((train, validation))
}

/// Cross-entropy summed over a batch's target tokens (fp32 logits).
fn summed_loss(model: &LlamaModel, batch: &Batch, vocab_size: i64, train: bool) -> Tensor {
    let logits = model.forward(&batch.input_ids, train).to_kind(Kind::Float);
    logits.view([-1, vocab_size]).cross_entropy_loss::<Tensor>(
        &batch.labels.view([-1]),
        None,
        Reduction::Sum,
        IGNORE_INDEX,
        0.0,
    )
}

/// Mean loss per target token over the validation examples (no dropout), and how many
/// target tokens that is. The safety evaluation's perplexity is this loss, exponentiated.
pub fn evaluate(
    model: &LlamaModel,
    examples: &ExampleSet,
    seq_len: usize,
    batch_size: usize,
    pad_id: i64,
    vocab_size: i64,
    device: Device,
) -> Result<(f64, u64)> {
    let (mut loss_sum, mut targets) = (0.0, 0u64);
    let positions: Vec<usize> = (0..examples.len()).collect();
    for chunk in positions.chunks(batch_size) {
        let rows = chunk
            .iter()
            .map(|&p| examples.row(p, seq_len))
            .collect::<Result<Vec<_>>>()?;
        let batch = Batch::from_rows(&rows, pad_id, device);
        loss_sum +=
            tch::no_grad(|| summed_loss(model, &batch, vocab_size, false)).double_value(&[]);
        targets += batch.targets;
    }
    Ok((loss_sum / targets.max(1) as f64, targets))
}

/// A checkpoint of the run as it is after `state.step` steps.
fn checkpoint_of(
    method: &dyn AdapterMethod,
    optimizer: &AdamW,
    state: &TrainingState,
) -> Checkpoint {
    let mut adapter: Vec<(String, Tensor)> = method
        .var_store()
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    adapter.sort_by(|a, b| a.0.cmp(&b.0));
    Checkpoint {
        state: state.clone(),
        adapter,
        optimizer: optimizer.state(),
    }
}

/// Puts a checkpoint's adapter and optimizer state back. A checkpoint planned for another run
/// length means the data changed since it was written (a `file://` input edited in place).
fn restore(
    method: &dyn AdapterMethod,
    optimizer: &mut AdamW,
    checkpoint: &Checkpoint,
    total_steps: u32,
) -> Result<()> {
    let state = &checkpoint.state;
    if state.total_steps != total_steps {
        return Err(user_error(format!(
            "the checkpoint at step {} belongs to a run of {} steps, but this run has {total_steps}: \
             the training data changed since it was written",
            state.step, state.total_steps
        )));
    }
    let mut variables = method.var_store().variables();
    if checkpoint.adapter.len() != variables.len() {
        bail!(
            "the checkpoint holds {} adapter variables; the adapter has {}",
            checkpoint.adapter.len(),
            variables.len()
        );
    }
    for (name, saved) in &checkpoint.adapter {
        let variable = variables
            .get_mut(name)
            .ok_or_else(|| anyhow!("the adapter has no variable {name}"))?;
        if variable.size() != saved.size() {
            bail!(
                "checkpoint variable {name} has shape {:?}; the adapter's is {:?}",
                saved.size(),
                variable.size()
            );
        }
        tch::no_grad(|| variable.copy_(saved));
    }
    optimizer.load_state(&checkpoint.optimizer, u64::from(state.step))
}

fn log(message: String) -> EventPayload {
    EventPayload::Log { message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::StoredCheckpoints;
    use crate::error::classify;
    use crate::fixture::write_fixture;
    use crate::seeds::torch_rng_turn;
    use crate::weights::read_safetensors;
    use loraforge_storage::Store;

    #[derive(Default)]
    struct Recorder(Vec<EventPayload>);

    impl Reporter for Recorder {
        fn report(&mut self, event: EventPayload) {
            self.0.push(event);
        }
    }

    impl Recorder {
        fn progress_steps(&self) -> Vec<u32> {
            self.0
                .iter()
                .filter_map(|e| {
                    if let EventPayload::Progress { step, .. } = e {
                        Some(*step)
                    } else {
                        None
                    }
                })
                .collect()
        }
    }

    fn fixture() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let _turn = torch_rng_turn();
        write_fixture(root.path(), 0).unwrap();
        root
    }

    fn job(root: &Path, dataset: &str, method: &str, training: &str) -> JobSpec {
        let body = format!(
            r#"{{"adapter_name":"demo","base_model":"file://{root}/model","dataset":{dataset},"method":{method},"training":{training}}}"#,
            root = root.display()
        );
        JobSpec::parse(body.as_bytes()).unwrap()
    }

    fn fixture_job(root: &Path, method: &str, training: &str) -> JobSpec {
        let dataset = format!(
            r#"{{"train":"file://{}/data/train.jsonl"}}"#,
            root.display()
        );
        job(root, &dataset, method, training)
    }

    /// The fixture's files, which a run's inputs borrow.
    struct FixturePaths {
        model: std::path::PathBuf,
        train: std::path::PathBuf,
        validation: std::path::PathBuf,
    }

    impl FixturePaths {
        fn new(root: &Path) -> FixturePaths {
            FixturePaths {
                model: root.join("model"),
                train: root.join("data/train.jsonl"),
                validation: root.join("data/validation.jsonl"),
            }
        }

        fn inputs(&self) -> TrainingInputs<'_> {
            TrainingInputs {
                model_dir: &self.model,
                train_data: &self.train,
                validation_data: None,
                parent: None,
                resume: None,
            }
        }
    }

    fn run_with(
        spec: &JobSpec,
        inputs: TrainingInputs,
        checkpoints: Option<&mut dyn CheckpointStore>,
        recorder: &mut dyn Reporter,
        cancel: &AtomicBool,
    ) -> Result<TrainOutcome> {
        let _turn = torch_rng_turn();
        train(spec, inputs, Device::Cpu, checkpoints, recorder, cancel)
    }

    fn run(spec: &JobSpec, root: &Path, recorder: &mut Recorder) -> Result<TrainOutcome> {
        run_with(
            spec,
            FixturePaths::new(root).inputs(),
            None,
            recorder,
            &AtomicBool::new(false),
        )
    }

    fn max_abs_diff(a: &PeftAdapter, b: &PeftAdapter) -> f64 {
        assert_eq!(a.tensors.len(), b.tensors.len());
        a.tensors
            .iter()
            .zip(&b.tensors)
            .map(|((ka, ta), (kb, tb))| {
                assert_eq!(ka, kb);
                (ta - tb).abs().max().double_value(&[])
            })
            .fold(0.0, f64::max)
    }

    /// The fixture job learns, exports exactly PEFT's keys and shapes, and is bit-for-bit
    /// reproducible on the CPU for a given seed.
    #[test]
    fn fixture_job_learns_exports_peft_layout_and_reproduces() {
        let root = fixture();
        let spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":8,"alpha":16,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"max_steps":30,"learning_rate":0.001,"batch_size":4,"seq_len":64,"seed":0}"#,
        );
        let mut events = Recorder::default();
        let first = run(&spec, root.path(), &mut events).unwrap();
        let m = &first.metrics;
        assert!(
            m.final_loss < 0.8 * m.initial_loss,
            "loss did not fall enough: {m:?}"
        );
        assert_eq!(
            (m.steps, m.trainable_parameters),
            (30, 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8))
        );
        assert_eq!(events.progress_steps(), (1..=30).collect::<Vec<_>>());
        assert_eq!(m.eval_loss, None);

        let out = tempfile::tempdir().unwrap();
        first.adapter.write(out.path()).unwrap();
        let mut written = Vec::new();
        read_safetensors(&out.path().join("adapter_model.safetensors"), |name, t| {
            written.push((name, t.size()))
        })
        .unwrap();
        written.sort();
        let mut expected = Vec::new();
        for layer in 0..2 {
            let p = format!("base_model.model.model.layers.{layer}.self_attn");
            expected.push((format!("{p}.q_proj.lora_A.weight"), vec![8, 64]));
            expected.push((format!("{p}.q_proj.lora_B.weight"), vec![64, 8]));
            expected.push((format!("{p}.v_proj.lora_A.weight"), vec![8, 64]));
            expected.push((format!("{p}.v_proj.lora_B.weight"), vec![32, 8]));
        }
        expected.sort();
        assert_eq!(written, expected);
        assert!(out.path().join("adapter_config.json").is_file());

        let second = run(&spec, root.path(), &mut Recorder::default()).unwrap();
        assert_eq!(second.metrics.final_loss, m.final_loss);
        for ((key, a), (_, b)) in first.adapter.tensors.iter().zip(&second.adapter.tensors) {
            assert!(a.equal(b), "{key} differs between runs with the same seed");
        }
    }

    /// A non-finite loss stops training as the user's error, naming the step.
    #[test]
    fn non_finite_loss_is_a_user_error_naming_the_step() {
        let root = fixture();
        // Poison the final norm: every logit becomes NaN, as a diverged run's would.
        let weights_path = root.path().join("model/model.safetensors");
        let mut weights = Vec::new();
        read_safetensors(&weights_path, |name, t| weights.push((name, t))).unwrap();
        for (name, tensor) in &mut weights {
            if name == "model.norm.weight" {
                *tensor = tensor.fill(f64::NAN);
            }
        }
        Tensor::write_safetensors(&weights, &weights_path).unwrap();
        let spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":4}"#,
            r#"{"max_steps":5,"learning_rate":0.001,"batch_size":2,"seq_len":32}"#,
        );
        let err = run(&spec, root.path(), &mut Recorder::default())
            .err()
            .expect("training should fail");
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        assert!(err.to_string().contains("became NaN at step 1"), "{err:#}");
    }

    /// k micro-batches of b rows make the same step as one batch of k * b rows.
    #[test]
    fn gradient_accumulation_matches_a_larger_batch() {
        let root = fixture();
        let method = r#"{"type":"lora","r":4,"dropout":0.0}"#;
        let whole = fixture_job(
            root.path(),
            method,
            r#"{"max_steps":6,"learning_rate":0.002,"batch_size":8,"seq_len":64,"seed":1,"schedule":"linear","warmup_steps":2}"#,
        );
        let accumulated = fixture_job(
            root.path(),
            method,
            r#"{"max_steps":6,"learning_rate":0.002,"batch_size":2,"gradient_accumulation_steps":4,"seq_len":64,"seed":1,"schedule":"linear","warmup_steps":2}"#,
        );
        let (mut whole_events, mut accumulated_events) = (Recorder::default(), Recorder::default());
        let a = run(&whole, root.path(), &mut whole_events).unwrap();
        let b = run(&accumulated, root.path(), &mut accumulated_events).unwrap();
        assert_eq!(
            accumulated_events.progress_steps(),
            (1..=6).collect::<Vec<_>>()
        );
        assert_eq!(a.metrics.tokens, b.metrics.tokens);
        assert!(
            (a.metrics.final_loss - b.metrics.final_loss).abs() < 1e-5,
            "{:?} vs {:?}",
            a.metrics,
            b.metrics
        );
        let diff = max_abs_diff(&a.adapter, &b.adapter);
        assert!(diff < 1e-5, "adapters differ by {diff}");
    }

    /// Evaluation runs every `eval_every` steps and at the end, on a held-out fraction or on
    /// the validation file, and its last loss is the metrics' `eval_loss`.
    #[test]
    fn validation_loss_is_reported_as_eval_events_and_metrics() {
        let root = fixture();
        let method = r#"{"type":"lora","r":4}"#;
        let training =
            r#"{"max_steps":12,"learning_rate":0.002,"batch_size":4,"seq_len":64,"eval_every":5}"#;
        let train_uri = format!("file://{}/data/train.jsonl", root.path().display());
        let evals = |events: &Recorder| -> Vec<(u32, f64, u64)> {
            events
                .0
                .iter()
                .filter_map(|e| {
                    if let EventPayload::Eval { step, loss, tokens } = e {
                        Some((*step, *loss, *tokens))
                    } else {
                        None
                    }
                })
                .collect()
        };

        let split = job(
            root.path(),
            &format!(r#"{{"train":"{train_uri}","validation_fraction":0.1}}"#),
            method,
            training,
        );
        let mut events = Recorder::default();
        let outcome = run(&split, root.path(), &mut events).unwrap();
        let reported = evals(&events);
        assert_eq!(
            reported.iter().map(|e| e.0).collect::<Vec<_>>(),
            [5, 10, 12]
        );
        assert!(reported
            .iter()
            .all(|&(_, loss, tokens)| loss.is_finite() && tokens > 0));
        assert!(
            reported.windows(2).all(|w| w[0].2 == w[1].2),
            "one validation set throughout: {reported:?}"
        );
        assert_eq!(outcome.metrics.eval_loss, Some(reported[2].1));

        let paths = FixturePaths::new(root.path());
        let validation_uri = format!("file://{}", paths.validation.display());
        let separate = job(
            root.path(),
            &format!(r#"{{"train":"{train_uri}","validation":"{validation_uri}"}}"#),
            method,
            training,
        );
        let mut with_file = paths.inputs();
        with_file.validation_data = Some(&paths.validation);
        let mut events = Recorder::default();
        let outcome = run_with(
            &separate,
            with_file,
            None,
            &mut events,
            &AtomicBool::new(false),
        )
        .unwrap();
        let from_file = evals(&events);
        assert_eq!(
            from_file.iter().map(|e| e.0).collect::<Vec<_>>(),
            [5, 10, 12]
        );
        assert_ne!(
            from_file[0].2, reported[0].2,
            "the file, not a split, is evaluated"
        );
        assert_eq!(outcome.metrics.eval_loss, Some(from_file[2].1));
    }

    /// `epochs` ends training when the data has been seen that many times.
    #[test]
    fn epochs_cap_the_number_of_steps() {
        let root = fixture();
        // 400 examples in batches of 32 (8 x 4 accumulated): one epoch is 13 steps.
        let spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":2}"#,
            r#"{"max_steps":1000,"learning_rate":0.001,"batch_size":8,"gradient_accumulation_steps":4,"seq_len":32,"epochs":1}"#,
        );
        let mut events = Recorder::default();
        let outcome = run(&spec, root.path(), &mut events).unwrap();
        assert_eq!(outcome.metrics.steps, 13);
        assert_eq!(events.progress_steps().len(), 13);
        assert!(events.0.iter().any(|e| matches!(
            e,
            EventPayload::Progress {
                total_steps: 13,
                ..
            }
        )));
    }

    /// A run checkpointed, stopped, and resumed from its newest complete checkpoint ends with
    /// the adapter of a run that never stopped: dropout, shuffling (packed rows here), warmup
    /// and cosine decay, accumulation, clipping and weight decay all continue exactly.
    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        assert_resume_is_seamless(
            r#"{"type":"lora","r":4,"alpha":8,"dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}"#,
        );
    }

    /// The adaptive-rank methods keep their state (importance averages, masks, gates and
    /// their optimizer, schedules) in the checkpoint: resuming changes nothing either. The
    /// checkpoint at step 5 falls inside AdaLoRA's pruning, IncreLoRA's and TriAdaptLoRA's
    /// growth and CoDyRA's threshold schedule.
    #[test]
    fn adaptive_methods_resume_seamlessly() {
        for method in [
            r#"{"type":"adalora","init_r":4,"target_r":2,"tinit":2,"tfinal":3,"delta_t":2,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"type":"sora","r":4,"lambda":0.01,"threshold":0.05,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"type":"dylora","r":4,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"type":"increlora","target_rank":2,"lora_r":1,"init_warmup":2,"incre_interval":2,"top_h":2,
                "incre_rank_num":1,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"type":"triadaptlora","reference_rank":2,"init_rank":1,"incre_interval":2,"incre_rank_num":1,
                "target_modules":["q_proj","v_proj"]}"#,
            r#"{"type":"codyra","r":4,"max_kappa":0.05,"lambda_num":2,"dense_iters":0.25,"target_modules":["q_proj","v_proj"]}"#,
        ] {
            assert_resume_is_seamless(method);
        }
    }

    /// Runs `method` for 14 steps uninterrupted, and again stopped after step 7 and resumed
    /// from its checkpoint at step 5: the two end with the same adapter and losses.
    fn assert_resume_is_seamless(method: &str) {
        let root = fixture();
        let spec = fixture_job(
            root.path(),
            method,
            r#"{"max_steps":14,"learning_rate":0.003,"batch_size":2,"gradient_accumulation_steps":2,"seq_len":48,
                "seed":7,"schedule":"cosine","warmup_steps":3,"weight_decay":0.01,"max_grad_norm":0.5,
                "packing":true,"checkpoint_every":5}"#,
        );
        let uninterrupted = run(&spec, root.path(), &mut Recorder::default()).unwrap();

        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::create(&format!("file://{}", store_dir.path().display())).unwrap();
        let job_id = uuid::Uuid::new_v4();
        let mut checkpoints = StoredCheckpoints::new(&runtime, store, job_id);

        /// Stops the run after step 7, i.e. two steps past the checkpoint at step 5.
        struct StopAfter<'a>(&'a AtomicBool, Recorder);
        impl Reporter for StopAfter<'_> {
            fn report(&mut self, event: EventPayload) {
                if matches!(event, EventPayload::Progress { step: 7, .. }) {
                    self.0.store(true, Ordering::Relaxed);
                }
                self.1.report(event);
            }
        }
        let stop = AtomicBool::new(false);
        let mut first_attempt = StopAfter(&stop, Recorder::default());
        let paths = FixturePaths::new(root.path());
        let err = run_with(
            &spec,
            paths.inputs(),
            Some(&mut checkpoints),
            &mut first_attempt,
            &stop,
        )
        .err()
        .expect("the first attempt is stopped");
        assert!(
            matches!(classify(&err), Some(Failure::Cancelled)),
            "{err:#}"
        );
        let saved: Vec<_> = first_attempt
            .1
             .0
            .iter()
            .filter(|e| matches!(e, EventPayload::Checkpoint { .. }))
            .collect();
        assert_eq!(
            saved,
            [&EventPayload::Checkpoint {
                step: 5,
                prefix: checkpoint_prefix(&job_id, 5),
                resumed: false
            }]
        );

        let latest = checkpoints
            .latest()
            .unwrap()
            .expect("the checkpoint at step 5");
        let mut resumed_inputs = paths.inputs();
        resumed_inputs.resume = Some(latest);
        let mut second_attempt = Recorder::default();
        let resumed = run_with(
            &spec,
            resumed_inputs,
            Some(&mut checkpoints),
            &mut second_attempt,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(
            second_attempt
                .0
                .iter()
                .find(|e| matches!(e, EventPayload::Checkpoint { .. })),
            Some(&EventPayload::Checkpoint {
                step: 5,
                prefix: checkpoint_prefix(&job_id, 5),
                resumed: true
            })
        );
        assert_eq!(
            second_attempt.progress_steps(),
            (6..=14).collect::<Vec<_>>()
        );
        assert_eq!(
            uninterrupted.adapter.config.rank_pattern, resumed.adapter.config.rank_pattern,
            "{method}"
        );
        let diff = max_abs_diff(&uninterrupted.adapter, &resumed.adapter);
        assert!(
            diff <= 1e-6,
            "{method}: the resumed adapter differs by {diff}"
        );
        let (a, b) = (&uninterrupted.metrics, &resumed.metrics);
        assert_eq!(
            (a.steps, a.tokens, a.initial_loss),
            (b.steps, b.tokens, b.initial_loss)
        );
        assert!(
            (a.final_loss - b.final_loss).abs() <= 1e-6,
            "{method}: {a:?} vs {b:?}"
        );
    }

    fn checkpoint_prefix(job_id: &uuid::Uuid, step: u32) -> String {
        loraforge_storage::layout::checkpoint_prefix(&job_id.to_string(), step)
    }

    /// A parent adapter's factors are where training starts; one of another rank is refused.
    #[test]
    fn training_continues_from_a_parent_adapter() {
        let root = fixture();
        let parent_spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":4}"#,
            r#"{"max_steps":5,"learning_rate":0.005,"batch_size":4,"seq_len":32}"#,
        );
        let parent = run(&parent_spec, root.path(), &mut Recorder::default())
            .unwrap()
            .adapter;
        // One step at a tiny learning rate: the child is its parent, nearly.
        let child_spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":4}"#,
            r#"{"max_steps":1,"learning_rate":1e-9,"batch_size":4,"seq_len":32,"max_grad_norm":null}"#,
        );
        let paths = FixturePaths::new(root.path());
        let mut child_inputs = paths.inputs();
        child_inputs.parent = Some(&parent);
        let child = run_with(
            &child_spec,
            child_inputs,
            None,
            &mut Recorder::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(max_abs_diff(&parent, &child.adapter) < 1e-6);
        assert!(parent
            .tensors
            .iter()
            .any(|(_, t)| t.abs().sum(Kind::Float).double_value(&[]) > 0.0));

        let misfit = fixture_job(
            root.path(),
            r#"{"type":"lora","r":8}"#,
            r#"{"max_steps":1,"learning_rate":0.001,"batch_size":4,"seq_len":32}"#,
        );
        let mut misfit_inputs = paths.inputs();
        misfit_inputs.parent = Some(&parent);
        let err = run_with(
            &misfit,
            misfit_inputs,
            None,
            &mut Recorder::default(),
            &AtomicBool::new(false),
        )
        .err()
        .expect("a parent of another rank is refused");
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        assert!(err.to_string().contains("ranks differ"), "{err:#}");
    }
}
