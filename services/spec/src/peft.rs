//! The PEFT `adapter_config.json` we publish, so that `PeftModel.from_pretrained`,
//! vLLM and LoRAX load our adapters as they are.

use crate::methods::{LoraConfig, LoraInit};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// PEFT's `LoraConfig` fields that matter for loading; PEFT fills in the rest.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: String,
    pub r: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub init_lora_weights: serde_json::Value,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks where they differ from `r` (adaptive-rank methods).
    pub rank_pattern: BTreeMap<String, u32>,
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl PeftLoraConfig {
    pub fn from_lora(c: &LoraConfig, base_model: &str) -> Self {
        let mut modules = c.target_modules.clone();
        modules.sort();
        PeftLoraConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: base_model.into(),
            r: c.r,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: modules,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: match c.init {
                LoraInit::Kaiming => serde_json::Value::Bool(true),
                LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
            },
            use_rslora: c.use_rslora,
            use_dora: false,
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// PEFT's key for a LoRA factor: `base_model.model.<module path>.lora_A.weight`.
pub fn lora_key(module_path: &str, factor: char) -> String {
    format!("base_model.model.{module_path}.lora_{factor}.weight")
}

/// The largest safetensors header we read (a LoRA's is a few KiB; this bounds a bad file).
pub const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// Name -> shape of every tensor, from a safetensors header: the JSON that follows the
/// file's first 8 bytes (its little-endian length).
pub fn safetensors_shapes(header: &[u8]) -> Result<BTreeMap<String, Vec<u64>>, String> {
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("safetensors header: {e}"))?;
    let mut shapes = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| serde_json::from_value::<Vec<u64>>(s.clone()).ok())
            .ok_or_else(|| format!("safetensors: tensor {name} has no shape"))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

impl PeftLoraConfig {
    /// The rank PEFT gives a module: `rank_pattern` keys match module paths as suffixes on
    /// a dot boundary; anything unmatched has `r`.
    pub fn rank_of(&self, module_path: &str) -> u32 {
        self.rank_pattern
            .iter()
            .find(|(k, _)| module_path == k.as_str() || module_path.ends_with(&format!(".{k}")))
            .map_or(self.r, |(_, r)| *r)
    }

    /// Checks that `tensors` (name -> shape) is a LoRA that PEFT loads with this config:
    /// only `lora_A`/`lora_B` keys of target modules, in pairs, with this config's ranks.
    pub fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        if tensors.is_empty() {
            return Err("the adapter holds no tensors".into());
        }
        for (name, shape) in tensors {
            let module = name
                .strip_prefix("base_model.model.")
                .and_then(|n| {
                    n.strip_suffix(".lora_A.weight")
                        .or_else(|| n.strip_suffix(".lora_B.weight"))
                })
                .ok_or_else(|| format!("{name} is not a PEFT LoRA key"))?;
            let leaf = module.rsplit('.').next().unwrap_or(module);
            if !self.target_modules.iter().any(|t| t == leaf) {
                return Err(format!("{name}: {leaf} is not among target_modules"));
            }
            let a = tensors.get(&lora_key(module, 'A'));
            let b = tensors.get(&lora_key(module, 'B'));
            let (Some(a), Some(b)) = (a, b) else {
                return Err(format!("{module}: lora_A and lora_B must come in pairs"));
            };
            let rank = self.rank_of(module);
            if a.len() != 2
                || b.len() != 2
                || a[0] != rank as u64
                || b[1] != rank as u64
                || shape.len() != 2
            {
                return Err(format!(
                    "{module}: lora_A {a:?} / lora_B {b:?} do not match rank {rank}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tensor_tests {
    use super::*;

    fn config() -> PeftLoraConfig {
        let mut c = PeftLoraConfig::from_lora(
            &serde_json::from_str(r#"{"r": 4, "target_modules": ["q_proj"]}"#).unwrap(),
            "m",
        );
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
        c
    }

    fn pair(module: &str, r: u64) -> [(String, Vec<u64>); 2] {
        [
            (lora_key(module, 'A'), vec![r, 8]),
            (lora_key(module, 'B'), vec![8, r]),
        ]
    }

    #[test]
    fn ranks_follow_the_pattern_and_pairs_are_required() {
        let c = config();
        let mut t: BTreeMap<String, Vec<u64>> = pair("model.layers.0.self_attn.q_proj", 4)
            .into_iter()
            .chain(pair("model.layers.1.self_attn.q_proj", 2))
            .collect();
        assert_eq!(c.check_tensors(&t), Ok(()));
        t.remove(&lora_key("model.layers.1.self_attn.q_proj", 'B'));
        assert!(c.check_tensors(&t).unwrap_err().contains("pairs"));
        let wrong_rank: BTreeMap<_, _> = pair("model.layers.1.self_attn.q_proj", 4)
            .into_iter()
            .collect();
        assert!(c.check_tensors(&wrong_rank).unwrap_err().contains("rank 2"));
        let foreign: BTreeMap<_, _> = pair("model.layers.0.mlp.up_proj", 4).into_iter().collect();
        assert!(c
            .check_tensors(&foreign)
            .unwrap_err()
            .contains("target_modules"));
        assert!(c.check_tensors(&BTreeMap::new()).is_err());
    }

    #[test]
    fn header_shapes_skip_metadata() {
        let h = br#"{"__metadata__": {"format": "pt"}, "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}"#;
        assert_eq!(safetensors_shapes(h).unwrap()["x"], vec![2, 3]);
        assert!(safetensors_shapes(br#"{"x": {"dtype": "F32"}}"#).is_err());
    }
}
