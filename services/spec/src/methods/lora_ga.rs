//! LoRA-GA (Wang et al., NeurIPS 2024): LoRA initialised from the SVD of the full gradient
//! over a few batches, the initial product taken out of the output; see docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// Which singular vectors of the gradient `G = U S Vᵀ` go to `A` and which to `B`
/// (PEFT's `LoraGAConfig.direction`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoraGaDirection {
    /// `A` from the odd-indexed right singular vectors of the first `2r`, `B` the even left ones.
    ArBr,
    /// `A = V[r:2r]ᵀ`, `B = U[:, :r]`.
    A2rBr,
    /// `A = V[:r]ᵀ`, `B = U[:, r:2r]` (the reference's and PEFT's default).
    #[default]
    ArB2r,
    /// A random half of the first `2r` indices (from the job's seed), shared by `A` and `B`.
    #[serde(rename = "random")]
    Random,
}

/// How the initial factors are scaled (PEFT's `LoraGAConfig.scale`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraGaScale {
    /// `B *= out^(1/4) / sqrt(stable_gamma)` (the default).
    #[default]
    Stable,
    /// `B *= σ₁(W) / S_B[0]`: the top singular value of the base weight over `B`'s first.
    WeightSvd,
    /// `A /= scaling`, `B /= scaling`.
    GdScale,
    /// No scaling.
    Unit,
}

/// LoRA-GA with PEFT 0.21's defaults (`LoraConfig`: r 8, alpha 8; `LoraGAConfig`: direction
/// `ArB2r`, scale `stable`, stable_gamma 16) and the official `LoraGAConfig`'s gradient
/// estimate (`bsz` 2, `iters` 64).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraGaConfig {
    /// The trained rank. The published adapter has rank `2r` (the initial product is taken out).
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub direction: LoraGaDirection,
    #[serde(default)]
    pub scale: LoraGaScale,
    /// `γ` of the `stable` scale.
    #[serde(default = "default_gamma")]
    pub stable_gamma: f64,
    /// Training rows per gradient-estimation batch (the reference's `bsz`).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Gradient-estimation batches (the reference's `iters`); fewer if the first epoch has
    /// fewer rows.
    #[serde(default = "default_batches")]
    pub batches: u32,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_gamma() -> f64 {
    16.0
}
fn default_batch_size() -> u32 {
    2
}
fn default_batches() -> u32 {
    64
}

impl LoraGaConfig {
    /// The multiplier of the low-rank branch: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / f64::from(self.r).sqrt()
        } else {
            self.alpha / f64::from(self.r)
        }
    }
}

impl MethodParams for LoraGaConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        if !(self.stable_gamma.is_finite() && self.stable_gamma > 0.0) {
            errors.push(FieldError::new(
                "method.stable_gamma",
                "must be a positive number",
            ));
        }
        for (field, value) in [("batch_size", self.batch_size), ("batches", self.batches)] {
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
