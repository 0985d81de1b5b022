//! EVA, Explained Variance Adaptation (Paischer et al., 2024, arXiv 2410.07170): LoRA whose
//! `A` starts at the top right-singular vectors of each target layer's inputs over the first
//! training batches, with the ranks redistributed across layers by explained variance; see
//! docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules, default_targets, yes};
use super::{MethodParams, MAX_RANK};
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// EVA with PEFT's defaults (`LoraConfig` r 8, lora_alpha 8, dropout 0; `EvaConfig` rho 2,
/// tau 0.99, use_label_mask, no whitening, adjust_scaling_factors). The data pass's batches are
/// the run's first training batches (PEFT takes a dataloader from the user).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaConfig {
    /// The rank per module before redistribution; the budget is `r` times the modules.
    #[serde(default = "default_r")]
    pub r: u32,
    /// Scaling alpha / r (alpha adjusted per module with `adjust_scaling_factors`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// A module's rank after redistribution is at most `round(r * rho)`; 1 keeps every rank at `r`.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// A module's components have settled when each one's cosine similarity to the previous
    /// batch's is at least `tau`.
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// Only positions whose token is a training target feed the SVD (else every non-padding
    /// position).
    #[serde(default = "yes")]
    pub use_label_mask: bool,
    /// Divide each `A` row by the square root of its singular value.
    #[serde(default)]
    pub whiten: bool,
    /// A module whose rank changed gets alpha `alpha * rank / r`, keeping the scale `alpha / r`.
    #[serde(default = "yes")]
    pub adjust_scaling_factors: bool,
    /// How many of the run's first training batches the data pass cycles through, as PEFT
    /// cycles its dataloader, until every module's components have settled.
    #[serde(default = "default_calibration_batches")]
    pub calibration_batches: u32,
    /// The most forward passes the data pass makes, repeats included (PEFT has no limit); a run
    /// whose components have not settled by then fails, naming this field and `tau`.
    #[serde(default = "default_max_calibration_passes")]
    pub max_calibration_passes: u32,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_rho() -> f64 {
    2.0
}
fn default_tau() -> f64 {
    0.99
}
fn default_calibration_batches() -> u32 {
    8
}
fn default_max_calibration_passes() -> u32 {
    200
}

impl EvaConfig {
    /// The most components a module can keep: `round(r * rho)` (PEFT's `max_components`).
    pub fn max_components(&self) -> u32 {
        (f64::from(self.r) * self.rho).round() as u32
    }
}

impl MethodParams for EvaConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        if !(self.rho.is_finite() && self.rho >= 1.0) {
            errors.push(FieldError::new("method.rho", "must be at least 1"));
        } else if (1..=MAX_RANK).contains(&self.r)
            && f64::from(self.r) * self.rho > f64::from(MAX_RANK) + 0.5
        {
            errors.push(FieldError::new(
                "method.rho",
                format!(
                    "r * rho ({} * {}) must not exceed {MAX_RANK}: the largest rank any method accepts",
                    self.r, self.rho
                ),
            ));
        }
        if !(self.tau.is_finite() && (0.0..=1.0).contains(&self.tau)) {
            errors.push(FieldError::new("method.tau", "must be in [0, 1]"));
        }
        if self.calibration_batches == 0 {
            errors.push(FieldError::new(
                "method.calibration_batches",
                "must be at least 1",
            ));
        }
        // Convergence compares a batch's components with the previous batch's: one pass
        // can never settle.
        if self.max_calibration_passes < 2 {
            errors.push(FieldError::new(
                "method.max_calibration_passes",
                "must be at least 2: components settle by comparison with the previous batch's",
            ));
        }
        errors
    }
}
