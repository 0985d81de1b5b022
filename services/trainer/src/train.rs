//! The training core, independent of the control plane: load the base model and data,
//! attach the job's adapter method, run AdamW over the adapter only, and hand back the
//! trained adapter with its metrics.

use crate::config::ModelConfig;
use crate::data::{self, Batches, SequenceFormat, IGNORE_INDEX};
use crate::error::{user_error, Failure};
use crate::export::PeftAdapter;
use crate::method::attach_method;
use crate::model::{device_label, LlamaModel};
use anyhow::{anyhow, Result};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{JobSpec, TrainingMetrics};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction};
use tokenizers::Tokenizer;

/// Where training reports what it does (the control plane's event stream, or a log).
pub trait Reporter {
    fn report(&mut self, event: EventPayload);
}

pub struct TrainOutcome {
    pub metrics: TrainingMetrics,
    pub adapter: PeftAdapter,
}

/// Trains the adapter a job asks for. `cancel` is checked before every step.
///
/// libtorch reports its own failures (out of memory, kernel errors) by panicking through
/// `tch`; they are caught here and returned as system errors so the job can be failed cleanly.
pub fn train(
    spec: &JobSpec,
    model_dir: &Path,
    dataset_path: &Path,
    device: Device,
    reporter: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    catch_unwind(AssertUnwindSafe(|| train_unguarded(spec, model_dir, dataset_path, device, reporter, cancel)))
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
    model_dir: &Path,
    dataset_path: &Path,
    device: Device,
    reporter: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let training = &spec.training;
    let config = ModelConfig::load(model_dir)?;
    if i64::from(training.seq_len) > config.max_trainable_len() {
        return Err(user_error(format!(
            "training.seq_len {} exceeds what the model attends over ({}: max_position_embeddings or sliding_window)",
            training.seq_len,
            config.max_trainable_len()
        )));
    }
    let tokenizer_path = model_dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| user_error(format!("cannot load {}: {e}", tokenizer_path.display())))?;
    let format = SequenceFormat {
        bos: config.bos_token_id,
        eos: config.eos_token_id,
        max_len: training.seq_len as usize,
        vocab_size: config.vocab_size,
    };
    let sequences = data::tokenize(&tokenizer, data::read_texts(dataset_path)?, &format)?;
    let dataset_tokens: usize = sequences.iter().map(Vec::len).sum();
    reporter.report(log(format!("dataset: {} sequences, {dataset_tokens} tokens", sequences.len())));
    // Padding is never attended to (causal attention, right padding) nor scored, so any id will do.
    let pad_id = config.pad_token_id.or(config.eos_token_id).unwrap_or(0);
    let vocab_size = config.vocab_size;

    tch::manual_seed(training.seed as i64);
    let mut model = LlamaModel::load(model_dir, config, device)?;
    let method = attach_method(&mut model, &spec.method, device)?;
    let params = method.var_store().trainable_variables();
    let trainable_parameters: u64 = params.iter().map(|p| p.numel() as u64).sum();
    reporter.report(log(format!(
        "training {} on {}, adapter fp32: {trainable_parameters} trainable parameters",
        spec.method.name(),
        device_label(device)
    )));

    let mut optimizer = nn::AdamW { wd: training.weight_decay, ..Default::default() }
        .build(method.var_store(), training.learning_rate)?;
    let mut batches = Batches::new(sequences, training.batch_size as usize, pad_id, training.seed);
    let total_steps = training.max_steps;
    let mut losses = Vec::with_capacity(total_steps as usize);
    let mut tokens = 0u64;
    let started = Instant::now();
    for step in 1..=total_steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(Failure::Cancelled.into());
        }
        let lr = learning_rate_at(step, training.learning_rate, training.warmup_steps);
        optimizer.set_lr(lr);
        let batch = batches.next_batch(device);
        let logits = model.forward(&batch.input_ids, true).to_kind(Kind::Float);
        let loss = logits.view([-1, vocab_size]).cross_entropy_loss::<tch::Tensor>(
            &batch.labels.view([-1]),
            None,
            Reduction::Mean,
            IGNORE_INDEX,
            0.0,
        );
        let loss_value = loss.double_value(&[]);
        if !loss_value.is_finite() {
            return Err(user_error(format!(
                "training loss became {loss_value} at step {step}: the run diverged (lower \
                 training.learning_rate, now {}, or set training.max_grad_norm) or the base weights are not finite",
                training.learning_rate
            )));
        }
        optimizer.zero_grad();
        loss.backward();
        if let Some(max_norm) = training.max_grad_norm {
            optimizer.clip_grad_norm(max_norm);
        }
        optimizer.step();

        losses.push(loss_value);
        tokens += batch.tokens;
        let elapsed = started.elapsed().as_secs_f64();
        reporter.report(EventPayload::Progress {
            step,
            total_steps,
            loss: loss_value,
            lr,
            tokens_per_second: tokens as f64 / elapsed.max(1e-9),
            eta_seconds: Some(elapsed / f64::from(step) * f64::from(total_steps - step)),
        });
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let tail = (losses.len() / 10).max(1);
    let metrics = TrainingMetrics {
        steps: total_steps,
        tokens,
        initial_loss: losses[0],
        final_loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64,
        train_seconds,
        tokens_per_second: tokens as f64 / train_seconds.max(1e-9),
        trainable_parameters,
        eval_loss: None,
    };
    Ok(TrainOutcome { metrics, adapter: method.export(&spec.base_model) })
}

/// Linear warmup from `peak / warmup` at step 1 to `peak` at step `warmup`, then constant.
fn learning_rate_at(step: u32, peak: f64, warmup: u32) -> f64 {
    if step < warmup {
        peak * f64::from(step) / f64::from(warmup)
    } else {
        peak
    }
}

fn log(message: String) -> EventPayload {
    EventPayload::Log { message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::classify;
    use crate::fixture::write_fixture;
    use crate::weights::read_safetensors;
    use std::sync::Mutex;
    use tch::Tensor;

    /// libtorch's generator is global: runs that must be reproducible take turns.
    static TORCH_RNG: Mutex<()> = Mutex::new(());

    #[derive(Default)]
    struct Recorder(Vec<EventPayload>);

    impl Reporter for Recorder {
        fn report(&mut self, event: EventPayload) {
            self.0.push(event);
        }
    }

    fn fixture_job(root: &Path, method: &str, training: &str) -> JobSpec {
        let body = format!(
            r#"{{"adapter_name":"demo","base_model":"file://{root}/model","dataset":{{"train":"file://{root}/data/train.jsonl"}},
                "method":{method},"training":{training}}}"#,
            root = root.display()
        );
        JobSpec::parse(body.as_bytes()).unwrap()
    }

    fn run(spec: &JobSpec, root: &Path, recorder: &mut Recorder) -> Result<TrainOutcome> {
        let _turn = TORCH_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dataset = root.join("data/train.jsonl");
        train(spec, &root.join("model"), &dataset, Device::Cpu, recorder, &AtomicBool::new(false))
    }

    #[test]
    fn warmup_is_linear_then_constant() {
        let lrs: Vec<f64> = (1..=6).map(|s| learning_rate_at(s, 1.0, 4)).collect();
        assert_eq!(lrs, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(learning_rate_at(1, 0.1, 0), 0.1);
    }

    /// The fixture job learns, exports exactly PEFT's keys and shapes, and is bit-for-bit
    /// reproducible on the CPU for a given seed.
    #[test]
    fn fixture_job_learns_exports_peft_layout_and_reproduces() {
        let root = tempfile::tempdir().unwrap();
        write_fixture(root.path(), 0).unwrap();
        let spec = fixture_job(
            root.path(),
            r#"{"type":"lora","r":8,"alpha":16,"target_modules":["q_proj","v_proj"]}"#,
            r#"{"max_steps":30,"learning_rate":0.001,"batch_size":4,"seq_len":64,"seed":0}"#,
        );
        let mut events = Recorder::default();
        let first = run(&spec, root.path(), &mut events).unwrap();
        let m = &first.metrics;
        assert!(m.final_loss < 0.8 * m.initial_loss, "loss did not fall enough: {m:?}");
        assert_eq!((m.steps, m.trainable_parameters), (30, 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8)));
        let progress = events.0.iter().filter(|e| matches!(e, EventPayload::Progress { .. })).count();
        assert_eq!(progress, 30);

        let out = tempfile::tempdir().unwrap();
        first.adapter.write(out.path()).unwrap();
        let mut written = Vec::new();
        read_safetensors(&out.path().join("adapter_model.safetensors"), |name, t| written.push((name, t.size())))
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
        let root = tempfile::tempdir().unwrap();
        write_fixture(root.path(), 0).unwrap();
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
        let err = run(&spec, root.path(), &mut Recorder::default()).err().expect("training should fail");
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        assert!(err.to_string().contains("became NaN at step 1"), "{err:#}");
    }
}
