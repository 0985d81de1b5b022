//! ALLoRA (Huang & Balestriero, 2024, arXiv 2410.09692v1): LoRA without dropout or scaling,
//! its factors' gradients scaled per output row by `1/sqrt(‖(BA)_i‖ + 1/η²)` (the paper's
//! Section 4.2); see docs/methods.md.

use super::common::{check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// ALLoRA. `r` and `eta` have no defaults, as the paper names none: it tries `η²` of 1, 2 and
/// 4 at a base learning rate of 1e-4 and reports the best, at ranks 4 to 64 (see
/// docs/methods.md), so a job states them.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlloraConfig {
    pub r: u32,
    /// η: the factor `1/sqrt(‖row‖ + 1/η²)` on the gradients of a row of the update is η while
    /// the row is zero, and falls as it grows; it takes the place of LoRA's scale alpha/r.
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
