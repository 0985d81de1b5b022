//! Plain LoRA (Hu et al., 2021) with PEFT's semantics; see docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// How `lora_A` starts (B always starts at zero, so the adapter starts as the identity).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), as nn.Linear.
    #[default]
    Kaiming,
    /// PEFT's `init_lora_weights="gaussian"`: normal with std 1/r.
    Gaussian,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// No `deny_unknown_fields` here: serde's internal tagging would then also refuse the
// `type` tag in the OpenAPI schema. `MethodConfig::check_fields` refuses unknown keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub init: LoraInit,
    /// FFA-LoRA: keep A fixed at its initial value and train B only.
    #[serde(default)]
    pub freeze_a: bool,
}

fn default_alpha() -> f64 {
    16.0
}

impl LoraConfig {
    /// The multiplier of the low-rank branch: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

impl MethodParams for LoraConfig {
    fn example() -> Self {
        serde_json::from_value(serde_json::json!({"r": 8}))
            .expect("r is LoRA's only required field")
    }

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

    /// The published factors have the same shapes: same rank, same modules in any order.
    fn same_shape(&self, other: &Self) -> bool {
        let (mut a, mut b) = (self.target_modules.clone(), other.target_modules.clone());
        a.sort();
        b.sort();
        self.r == other.r && a == b
    }
}
