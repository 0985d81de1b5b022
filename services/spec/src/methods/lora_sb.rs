//! LoRA-SB (Ponkshe, Singhal et al., 2024): `B R A` with `A`, `B` fixed from the truncated SVD
//! of an approximated first full fine-tuning step, only the `r × r` `R` trained; see
//! docs/methods.md.

use super::common::{check_dropout, check_rank, check_target_modules};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use crate::model::LLAMA_TARGET_MODULES;
use serde::{Deserialize, Serialize};

/// LoRA-SB with the official `train_arithmetic.py` defaults: r 96 (`lora_alpha` forced to r,
/// so the branch is unscaled), dropout 0, all seven projections, the update estimated from 50
/// samples in batches of 3 (`eg_bs`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSbConfig {
    /// The rank of `A` and `B`; `R` has `r²` trained parameters.
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Training rows per gradient-estimation batch (the reference's `eg_bs`).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Training rows the update is estimated from (the reference's `num_samples`); fewer if
    /// the first epoch has fewer rows.
    #[serde(default = "default_samples")]
    pub samples: u32,
}

fn default_r() -> u32 {
    96
}
fn default_targets() -> Vec<String> {
    LLAMA_TARGET_MODULES.iter().map(|m| m.to_string()).collect()
}
fn default_batch_size() -> u32 {
    3
}
fn default_samples() -> u32 {
    50
}

impl MethodParams for LoraSbConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_dropout(self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        for (field, value) in [("batch_size", self.batch_size), ("samples", self.samples)] {
            if value == 0 {
                errors.push(FieldError::new(
                    format!("method.{field}"),
                    "must be at least 1",
                ));
            }
        }
        errors
    }
}
