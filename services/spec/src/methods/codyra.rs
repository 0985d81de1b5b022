//! CoDyRA (Lu et al., 2024), one task per job: gated ranks driven to exact zeros by a proximal
//! step whose threshold rises on a schedule after a dense phase; see docs/methods.md.

use super::common::{check_dropout, check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// CoDyRA with the reference's `main.py` defaults (`rank 16`, `max_kappa 7e-4`,
/// `lambda_num 50`, `dense_iters 0.5`); `dropout` and `target_modules` as the other methods.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodyraConfig {
    /// The rank each module starts with: gates can only switch ranks off.
    #[serde(default = "default_r")]
    pub r: u32,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// The largest soft threshold κ of the proximal step on the gates (not scaled by the
    /// learning rate), reached at the end of the schedule; above 0 (at 0 nothing is pruned).
    #[serde(default = "default_max_kappa")]
    pub max_kappa: f64,
    /// How many thresholds the schedule has, evenly spaced from 0 to `max_kappa`; at least 2
    /// (a single one is 0, which prunes nothing).
    #[serde(default = "default_lambda_num")]
    pub lambda_num: u32,
    /// The fraction of `training.max_steps` trained densely (threshold 0, no proximal step).
    #[serde(default = "default_dense_iters")]
    pub dense_iters: f64,
}

fn default_r() -> u32 {
    16
}
fn default_max_kappa() -> f64 {
    7e-4
}
fn default_lambda_num() -> u32 {
    50
}
fn default_dense_iters() -> f64 {
    0.5
}

impl CodyraConfig {
    /// The reference's `dense_iters * total_iterations`, kept unrounded as there: the schedule
    /// compares iterations with it (`it >= dense`, `it > dense`).
    pub fn dense_iters_at(&self, max_steps: u32) -> f64 {
        self.dense_iters * f64::from(max_steps)
    }

    /// The reference's `int((T - dense_iters) // lambda_num)`: the iterations between two
    /// rises of the threshold, with Python's float floor division (fmod, then rounded).
    pub fn lambda_step(&self, max_steps: u32) -> u32 {
        let rest = f64::from(max_steps) - self.dense_iters_at(max_steps);
        let n = f64::from(self.lambda_num);
        if !(rest >= 0.0 && n > 0.0) {
            return 0;
        }
        let div = (rest - rest % n) / n;
        let mut floor = div.floor();
        if div - floor > 0.5 {
            floor += 1.0;
        }
        floor as u32
    }
}

impl MethodParams for CodyraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_dropout(self.dropout, &mut errors);
        if !(self.max_kappa.is_finite() && self.max_kappa > 0.0) {
            errors.push(FieldError::new(
                "method.max_kappa",
                "must be a positive number (at 0 the threshold stays 0 and nothing is pruned)",
            ));
        }
        if self.lambda_num < 2 {
            errors.push(FieldError::new(
                "method.lambda_num",
                format!(
                    "must be at least 2 (linspace(0, max_kappa, 1) is [0]: the threshold would \
                     stay 0 and nothing be pruned), got {}",
                    self.lambda_num
                ),
            ));
        }
        let dense_iters_valid =
            self.dense_iters.is_finite() && (0.0..1.0).contains(&self.dense_iters);
        if !dense_iters_valid {
            errors.push(FieldError::new(
                "method.dense_iters",
                "must be in [0, 1): the fraction of training.max_steps trained densely",
            ));
        }
        check_target_modules(&self.target_modules, &mut errors);
        // The reference skips its schedule when lambda_step is 0: the threshold would stay
        // at 0 and nothing would ever be pruned, so such a plan is refused instead. (An
        // invalid lambda_num or dense_iters is reported above.)
        let schedulable = self.lambda_num >= 2 && dense_iters_valid;
        if schedulable && self.lambda_step(training.max_steps) == 0 {
            errors.push(FieldError::new(
                "method.lambda_num",
                format!(
                    "must not exceed the steps after the dense phase, training.max_steps - \
                     dense_iters x training.max_steps ({}), so that lambda_step = that // \
                     lambda_num is at least 1 (at 0 the threshold never rises); got {}",
                    f64::from(training.max_steps) - self.dense_iters_at(training.max_steps),
                    self.lambda_num
                ),
            ));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::CodyraConfig;

    /// `int((T - dense_iters * T) // lambda_num)` as Python computes it.
    #[test]
    fn codyra_lambda_step_is_pythons_floor_division() {
        let config = |dense_iters: f64, lambda_num: u32| CodyraConfig {
            r: 16,
            dropout: 0.0,
            target_modules: vec!["q_proj".into()],
            max_kappa: 7e-4,
            lambda_num,
            dense_iters,
        };
        // main.py's defaults: (1000 - 500.0) // 50 = 10.0.
        assert_eq!(config(0.5, 50).lambda_step(1000), 10);
        // (10 - 2.5) // 3 = 2.0; (16 - 8.0) // 3 = 2.0; (16 - 0.0) // 16 = 1.0.
        assert_eq!(config(0.25, 3).lambda_step(10), 2);
        assert_eq!(config(0.5, 3).lambda_step(16), 2);
        assert_eq!(config(0.0, 16).lambda_step(16), 1);
        // 25 - 0.56 * 25 is 10.999999999999998 in floats: Python's // gives 0.0, not 1.
        assert_eq!(config(0.56, 11).lambda_step(25), 0);
    }
}
