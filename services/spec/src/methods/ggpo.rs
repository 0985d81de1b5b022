//! LoRA-GGPO (Chang et al., 2025): LoRA trained under random weight perturbations whose size
//! follows the weights' and the gradients' row norms; see docs/methods.md.

use super::common::{
    check_alpha_dropout, check_non_negative, check_rank, check_target_modules, default_targets,
};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// LoRA-GGPO. `sigma` and `beta` default to what kohya-ss/sd-scripts documents for its
/// implementation (`ggpo_sigma=0.03`, `ggpo_beta=0.01`); r 8, alpha 8 (PEFT's defaults).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GgpoConfig {
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// σ: the weight of each output row's weight norm in the standard deviation of that row's
    /// perturbation.
    #[serde(default = "default_sigma")]
    pub sigma: f64,
    /// β: the weight of each output row's squared gradient norm in the standard deviation of
    /// that row's perturbation.
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_sigma() -> f64 {
    0.03
}
fn default_beta() -> f64 {
    0.01
}

impl GgpoConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / f64::from(self.r)
    }
}

impl MethodParams for GgpoConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_non_negative("sigma", self.sigma, &mut errors);
        check_non_negative("beta", self.beta, &mut errors);
        if errors.is_empty() && self.sigma == 0.0 && self.beta == 0.0 {
            errors.push(FieldError::new(
                "method.sigma",
                "sigma and beta are both 0: nothing is perturbed (train `lora` instead)",
            ));
        }
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }
}
