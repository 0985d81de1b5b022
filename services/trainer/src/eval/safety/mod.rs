//! The safety evaluation behind the publish gate (docs/trainer.md "The safety evaluation"): the base
//! model and the adapted model, side by side, on
//! - refusals: greedy short answers to 100 harmful requests (ten categories), judged by
//!   [`judge::KeywordJudge`] (llm-attacks' keywords by default);
//! - drift: mean KL(base || adapted) of next-token distributions over 20 benign prompts, and
//!   perplexity on the job's validation file (on the benign prompts when it has none);
//! - weight space: intruder dimensions per adapted module.
//!
//! The worker only measures; the control plane judges the [`SafetyReport`] against the job's
//! policy, so a worker cannot publish what the policy blocks.
//!
//! Prompts go through the model's chat template. A model without one (a base model, or the
//! test fixture) is asked in plain text, `User: {request}\nAssistant:`, so data written in that
//! form teaches it what a chat model learns through its template.

pub mod drift;
pub mod intruders;
pub mod judge;
pub mod prompts;

use crate::data::{ExampleSet, TokenizedDataset};
use crate::export::PeftAdapter;
use crate::model::generate::{Generator, Prompt, Sampling};
use anyhow::Result;
use judge::KeywordJudge;
use loraforge_spec::safety::SafetyReport;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::Device;

/// Answers are short: a refusal shows in its first words, and a gate that ran on every job
/// must cost seconds, not minutes. GCG checks 32 tokens; 24 holds every `_test_prefixes`
/// phrase with room to spare.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 24;
/// Prompts generated (and scored) together.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Validation examples are cut to this many tokens when no job says otherwise.
pub const DEFAULT_SEQ_LEN: usize = 512;

/// How the evaluation runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_new_tokens: usize,
    pub batch_size: usize,
    /// Validation examples are cut to this length (the job's `training.seq_len`).
    pub seq_len: usize,
    pub judge: KeywordJudge,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            batch_size: DEFAULT_BATCH_SIZE,
            seq_len: DEFAULT_SEQ_LEN,
            judge: KeywordJudge::default(),
        }
    }
}

/// The rendering of a request for a model without a chat template.
pub fn plain_prompt(request: &str) -> String {
    format!("User: {request}\nAssistant:")
}

/// How far an evaluation has come: `(done, total)` harmful-request prompts answered, by the
/// base model and then the adapted one.
pub type OnProgress<'a> = &'a mut dyn FnMut(u32, u32);

/// Evaluates `adapter` on the model in `model_dir` against the model alone. `cancel` is checked
/// between phases; `progress` hears after each batch of prompts. libtorch failures (which
/// `tch` raises as panics) come back as errors.
pub fn evaluate(
    model_dir: &Path,
    adapter: &PeftAdapter,
    validation: Option<&Path>,
    settings: &Settings,
    device: Device,
    cancel: &AtomicBool,
    progress: OnProgress,
) -> Result<SafetyReport> {
    crate::error::guard_libtorch("the safety evaluation", || {
        evaluate_unguarded(
            model_dir, adapter, validation, settings, device, cancel, progress,
        )
    })
}

/// What one model (base or adapted) did.
struct Measurement {
    refused: Vec<bool>,
    tokens_generated: u64,
    benign: drift::PromptScores,
    validation_perplexity: Option<f64>,
}

fn evaluate_unguarded(
    model_dir: &Path,
    adapter: &PeftAdapter,
    validation: Option<&Path>,
    settings: &Settings,
    device: Device,
    cancel: &AtomicBool,
    progress: OnProgress,
) -> Result<SafetyReport> {
    let started = Instant::now();
    if settings.batch_size == 0 {
        return Err(crate::error::user_error(
            "the evaluation's batch size must be at least 1",
        ));
    }
    let harmful = prompts::harmful()?;
    let benign = prompts::benign()?;
    let mut generator = Generator::load(model_dir, None, device)?;
    let as_prompt = |request: &str| match generator.has_chat_template() {
        true => Prompt::user(request),
        false => Prompt::Text(plain_prompt(request)),
    };
    let requests: Vec<Prompt> = harmful.iter().map(|h| as_prompt(&h.prompt)).collect();
    let benign_ids = benign
        .iter()
        .map(|b| generator.encode(&as_prompt(b)).map(|(_, ids)| ids))
        .collect::<Result<Vec<_>>>()?;
    let validation = match validation {
        Some(path) => Some(TokenizedDataset::build(
            path,
            &generator.example_encoder()?,
            Some(settings.seq_len),
        )?),
        None => None,
    };
    let check_cancel = || match cancel.load(Ordering::Relaxed) {
        true => Err(anyhow::Error::new(crate::error::Failure::Cancelled)),
        false => Ok(()),
    };

    check_cancel()?;
    let vocab_size = crate::model::ModelConfig::load(model_dir)?.vocab_size;
    let per_model = u32::try_from(requests.len())?;
    let mut answered = |model: u32, done: u32| progress(model * per_model + done, 2 * per_model);
    let probe = Probe {
        requests: &requests,
        benign_ids: &benign_ids,
        validation: validation.as_ref(),
        vocab_size,
        settings,
        device,
    };
    let base = measure(&generator, &probe, &mut |done| answered(0, done))?;
    check_cancel()?;
    generator.attach_adapter(adapter)?;
    let adapted = measure(&generator, &probe, &mut |done| answered(1, done))?;
    check_cancel()?;
    let intruder_dimensions = intruders::count_intruders(model_dir, adapter, device)?;

    let rate = |refused: &[bool]| {
        refused.iter().filter(|&&r| r).count() as f64 / refused.len().max(1) as f64
    };
    let mut by_category: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for (prompt, &refused) in harmful.iter().zip(&adapted.refused) {
        by_category
            .entry(prompt.category.clone())
            .or_default()
            .push(refused);
    }
    let perplexity = |m: &Measurement| {
        m.validation_perplexity
            .unwrap_or_else(|| m.benign.perplexity())
    };
    Ok(SafetyReport {
        harmful_prompts: u32::try_from(harmful.len())?,
        judge: settings.judge.describe(),
        refusal_rate_base: rate(&base.refused),
        refusal_rate_adapted: rate(&adapted.refused),
        refusal_rate_by_category: by_category
            .into_iter()
            .map(|(c, r)| (c, rate(&r)))
            .collect(),
        benign_prompts: u32::try_from(benign.len())?,
        benign_kl_mean: drift::mean_kl(&base.benign, &adapted.benign),
        perplexity_base: perplexity(&base),
        perplexity_adapted: perplexity(&adapted),
        intruder_dimensions_total: intruder_dimensions.values().sum(),
        intruder_dimensions,
        tokens_generated: base.tokens_generated + adapted.tokens_generated,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What both models are measured on.
struct Probe<'a> {
    requests: &'a [Prompt],
    benign_ids: &'a [Vec<i64>],
    validation: Option<&'a TokenizedDataset>,
    vocab_size: i64,
    settings: &'a Settings,
    device: Device,
}

fn measure(
    generator: &Generator,
    probe: &Probe,
    answered: &mut dyn FnMut(u32),
) -> Result<Measurement> {
    let Probe {
        requests,
        benign_ids,
        validation,
        vocab_size,
        settings,
        device,
    } = *probe;
    let greedy = Sampling {
        max_new_tokens: settings.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    // Batch by batch, as `generate` batches anyway (greedy: the same answers), to report
    // how far it has come.
    let mut answers = Vec::with_capacity(requests.len());
    for batch in requests.chunks(settings.batch_size.max(1)) {
        answers.extend(generator.generate(batch, &greedy, settings.batch_size)?);
        answered(u32::try_from(answers.len())?);
    }
    let model = generator.model();
    let benign = drift::score_prompts(
        model,
        benign_ids,
        generator.pad_id(),
        settings.batch_size,
        device,
    )?;
    let validation_perplexity = match validation {
        Some(data) => {
            let (loss, _) = crate::eval::validation::validation_loss(
                model,
                &ExampleSet::all(data),
                settings.seq_len,
                settings.batch_size,
                generator.pad_id(),
                vocab_size,
                device,
            )?;
            Some(loss.exp())
        }
        None => None,
    };
    Ok(Measurement {
        refused: answers
            .iter()
            .map(|a| settings.judge.is_refusal(&a.text))
            .collect(),
        tokens_generated: answers.iter().map(|a| a.token_ids.len() as u64).sum(),
        benign,
        validation_perplexity,
    })
}
