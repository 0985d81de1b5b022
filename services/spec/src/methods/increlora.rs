//! IncreLoRA (Zhang et al., 2023): ranks added during training to the modules that matter
//! most; see docs/methods.md.

use super::common::{
    check_alpha_dropout, check_betas, check_growth_schedule, check_non_negative,
    check_target_modules, default_targets, growth_steps, one, yes, GrowthRanks,
};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// IncreLoRA with the defaults of the reference's rank-8 MNLI script
/// (in `NLU/scripts/rank=8/`: target_rank 8, lora_r 1, init_warmup 1000, incre_interval
/// 1000, top_h 18, reg_orth_coef 0.1, beta1 = beta2 = 0.85, alpha 16) and of `run_glue.py`
/// (`advance_learn` and `multi_lr` on, `incre_rank_num` from its table). Schedule steps count
/// optimizer steps from 0, as the reference's `update_and_increase(global_step)` does.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncreLoraConfig {
    /// The average rank per module once growth ends (the budget is `target_rank` x modules).
    #[serde(default = "default_target_rank")]
    pub target_rank: u32,
    /// The whole budget in ranks, instead of `target_rank` x modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_total_rank: Option<u32>,
    /// Every module's rank at the start.
    #[serde(default = "one")]
    pub lora_r: u32,
    /// Ranks a chosen module gains per allocation; `null`: the reference's table
    /// `{2: 1, 4: 2, 6: 3, 8: 4}`, i.e. `target_rank / 2` (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incre_rank_num: Option<u32>,
    /// Deliberately not in the reference (which has no cap): the most active ranks one module
    /// may grow to, bounding its preallocated factors; `null`: 4 x `target_rank`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_module_rank: Option<u32>,
    /// The branch is scaled by alpha / (active rank), which changes as the module grows.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Steps (from 0) before the first allocation: allocations need `step > init_warmup`.
    #[serde(default = "default_incre_step")]
    pub init_warmup: u32,
    /// Ranks are allocated at steps that are multiples of `incre_interval`.
    #[serde(default = "default_incre_step")]
    pub incre_interval: u32,
    /// At most this many modules (the highest scores) grow per allocation.
    #[serde(default = "default_top_h")]
    pub top_h: u32,
    /// Train each module's next ranks (its reserve) before they are added.
    #[serde(default = "yes")]
    pub advance_learn: bool,
    /// Added ranks restart the learning-rate warmup from the step they are added.
    #[serde(default = "yes")]
    pub multi_lr: bool,
    /// EMA coefficient of the importance score.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA coefficient of its uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regulariser on A and B.
    #[serde(default = "default_reg_orth_coef")]
    pub reg_orth_coef: f64,
}

fn default_target_rank() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_incre_step() -> u32 {
    1000
}
fn default_top_h() -> u32 {
    18
}
fn default_beta() -> f64 {
    0.85
}
fn default_reg_orth_coef() -> f64 {
    0.1
}

impl IncreLoraConfig {
    /// Ranks gained per allocation by each chosen module.
    pub fn rank_step(&self) -> u32 {
        self.incre_rank_num.unwrap_or((self.target_rank / 2).max(1))
    }

    /// The cap on one module's active ranks.
    pub fn module_rank_cap(&self) -> u32 {
        self.max_module_rank.unwrap_or(4 * self.target_rank)
    }

    /// How many steps of a `max_steps` run (counted from 0) allocate ranks.
    pub fn allocation_steps(&self, max_steps: u32) -> u32 {
        growth_steps(self.init_warmup, self.incre_interval, max_steps)
    }
}

impl MethodParams for IncreLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        GrowthRanks {
            target_field: "target_rank",
            target: self.target_rank,
            initial_field: "lora_r",
            initial: self.lora_r,
            target_total_rank: self.target_total_rank,
            incre_rank_num: self.incre_rank_num,
            rank_step: self.rank_step(),
            cap: self.module_rank_cap(),
        }
        .check(&mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        for (field, value) in [
            ("incre_interval", self.incre_interval),
            ("top_h", self.top_h),
        ] {
            if value == 0 {
                errors.push(FieldError::new(
                    format!("method.{field}"),
                    "must be at least 1",
                ));
            }
        }
        check_betas(self.beta1, self.beta2, &mut errors);
        check_non_negative("reg_orth_coef", self.reg_orth_coef, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        check_growth_schedule(
            self.init_warmup,
            self.incre_interval,
            training.max_steps,
            &mut errors,
        );
        errors
    }
}

#[cfg(test)]
mod tests {
    /// IncreLoRA allocates at the steps from 0 above init_warmup that incre_interval divides.
    #[test]
    fn increlora_counts_its_allocation_steps() {
        let config: super::IncreLoraConfig =
            serde_json::from_value(serde_json::json!({"init_warmup": 2, "incre_interval": 2}))
                .unwrap();
        // Steps 0..16: 4, 6, 8, 10, 12, 14.
        assert_eq!(config.allocation_steps(16), 6);
        assert_eq!(config.allocation_steps(15), 6);
        assert_eq!(config.allocation_steps(5), 1);
        assert_eq!(config.allocation_steps(4), 0);
        assert_eq!(config.rank_step(), 4);
        assert_eq!(config.module_rank_cap(), 32);
    }
}
