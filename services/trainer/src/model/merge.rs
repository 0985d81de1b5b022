//! `loraforge-trainer merge`: a LoRA adapter folded into its base model's weights,
//! `W' = W + scaling · B A`, written as a new Hugging Face model directory that can be
//! registered and trained on as a base model of its own. `loraforge_merge.json` records the
//! adapter it came from, so the registry can keep the lineage.
//!
//! Scaling follows PEFT: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, with `r` and
//! `alpha` per module where `rank_pattern` / `alpha_pattern` name it.

use crate::error::user_error;
use crate::export::{file_digest, PeftAdapter};
use crate::model::weights::{read_safetensors, weight_files};
use anyhow::{Context, Result};
use loraforge_spec::manifest::{ADAPTER_WEIGHTS_FILE, MANIFEST_FILE};
use loraforge_spec::merge::{
    MergeRecord, MergeSource, MergedAdapter, MERGE_RECORD_FILE, MERGE_RECORD_FORMAT,
};
use loraforge_spec::peft::PeftLoraConfig;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Kind, Tensor};

/// What was merged, for the command's output.
#[derive(Debug, serde::Serialize)]
pub struct MergeSummary {
    pub merged_modules: usize,
    pub record: MergeRecord,
}

/// One adapted layer: its factors and scaling (the safety evaluation's intruder count reads them too).
pub struct Delta {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
}

/// Merges the adapter in `adapter_dir` into the model in `model_dir`, writing `out`: the weights
/// (same files and dtypes as the base, one file in memory at a time), the base's other files
/// (config, tokenizer, chat template) copied, and the merge record. `source` names the adapter
/// version; without it, the adapter's `manifest.json` says which it is, where it has one.
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    source: Option<MergeSource>,
) -> Result<MergeSummary> {
    if same_dir(model_dir, out) {
        return Err(user_error(
            "--out must differ from --model: the base model is read while the merge is written",
        ));
    }
    let adapter = PeftAdapter::load(adapter_dir)?;
    let mut deltas = deltas(&adapter)?;
    let merged_modules = deltas.len();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let files = weight_files(model_dir)?;
    for file in &files {
        let mut tensors = Vec::new();
        read_safetensors(file, |name, tensor| tensors.push((name, tensor)))?;
        for (name, weight) in tensors.iter_mut() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if let Some(delta) = deltas.remove(module) {
                *weight = merged_weight(name, weight, &delta)?;
            }
        }
        let name = file.file_name().context("weight file without a name")?;
        Tensor::write_safetensors(&tensors, out.join(name))?;
    }
    if let Some(module) = deltas.keys().next() {
        return Err(user_error(format!(
            "the adapter adapts {module}, which the base model has no weight for"
        )));
    }

    let weight_names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    for entry in
        std::fs::read_dir(model_dir).with_context(|| format!("reading {}", model_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        // The base's own merge record, if it was merged too, is replaced by ours.
        if !entry.file_type()?.is_file()
            || weight_names.contains(&name.as_os_str())
            || name == MERGE_RECORD_FILE
        {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name))
            .with_context(|| format!("copying {} to {}", entry.path().display(), out.display()))?;
    }

    let source = match source {
        Some(source) => Some(source),
        None => manifest_source(adapter_dir)?,
    };
    let record = MergeRecord {
        format: MERGE_RECORD_FORMAT,
        base_model: model_dir.display().to_string(),
        adapter: MergedAdapter {
            path: adapter_dir.display().to_string(),
            weights_sha256: file_digest(
                &adapter_dir.join(ADAPTER_WEIGHTS_FILE),
                ADAPTER_WEIGHTS_FILE,
            )?
            .sha256,
        },
        source,
    };
    std::fs::write(
        out.join(MERGE_RECORD_FILE),
        serde_json::to_vec_pretty(&record)?,
    )?;
    Ok(MergeSummary {
        merged_modules,
        record,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `W + scaling · B A`, computed in fp32 and stored in the weight's own dtype.
fn merged_weight(name: &str, weight: &Tensor, delta: &Delta) -> Result<Tensor> {
    let (out_features, r) = (delta.b.size()[0], delta.b.size()[1]);
    let in_features = delta.a.size()[1];
    if weight.size() != [out_features, in_features] || delta.a.size()[0] != r {
        return Err(user_error(format!(
            "adapter factors A {:?} and B {:?} do not fit {name} {:?}",
            delta.a.size(),
            delta.b.size(),
            weight.size()
        )));
    }
    let update = delta
        .b
        .to_kind(Kind::Float)
        .matmul(&delta.a.to_kind(Kind::Float))
        * delta.scaling;
    Ok((weight.to_kind(Kind::Float) + update).to_kind(weight.kind()))
}

/// The adapter's factors by module path (`model.layers.0.self_attn.q_proj`), with their scaling.
pub fn deltas(adapter: &PeftAdapter) -> Result<BTreeMap<String, Delta>> {
    let config = &adapter.config;
    if config.use_dora {
        return Err(user_error(
            "DoRA adapters cannot be merged by loraforge (only plain LoRA)",
        ));
    }
    if config.fan_in_fan_out {
        return Err(user_error(
            "adapters with fan_in_fan_out (Conv1D layers) cannot be merged",
        ));
    }
    let mut factors: HashMap<String, (Option<&Tensor>, Option<&Tensor>)> = HashMap::new();
    for (key, tensor) in &adapter.tensors {
        let parsed = key.strip_prefix("base_model.model.").and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, 'A'))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))
        });
        let (module, factor) = parsed.ok_or_else(|| {
            user_error(format!(
                "adapter tensor {key} is not a LoRA factor (lora_A/lora_B)"
            ))
        })?;
        let slot = factors.entry(module.to_string()).or_default();
        if factor == 'A' {
            slot.0 = Some(tensor);
        } else {
            slot.1 = Some(tensor);
        }
    }
    let mut deltas = BTreeMap::new();
    for (module, pair) in factors {
        let (Some(a), Some(b)) = pair else {
            return Err(user_error(format!(
                "adapter module {module} lacks lora_A or lora_B"
            )));
        };
        let r = a.size()[0];
        let expected_r =
            pattern_value(&config.rank_pattern, &module).map_or(i64::from(config.r), i64::from);
        if r != expected_r {
            return Err(user_error(format!(
                "{module}: lora_A has rank {r}, but adapter_config.json says {expected_r} (r / rank_pattern)"
            )));
        }
        let alpha = pattern_value(&config.alpha_pattern, &module).unwrap_or(config.lora_alpha);
        deltas.insert(
            module,
            Delta {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                scaling: scaling(config, alpha, r),
            },
        );
    }
    if deltas.is_empty() {
        return Err(user_error("the adapter has no LoRA factors"));
    }
    Ok(deltas)
}

/// PEFT's per-module scaling.
fn scaling(config: &PeftLoraConfig, alpha: f64, r: i64) -> f64 {
    if config.use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The value of the pattern that names `module`: PEFT matches a key as the whole module path
/// or a suffix of it at a `.` boundary (`q_proj`, `layers.0.self_attn.q_proj`). Where several
/// match, the longest (most specific) wins.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    patterns
        .iter()
        .filter(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
        .max_by_key(|(key, _)| key.len())
        .map(|(_, &value)| value)
}

/// The adapter version an artifact directory is, from its `manifest.json`. Local `train`
/// writes version 0, which is no registered version.
fn manifest_source(adapter_dir: &Path) -> Result<Option<MergeSource>> {
    let path = adapter_dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(user_error(format!("cannot read {}: {e}", path.display()))),
    };
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|e| user_error(format!("{} is not valid JSON: {e}", path.display())))?;
    let name = manifest.get("adapter_name").and_then(Value::as_str);
    let version = manifest
        .get("version")
        .and_then(Value::as_i64)
        .and_then(|v| i32::try_from(v).ok());
    Ok(match (name, version) {
        (Some(name), Some(version)) if version > 0 => Some(MergeSource {
            adapter: name.to_string(),
            version,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_path_segments_and_the_longest_wins() {
        let patterns = BTreeMap::from([
            ("q_proj".to_string(), 4),
            ("layers.1.self_attn.q_proj".to_string(), 2),
        ]);
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.q_proj"),
            Some(4)
        );
        assert_eq!(
            pattern_value(&patterns, "model.layers.1.self_attn.q_proj"),
            Some(2)
        );
        assert_eq!(
            pattern_value(&patterns, "model.layers.0.self_attn.xq_proj"),
            None
        );
    }
}
