//! LoRA-Pro (Wang et al., ICLR 2025): plain LoRA factors whose gradients are adjusted toward
//! the full fine-tuning gradient, with Adam on the equivalent full gradient; see
//! docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use crate::model::LLAMA_TARGET_MODULES;
use serde::{Deserialize, Serialize};

/// LoRA-Pro with the reference's defaults (`mrflogs/LoRA-Pro`,
/// `minimal_lora_llama2_math_transformers.py`: r 8, alpha 16, dropout 0, every projection).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraProConfig {
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "all_projections")]
    pub target_modules: Vec<String>,
    /// Scaling alpha/sqrt(r) instead of alpha/r (the reference's `rslora-pro` runs).
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn all_projections() -> Vec<String> {
    LLAMA_TARGET_MODULES.iter().map(|m| m.to_string()).collect()
}

impl LoraProConfig {
    /// The multiplier `s` of the branch, which the adjustment divides by (`1 / s²`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / f64::from(self.r).sqrt()
        } else {
            self.alpha / f64::from(self.r)
        }
    }
}

impl MethodParams for LoraProConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }
}
