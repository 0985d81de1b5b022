//! Refusal replay (`safety.replay`; docs/safety.md, "Keeping refusals while fine-tuning"):
//! harmful requests answered with refusals, mixed into a job's training examples so that a
//! fine-tune on other data keeps the refusals of its base. The examples come from a dataset
//! the job names (any of the three formats) or from the built-in set `refusals.jsonl`: 220
//! harmful *requests* (no harmful content), 22 in each of the evaluation's ten categories, each
//! with a refusal. That set is disjoint from the evaluation's prompts (a test below checks it),
//! so replay teaches refusing, not the answers to the test.

use super::dataset::TokenizedDataset;
use crate::training::seeds::{derive_seed, SeedUse};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::json;
use std::path::Path;

const BUILTIN: &str = include_str!("refusals.jsonl");

/// What the manifest records as the source of the built-in set.
pub const BUILTIN_URI: &str = "builtin:refusals";

/// One line of the built-in set.
#[derive(Debug, Clone, Deserialize)]
pub struct RefusalExample {
    /// One of the evaluation's categories; the tests check that each has its share.
    #[cfg_attr(not(test), allow(dead_code))]
    pub category: String,
    pub request: String,
    pub refusal: String,
}

pub fn builtin() -> Result<Vec<RefusalExample>> {
    BUILTIN
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("built-in refusals.jsonl line {}", i + 1))
        })
        .collect()
}

/// The built-in set's sha256, recorded in the manifest beside [`BUILTIN_URI`].
pub fn builtin_digest() -> String {
    loraforge_storage::sha256_hex(BUILTIN.as_bytes())
}

/// Writes the built-in set as dataset lines, asked the way the safety evaluation asks: chat
/// messages for a model with a chat template, else the plain `User: …\nAssistant:` form as a
/// prompt and completion. The lines then go through the job's own encoder, so they are
/// rendered and masked like its data (loss on the refusal only).
pub fn write_builtin(path: &Path, chat: bool) -> Result<()> {
    let lines: String = builtin()?
        .iter()
        .map(|e| {
            let line = if chat {
                json!({"messages": [
                    {"role": "user", "content": e.request},
                    {"role": "assistant", "content": e.refusal},
                ]})
            } else {
                json!({
                    "prompt": crate::eval::safety::plain_prompt(&e.request),
                    "completion": format!(" {}", e.refusal),
                })
            };
            format!("{line}\n")
        })
        .collect();
    std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))
}

/// Which of `available` replay examples join the training data: `count` of them, each pass
/// over the set in an order drawn from the job's seed, so the same job mixes the same ones.
pub fn pick(available: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut picks = Vec::with_capacity(count);
    for pass in 0.. {
        if picks.len() >= count || available == 0 {
            break;
        }
        let mut order: Vec<usize> = (0..available).collect();
        order.shuffle(&mut StdRng::seed_from_u64(derive_seed(
            seed,
            SeedUse::Replay,
            pass,
        )));
        order.truncate(count - picks.len());
        picks.extend(order);
    }
    picks
}

/// Mixes `fraction`'s share of `replay`'s examples into `train`, whose file holds `trained`
/// examples to train on once any validation split is taken (see
/// [`loraforge_spec::safety::RefusalReplay::examples_for`]); returns how many were mixed in.
pub fn mix(
    train: &mut TokenizedDataset,
    trained: usize,
    replay: &TokenizedDataset,
    spec: &loraforge_spec::safety::RefusalReplay,
    seed: u64,
) -> Result<usize> {
    let count = spec.examples_for(trained);
    let picks = pick(replay.len(), count, seed);
    train.mix_in(replay, &picks)?;
    Ok(picks.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::safety::prompts;
    use std::collections::{BTreeMap, BTreeSet};

    fn words(text: &str) -> BTreeSet<String> {
        text.to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_builtin_set_is_disjoint_from_the_evaluation() {
        let set = builtin().unwrap();
        assert!(set.len() >= 200, "{}", set.len());
        let mut per_category = BTreeMap::new();
        for e in &set {
            *per_category.entry(e.category.as_str()).or_insert(0) += 1;
        }
        let evaluated = prompts::harmful().unwrap();
        let eval_categories: BTreeSet<&str> =
            evaluated.iter().map(|p| p.category.as_str()).collect();
        assert_eq!(
            per_category.keys().copied().collect::<BTreeSet<_>>(),
            eval_categories,
            "every category the evaluation asks about, and no other"
        );
        let normalised = |t: &str| words(t).into_iter().collect::<Vec<_>>().join(" ");
        let eval_words: Vec<(BTreeSet<String>, &str)> = evaluated
            .iter()
            .map(|p| (words(&p.prompt), p.prompt.as_str()))
            .collect();
        let mut seen = BTreeSet::new();
        for e in &set {
            assert!(
                seen.insert(normalised(&e.request)),
                "repeated request: {}",
                e.request
            );
            let mine = words(&e.request);
            for (theirs, prompt) in &eval_words {
                assert_ne!(normalised(&e.request), normalised(prompt));
                // Jaccard similarity of the word sets: a near-duplicate shares most words.
                let shared = mine.intersection(theirs).count() as f64;
                let jaccard = shared / mine.union(theirs).count() as f64;
                assert!(
                    jaccard < 0.5,
                    "{:?} is close to the evaluation's {prompt:?} ({jaccard:.2})",
                    e.request
                );
            }
        }
    }

    #[test]
    fn requests_are_requests_and_refusals_refuse() {
        let judge = crate::eval::safety::judge::KeywordJudge::default();
        let set = builtin().unwrap();
        let distinct: BTreeSet<&str> = set.iter().map(|e| e.refusal.as_str()).collect();
        assert!(distinct.len() * 2 > set.len(), "varied refusals");
        for e in &set {
            // A request holds no answer: one sentence or question, no refusal of its own.
            assert!(e.request.len() < 160, "{}", e.request);
            assert!(!judge.is_refusal(&e.request), "{}", e.request);
            assert!(judge.is_refusal(&e.refusal), "{}", e.refusal);
        }
    }

    #[test]
    fn picks_are_deterministic_and_cycle_through_the_set() {
        let picks = pick(10, 25, 7);
        assert_eq!(picks.len(), 25);
        assert_eq!(
            picks,
            pick(10, 25, 7),
            "the same seed mixes the same examples"
        );
        assert_ne!(picks, pick(10, 25, 8));
        let first: BTreeSet<usize> = picks[..10].iter().copied().collect();
        assert_eq!(first.len(), 10, "one pass uses every example once");
        assert_eq!(pick(10, 3, 7), picks[..3], "a prefix of the longer mix");
        assert!(pick(0, 3, 7).is_empty());
    }
}
