//! The first step of a run: the job's data, tokenized once and split into what is trained on
//! and what is validated on. It runs before the model is loaded, so a bad line fails the job
//! in seconds.

use super::{log, Reporter, TrainingInputs};
use crate::data::{replay, ExampleEncoder, ExampleSet, TokenizedDataset};
use crate::error::user_error;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer_config::TokenizerConfig;
use crate::model::ModelConfig;
use anyhow::Result;
use chrono::{DateTime, Utc};
use loraforge_spec::JobSpec;
use tokenizers::Tokenizer;

/// The training file and the validation file (if the job has one), tokenized.
pub struct Datasets {
    train: TokenizedDataset,
    validation: Option<TokenizedDataset>,
    /// The refusal examples mixed into `train` (`safety.replay`), if any.
    pub replay: Option<ReplayMixed>,
}

/// What `safety.replay` mixed into the training examples.
pub struct ReplayMixed {
    pub examples: usize,
    /// Where they came from: the job's replay dataset, or the built-in set.
    pub source: &'static str,
}

/// The examples a run trains on, and those it validates on, if any.
pub struct Examples<'a> {
    pub train: ExampleSet<'a>,
    pub validation: Option<ExampleSet<'a>>,
}

/// Tokenizes the job's data as the model's tokenizer and chat template say, after checking
/// that the model attends over `training.seq_len`. `template_clock` is the run's date for chat
/// templates (`strftime_now`).
pub fn tokenize(
    spec: &JobSpec,
    inputs: &TrainingInputs,
    config: &ModelConfig,
    template_clock: DateTime<Utc>,
) -> Result<Datasets> {
    let training = &spec.training;
    if i64::from(training.seq_len) > config.max_trainable_len() {
        return Err(user_error(format!(
            "training.seq_len {} exceeds what the model attends over ({}: max_position_embeddings)",
            training.seq_len,
            config.max_trainable_len()
        )));
    }
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
    let seq_len = training.seq_len as usize;
    // Packed rows split long examples instead of cutting them, so only unpacked ones are truncated.
    let truncate_to = (!training.packing).then_some(seq_len);
    let mut train = TokenizedDataset::build(inputs.train_data, &encoder, truncate_to)?;
    let validation = inputs
        .validation_data
        .map(|path| TokenizedDataset::build(path, &encoder, Some(seq_len)))
        .transpose()?;
    let replay = match &spec.safety.replay {
        None => None,
        Some(asked) => {
            // The built-in set is written out in the form this model is asked in, then read
            // like any dataset, so its examples are rendered and masked like the job's.
            let builtin;
            let (path, source) = match inputs.replay_data {
                Some(path) => (path, "safety.replay.dataset"),
                None => {
                    builtin = tempfile::NamedTempFile::new()?;
                    replay::write_builtin(builtin.path(), chat_template.is_ok())?;
                    (builtin.path(), "the built-in refusal set")
                }
            };
            // The error keeps its kind (a bad line is the user's) and says which input it was.
            let examples = TokenizedDataset::build(path, &encoder, truncate_to)
                .map_err(|e| e.context(format!("reading {source}")))?;
            // The share is of the examples trained on: a validation split is taken first.
            let n = train.file_len();
            let trained = match (&validation, spec.dataset.validation_fraction) {
                (None, Some(fraction)) if n >= 2 => n - ExampleSet::held_out(n, fraction),
                _ => n,
            };
            let mixed = replay::mix(&mut train, trained, &examples, asked, training.seed)?;
            Some(ReplayMixed {
                examples: mixed,
                source,
            })
        }
    };
    Ok(Datasets {
        train,
        validation,
        replay,
    })
}

/// The examples to train and validate on: the validation file where the job has one, else a
/// held-out `dataset.validation_fraction` of the training file, else none. Reports what it chose.
pub fn select<'a>(
    spec: &JobSpec,
    datasets: &'a Datasets,
    reporter: &mut dyn Reporter,
) -> Result<Examples<'a>> {
    let training = &spec.training;
    let (train, validation) = match (&datasets.validation, spec.dataset.validation_fraction) {
        (Some(file), _) => (
            ExampleSet::all(&datasets.train),
            Some(ExampleSet::all(file)),
        ),
        (None, Some(fraction)) => {
            let (train, validation) = ExampleSet::split(&datasets.train, fraction, training.seed)?;
            (train, Some(validation))
        }
        (None, None) => (ExampleSet::all(&datasets.train), None),
    };
    if let Some(mixed) = &datasets.replay {
        reporter.report(log(format!(
            "safety.replay: {} refusal examples from {} mixed into the {} training examples",
            mixed.examples,
            mixed.source,
            train.len()
        )));
    }
    let train = train.with_mixed_in();
    reporter.report(log(format!(
        "dataset: {} training examples, {} tokens ({} without a token to learn left out){}",
        train.len(),
        train.tokens(),
        datasets.train.dropped,
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
    Ok(Examples { train, validation })
}
