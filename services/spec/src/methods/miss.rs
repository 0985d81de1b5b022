//! MiSS (Kang & Yin, "Bone/MiSS: Balancing LoRA performance and efficiency with simple shard
//! sharing"; PEFT `tuners/miss`), with Bone's block-affine variant; see docs/methods.md.

use super::common::{check_dropout, check_rank, check_target_modules, default_targets, one};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// The MiSS variant, PEFT's `init_weights`. Every block starts at zero (the adapter starts as
/// the base model).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissInit {
    /// PEFT's default (`true`): one shard `D (r, out)` shared by every `r`-wide slice of the
    /// input, `ΔW[:, j] = D[j mod r, :]ᵀ`.
    #[default]
    Balance,
    /// Bone's block-affine transform (`"bat"`): `(out / r)` blocks `D_i (r, r)`, each `r × r`
    /// block of W becomes `W_ij (I + D_i) + D_i`. Needs `r` to divide both dimensions.
    Bat,
    /// `"mini"`: a shard `(r, mini_r)` repeated along the output too; `mini_r` must divide the
    /// output dimension.
    Mini,
}

/// MiSS with PEFT's defaults (`MissConfig`: `r` 64, `miss_dropout` 0, `mini_r` 1, balance).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissConfig {
    /// The shard's rows: the input is summed over its `r`-wide slices (at most the input
    /// dimension; for `bat`, a divisor of the input and output dimensions).
    #[serde(default = "default_r")]
    pub r: u32,
    /// Dropout on the layer's input before the slices are summed (`miss_dropout`; not with `bat`,
    /// whose forward has none).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub init: MissInit,
    /// The shard's columns with `init: mini` (only then).
    #[serde(default = "one")]
    pub mini_r: u32,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_r() -> u32 {
    64
}

impl MethodParams for MissConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_dropout(self.dropout, &mut errors);
        check_rank("mini_r", self.mini_r, &mut errors);
        if self.init != MissInit::Mini && self.mini_r != 1 {
            errors.push(FieldError::new(
                "method.mini_r",
                "only init: mini uses mini_r; leave it at 1",
            ));
        }
        if self.init == MissInit::Bat && self.dropout != 0.0 {
            errors.push(FieldError::new(
                "method.dropout",
                "init: bat applies no dropout (its update depends on the weight, not the input)",
            ));
        }
        check_target_modules(&self.target_modules, &mut errors);
        errors
    }

    fn peft_type(&self) -> &'static str {
        "MISS"
    }
}
