//! TriAdaptLoRA (Liang et al., 2025): `B C A` with a growing block-triangular `C`;
//! see docs/methods.md.

use super::common::{
    check_alpha_dropout, check_growth_schedule, check_non_negative, check_target_modules,
    default_targets, growth_steps, one, GrowthRanks,
};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// How many modules grow at a TriAdaptLoRA allocation, from the budget left and the progress.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankGrowthModel {
    /// `int(budget left x progress)`.
    #[default]
    Linear,
    /// `int(budget left ^ progress)` (the reference spells it `non-linear`).
    #[serde(alias = "non-linear")]
    Nonlinear,
}

/// TriAdaptLoRA with the defaults of the authors' `TriAdaptLoraConfig` (their PEFT fork,
/// `peft/src/peft/tuners/triadaptlora.py`) and of the `LoraConfig` it extends (alpha 8,
/// dropout 0); the schedule counts optimizer steps from 0.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriAdaptLoraConfig {
    /// The average rank per module once growth ends (the budget is `reference_rank` x modules).
    #[serde(default = "default_reference_rank")]
    pub reference_rank: u32,
    /// The whole budget in ranks, instead of `reference_rank` x modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_total_rank: Option<u32>,
    /// Every module's rank at the start.
    #[serde(default = "one")]
    pub init_rank: u32,
    /// Ranks a chosen module gains per allocation; `null`: the reference's table,
    /// `reference_rank / 2` (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incre_rank_num: Option<u32>,
    /// Deliberately not in the reference (which has no cap): the most ranks one module may
    /// grow to, bounding its preallocated factors; `null`: 4 x `reference_rank`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_module_rank: Option<u32>,
    /// The branch is scaled by alpha / rank, which changes as the module grows.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Steps (from 0) before the first allocation: allocations need `step > init_warmup`.
    #[serde(default)]
    pub init_warmup: u32,
    /// Ranks are allocated at steps that are multiples of `incre_interval`.
    #[serde(default = "one")]
    pub incre_interval: u32,
    #[serde(default)]
    pub rank_growth_model: RankGrowthModel,
    /// Weight of the orthogonality regulariser on A and B.
    #[serde(default = "default_orth_reg_weight")]
    pub orth_reg_weight: f64,
}

fn default_reference_rank() -> u32 {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_orth_reg_weight() -> f64 {
    0.5
}

impl TriAdaptLoraConfig {
    /// Ranks gained per allocation by each chosen module.
    pub fn rank_step(&self) -> u32 {
        self.incre_rank_num
            .unwrap_or((self.reference_rank / 2).max(1))
    }

    /// The cap on one module's rank.
    pub fn module_rank_cap(&self) -> u32 {
        self.max_module_rank.unwrap_or(4 * self.reference_rank)
    }

    /// How many steps of a `max_steps` run (counted from 0) allocate ranks.
    pub fn allocation_steps(&self, max_steps: u32) -> u32 {
        growth_steps(self.init_warmup, self.incre_interval, max_steps)
    }
}

impl MethodParams for TriAdaptLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn validate(&self, training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        GrowthRanks {
            target_field: "reference_rank",
            target: self.reference_rank,
            initial_field: "init_rank",
            initial: self.init_rank,
            target_total_rank: self.target_total_rank,
            incre_rank_num: self.incre_rank_num,
            rank_step: self.rank_step(),
            cap: self.module_rank_cap(),
        }
        .check(&mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        if self.incre_interval == 0 {
            errors.push(FieldError::new(
                "method.incre_interval",
                "must be at least 1",
            ));
        }
        check_non_negative("orth_reg_weight", self.orth_reg_weight, &mut errors);
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
