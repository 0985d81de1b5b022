//! The base model's side of the safety evaluation, kept for reuse. What the base model
//! answers to the harmful requests, its next-token distributions on the benign prompts and its
//! refusal direction (per-layer mean activations) depend only on the base model, the prompts, the generation settings and the device, never
//! on the job: so they are computed once per [`baseline_key`] and every later job on that base
//! reads them back (half the evaluation's work, since the adapted model's side must run). The
//! judge is applied to the stored answers each time, so the job's judge (semantic or keywords,
//! with its project's exemplars and keywords) decides what counts as a refusal.
//! The job's validation perplexity depends on its data and is always measured.

use super::direction::{BaseDirection, Means};
use super::drift::PromptScores;
use super::{prompts, Settings};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::Device;

/// Bumped whenever what is stored, or how it is computed, changes: old entries are then
/// simply never asked for again.
const FORMAT: u32 = 3;

/// What the base model did, as the evaluation measures it.
pub struct BaseSide {
    /// Its greedy answers to the harmful requests, in order.
    pub answers: Vec<String>,
    pub tokens_generated: u64,
    pub benign: PromptScores,
    /// Its refusal direction at every layer.
    pub direction: BaseDirection,
}

/// Where base sides are kept between jobs.
pub trait BaselineCache {
    fn load(&self, key: &str) -> Result<Option<BaseSide>>;
    fn save(&self, key: &str, base: &BaseSide) -> Result<()>;
}

/// The key of a base side: the base model's tree digest, the prompt sets, the settings that
/// change what is generated or scored, and the device (CPU and GPU kernels round differently).
pub fn baseline_key(model_digest: &str, settings: &Settings, device: Device) -> String {
    let described = serde_json::json!({
        "format": FORMAT,
        "model": model_digest,
        "prompts": prompts::digest(),
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "device": crate::model::device_label(device),
    });
    hex::encode(Sha256::digest(described.to_string().as_bytes()))
}

/// The scalar half of a stored base side (the distributions go beside it as safetensors).
#[derive(Serialize, Deserialize)]
struct Stored {
    answers: Vec<String>,
    tokens_generated: u64,
    nll_sum: f64,
    predicted: u64,
    prompts: usize,
}

pub const ANSWERS_FILE: &str = "answers.json";
pub const BENIGN_FILE: &str = "benign.safetensors";
pub const DIRECTION_FILE: &str = "direction.safetensors";
/// An entry's files in the order they are written: the answers last, so that where they are,
/// the whole entry is.
pub const FILES: [&str; 3] = [BENIGN_FILE, DIRECTION_FILE, ANSWERS_FILE];

/// Writes `base` as three files into `dir`.
pub fn write(base: &BaseSide, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let (log_probs, nll_sum, predicted) = base.benign.parts();
    let stored = Stored {
        answers: base.answers.clone(),
        tokens_generated: base.tokens_generated,
        nll_sum,
        predicted,
        prompts: log_probs.len(),
    };
    let named: Vec<(String, &tch::Tensor)> = log_probs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("prompt.{i}"), t))
        .collect();
    tch::Tensor::write_safetensors(&named, dir.join(BENIGN_FILE))?;
    let direction = &base.direction;
    tch::Tensor::write_safetensors(
        &[
            ("harmful_mean", &direction.means.harmful),
            ("harmless_mean", &direction.means.harmless),
            ("spread", &direction.spread),
        ],
        dir.join(DIRECTION_FILE),
    )?;
    std::fs::write(dir.join(ANSWERS_FILE), serde_json::to_vec(&stored)?)?;
    Ok(())
}

/// Reads what [`write`] wrote.
pub fn read(dir: &Path) -> Result<BaseSide> {
    let stored: Stored = serde_json::from_slice(&std::fs::read(dir.join(ANSWERS_FILE))?)
        .context("reading a stored base side")?;
    let mut tensors: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir.join(BENIGN_FILE))?
            .into_iter()
            .collect();
    let log_probs = (0..stored.prompts)
        .map(|i| {
            tensors
                .remove(&format!("prompt.{i}"))
                .with_context(|| format!("a stored base side lacks prompt {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut direction: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(dir.join(DIRECTION_FILE))?
            .into_iter()
            .collect();
    let mut take = |name: &str| {
        direction
            .remove(name)
            .with_context(|| format!("a stored base side lacks the direction's {name}"))
    };
    let direction = BaseDirection {
        means: Means {
            harmful: take("harmful_mean")?,
            harmless: take("harmless_mean")?,
        },
        spread: take("spread")?,
    };
    Ok(BaseSide {
        answers: stored.answers,
        tokens_generated: stored.tokens_generated,
        benign: PromptScores::from_parts(log_probs, stored.nll_sum, stored.predicted),
        direction,
    })
}

/// Base sides in folders of a local directory (`loraforge-trainer evaluate --baselines DIR`,
/// and the tests). A worker keeps them in the artifact store instead.
pub struct DirectoryCache {
    pub root: PathBuf,
}

impl BaselineCache for DirectoryCache {
    fn load(&self, key: &str) -> Result<Option<BaseSide>> {
        let dir = self.root.join(key);
        match dir.join(ANSWERS_FILE).is_file() {
            true => read(&dir).map(Some),
            false => Ok(None),
        }
    }

    fn save(&self, key: &str, base: &BaseSide) -> Result<()> {
        // Written aside and renamed: a reader never sees half an entry.
        let partial = self.root.join(format!(".{key}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        write(base, &partial)?;
        let dir = self.root.join(key);
        match std::fs::rename(&partial, &dir) {
            Ok(()) => Ok(()),
            // Another job saved the same entry first: the same numbers, keep theirs.
            Err(_) if dir.join(ANSWERS_FILE).is_file() => {
                let _ = std::fs::remove_dir_all(&partial);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
