//! AdaLoRA (Zhang et al., ICLR 2023): SVD-form triplets pruned to a budget by importance;
//! see docs/methods.md.

use super::common::{
    check_alpha_dropout, check_betas, check_non_negative, check_target_modules, default_targets,
    one, MAX_RANK,
};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// AdaLoRA with PEFT's `AdaLoraConfig` defaults and names (`deltaT` is `delta_t`); the schedule
/// steps count optimizer steps from 0, as PEFT's `update_and_allocate(global_step)` does.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    /// Triplets per adapted matrix at the start.
    #[serde(default = "default_init_r")]
    pub init_r: u32,
    /// Average triplets per matrix once pruning ends (the budget is `target_r` x matrices).
    #[serde(default = "default_target_r")]
    pub target_r: u32,
    /// The branch is scaled by alpha / init_r throughout (PEFT: `lora_alpha / ranknum`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Steps at full budget before pruning starts.
    #[serde(default)]
    pub tinit: u32,
    /// Final steps at the target budget, with the allocation frozen.
    #[serde(default)]
    pub tfinal: u32,
    /// Prune every `delta_t` steps while the budget shrinks.
    #[serde(default = "one")]
    pub delta_t: u32,
    /// EMA coefficient of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA coefficient of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regulariser on A and B.
    #[serde(default = "default_orth_reg_weight")]
    pub orth_reg_weight: f64,
}

fn default_init_r() -> u32 {
    12
}
fn default_target_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth_reg_weight() -> f64 {
    0.5
}

impl MethodParams for AdaLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.init_r == 0 || self.init_r > MAX_RANK {
            errors.push(FieldError::new(
                "method.init_r",
                format!("must be between 1 and {MAX_RANK}"),
            ));
        }
        if self.target_r == 0 || self.target_r > self.init_r {
            errors.push(FieldError::new(
                "method.target_r",
                format!(
                    "must be between 1 and init_r ({}), got {}",
                    self.init_r, self.target_r
                ),
            ));
        }
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        if self.delta_t == 0 {
            errors.push(FieldError::new("method.delta_t", "must be at least 1"));
        }
        check_betas(self.beta1, self.beta2, &mut errors);
        check_non_negative("orth_reg_weight", self.orth_reg_weight, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        // PEFT's `AdaLoraConfig` requires tinit < total_step - tfinal, total_step being the
        // run's length: otherwise the budget never leaves its initial value.
        let pruning_ends = i64::from(training.max_steps) - i64::from(self.tfinal);
        if i64::from(self.tinit) >= pruning_ends {
            errors.push(FieldError::new(
                "method.tinit",
                format!(
                    "must be below training.max_steps - tfinal ({pruning_ends}), so that there are steps \
                     in which ranks are pruned; got {}",
                    self.tinit
                ),
            ));
        }
        errors
    }
}
