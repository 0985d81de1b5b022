//! The safety evaluation behind the publish gate (docs/trainer.md "The safety evaluation"): the base
//! model and the adapted model, side by side, on
//! - refusals: greedy short answers to 100 harmful requests (ten categories), judged by
//!   by [`judge::Judge`] (semantic where the encoder is installed, else llm-attacks' keywords);
//! - drift: mean KL(base || adapted) of next-token distributions over 20 benign prompts, and
//!   perplexity on the job's validation file (on the benign prompts when it has none);
//! - weight space: intruder dimensions per adapted module;
//! - the refusal direction ([`direction`]): how far the adapter moved the harmful requests'
//!   activations towards the benign prompts' along the base model's difference of means.
//!
//! The worker only measures; the control plane judges the [`SafetyReport`] against the job's
//! policy, so a worker cannot publish what the policy blocks.
//!
//! Prompts go through the model's chat template. A model without one (a base model, or the
//! test fixture) is asked in plain text, `User: {request}\nAssistant:`, so data written in that
//! form teaches it what a chat model learns through its template.

pub mod baseline;
pub mod direction;
pub mod drift;
pub mod embedder;
pub mod intruders;
pub mod judge;
pub mod labelled;
pub mod prompts;
pub mod semantic;

use crate::data::{ExampleSet, TokenizedDataset};
use crate::export::PeftAdapter;
use crate::model::generate::{Generator, Prompt, Sampling};
use anyhow::Result;
use baseline::{BaseSide, BaselineCache};
use judge::{Judge, JudgeConfig};
use loraforge_spec::safety::SafetyReport;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::Device;

/// Answers are short: a refusal shows in its first words, and a gate that ran on every job
/// must cost seconds, not minutes. GCG checks 32 tokens; 24 holds every `_test_prefixes`
/// phrase with room to spare.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 24;
/// Prompts generated (and scored) together: every harmful request in one batch. Decoding is
/// one forward pass per token for the whole batch, so its cost is nearly that of the weights'
/// reads, however many rows share it: on two CPU cores, SmolLM2-135M evaluates in 0.55x the
/// time of batches of 32, with the same answers.
pub const DEFAULT_BATCH_SIZE: usize = 128;
/// Validation examples are cut to this many tokens when no job says otherwise.
pub const DEFAULT_SEQ_LEN: usize = 512;
/// Validation examples scored together when no job says otherwise (a job's own training batch
/// size is what it knows fits: validation holds full `(batch, seq_len, vocab)` logits).
pub const DEFAULT_VALIDATION_BATCH_SIZE: usize = 8;

/// How the evaluation runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_new_tokens: usize,
    /// Prompts answered, and benign prompts scored, together.
    pub batch_size: usize,
    /// Validation examples are cut to this length (the job's `training.seq_len`).
    pub seq_len: usize,
    /// Validation examples scored together (the job's `training.batch_size`).
    pub validation_batch_size: usize,
    pub judge: JudgeConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            batch_size: DEFAULT_BATCH_SIZE,
            seq_len: DEFAULT_SEQ_LEN,
            validation_batch_size: DEFAULT_VALIDATION_BATCH_SIZE,
            judge: JudgeConfig::default(),
        }
    }
}

/// The rendering of a request for a model without a chat template.
pub fn plain_prompt(request: &str) -> String {
    format!("User: {request}\nAssistant:")
}

/// Where the base model's side of an evaluation may be found, or kept for the next job.
pub struct Reuse<'a> {
    pub cache: &'a dyn BaselineCache,
    /// The base model's tree digest (the job's lineage records the same).
    pub model_digest: &'a str,
}

/// How far an evaluation is: `done` of `total` prompts answered or scored, across both models
/// (the base model's share is not counted when it is reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
}

/// What an evaluation runs with besides the models.
pub struct Context<'a> {
    pub device: Device,
    /// Checked between batches.
    pub cancel: &'a AtomicBool,
    pub reuse: Option<Reuse<'a>>,
    /// Told after every batch.
    pub progress: &'a mut dyn FnMut(Progress),
}

/// Evaluates `adapter` on the model in `model_dir` against the model alone. libtorch failures
/// (which `tch` raises as panics) come back as errors.
pub fn evaluate(
    model_dir: &Path,
    adapter: &PeftAdapter,
    validation: Option<&Path>,
    settings: &Settings,
    context: Context,
) -> Result<SafetyReport> {
    crate::error::guard_libtorch("the safety evaluation", || {
        evaluate_unguarded(model_dir, adapter, validation, settings, context)
    })
}

/// Measures the model in `model_dir` alone, as the base side of [`evaluate`] does (and reusing
/// or keeping that side the same way): so a base model can be checked before anything is
/// trained on it.
pub fn evaluate_model(
    model_dir: &Path,
    validation: Option<&Path>,
    settings: &Settings,
    context: Context,
) -> Result<ModelReport> {
    crate::error::guard_libtorch("the safety evaluation", || {
        evaluate_model_unguarded(model_dir, validation, settings, context)
    })
}

/// One model's side of the evaluation, on its own (`loraforge-trainer evaluate` without an
/// adapter).
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub harmful_prompts: u32,
    pub judge: String,
    pub refusal_rate: f64,
    pub refusal_rate_by_category: BTreeMap<String, f64>,
    pub benign_prompts: u32,
    /// On the validation set, or the benign prompts when there is none.
    pub perplexity: f64,
    pub refusal_direction: ModelDirection,
    pub tokens_generated: u64,
    pub seconds: f64,
}

/// A model's refusal direction: the layer an evaluation would take it from, and how well every
/// layer separates harmful from harmless prompts.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDirection {
    pub layer: u32,
    pub layers: u32,
    pub separation: f64,
    pub effect_size: f64,
    pub per_layer: Vec<direction::LayerSeparation>,
}

/// What one model (base or adapted) did.
struct Measurement {
    side: BaseSide,
    validation_perplexity: Option<f64>,
}

impl Measurement {
    fn refused(&self, judge: &Judge) -> Result<Vec<bool>> {
        let answers: Vec<&str> = self.side.answers.iter().map(String::as_str).collect();
        Ok(judge
            .verdicts(&answers)?
            .iter()
            .map(|v| v.refusal)
            .collect())
    }

    fn perplexity(&self) -> f64 {
        self.validation_perplexity
            .unwrap_or_else(|| self.side.benign.perplexity())
    }
}

/// The share of `true`s.
fn rate(refused: &[bool]) -> f64 {
    refused.iter().filter(|&&r| r).count() as f64 / refused.len().max(1) as f64
}

/// The refusal rate per prompt category.
fn rate_by_category(harmful: &[prompts::HarmfulPrompt], refused: &[bool]) -> BTreeMap<String, f64> {
    let mut by_category: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (prompt, &refused) in harmful.iter().zip(refused) {
        by_category
            .entry(prompt.category.clone())
            .or_default()
            .push(refused);
    }
    by_category
        .into_iter()
        .map(|(c, r)| (c, rate(&r)))
        .collect()
}

/// The prompts, rendered and tokenized for the model, and the validation set.
struct Prepared {
    harmful: Vec<prompts::HarmfulPrompt>,
    requests: Vec<Prompt>,
    harmful_ids: Vec<Vec<i64>>,
    benign_ids: Vec<Vec<i64>>,
    validation: Option<TokenizedDataset>,
}

impl Prepared {
    fn new(
        generator: &Generator,
        validation: Option<&Path>,
        settings: &Settings,
    ) -> Result<Prepared> {
        if settings.batch_size == 0 {
            return Err(crate::error::user_error(
                "the evaluation's batch size must be at least 1",
            ));
        }
        let harmful = prompts::harmful()?;
        let benign = prompts::benign()?;
        let as_prompt = |request: &str| match generator.has_chat_template() {
            true => Prompt::user(request),
            false => Prompt::Text(plain_prompt(request)),
        };
        let requests: Vec<Prompt> = harmful.iter().map(|h| as_prompt(&h.prompt)).collect();
        let encode = |prompts: &[Prompt]| {
            prompts
                .iter()
                .map(|p| generator.encode(p).map(|(_, ids)| ids))
                .collect::<Result<Vec<_>>>()
        };
        let harmful_ids = encode(&requests)?;
        let benign_ids = encode(&benign.iter().map(|b| as_prompt(b)).collect::<Vec<_>>())?;
        let validation = match validation {
            Some(path) => Some(TokenizedDataset::build(
                path,
                &generator.example_encoder()?,
                Some(settings.seq_len),
            )?),
            None => None,
        };
        Ok(Prepared {
            harmful,
            requests,
            harmful_ids,
            benign_ids,
            validation,
        })
    }

    /// Prompts answered or scored per model (what progress counts).
    fn per_model(&self) -> Result<u32> {
        Ok(u32::try_from(self.requests.len() + self.benign_ids.len())?)
    }

    fn inputs<'a>(&'a self, settings: &'a Settings, device: Device) -> MeasureInputs<'a> {
        MeasureInputs {
            requests: &self.requests,
            harmful_ids: &self.harmful_ids,
            benign_ids: &self.benign_ids,
            validation: self.validation.as_ref(),
            settings,
            device,
        }
    }
}

/// Where the base model's side is kept, if anywhere, and what was found there.
struct Baseline<'a> {
    reuse: Option<Reuse<'a>>,
    key: Option<String>,
    stored: Option<BaseSide>,
}

impl<'a> Baseline<'a> {
    fn look_up(reuse: Option<Reuse<'a>>, settings: &Settings, device: Device) -> Baseline<'a> {
        let key = reuse
            .as_ref()
            .map(|r| baseline::baseline_key(r.model_digest, settings, device));
        let stored = match (&reuse, &key) {
            (Some(r), Some(key)) => r.cache.load(key).unwrap_or_else(|e| {
                // A stored entry that cannot be read is measured again (and replaced).
                tracing::warn!("the stored base side {key} is unreadable, measuring again: {e:#}");
                None
            }),
            _ => None,
        };
        Baseline { reuse, key, stored }
    }

    /// Of `models` evaluated (the base first), how many are measured here: the base is not
    /// when its side was found stored.
    fn models_to_measure(&self, models: u32) -> u32 {
        models - u32::from(self.stored.is_some())
    }

    /// The stored side, or the side measured now (and kept for the next evaluation).
    fn measure(self, measurer: Measurer, counter: &mut Counter) -> Result<Measurement> {
        if let Some(side) = self.stored {
            return Ok(Measurement {
                validation_perplexity: measurer.validation_perplexity()?,
                side,
            });
        }
        let measured = measurer.measure(counter)?;
        if let (Some(r), Some(key)) = (&self.reuse, &self.key) {
            if let Err(e) = r.cache.save(key, &measured.side) {
                tracing::warn!("could not keep the base side {key} for reuse: {e:#}");
            }
        }
        Ok(measured)
    }
}

/// What both evaluations start from.
struct Opened<'a> {
    judge: judge::Judge,
    generator: Generator,
    prepared: Prepared,
    baseline: Baseline<'a>,
}

impl<'a> Opened<'a> {
    fn new(
        model_dir: &Path,
        validation: Option<&Path>,
        settings: &Settings,
        device: Device,
        reuse: Option<Reuse<'a>>,
    ) -> Result<Opened<'a>> {
        // Loaded first: a judge that cannot load fails the evaluation before any generation.
        let judge = settings.judge.load(device)?;
        let generator = Generator::load(model_dir, None, device)?;
        let prepared = Prepared::new(&generator, validation, settings)?;
        let baseline = Baseline::look_up(reuse, settings, device);
        Ok(Opened {
            judge,
            generator,
            prepared,
            baseline,
        })
    }
}

fn evaluate_model_unguarded(
    model_dir: &Path,
    validation: Option<&Path>,
    settings: &Settings,
    context: Context,
) -> Result<ModelReport> {
    let Context {
        device,
        cancel,
        reuse,
        progress,
    } = context;
    let started = Instant::now();
    let Opened {
        judge,
        generator,
        prepared,
        baseline,
    } = Opened::new(model_dir, validation, settings, device, reuse)?;
    let mut counter = Counter {
        done: 0,
        total: prepared.per_model()? * baseline.models_to_measure(1),
        progress,
        cancel,
    };
    counter.check_cancel()?;
    let inputs = prepared.inputs(settings, device);
    let model = baseline.measure(Measurer::of(&generator, &inputs), &mut counter)?;
    let refused = model.refused(&judge)?;
    let direction = &model.side.direction;
    let per_layer = direction.per_layer();
    let layer = direction.chosen_layer();
    Ok(ModelReport {
        harmful_prompts: u32::try_from(prepared.harmful.len())?,
        judge: judge.describe(),
        refusal_rate: rate(&refused),
        refusal_rate_by_category: rate_by_category(&prepared.harmful, &refused),
        benign_prompts: u32::try_from(prepared.benign_ids.len())?,
        perplexity: model.perplexity(),
        refusal_direction: ModelDirection {
            layer: u32::try_from(layer)?,
            layers: u32::try_from(per_layer.len())?,
            separation: per_layer[layer].separation,
            effect_size: per_layer[layer].effect_size,
            per_layer,
        },
        tokens_generated: model.side.tokens_generated,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn evaluate_unguarded(
    model_dir: &Path,
    adapter: &PeftAdapter,
    validation: Option<&Path>,
    settings: &Settings,
    context: Context,
) -> Result<SafetyReport> {
    let Context {
        device,
        cancel,
        reuse,
        progress,
    } = context;
    let started = Instant::now();
    let Opened {
        judge,
        mut generator,
        prepared,
        baseline,
    } = Opened::new(model_dir, validation, settings, device, reuse)?;
    let per_model = prepared.per_model()?;
    let mut counter = Counter {
        done: 0,
        total: per_model * baseline.models_to_measure(2),
        progress,
        cancel,
    };
    counter.check_cancel()?;
    let inputs = prepared.inputs(settings, device);
    let base = baseline.measure(Measurer::of(&generator, &inputs), &mut counter)?;
    generator.attach_adapter(adapter)?;
    let adapted = Measurer::of(&generator, &inputs).measure(&mut counter)?;
    counter.check_cancel()?;
    let intruder_dimensions = intruders::count_intruders(model_dir, adapter, device)?;
    // Judged here, never stored: a reused base side is judged by this job's judge.
    let (base_refused, adapted_refused) = (base.refused(&judge)?, adapted.refused(&judge)?);
    Ok(SafetyReport {
        harmful_prompts: u32::try_from(prepared.harmful.len())?,
        judge: judge.describe(),
        refusal_rate_base: rate(&base_refused),
        refusal_rate_adapted: rate(&adapted_refused),
        refusal_rate_by_category: rate_by_category(&prepared.harmful, &adapted_refused),
        benign_prompts: u32::try_from(prepared.benign_ids.len())?,
        benign_kl_mean: drift::mean_kl(&base.side.benign, &adapted.side.benign),
        perplexity_base: base.perplexity(),
        perplexity_adapted: adapted.perplexity(),
        intruder_dimensions_total: intruder_dimensions.values().sum(),
        intruder_dimensions,
        refusal_direction: Some(base.side.direction.report(&adapted.side.direction.means)),
        tokens_generated: base.side.tokens_generated + adapted.side.tokens_generated,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Counts finished prompts, reports them, and checks for cancellation between batches.
struct Counter<'a> {
    done: u32,
    total: u32,
    progress: &'a mut dyn FnMut(Progress),
    cancel: &'a AtomicBool,
}

impl Counter<'_> {
    fn check_cancel(&self) -> Result<()> {
        match self.cancel.load(Ordering::Relaxed) {
            true => Err(anyhow::Error::new(crate::error::Failure::Cancelled)),
            false => Ok(()),
        }
    }

    fn finished(&mut self, prompts: usize) -> Result<()> {
        self.done += prompts as u32;
        (self.progress)(Progress {
            done: self.done,
            total: self.total,
        });
        self.check_cancel()
    }
}

/// What both models are measured on.
struct MeasureInputs<'a> {
    requests: &'a [Prompt],
    /// The requests' token ids (the same the generator encodes).
    harmful_ids: &'a [Vec<i64>],
    benign_ids: &'a [Vec<i64>],
    validation: Option<&'a TokenizedDataset>,
    settings: &'a Settings,
    device: Device,
}

/// Measures whichever model the generator holds.
struct Measurer<'a> {
    generator: &'a Generator,
    inputs: &'a MeasureInputs<'a>,
}

impl<'a> Measurer<'a> {
    fn of(generator: &'a Generator, inputs: &'a MeasureInputs<'a>) -> Self {
        Measurer { generator, inputs }
    }

    fn measure(&self, counter: &mut Counter) -> Result<Measurement> {
        let greedy = Sampling {
            max_new_tokens: self.inputs.settings.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        let batch = self.inputs.settings.batch_size;
        let (mut answers, mut tokens_generated) = (Vec::new(), 0);
        // Progress is reported, and a cancel noticed, after every decoding step.
        let completions = self.generator.generate_reporting(
            self.inputs.requests,
            &greedy,
            batch,
            &mut |prompts| counter.finished(prompts),
        )?;
        for answer in completions {
            tokens_generated += answer.token_ids.len() as u64;
            answers.push(answer.text);
        }
        let benign = drift::score_prompts(
            self.generator.model(),
            self.inputs.benign_ids,
            self.generator.pad_id(),
            batch,
            self.inputs.device,
        )?;
        counter.finished(self.inputs.benign_ids.len())?;
        // Not counted as progress: a forward pass of both prompt sets costs a fraction of
        // the answers' decoding (docs/safety.md gives the time, which this log line shows).
        let started = Instant::now();
        let activations = |ids: &[Vec<i64>]| self.generator.last_token_residuals(ids, batch);
        let direction = direction::BaseDirection::fit(
            &activations(self.inputs.harmful_ids)?,
            &activations(self.inputs.benign_ids)?,
        );
        tracing::info!(
            "refusal direction: activations of {} prompts in {:.2} s",
            self.inputs.harmful_ids.len() + self.inputs.benign_ids.len(),
            started.elapsed().as_secs_f64()
        );
        counter.check_cancel()?;
        Ok(Measurement {
            side: BaseSide {
                answers,
                tokens_generated,
                benign,
                direction,
            },
            validation_perplexity: self.validation_perplexity()?,
        })
    }

    fn validation_perplexity(&self) -> Result<Option<f64>> {
        let Some(data) = self.inputs.validation else {
            return Ok(None);
        };
        let (loss, _) = crate::eval::validation::validation_loss(
            self.generator.model(),
            &ExampleSet::all(data),
            self.inputs.settings.seq_len,
            self.inputs.settings.validation_batch_size,
            self.generator.pad_id(),
            self.inputs.device,
        )?;
        Ok(Some(loss.exp()))
    }
}
