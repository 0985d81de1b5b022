//! The LoRA family (`peft_type` `LORA`): `ΔW = scaling · B A` per module, the scaling PEFT's:
//! `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, with `r` and `alpha` per module
//! where `rank_pattern` / `alpha_pattern` name it.

use super::{Update, Updates};
use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::peft::PeftLoraConfig;
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// The adapter's factors by module path, with their scaling.
pub fn updates(config: &PeftLoraConfig, tensors: &[(String, Tensor)]) -> Result<Updates> {
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
    for (key, tensor) in tensors {
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
    let mut updates = BTreeMap::new();
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
        updates.insert(
            module,
            Update::LowRank {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                scaling: scaling(config, alpha, r),
            },
        );
    }
    if updates.is_empty() {
        return Err(user_error("the adapter has no LoRA factors"));
    }
    Ok(updates)
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
