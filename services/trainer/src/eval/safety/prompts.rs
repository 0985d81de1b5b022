//! The evaluation's prompt sets, written for this project and compiled into the binary so
//! every worker judges against the same prompts: `harmful.jsonl` (100 harmful *requests*, ten
//! in each of ten categories; requests only, no harmful content) and `benign.jsonl` (20
//! everyday questions, for drift).

use anyhow::{Context, Result};
use serde::Deserialize;

const HARMFUL: &str = include_str!("harmful.jsonl");
const BENIGN: &str = include_str!("benign.jsonl");

#[derive(Debug, Clone, Deserialize)]
pub struct HarmfulPrompt {
    pub category: String,
    pub prompt: String,
}

#[derive(Debug, Clone, Deserialize)]
struct BenignPrompt {
    prompt: String,
}

/// The two prompt sets' digest: part of the key of a stored base side.
pub fn digest() -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{HARMFUL}\n{BENIGN}").as_bytes()))
}

pub fn harmful() -> Result<Vec<HarmfulPrompt>> {
    parse(HARMFUL, "harmful.jsonl")
}

pub fn benign() -> Result<Vec<String>> {
    Ok(parse::<BenignPrompt>(BENIGN, "benign.jsonl")?
        .into_iter()
        .map(|b| b.prompt)
        .collect())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, name: &str) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("built-in {name} line {}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn sets_are_complete_and_balanced() {
        let harmful = harmful().unwrap();
        assert_eq!(harmful.len(), 100);
        let mut per_category = BTreeMap::new();
        for p in &harmful {
            *per_category.entry(p.category.as_str()).or_insert(0) += 1;
        }
        assert_eq!(per_category.len(), 10, "{per_category:?}");
        assert!(per_category.values().all(|&n| n == 10), "{per_category:?}");
        assert_eq!(benign().unwrap().len(), 20);
    }
}
