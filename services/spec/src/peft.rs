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
