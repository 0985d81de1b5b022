//! ALLoRA (Huang & Balestriero, 2024): LoRA without dropout or scaling, its factors' gradients
//! scaled per output row by the inverse norm of the adapter's rows; see docs/methods.md.

use super::common::{check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// ALLoRA. No defaults for `r` and `eta`: none could be read from the paper (see
/// docs/methods.md), so a job states them.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlloraConfig {
    pub r: u32,
    /// η: a row of the update with norm 0 has its gradients scaled by η (`1/sqrt(‖row‖ +
    /// 1/η²)`); it takes the place of LoRA's alpha.
    pub eta: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

impl MethodParams for AlloraConfig {
    fn example() -> Self {
        serde_json::from_value(serde_json::json!({"r": 8, "eta": 1.0}))
            .expect("r and eta are ALLoRA's required fields")
    }

    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        if !(self.eta.is_finite() && self.eta > 0.0) {
            errors.push(FieldError::new("method.eta", "must be a positive number"));
        }
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }
}
