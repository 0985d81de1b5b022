//! Adapter methods a job can ask for. Each variant's parameters validate themselves;
//! the trainer has one implementation per variant.

use crate::error::{from_value, FieldError, SpecError};
use crate::job::TrainingConfig;
use crate::model::LLAMA_TARGET_MODULES;
use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MethodConfig {
    /// Plain LoRA (Hu et al.), PEFT semantics.
    Lora(LoraConfig),
    /// AdaLoRA (Zhang et al., ICLR 2023): SVD-form triplets pruned to a budget by importance.
    #[serde(rename = "adalora")]
    AdaLora(AdaLoraConfig),
    /// SoRA (Ding et al., EMNLP 2023): a gate per rank, driven to exact zeros by a proximal step.
    Sora(SoraConfig),
    /// DyLoRA (Valipour et al., EACL 2023): one adapter trained to work truncated to any rank.
    #[serde(rename = "dylora")]
    DyLora(DyLoraConfig),
    /// IncreLoRA (Zhang et al., 2023): ranks added during training to the modules that matter most.
    #[serde(rename = "increlora")]
    IncreLora(IncreLoraConfig),
    /// TriAdaptLoRA (Liang et al., 2025): `B C A` with a growing block-triangular `C`.
    #[serde(rename = "triadaptlora")]
    TriAdaptLora(TriAdaptLoraConfig),
    /// CoDyRA (Lu et al., 2024), one task per job: gated ranks driven to exact zeros by a
    /// proximal step whose threshold rises on a schedule after a dense phase.
    #[serde(rename = "codyra")]
    Codyra(CodyraConfig),
}

impl MethodConfig {
    /// Checks a `method` object against its variant's own fields first, so an error
    /// names the field (`method.r`): serde's tagged enums lose the path inside them.
    pub fn check_fields(method: &serde_json::Value) -> Result<(), SpecError> {
        let Some(mut fields) = method.as_object().cloned() else {
            return Ok(());
        };
        let Some(kind) = fields.remove("type") else {
            return Ok(());
        };
        match kind.as_str() {
            Some("lora") => reject_unknown::<LoraConfig>(fields),
            Some("adalora") => reject_unknown::<AdaLoraConfig>(fields),
            Some("sora") => reject_unknown::<SoraConfig>(fields),
            Some("dylora") => reject_unknown::<DyLoraConfig>(fields),
            Some("increlora") => reject_unknown::<IncreLoraConfig>(fields),
            Some("triadaptlora") => reject_unknown::<TriAdaptLoraConfig>(fields),
            Some("codyra") => reject_unknown::<CodyraConfig>(fields),
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
            MethodConfig::AdaLora(_) => "adalora",
            MethodConfig::Sora(_) => "sora",
            MethodConfig::DyLora(_) => "dylora",
            MethodConfig::IncreLora(_) => "increlora",
            MethodConfig::TriAdaptLora(_) => "triadaptlora",
            MethodConfig::Codyra(_) => "codyra",
        }
    }

    pub fn target_modules(&self) -> &[String] {
        match self {
            MethodConfig::Lora(c) => &c.target_modules,
            MethodConfig::AdaLora(c) => &c.target_modules,
            MethodConfig::Sora(c) => &c.target_modules,
            MethodConfig::DyLora(c) => &c.target_modules,
            MethodConfig::IncreLora(c) => &c.target_modules,
            MethodConfig::TriAdaptLora(c) => &c.target_modules,
            MethodConfig::Codyra(c) => &c.target_modules,
        }
    }

    /// Appends every problem found to `errors`, with field paths under `method.`.
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        match self {
            MethodConfig::Lora(c) => c.validate("method", errors),
            MethodConfig::AdaLora(c) => c.validate("method", errors),
            MethodConfig::Sora(c) => c.validate("method", errors),
            MethodConfig::DyLora(c) => c.validate("method", errors),
            MethodConfig::IncreLora(c) => c.validate("method", errors),
            MethodConfig::TriAdaptLora(c) => c.validate("method", errors),
            MethodConfig::Codyra(c) => c.validate("method", errors),
        }
    }

    /// The checks that need the training plan as well (AdaLoRA's schedule is in steps of it).
    pub fn validate_with_training(&self, training: &TrainingConfig, errors: &mut Vec<FieldError>) {
        let growth = match self {
            MethodConfig::IncreLora(c) => Some((c.init_warmup, c.incre_interval)),
            MethodConfig::TriAdaptLora(c) => Some((c.init_warmup, c.incre_interval)),
            _ => None,
        };
        if let Some((init_warmup, incre_interval)) = growth {
            if growth_steps(init_warmup, incre_interval, training.max_steps) == 0 {
                errors.push(FieldError::new(
                    "method.init_warmup",
                    format!(
                        "no step of the run adds ranks: ranks are added at steps (counted from 0) above \
                         init_warmup ({init_warmup}) that are multiples of incre_interval ({incre_interval}), \
                         and the run has training.max_steps = {}",
                        training.max_steps
                    ),
                ));
            }
        }
        if let MethodConfig::Codyra(c) = self {
            // The reference skips its schedule when lambda_step is 0: the threshold would stay
            // at 0 and nothing would ever be pruned, so such a plan is refused instead. (An
            // invalid lambda_num or dense_iters is already reported by `validate`.)
            let schedulable = c.lambda_num >= 2 && (0.0..1.0).contains(&c.dense_iters);
            if schedulable && c.lambda_step(training.max_steps) == 0 {
                errors.push(FieldError::new(
                    "method.lambda_num",
                    format!(
                        "must not exceed the steps after the dense phase, training.max_steps - \
                         dense_iters x training.max_steps ({}), so that lambda_step = that // \
                         lambda_num is at least 1 (at 0 the threshold never rises); got {}",
                        f64::from(training.max_steps) - c.dense_iters_at(training.max_steps),
                        c.lambda_num
                    ),
                ));
            }
        }
        if let MethodConfig::AdaLora(c) = self {
            // PEFT's `AdaLoraConfig` requires tinit < total_step - tfinal, total_step being the
            // run's length: otherwise the budget never leaves its initial value.
            let pruning_ends = i64::from(training.max_steps) - i64::from(c.tfinal);
            if i64::from(c.tinit) >= pruning_ends {
                errors.push(FieldError::new(
                    "method.tinit",
                    format!(
                        "must be below training.max_steps - tfinal ({pruning_ends}), so that there are steps \
                         in which ranks are pruned; got {}",
                        c.tinit
                    ),
                ));
            }
        }
    }

    /// Whether an adapter of `self`'s method can continue training as `other` (same factors).
    /// Only plain LoRA continues from a parent: the other methods' state (triplets, gates,
    /// importance averages) is not in a published adapter.
    pub fn same_shape(&self, other: &MethodConfig) -> bool {
        match (self, other) {
            (MethodConfig::Lora(p), MethodConfig::Lora(c)) => {
                let (mut a, mut b) = (p.target_modules.clone(), c.target_modules.clone());
                a.sort();
                b.sort();
                p.r == c.r && a == b
            }
            _ => false,
        }
    }
}

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

fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

pub const MAX_RANK: u32 = 4096;

impl LoraConfig {
    /// The multiplier of the low-rank branch: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.r == 0 || self.r > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.r"),
                format!("must be between 1 and {MAX_RANK}, got {}", self.r),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            errors.push(FieldError::new(
                format!("{prefix}.alpha"),
                "must be a positive number",
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            errors.push(FieldError::new(
                format!("{prefix}.dropout"),
                "must be in [0, 1)",
            ));
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// AdaLoRA with PEFT's `AdaLoraConfig` defaults and names (`deltaT` is `delta_t`); the schedule
/// steps count optimizer steps from 0, as PEFT's `update_and_allocate(global_step)` does.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    /// Triplets per adapted matrix at the start.
    #[serde(default = "default_init_r")]
    pub init_r: u32,
    /// Average triplets per matrix once pruning ends (the budget is `target_r` x matrices).
    #[serde(default = "default_target_r")]
    pub target_r: u32,
    /// The branch is scaled by alpha / init_r throughout (PEFT: `lora_alpha / ranknum`).
    #[serde(default = "default_adalora_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Steps at full budget before pruning starts.
    #[serde(default)]
    pub tinit: u32,
    /// Final steps at the target budget, with the allocation frozen.
    #[serde(default)]
    pub tfinal: u32,
    /// Prune every `delta_t` steps while the budget shrinks.
    #[serde(default = "one")]
    pub delta_t: u32,
    /// EMA coefficient of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA coefficient of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regulariser on A and B.
    #[serde(default = "default_orth_reg_weight")]
    pub orth_reg_weight: f64,
}

fn default_init_r() -> u32 {
    12
}
fn default_target_r() -> u32 {
    8
}
fn default_adalora_alpha() -> f64 {
    8.0
}
fn one() -> u32 {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth_reg_weight() -> f64 {
    0.5
}

impl AdaLoraConfig {
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.init_r == 0 || self.init_r > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.init_r"),
                format!("must be between 1 and {MAX_RANK}"),
            ));
        }
        if self.target_r == 0 || self.target_r > self.init_r {
            errors.push(FieldError::new(
                format!("{prefix}.target_r"),
                format!(
                    "must be between 1 and init_r ({}), got {}",
                    self.init_r, self.target_r
                ),
            ));
        }
        check_alpha_dropout(prefix, self.alpha, self.dropout, errors);
        if self.delta_t == 0 {
            errors.push(FieldError::new(
                format!("{prefix}.delta_t"),
                "must be at least 1",
            ));
        }
        check_betas(prefix, self.beta1, self.beta2, errors);
        if !(self.orth_reg_weight.is_finite() && self.orth_reg_weight >= 0.0) {
            errors.push(FieldError::new(
                format!("{prefix}.orth_reg_weight"),
                "must be a non-negative number",
            ));
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// SoRA with the reference's defaults (`run_glue.py` `SparseArguments`, r from its scripts).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoraConfig {
    /// The maximum rank (r_max): gates can only switch ranks off.
    #[serde(default = "default_sora_r")]
    pub r: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Weight of the L1 term (mean |gate|) in the loss: the reference's `sparse_lambda`.
    #[serde(default = "default_sora_lambda")]
    pub lambda: f64,
    /// The proximal step's soft threshold ξ, applied to the gates after every step
    /// (not scaled by the learning rate): the reference's `sparse_lambda_2`.
    #[serde(default = "default_sora_lambda")]
    pub threshold: f64,
}

fn default_sora_r() -> u32 {
    8
}
fn default_sora_lambda() -> f64 {
    1e-3
}

impl SoraConfig {
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.r == 0 || self.r > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.r"),
                format!("must be between 1 and {MAX_RANK}, got {}", self.r),
            ));
        }
        check_alpha_dropout(prefix, self.alpha, self.dropout, errors);
        for (field, value) in [("lambda", self.lambda), ("threshold", self.threshold)] {
            if !(value.is_finite() && value >= 0.0) {
                errors.push(FieldError::new(
                    format!("{prefix}.{field}"),
                    "must be a non-negative number",
                ));
            }
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// DyLoRA with the reference's script defaults (r 8, alpha 16).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DyLoraConfig {
    /// The largest rank trained.
    #[serde(default = "default_sora_r")]
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

impl DyLoraConfig {
    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.r == 0 || self.r > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.r"),
                format!("must be between 1 and {MAX_RANK}, got {}", self.r),
            ));
        }
        if self.min_r == 0 || self.min_r > self.r {
            errors.push(FieldError::new(
                format!("{prefix}.min_r"),
                format!("must be between 1 and r ({}), got {}", self.r, self.min_r),
            ));
        }
        if let Some(b) = self.export_r {
            if b < self.min_r || b > self.r {
                errors.push(FieldError::new(
                    format!("{prefix}.export_r"),
                    format!(
                        "must be between min_r ({}) and r ({}), got {b}",
                        self.min_r, self.r
                    ),
                ));
            }
        }
        check_alpha_dropout(prefix, self.alpha, self.dropout, errors);
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// IncreLoRA with the defaults of the reference's rank-8 MNLI script
/// (in `NLU/scripts/rank=8/`: target_rank 8, lora_r 1, init_warmup 1000, incre_interval
/// 1000, top_h 18, reg_orth_coef 0.1, beta1 = beta2 = 0.85, alpha 16) and of `run_glue.py`
/// (`advance_learn` and `multi_lr` on, `incre_rank_num` from its table). Schedule steps count
/// optimizer steps from 0, as the reference's `update_and_increase(global_step)` does.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncreLoraConfig {
    /// The average rank per module once growth ends (the budget is `target_rank` x modules).
    #[serde(default = "default_target_r")]
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

fn default_incre_step() -> u32 {
    1000
}
fn default_top_h() -> u32 {
    18
}
fn yes() -> bool {
    true
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

    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
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
        .check(prefix, errors);
        check_alpha_dropout(prefix, self.alpha, self.dropout, errors);
        for (field, value) in [
            ("incre_interval", self.incre_interval),
            ("top_h", self.top_h),
        ] {
            if value == 0 {
                errors.push(FieldError::new(
                    format!("{prefix}.{field}"),
                    "must be at least 1",
                ));
            }
        }
        check_betas(prefix, self.beta1, self.beta2, errors);
        if !(self.reg_orth_coef.is_finite() && self.reg_orth_coef >= 0.0) {
            errors.push(FieldError::new(
                format!("{prefix}.reg_orth_coef"),
                "must be a non-negative number",
            ));
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// How many steps of a `max_steps` run (counted from 0) add ranks, for IncreLoRA and
/// TriAdaptLoRA: those above `init_warmup` that are multiples of `incre_interval`.
pub fn growth_steps(init_warmup: u32, incre_interval: u32, max_steps: u32) -> u32 {
    let interval = incre_interval.max(1);
    let first = (init_warmup / interval + 1) * interval;
    match first < max_steps {
        true => (max_steps - 1 - first) / interval + 1,
        false => 0,
    }
}

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
    #[serde(default = "default_target_r")]
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
    #[serde(default = "default_adalora_alpha")]
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

    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
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
        .check(prefix, errors);
        check_alpha_dropout(prefix, self.alpha, self.dropout, errors);
        if self.incre_interval == 0 {
            errors.push(FieldError::new(
                format!("{prefix}.incre_interval"),
                "must be at least 1",
            ));
        }
        if !(self.orth_reg_weight.is_finite() && self.orth_reg_weight >= 0.0) {
            errors.push(FieldError::new(
                format!("{prefix}.orth_reg_weight"),
                "must be a non-negative number",
            ));
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

/// The rank fields IncreLoRA and TriAdaptLoRA share: a target rank per module, the rank every
/// module starts at, an optional total budget, the ranks added per growth and the per-module cap.
struct GrowthRanks {
    target_field: &'static str,
    target: u32,
    initial_field: &'static str,
    initial: u32,
    target_total_rank: Option<u32>,
    incre_rank_num: Option<u32>,
    rank_step: u32,
    cap: u32,
}

impl GrowthRanks {
    fn check(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        let (target_field, target) = (self.target_field, self.target);
        if target == 0 || target > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.{target_field}"),
                format!("must be between 1 and {MAX_RANK}, got {target}"),
            ));
        }
        if self.target_total_rank == Some(0) {
            errors.push(FieldError::new(
                format!("{prefix}.target_total_rank"),
                "must be at least 1",
            ));
        }
        let (initial_field, initial) = (self.initial_field, self.initial);
        if initial == 0 || initial > target {
            errors.push(FieldError::new(
                format!("{prefix}.{initial_field}"),
                format!("must be between 1 and {target_field} ({target}), got {initial}"),
            ));
        }
        if let Some(n) = self.incre_rank_num {
            if n == 0 || n > MAX_RANK {
                errors.push(FieldError::new(
                    format!("{prefix}.incre_rank_num"),
                    format!("must be between 1 and {MAX_RANK}, got {n}"),
                ));
            }
        }
        let (cap, step) = (self.cap, self.rank_step);
        let field = format!("{prefix}.max_module_rank");
        if cap < target || cap > MAX_RANK {
            errors.push(FieldError::new(
                field,
                format!("must be between {target_field} ({target}) and {MAX_RANK}, got {cap}"),
            ));
        } else if (1..=MAX_RANK).contains(&step) && cap < initial.saturating_add(step) {
            // Below one growth's room no module can ever grow.
            errors.push(FieldError::new(
                field,
                format!(
                    "must be at least {initial_field} + incre_rank_num ({initial} + {step} = {}), \
                     or no module can ever grow; got {cap}",
                    initial.saturating_add(step)
                ),
            ));
        }
    }
}

/// EMA coefficients in (0, 1), as the references assert.
fn check_betas(prefix: &str, beta1: f64, beta2: f64, errors: &mut Vec<FieldError>) {
    for (field, beta) in [("beta1", beta1), ("beta2", beta2)] {
        if !(beta > 0.0 && beta < 1.0) {
            errors.push(FieldError::new(
                format!("{prefix}.{field}"),
                "must be in (0, 1)",
            ));
        }
    }
}

/// CoDyRA with the reference's `main.py` defaults (`rank 16`, `max_kappa 7e-4`,
/// `lambda_num 50`, `dense_iters 0.5`); `dropout` and `target_modules` as the other methods.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodyraConfig {
    /// The rank each module starts with: gates can only switch ranks off.
    #[serde(default = "default_codyra_r")]
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

fn default_codyra_r() -> u32 {
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

    pub fn validate(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.r == 0 || self.r > MAX_RANK {
            errors.push(FieldError::new(
                format!("{prefix}.r"),
                format!("must be between 1 and {MAX_RANK}, got {}", self.r),
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            errors.push(FieldError::new(
                format!("{prefix}.dropout"),
                "must be in [0, 1)",
            ));
        }
        if !(self.max_kappa.is_finite() && self.max_kappa > 0.0) {
            errors.push(FieldError::new(
                format!("{prefix}.max_kappa"),
                "must be a positive number (at 0 the threshold stays 0 and nothing is pruned)",
            ));
        }
        if self.lambda_num < 2 {
            errors.push(FieldError::new(
                format!("{prefix}.lambda_num"),
                format!(
                    "must be at least 2 (linspace(0, max_kappa, 1) is [0]: the threshold would \
                     stay 0 and nothing be pruned), got {}",
                    self.lambda_num
                ),
            ));
        }
        if !(self.dense_iters.is_finite() && (0.0..1.0).contains(&self.dense_iters)) {
            errors.push(FieldError::new(
                format!("{prefix}.dense_iters"),
                "must be in [0, 1): the fraction of training.max_steps trained densely",
            ));
        }
        check_target_modules(
            &format!("{prefix}.target_modules"),
            &self.target_modules,
            errors,
        );
    }
}

fn check_alpha_dropout(prefix: &str, alpha: f64, dropout: f64, errors: &mut Vec<FieldError>) {
    if !(alpha.is_finite() && alpha > 0.0) {
        errors.push(FieldError::new(
            format!("{prefix}.alpha"),
            "must be a positive number",
        ));
    }
    if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
        errors.push(FieldError::new(
            format!("{prefix}.dropout"),
            "must be in [0, 1)",
        ));
    }
}

/// Parses a method's fields, then refuses any key the method does not have (a typo
/// such as `alhpa` must not silently fall back to a default).
fn reject_unknown<T: serde::de::DeserializeOwned + Serialize>(
    fields: serde_json::Map<String, serde_json::Value>,
) -> Result<(), SpecError> {
    let parsed: T = from_value(fields.clone().into(), "method")?;
    let known = serde_json::to_value(&parsed).unwrap_or_default();
    let mut unknown: Vec<FieldError> = fields
        .keys()
        .filter(|k| known.get(k.as_str()).is_none())
        .map(|k| FieldError::new(format!("method.{k}"), "unknown field"))
        .collect();
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(SpecError {
            errors: std::mem::take(&mut unknown),
            malformed: false,
        }),
    }
}

/// Target modules must be non-empty, distinct, and name projections the model has.
pub fn check_target_modules(field: &str, modules: &[String], errors: &mut Vec<FieldError>) {
    if modules.is_empty() {
        errors.push(FieldError::new(field, "must name at least one module"));
    }
    for (i, m) in modules.iter().enumerate() {
        if !LLAMA_TARGET_MODULES.contains(&m.as_str()) {
            errors.push(FieldError::new(
                format!("{field}[{i}]"),
                format!(
                    "unknown module {m:?}; Llama-family models have {}",
                    LLAMA_TARGET_MODULES.join(", ")
                ),
            ));
        } else if modules[..i].contains(m) {
            errors.push(FieldError::new(
                format!("{field}[{i}]"),
                format!("{m:?} is listed twice"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::JobSpec;

    fn parse(method: &str, max_steps: u32) -> Result<JobSpec, crate::SpecError> {
        JobSpec::parse(
            format!(
                r#"{{"adapter_name":"demo","base_model":"file:///m","dataset":{{"train":"file:///d.jsonl"}},
                   "method":{method},"training":{{"max_steps":{max_steps},"learning_rate":0.001}}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn adaptive_methods_parse_with_their_defaults() {
        for method in [
            r#"{"type":"adalora"}"#,
            r#"{"type":"sora"}"#,
            r#"{"type":"dylora","r":4,"export_r":2}"#,
            r#"{"type":"codyra"}"#,
            r#"{"type":"increlora","init_warmup":10,"incre_interval":10}"#,
            r#"{"type":"triadaptlora"}"#,
            r#"{"type":"triadaptlora","rank_growth_model":"non-linear"}"#,
        ] {
            let spec = parse(method, 100).unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(spec.method.target_modules(), ["q_proj", "v_proj"]);
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"type":"adalora","init_r":4,"target_r":6}"#,
                100,
                "method.target_r",
            ),
            (
                r#"{"type":"adalora","tinit":60,"tfinal":40}"#,
                100,
                "method.tinit",
            ),
            (r#"{"type":"adalora","beta1":1.0}"#, 100, "method.beta1"),
            (r#"{"type":"adalora","delta_t":0}"#, 100, "method.delta_t"),
            (r#"{"type":"adalora","deltaT":2}"#, 100, "method.deltaT"),
            (r#"{"type":"sora","lambda":-1}"#, 100, "method.lambda"),
            (
                r#"{"type":"sora","threshold":-0.1}"#,
                100,
                "method.threshold",
            ),
            (
                r#"{"type":"sora","r":8,"sparse_lambda":1}"#,
                100,
                "method.sparse_lambda",
            ),
            (r#"{"type":"dylora","r":4,"min_r":5}"#, 100, "method.min_r"),
            (
                r#"{"type":"dylora","r":4,"export_r":8}"#,
                100,
                "method.export_r",
            ),
            (r#"{"type":"dylora","r":0}"#, 100, "method.r"),
            (r#"{"type":"codyra","r":0}"#, 100, "method.r"),
            (r#"{"type":"codyra","r":4097}"#, 100, "method.r"),
            (r#"{"type":"codyra","dropout":1.0}"#, 100, "method.dropout"),
            (
                r#"{"type":"codyra","max_kappa":-1e-3}"#,
                100,
                "method.max_kappa",
            ),
            (
                r#"{"type":"codyra","max_kappa":0}"#,
                100,
                "method.max_kappa",
            ),
            (
                r#"{"type":"codyra","lambda_num":0}"#,
                100,
                "method.lambda_num",
            ),
            (
                r#"{"type":"codyra","lambda_num":1}"#,
                100,
                "method.lambda_num",
            ),
            (
                r#"{"type":"codyra","dense_iters":1.0}"#,
                100,
                "method.dense_iters",
            ),
            (
                r#"{"type":"codyra","dense_iters":-0.1}"#,
                100,
                "method.dense_iters",
            ),
            (
                r#"{"type":"codyra","target_modules":["attn"]}"#,
                100,
                "method.target_modules[0]",
            ),
            (
                r#"{"type":"codyra","max_kappa":7e-4,"kappa":1}"#,
                100,
                "method.kappa",
            ),
            // 100 x (1 - 0.5) = 50 steps after the dense phase: 51 thresholds do not fit.
            (
                r#"{"type":"codyra","lambda_num":51}"#,
                100,
                "method.lambda_num",
            ),
            (
                r#"{"type":"increlora","target_rank":0}"#,
                5000,
                "method.target_rank",
            ),
            (
                r#"{"type":"increlora","target_total_rank":0}"#,
                5000,
                "method.target_total_rank",
            ),
            (
                r#"{"type":"increlora","target_rank":2,"lora_r":3}"#,
                5000,
                "method.lora_r",
            ),
            (
                r#"{"type":"increlora","incre_rank_num":0}"#,
                5000,
                "method.incre_rank_num",
            ),
            (
                r#"{"type":"increlora","max_module_rank":4}"#,
                5000,
                "method.max_module_rank",
            ),
            // lora_r 2 + incre_rank_num 3 = 5 > the cap: no module could ever grow.
            (
                r#"{"type":"increlora","target_rank":4,"lora_r":2,"incre_rank_num":3,"max_module_rank":4}"#,
                5000,
                "method.max_module_rank",
            ),
            // The default incre_rank_num, target_rank / 2 = 2: 4 + 2 > 5.
            (
                r#"{"type":"increlora","target_rank":4,"lora_r":4,"max_module_rank":5}"#,
                5000,
                "method.max_module_rank",
            ),
            (
                r#"{"type":"increlora","incre_interval":0}"#,
                5000,
                "method.incre_interval",
            ),
            (r#"{"type":"increlora","top_h":0}"#, 5000, "method.top_h"),
            (r#"{"type":"increlora","beta2":0}"#, 5000, "method.beta2"),
            (
                r#"{"type":"increlora","reg_orth_coef":-1}"#,
                5000,
                "method.reg_orth_coef",
            ),
            (r#"{"type":"increlora","alpha":0}"#, 5000, "method.alpha"),
            (
                r#"{"type":"increlora","init_warmup":90,"incre_interval":10}"#,
                100,
                "method.init_warmup",
            ),
            (r#"{"type":"increlora","top_k":3}"#, 5000, "method.top_k"),
            (
                r#"{"type":"triadaptlora","reference_rank":0}"#,
                100,
                "method.reference_rank",
            ),
            (
                r#"{"type":"triadaptlora","reference_rank":2,"init_rank":4}"#,
                100,
                "method.init_rank",
            ),
            (
                r#"{"type":"triadaptlora","incre_rank_num":0}"#,
                100,
                "method.incre_rank_num",
            ),
            (
                r#"{"type":"triadaptlora","max_module_rank":7}"#,
                100,
                "method.max_module_rank",
            ),
            // init_rank 8 + the default incre_rank_num 4 = 12 > the cap.
            (
                r#"{"type":"triadaptlora","init_rank":8,"max_module_rank":11}"#,
                100,
                "method.max_module_rank",
            ),
            (
                r#"{"type":"triadaptlora","init_rank":2,"incre_rank_num":7,"max_module_rank":8}"#,
                100,
                "method.max_module_rank",
            ),
            (
                r#"{"type":"triadaptlora","target_total_rank":0}"#,
                100,
                "method.target_total_rank",
            ),
            (
                r#"{"type":"triadaptlora","incre_interval":0}"#,
                100,
                "method.incre_interval",
            ),
            (
                r#"{"type":"triadaptlora","orth_reg_weight":-0.5}"#,
                100,
                "method.orth_reg_weight",
            ),
            (
                r#"{"type":"triadaptlora","rank_growth_model":"cubic"}"#,
                100,
                "method.rank_growth_model",
            ),
            (
                r#"{"type":"triadaptlora","init_warmup":99}"#,
                100,
                "method.init_warmup",
            ),
            (r#"{"type":"triadaptlora","top_k":1}"#, 100, "method.top_k"),
        ];
        for (method, steps, field) in cases {
            let err = parse(method, steps).unwrap_err();
            assert_eq!(err.errors[0].field, field, "{method}: {err}");
        }
        // The same schedules fit a longer run.
        assert!(parse(r#"{"type":"adalora","tinit":60,"tfinal":40}"#, 101).is_ok());
        assert!(parse(r#"{"type":"codyra","lambda_num":51}"#, 102).is_ok());
        // A cap of exactly one growth above the start.
        assert!(parse(
            r#"{"type":"increlora","target_rank":4,"lora_r":2,"incre_rank_num":3,"max_module_rank":5}"#,
            5000
        )
        .is_ok());
        assert!(parse(
            r#"{"type":"triadaptlora","init_rank":8,"max_module_rank":12}"#,
            100
        )
        .is_ok());
        assert!(parse(r#"{"type":"codyra","max_kappa":1e-9,"lambda_num":2}"#, 100).is_ok());
        // Step 100 (the 101st) is above init_warmup 90 and a multiple of 10.
        assert!(parse(
            r#"{"type":"increlora","init_warmup":90,"incre_interval":10}"#,
            101
        )
        .is_ok());
    }

    /// `int((T - dense_iters * T) // lambda_num)` as Python computes it.
    #[test]
    fn codyra_lambda_step_is_pythons_floor_division() {
        let config = |dense_iters: f64, lambda_num: u32| crate::method::CodyraConfig {
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
