//! Facts about the model families the trainer supports, shared so the control
//! plane can reject a job before any GPU time is spent.

use serde::Deserialize;

/// Linear layers of a Llama-family decoder that can carry an adapter.
pub const LLAMA_TARGET_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `model_type` values of Hugging Face configs the trainer can load.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// The part of a Hugging Face `config.json` needed to decide whether we can train it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfigSummary {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl ModelConfigSummary {
    pub fn check_supported(&self) -> Result<(), String> {
        match self.model_type.as_deref() {
            Some(t) if SUPPORTED_MODEL_TYPES.contains(&t) => Ok(()),
            Some(t) => Err(format!(
                "model_type {t:?} is not supported; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            )),
            None => Err("config.json has no model_type".into()),
        }
    }
}
