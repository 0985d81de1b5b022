//! Adapter methods a job can ask for: one module per method, each with its parameters, their
//! defaults and their validation, and one line per method in [`declare_methods!`]'s registry
//! below. The trainer mirrors this in its own `methods/` (one `attach` per method); see
//! docs/methods.md for how to add one.

mod common;

pub mod adalora;
pub mod allora;
pub mod codyra;
pub mod dylora;
pub mod eva;
pub mod ggpo;
pub mod increlora;
pub mod lora;
pub mod lora_ga;
pub mod lora_sb;
pub mod lorapro;
pub mod miss;
pub mod randlora;
pub mod shira;
pub mod sora;
pub mod triadaptlora;

pub use adalora::AdaLoraConfig;
pub use allora::AlloraConfig;
pub use codyra::CodyraConfig;
pub use common::{growth_steps, MAX_RANK};
pub use dylora::DyLoraConfig;
pub use eva::EvaConfig;
pub use ggpo::GgpoConfig;
pub use increlora::IncreLoraConfig;
pub use lora::{LoraConfig, LoraInit};
pub use lora_ga::{LoraGaConfig, LoraGaDirection, LoraGaScale};
pub use lora_sb::LoraSbConfig;
pub use lorapro::LoraProConfig;
pub use miss::{MissConfig, MissInit};
pub use randlora::RandLoraConfig;
pub use shira::{ShiraConfig, ShiraMask};
pub use sora::SoraConfig;
pub use triadaptlora::{RankGrowthModel, TriAdaptLoraConfig};

use crate::error::{from_value, FieldError, SpecError};
use crate::job::TrainingConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a method's parameters (the fields of its `method` object, less `type`) provide.
pub trait MethodParams: Serialize + DeserializeOwned {
    /// The smallest valid parameters: every default, plus what the method requires.
    fn example() -> Self {
        serde_json::from_value(serde_json::json!({}))
            .expect("a method without required fields parses from {}")
    }

    /// The projections the method adapts (`q_proj`, ...).
    fn target_modules(&self) -> &[String];

    /// Every problem with the parameters, including those that need the training plan
    /// (schedules counted in its steps). Field paths are under `method.` (`method.r`).
    fn validate(&self, training: &TrainingConfig) -> Vec<FieldError>;

    /// Whether an adapter trained with `self` can continue training as `other` (the same
    /// factors). No by default: only a method whose whole state is in a published adapter
    /// can continue from one.
    fn same_shape(&self, _other: &Self) -> bool {
        false
    }

    /// The PEFT family the method publishes (`peft_type`, one of
    /// [`crate::peft::PeftConfig::PEFT_TYPES`]): LoRA unless the method has its own format.
    fn peft_type(&self) -> &'static str {
        "LORA"
    }
}

/// The registry: one line per method, `Variant(Config) = "tag"`, with its doc comment. It
/// generates [`MethodConfig`] (tagged by `type`), its dispatch to [`MethodParams`] and the list
/// of known tags, [`MethodConfig::TAGS`].
macro_rules! declare_methods {
    // `$tag:tt`, not `literal`: a `literal` fragment reaches the derives wrapped in an invisible
    // group, which serde reads but utoipa silently ignores (the schema would say `"Lora"`).
    ($($(#[$doc:meta])* $variant:ident($config:ty) = $tag:tt,)+) => {
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type")]
        pub enum MethodConfig {
            $($(#[$doc])* #[serde(rename = $tag)] $variant($config),)+
        }

        impl MethodConfig {
            /// Every method's `type` tag, in the registry's order.
            pub const TAGS: &'static [&'static str] = &[$($tag),+];

            /// The method's `type` tag.
            pub fn name(&self) -> &'static str {
                match self {
                    $(MethodConfig::$variant(_) => $tag,)+
                }
            }

            /// The smallest valid configuration of the method tagged `tag`
            /// ([`MethodParams::example`]).
            pub fn example(tag: &str) -> Option<MethodConfig> {
                match tag {
                    $($tag => Some(MethodConfig::$variant(<$config as MethodParams>::example())),)+
                    _ => None,
                }
            }

            /// Parses `fields` as the parameters of the method tagged `tag`, refusing unknown
            /// keys; `None` for an unknown tag.
            fn check_fields_of(
                tag: &str,
                fields: serde_json::Map<String, serde_json::Value>,
            ) -> Option<Result<(), SpecError>> {
                match tag {
                    $($tag => Some(reject_unknown::<$config>(fields)),)+
                    _ => None,
                }
            }

            pub fn target_modules(&self) -> &[String] {
                match self {
                    $(MethodConfig::$variant(c) => c.target_modules(),)+
                }
            }

            /// Every problem with the method's parameters, against the run's plan, with field
            /// paths under `method.`.
            pub fn validate(&self, training: &TrainingConfig) -> Vec<FieldError> {
                match self {
                    $(MethodConfig::$variant(c) => c.validate(training),)+
                }
            }

            /// The PEFT family the method publishes ([`MethodParams::peft_type`]).
            pub fn peft_type(&self) -> &'static str {
                match self {
                    $(MethodConfig::$variant(c) => c.peft_type(),)+
                }
            }

            /// Whether an adapter of `self`'s method can continue training as `other` (same
            /// method, same factors).
            pub fn same_shape(&self, other: &MethodConfig) -> bool {
                match (self, other) {
                    $((MethodConfig::$variant(p), MethodConfig::$variant(c)) => p.same_shape(c),)+
                    _ => false,
                }
            }
        }
    };
}

declare_methods! {
    /// Plain LoRA (Hu et al.), PEFT semantics.
    Lora(LoraConfig) = "lora",
    /// AdaLoRA (Zhang et al., ICLR 2023): SVD-form triplets pruned to a budget by importance.
    AdaLora(AdaLoraConfig) = "adalora",
    /// SoRA (Ding et al., EMNLP 2023): a gate per rank, driven to exact zeros by a proximal step.
    Sora(SoraConfig) = "sora",
    /// DyLoRA (Valipour et al., EACL 2023): one adapter trained to work truncated to any rank.
    DyLora(DyLoraConfig) = "dylora",
    /// IncreLoRA (Zhang et al., 2023): ranks added during training to the modules that matter most.
    IncreLora(IncreLoraConfig) = "increlora",
    /// TriAdaptLoRA (Liang et al., 2025): `B C A` with a growing block-triangular `C`.
    TriAdaptLora(TriAdaptLoraConfig) = "triadaptlora",
    /// CoDyRA (Lu et al., 2024), one task per job: gated ranks driven to exact zeros by a
    /// proximal step whose threshold rises on a schedule after a dense phase.
    Codyra(CodyraConfig) = "codyra",
    /// LoRA-Pro (Wang et al., ICLR 2025): LoRA whose factor gradients are adjusted toward the
    /// full fine-tuning gradient, with Adam on the equivalent full gradient.
    LoraPro(LoraProConfig) = "lorapro",
    /// ALLoRA (Huang & Balestriero, 2024): LoRA without dropout or scaling, its gradients
    /// scaled per output row by the inverse norm of the update's rows.
    Allora(AlloraConfig) = "allora",
    /// LoRA-GGPO (Chang et al., 2025): LoRA trained under random weight perturbations sized
    /// by the weights' and gradients' row norms.
    Ggpo(GgpoConfig) = "lora_ggpo",
    /// MiSS (Kang & Yin, 2024; Bone's successor): a shard shared by the input's slices, or
    /// Bone's block-affine update; published in PEFT's MiSS format.
    Miss(MissConfig) = "miss",
    /// SHiRA (Bhardwaj et al., NeurIPS 2024): r (in + out) trained entries of each weight at
    /// fixed random positions; published in PEFT's SHiRA format.
    Shira(ShiraConfig) = "shira",
    /// RandLoRA (Albert et al., ICLR 2025): shared frozen random bases reaching full rank, only
    /// their diagonal scalings trained; published in PEFT's RandLoRA format.
    RandLora(RandLoraConfig) = "randlora",
    /// LoRA-GA (Wang et al., NeurIPS 2024): LoRA initialised from the SVD of the full
    /// gradient of the first batches; published as a rank-2r LoRA of the original base.
    LoraGa(LoraGaConfig) = "loraga",
    /// LoRA-SB (Ponkshe et al., 2024): `B R A` with `A`, `B` fixed from the SVD of an
    /// approximated first full fine-tuning step, only the r x r `R` trained.
    LoraSb(LoraSbConfig) = "lorasb",
    /// EVA (Paischer et al., 2024): LoRA with `A` from the SVD of each layer's inputs over the
    /// first batches, ranks redistributed by explained variance; published as LoRA.
    Eva(EvaConfig) = "eva",
}

impl MethodConfig {
    /// Checks a `method` object against its variant's own fields first, so an error
    /// names the field (`method.r`): serde's tagged enums lose the path inside them.
    /// An unknown or missing `type` is left to the tagged parse, which lists [`Self::TAGS`].
    pub fn check_fields(method: &serde_json::Value) -> Result<(), SpecError> {
        let Some(mut fields) = method.as_object().cloned() else {
            return Ok(());
        };
        let Some(kind) = fields.remove("type") else {
            return Ok(());
        };
        match kind.as_str() {
            Some(tag) => Self::check_fields_of(tag, fields).unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// The value each parameter of the method tagged `tag` takes when a job leaves it out
    /// (serde's defaults, read by parsing the example without it); a required parameter has
    /// none. The API document declares these as its schemas' `default`s. `None` for an
    /// unknown tag.
    pub fn defaults(tag: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        let example = serde_json::to_value(Self::example(tag)?).ok()?;
        let fields = example.as_object()?;
        let mut defaults = serde_json::Map::new();
        for name in fields.keys().filter(|k| *k != "type") {
            let mut without = fields.clone();
            without.remove(name);
            let Ok(parsed) = serde_json::from_value::<MethodConfig>(without.into()) else {
                continue; // required
            };
            let parsed = serde_json::to_value(parsed).ok()?;
            if let Some(value) = parsed.get(name) {
                defaults.insert(name.clone(), value.clone());
            }
        }
        Some(defaults)
    }
}

/// Parses a method's fields, then refuses any key the method does not have (a typo
/// such as `alhpa` must not silently fall back to a default).
fn reject_unknown<T: DeserializeOwned + Serialize>(
    fields: serde_json::Map<String, serde_json::Value>,
) -> Result<(), SpecError> {
    let parsed: T = from_value(fields.clone().into(), "method")?;
    let known = serde_json::to_value(&parsed).unwrap_or_default();
    let unknown: Vec<FieldError> = fields
        .keys()
        .filter(|k| known.get(k.as_str()).is_none())
        .map(|k| FieldError::new(format!("method.{k}"), "unknown field"))
        .collect();
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(SpecError {
            errors: unknown,
            malformed: false,
        }),
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
            r#"{"type":"eva"}"#,
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
            (r#"{"type":"loraga","r":0}"#, 100, "method.r"),
            (
                r#"{"type":"loraga","stable_gamma":0}"#,
                100,
                "method.stable_gamma",
            ),
            (r#"{"type":"loraga","batches":0}"#, 100, "method.batches"),
            (
                r#"{"type":"loraga","batch_size":0}"#,
                100,
                "method.batch_size",
            ),
            (r#"{"type":"loraga","iters":8}"#, 100, "method.iters"),
            (r#"{"type":"lorasb","samples":0}"#, 100, "method.samples"),
            (r#"{"type":"lorasb","dropout":1.0}"#, 100, "method.dropout"),
            (r#"{"type":"lorasb","alpha":16}"#, 100, "method.alpha"),
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
            (r#"{"type":"lorapro","r":0}"#, 100, "method.r"),
            (r#"{"type":"lorapro","alpha":0}"#, 100, "method.alpha"),
            (r#"{"type":"lorapro","dropout":1}"#, 100, "method.dropout"),
            (
                r#"{"type":"lorapro","target_modules":["lm_head"]}"#,
                100,
                "method.target_modules[0]",
            ),
            (r#"{"type":"lorapro","beta1":0.9}"#, 100, "method.beta1"),
            (r#"{"type":"allora","r":4,"eta":0}"#, 100, "method.eta"),
            (r#"{"type":"allora","r":0,"eta":1}"#, 100, "method.r"),
            (
                r#"{"type":"allora","r":4,"eta":1,"dropout":0.1}"#,
                100,
                "method.dropout",
            ),
            (r#"{"type":"lora_ggpo","sigma":-1}"#, 100, "method.sigma"),
            (r#"{"type":"lora_ggpo","beta":-0.1}"#, 100, "method.beta"),
            (
                r#"{"type":"lora_ggpo","sigma":0,"beta":0}"#,
                100,
                "method.sigma",
            ),
            (r#"{"type":"eva","rho":0.5}"#, 100, "method.rho"),
            (r#"{"type":"eva","r":4096,"rho":1.5}"#, 100, "method.rho"),
            (r#"{"type":"eva","tau":1.01}"#, 100, "method.tau"),
            (r#"{"type":"eva","tau":-0.1}"#, 100, "method.tau"),
            (r#"{"type":"eva","r":0}"#, 100, "method.r"),
            (r#"{"type":"eva","alpha":0}"#, 100, "method.alpha"),
            (
                r#"{"type":"eva","calibration_batches":0}"#,
                100,
                "method.calibration_batches",
            ),
            (
                r#"{"type":"eva","max_calibration_passes":1}"#,
                100,
                "method.max_calibration_passes",
            ),
            (
                r#"{"type":"eva","label_mask_value":-1}"#,
                100,
                "method.label_mask_value",
            ),
            (r#"{"type":"miss","r":0}"#, 100, "method.r"),
            (r#"{"type":"miss","r":4097}"#, 100, "method.r"),
            (r#"{"type":"miss","dropout":1.0}"#, 100, "method.dropout"),
            (r#"{"type":"miss","dropout":-0.1}"#, 100, "method.dropout"),
            // mini_r is the shard's width with init: mini only (PEFT ignores it otherwise).
            (r#"{"type":"miss","mini_r":4}"#, 100, "method.mini_r"),
            (
                r#"{"type":"miss","init":"bat","mini_r":2}"#,
                100,
                "method.mini_r",
            ),
            (
                r#"{"type":"miss","init":"mini","mini_r":0}"#,
                100,
                "method.mini_r",
            ),
            // Bone's block-affine forward has no input to drop.
            (
                r#"{"type":"miss","init":"bat","dropout":0.1}"#,
                100,
                "method.dropout",
            ),
            (r#"{"type":"miss","init":"bone"}"#, 100, "method.init"),
            (
                r#"{"type":"miss","target_modules":["attn"]}"#,
                100,
                "method.target_modules[0]",
            ),
            (
                r#"{"type":"miss","miss_dropout":0.1}"#,
                100,
                "method.miss_dropout",
            ),
            (r#"{"type":"shira","r":0}"#, 100, "method.r"),
            (r#"{"type":"shira","r":4097}"#, 100, "method.r"),
            (
                r#"{"type":"shira","r":8,"mask_type":"magnitude"}"#,
                100,
                "method.mask_type",
            ),
            (
                r#"{"type":"shira","r":8,"random_seed":-1}"#,
                100,
                "method.random_seed",
            ),
            (
                r#"{"type":"shira","r":8,"target_modules":[]}"#,
                100,
                "method.target_modules",
            ),
            (
                r#"{"type":"shira","r":8,"target_modules":["q_proj","q_proj"]}"#,
                100,
                "method.target_modules[1]",
            ),
            (r#"{"type":"shira","r":8,"mini_r":1}"#, 100, "method.mini_r"),
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
        // No redistribution (rho 1), and a tau every pair of batches meets.
        assert!(parse(r#"{"type":"eva","r":4096,"rho":1,"tau":0}"#, 100).is_ok());
        // MiSS's variants with what each uses; both of bat's rules are reported at once.
        assert!(parse(r#"{"type":"miss","init":"mini","mini_r":4}"#, 100).is_ok());
        assert!(parse(r#"{"type":"miss","init":"bat","r":4}"#, 100).is_ok());
        assert!(parse(r#"{"type":"miss","dropout":0.1}"#, 100).is_ok());
        let err = parse(
            r#"{"type":"miss","init":"bat","dropout":0.1,"mini_r":2}"#,
            100,
        )
        .unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["method.mini_r", "method.dropout"], "{err}");
        assert!(parse(r#"{"type":"shira","r":8,"random_seed":7}"#, 100).is_ok());
        // Step 100 (the 101st) is above init_warmup 90 and a multiple of 10.
        assert!(parse(
            r#"{"type":"increlora","init_warmup":90,"incre_interval":10}"#,
            101
        )
        .is_ok());
    }

    /// The registry's tags are distinct, and each names its variant.
    #[test]
    fn tags_are_unique_and_name_their_methods() {
        let tags = crate::MethodConfig::TAGS;
        let mut sorted = tags.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), tags.len(), "{tags:?}");
        for tag in tags {
            let example = crate::MethodConfig::example(tag).unwrap();
            assert_eq!(example.name(), *tag);
        }
        assert!(crate::MethodConfig::example("bogus").is_none());
    }

    /// The defaults the API document declares are those a job gets by leaving a field out;
    /// a required field (LoRA's `r`) has none.
    #[test]
    fn defaults_are_what_an_absent_field_becomes() {
        let miss = crate::MethodConfig::defaults("miss").unwrap();
        assert_eq!(
            serde_json::Value::Object(miss),
            serde_json::json!({"r": 64, "dropout": 0.0, "init": "balance", "mini_r": 1,
                               "target_modules": ["q_proj", "v_proj"]})
        );
        // PEFT's r of 32, not the example's 8.
        assert_eq!(crate::MethodConfig::defaults("shira").unwrap()["r"], 32);
        let lora = crate::MethodConfig::defaults("lora").unwrap();
        assert!(
            !lora.contains_key("r") && lora.contains_key("alpha"),
            "{lora:?}"
        );
        assert!(crate::MethodConfig::defaults("bogus").is_none());
    }

    /// A method's defaults survive the trip through JSON: `{"type": tag}` (plus LoRA's `r`)
    /// parses to the method's example, which serializes and parses back to itself, and is valid.
    #[test]
    fn defaults_round_trip() {
        for tag in crate::MethodConfig::TAGS {
            let example = crate::MethodConfig::example(tag).unwrap();
            let json = serde_json::to_value(&example).unwrap();
            assert_eq!(json["type"], *tag);
            let back: crate::MethodConfig = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(back, example, "{json}");
            let minimal = match *tag {
                "lora" => r#"{"type":"lora","r":8}"#.to_string(),
                "allora" => r#"{"type":"allora","r":8,"eta":1}"#.to_string(),
                // The example's r (PEFT's default 32 does not fit small layers).
                "shira" => r#"{"type":"shira","r":8}"#.to_string(),
                _ => format!(r#"{{"type":"{tag}"}}"#),
            };
            let spec = parse(&minimal, 5000).unwrap_or_else(|e| panic!("{minimal}: {e}"));
            assert_eq!(spec.method, example);
            assert_eq!(example.same_shape(&example), *tag == "lora", "{tag}");
        }
    }
}
