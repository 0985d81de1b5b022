//! Adapter methods a job can ask for. Each variant's parameters validate themselves;
//! the trainer has one implementation per variant.

use crate::error::{from_value, FieldError, SpecError};
use crate::model::LLAMA_TARGET_MODULES;
use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MethodConfig {
    /// Plain LoRA (Hu et al.), PEFT semantics.
    Lora(LoraConfig),
}

impl MethodConfig {
    /// Checks a `method` object against its variant's own fields first, so an error
    /// names the field (`method.r`): serde's tagged enums lose the path inside them.
    pub fn check_fields(method: &serde_json::Value) -> Result<(), SpecError> {
        let Some(mut fields) = method.as_object().cloned() else { return Ok(()) };
        let Some(kind) = fields.remove("type") else { return Ok(()) };
        match kind.as_str() {
            Some("lora") => reject_unknown::<LoraConfig>(fields),
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
        }
    }

    pub fn target_modules(&self) -> &[String] {
        match self {
            MethodConfig::Lora(c) => &c.target_modules,
        }
    }

    /// Appends every problem found to `errors`, with field paths under `method.`.
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        match self {
            MethodConfig::Lora(c) => c.validate("method", errors),
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
            errors.push(FieldError::new(format!("{prefix}.r"), format!("must be between 1 and {MAX_RANK}, got {}", self.r)));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            errors.push(FieldError::new(format!("{prefix}.alpha"), "must be a positive number"));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            errors.push(FieldError::new(format!("{prefix}.dropout"), "must be in [0, 1)"));
        }
        check_target_modules(&format!("{prefix}.target_modules"), &self.target_modules, errors);
    }
}

/// Parses a method's fields, then refuses any key the method does not have (a typo
/// such as `alhpa` must not silently fall back to a default).
fn reject_unknown<T: serde::de::DeserializeOwned + Serialize>(fields: serde_json::Map<String, serde_json::Value>) -> Result<(), SpecError> {
    let parsed: T = from_value(fields.clone().into(), "method")?;
    let known = serde_json::to_value(&parsed).unwrap_or_default();
    let mut unknown: Vec<FieldError> = fields
        .keys()
        .filter(|k| known.get(k.as_str()).is_none())
        .map(|k| FieldError::new(format!("method.{k}"), "unknown field"))
        .collect();
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(SpecError { errors: std::mem::take(&mut unknown), malformed: false }),
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
                format!("unknown module {m:?}; Llama-family models have {}", LLAMA_TARGET_MODULES.join(", ")),
            ));
        } else if modules[..i].contains(m) {
            errors.push(FieldError::new(format!("{field}[{i}]"), format!("{m:?} is listed twice")));
        }
    }
}
