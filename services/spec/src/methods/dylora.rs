//! DyLoRA (Valipour et al., EACL 2023): one adapter trained to work truncated to any rank;
//! see docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules, default_targets, one};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// DyLoRA with the reference's script defaults (r 8, alpha 16).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DyLoraConfig {
    /// The largest rank trained.
    #[serde(default = "default_r")]
    pub r: u32,
    /// The smallest rank sampled in training (the reference samples from 1).
    #[serde(default = "one")]
    pub min_r: u32,
    /// The rank the published adapter is truncated to; `null` publishes rank `r`.
    #[serde(default)]
    pub export_r: Option<u32>,
    /// Scaling alpha / r at rank r, alpha / b at truncated rank b.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_r() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}

impl MethodParams for DyLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        if self.min_r == 0 || self.min_r > self.r {
            errors.push(FieldError::new(
                "method.min_r",
                format!("must be between 1 and r ({}), got {}", self.r, self.min_r),
            ));
        }
        if let Some(b) = self.export_r {
            if b < self.min_r || b > self.r {
                errors.push(FieldError::new(
                    "method.export_r",
                    format!(
                        "must be between min_r ({}) and r ({}), got {b}",
                        self.min_r, self.r
                    ),
                ));
            }
        }
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }
}
