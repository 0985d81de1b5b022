//! SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024; PEFT `tuners/shira`);
//! see docs/methods.md.

use super::common::{check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// How the trained positions of each weight are chosen.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShiraMask {
    /// PEFT's `random_mask` (the paper's SHiRA-Rand): `r · (in + out)` positions drawn
    /// uniformly without replacement, from libtorch's generator seeded with `random_seed`.
    #[default]
    Random,
}

/// SHiRA with PEFT's defaults (`ShiraConfig`: `r` 32, `mask_type` random).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiraConfig {
    /// Sets the number of trained entries per weight, `r · (in + out)` (a LoRA of rank r's
    /// count); the update itself is sparse and of high rank.
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default)]
    pub mask_type: ShiraMask,
    /// The seed of the random mask; the job's `training.seed` where absent.
    #[serde(default)]
    pub random_seed: Option<u64>,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_r() -> u32 {
    32
}

impl ShiraConfig {
    /// The seed the mask is drawn with.
    pub fn mask_seed(&self, training: &TrainingConfig) -> u64 {
        self.random_seed.unwrap_or(training.seed)
    }
}

impl MethodParams for ShiraConfig {
    /// PEFT's default `r` of 32 needs layers of at least 64 x 64 (`r (in + out) ≤ in · out`);
    /// the example fits small models too.
    fn example() -> Self {
        serde_json::from_value(serde_json::json!({"r": 8})).expect("r is a valid field")
    }

    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }

    fn peft_type(&self) -> &'static str {
        "SHIRA"
    }
}
