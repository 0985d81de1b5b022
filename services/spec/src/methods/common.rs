//! What several methods' parameters share: defaults, and the checks of fields that mean the
//! same in each (alpha and dropout, EMA betas, target modules, the rank fields of the methods
//! whose ranks grow). Every field path is under `method.`.

use crate::error::FieldError;
use crate::model::LLAMA_TARGET_MODULES;

/// The largest rank any method accepts.
pub const MAX_RANK: u32 = 4096;

/// PEFT's default for Llama: the attention's query and value projections.
pub fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

pub fn one() -> u32 {
    1
}

pub fn yes() -> bool {
    true
}

/// `method.{field}`: must be between 1 and [`MAX_RANK`].
pub fn check_rank(field: &str, r: u32, errors: &mut Vec<FieldError>) {
    if r == 0 || r > MAX_RANK {
        errors.push(FieldError::new(
            format!("method.{field}"),
            format!("must be between 1 and {MAX_RANK}, got {r}"),
        ));
    }
}

/// `method.{field}`: a finite number of at least 0.
pub fn check_non_negative(field: &str, value: f64, errors: &mut Vec<FieldError>) {
    if !(value.is_finite() && value >= 0.0) {
        errors.push(FieldError::new(
            format!("method.{field}"),
            "must be a non-negative number",
        ));
    }
}

/// `method.dropout` in [0, 1).
pub fn check_dropout(dropout: f64, errors: &mut Vec<FieldError>) {
    if !(dropout.is_finite() && (0.0..1.0).contains(&dropout)) {
        errors.push(FieldError::new("method.dropout", "must be in [0, 1)"));
    }
}

/// `method.alpha` positive, `method.dropout` in [0, 1).
pub fn check_alpha_dropout(alpha: f64, dropout: f64, errors: &mut Vec<FieldError>) {
    if !(alpha.is_finite() && alpha > 0.0) {
        errors.push(FieldError::new("method.alpha", "must be a positive number"));
    }
    check_dropout(dropout, errors);
}

/// EMA coefficients in (0, 1), as the references assert.
pub fn check_betas(beta1: f64, beta2: f64, errors: &mut Vec<FieldError>) {
    for (field, beta) in [("beta1", beta1), ("beta2", beta2)] {
        if !(beta > 0.0 && beta < 1.0) {
            errors.push(FieldError::new(
                format!("method.{field}"),
                "must be in (0, 1)",
            ));
        }
    }
}

/// `method.target_modules`: non-empty, distinct, and naming projections the model has.
pub fn check_target_modules(modules: &[String], errors: &mut Vec<FieldError>) {
    let field = "method.target_modules";
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

/// How many steps of a `max_steps` run (counted from 0) add ranks, for the methods whose ranks
/// grow: those above `init_warmup` that are multiples of `incre_interval`.
pub fn growth_steps(init_warmup: u32, incre_interval: u32, max_steps: u32) -> u32 {
    let interval = incre_interval.max(1);
    let first = (init_warmup / interval + 1) * interval;
    match first < max_steps {
        true => (max_steps - 1 - first) / interval + 1,
        false => 0,
    }
}

/// A growing method's schedule must add ranks at least once in the run (`method.init_warmup`).
pub fn check_growth_schedule(
    init_warmup: u32,
    incre_interval: u32,
    max_steps: u32,
    errors: &mut Vec<FieldError>,
) {
    if growth_steps(init_warmup, incre_interval, max_steps) == 0 {
        errors.push(FieldError::new(
            "method.init_warmup",
            format!(
                "no step of the run adds ranks: ranks are added at steps (counted from 0) above \
                 init_warmup ({init_warmup}) that are multiples of incre_interval ({incre_interval}), \
                 and the run has training.max_steps = {max_steps}"
            ),
        ));
    }
}

/// The rank fields IncreLoRA and TriAdaptLoRA share: a target rank per module, the rank every
/// module starts at, an optional total budget, the ranks added per growth and the per-module cap.
pub struct GrowthRanks {
    pub target_field: &'static str,
    pub target: u32,
    pub initial_field: &'static str,
    pub initial: u32,
    pub target_total_rank: Option<u32>,
    pub incre_rank_num: Option<u32>,
    pub rank_step: u32,
    pub cap: u32,
}

impl GrowthRanks {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        let (target_field, target) = (self.target_field, self.target);
        check_rank(target_field, target, errors);
        if self.target_total_rank == Some(0) {
            errors.push(FieldError::new(
                "method.target_total_rank",
                "must be at least 1",
            ));
        }
        let (initial_field, initial) = (self.initial_field, self.initial);
        if initial == 0 || initial > target {
            errors.push(FieldError::new(
                format!("method.{initial_field}"),
                format!("must be between 1 and {target_field} ({target}), got {initial}"),
            ));
        }
        if let Some(n) = self.incre_rank_num {
            check_rank("incre_rank_num", n, errors);
        }
        let (cap, step) = (self.cap, self.rank_step);
        let field = "method.max_module_rank";
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
