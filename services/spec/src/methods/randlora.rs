//! RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
//! models", ICLR 2025): shared frozen random bases, only diagonal scalings trained, published in
//! PEFT's RandLoRA format; see docs/methods.md.

use super::common::{check_alpha_dropout, check_rank, check_target_modules, default_targets};
use super::MethodParams;
use crate::error::FieldError;
use crate::job::TrainingConfig;
use serde::{Deserialize, Serialize};

/// RandLoRA with PEFT's defaults (`peft.RandLoraConfig`, peft 0.21): `r` 32, `alpha` 640
/// (PEFT's `randlora_alpha`), `dropout` 0 (`randlora_dropout`), dense bases from key 0, the
/// bases saved in the adapter.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandLoraConfig {
    /// The rank of each random basis. A layer gets `ceil(min(in, out) / r)` bases, so together
    /// they reach full rank: a smaller `r` means more bases and more trained scalings.
    #[serde(default = "default_r")]
    pub r: u32,
    /// The branch is scaled by `alpha / r` (PEFT's `randlora_alpha`; its docs advise 20 r).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the branch's input (PEFT's `randlora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// Ternary bases (-1, 0, 1 with probabilities 1/6, 2/3, 1/6) instead of dense ones.
    #[serde(default)]
    pub sparse: bool,
    /// Ternary bases, each sign with probability `1 / (2 sqrt(D))` (PEFT's code), `D` the
    /// smaller of the largest adapted input and output widths.
    #[serde(default)]
    pub very_sparse: bool,
    /// The seed the shared random bases are drawn from (torch's CPU generator, as PEFT).
    #[serde(default)]
    pub projection_prng_key: u64,
    /// Publish the bases in the adapter (PEFT's default). `false` is refused: PEFT would redraw
    /// them from `projection_prng_key` when loading (in fp16 on machines without bf16, so other
    /// bases), and loraforge's merge and evaluation, which see one layer's weight at a time,
    /// read them from the adapter.
    #[serde(default = "super::common::yes")]
    pub save_projection: bool,
}

fn default_r() -> u32 {
    32
}

fn default_alpha() -> f64 {
    640.0
}

impl MethodParams for RandLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    /// Published in PEFT's own RandLoRA format (`crate::peft::randlora`).
    fn peft_type(&self) -> &'static str {
        "RANDLORA"
    }

    fn validate(&self, _training: &TrainingConfig) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_rank("r", self.r, &mut errors);
        check_alpha_dropout(self.alpha, self.dropout, &mut errors);
        check_target_modules(&self.target_modules, &mut errors);
        // PEFT silently takes very_sparse when both are set; a job asking for both asks for
        // something it will not get.
        if self.sparse && self.very_sparse {
            errors.push(FieldError::new(
                "method.very_sparse",
                "sparse and very_sparse are two kinds of bases: set at most one",
            ));
        }
        if !self.save_projection {
            errors.push(FieldError::new(
                "method.save_projection",
                "must be true: the bases are published in the adapter, where loraforge's merge and \
                 evaluation read them (PEFT would redraw them from projection_prng_key, in fp16 on \
                 machines without bf16)",
            ));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use crate::JobSpec;

    fn parse(method: &str) -> Result<JobSpec, crate::SpecError> {
        JobSpec::parse(
            format!(
                r#"{{"adapter_name":"demo","base_model":"file:///m","dataset":{{"train":"file:///d.jsonl"}},
                   "method":{method},"training":{{"max_steps":100,"learning_rate":0.001}}}}"#
            )
            .as_bytes(),
        )
    }

    #[test]
    fn defaults_are_pefts() {
        let spec = parse(r#"{"type":"randlora"}"#).unwrap();
        let crate::MethodConfig::RandLora(c) = spec.method else {
            panic!("not randlora: {:?}", spec.method)
        };
        assert_eq!((c.r, c.alpha, c.dropout), (32, 640.0, 0.0));
        assert_eq!(c.target_modules, ["q_proj", "v_proj"]);
        assert_eq!((c.sparse, c.very_sparse), (false, false));
        assert_eq!((c.projection_prng_key, c.save_projection), (0, true));
    }

    #[test]
    fn errors_name_the_field() {
        for (method, field) in [
            (r#"{"type":"randlora","r":0}"#, "method.r"),
            (r#"{"type":"randlora","alpha":0}"#, "method.alpha"),
            (r#"{"type":"randlora","dropout":1.0}"#, "method.dropout"),
            (
                r#"{"type":"randlora","sparse":true,"very_sparse":true}"#,
                "method.very_sparse",
            ),
            (
                r#"{"type":"randlora","target_modules":["lm_head"]}"#,
                "method.target_modules[0]",
            ),
            (
                r#"{"type":"randlora","randlora_alpha":2}"#,
                "method.randlora_alpha",
            ),
            (
                r#"{"type":"randlora","projection_prng_key":-1}"#,
                "method.projection_prng_key",
            ),
        ] {
            let err = parse(method).expect_err(method);
            assert!(
                err.errors.iter().any(|e| e.field == field),
                "{method}: {err:?}"
            );
        }
        for method in [
            r#"{"type":"randlora","sparse":true}"#,
            r#"{"type":"randlora","very_sparse":true,"r":8,"alpha":160,"save_projection":true}"#,
            r#"{"type":"randlora","projection_prng_key":18446744073709551615}"#,
        ] {
            parse(method).unwrap_or_else(|e| panic!("{method}: {e:?}"));
        }
    }
}
