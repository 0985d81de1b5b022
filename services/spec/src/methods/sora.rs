//! SoRA (Ding et al., EMNLP 2023): a gate per rank, driven to exact zeros by a proximal step;
//! see docs/methods.md.

use super::common::{
    check_alpha_dropout, check_non_negative, check_rank, check_target_modules, default_targets,
};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// SoRA with the reference's defaults (`run_glue.py` `SparseArguments`, r from its scripts).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoraConfig {
    /// The maximum rank (r_max): gates can only switch ranks off.
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Weight of the L1 term (mean |gate|) in the loss: the reference's `sparse_lambda`.
    #[serde(default = "default_lambda")]
    pub lambda: f64,
    /// The proximal step's soft threshold ξ, applied to the gates after every step
    /// (not scaled by the learning rate): the reference's `sparse_lambda_2`.
    #[serde(default = "default_lambda")]
    pub threshold: f64,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lambda() -> f64 {
    1e-3
}

impl MethodParams for SoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_non_negative("lambda", self.lambda, &mut errors);
        check_non_negative("threshold", self.threshold, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }
}
