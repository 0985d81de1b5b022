//! The PEFT `adapter_config.json` we publish, so that `PeftModel.from_pretrained` (and, for
//! LoRA, vLLM and LoRAX) load our adapters as they are.
//!
//! An adapter is one of PEFT's families, [`PeftConfig`], told apart by `peft_type`. Most
//! methods publish a plain LoRA ([`PeftLoraConfig`]); the adapter families PEFT has besides
//! LoRA publish in their own format. Each family is one config struct with the fields PEFT's
//! config needs to load, implementing [`PeftFamily`] (the layout of its tensors, checked by
//! the registry before it publishes), and one line in [`peft_families!`] below.
//!
//! Adding a family `X` (PEFT's `peft_type` `"X"`):
//! 1. here: `peft/x.rs` with `PeftXConfig` (`Serialize`, `Deserialize`, without a `peft_type`
//!    field: the enum writes and reads it) and `impl PeftFamily for PeftXConfig`; `pub mod x;`
//!    below and the line `X(x::PeftXConfig) = "X",` in `peft_families!`;
//! 2. the method that publishes it says so: `MethodParams::peft_type` returns `"X"`;
//! 3. the trainer: `services/trainer/src/families/x.rs`, how its tensors change a layer
//!    (dense `ΔW` per module), and its arm in `families::updates` (the match is exhaustive, so
//!    a family declared here but not there does not compile).

pub mod miss;
pub mod shira;

use crate::methods::{LoraConfig, LoraInit};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod randlora;

/// What every family's config provides besides (de)serialisation.
pub trait PeftFamily {
    /// The projections the adapter adapts (`q_proj`, ...).
    fn target_modules(&self) -> &[String];

    /// Checks that `tensors` (name -> shape, from the safetensors header) is an adapter that
    /// PEFT loads with this config: only this family's keys, for target modules, in the shapes
    /// the config implies. The base model's layer sizes are not known here, so checks that
    /// need them wait for the trainer (merge, evaluation).
    fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String>;
}

/// The registry of families: `Variant(Config) = "PEFT_TYPE",` per family. It generates
/// [`PeftConfig`], which (de)serialises as the config's own fields plus `peft_type`, its
/// dispatch to [`PeftFamily`], and `From<Config> for PeftConfig`.
macro_rules! peft_families {
    ($($(#[$doc:meta])* $variant:ident($config:ty) = $tag:literal,)+) => {
        /// A published adapter's `adapter_config.json`: one of PEFT's families.
        #[derive(Debug, Clone, PartialEq)]
        pub enum PeftConfig {
            $($(#[$doc])* $variant($config),)+
        }

        impl PeftConfig {
            /// Every `peft_type` loraforge reads and writes.
            pub const PEFT_TYPES: &'static [&'static str] = &[$($tag),+];

            /// PEFT's `peft_type` of the adapter.
            pub fn peft_type(&self) -> &'static str {
                match self {
                    $(PeftConfig::$variant(_) => $tag,)+
                }
            }

            fn family(&self) -> &dyn PeftFamily {
                match self {
                    $(PeftConfig::$variant(c) => c,)+
                }
            }

            fn to_fields(&self) -> serde_json::Result<serde_json::Value> {
                match self {
                    $(PeftConfig::$variant(c) => serde_json::to_value(c),)+
                }
            }

            fn from_fields(tag: &str, fields: serde_json::Value) -> Option<serde_json::Result<PeftConfig>> {
                match tag {
                    $($tag => Some(serde_json::from_value(fields).map(PeftConfig::$variant)),)+
                    _ => None,
                }
            }
        }

        $(impl From<$config> for PeftConfig {
            fn from(config: $config) -> PeftConfig {
                PeftConfig::$variant(config)
            }
        })+
    };
}

peft_families! {
    /// LoRA, which every LoRA-like method publishes (PEFT's `LoraConfig`).
    Lora(PeftLoraConfig) = "LORA",
    /// MiSS (PEFT's `MissConfig`), with Bone's block-affine variant.
    Miss(miss::PeftMissConfig) = "MISS",
    /// SHiRA (PEFT's `ShiraConfig`).
    Shira(shira::PeftShiraConfig) = "SHIRA",
    /// RandLoRA's own format (PEFT's `RandLoraConfig`).
    RandLora(randlora::PeftRandLoraConfig) = "RANDLORA",
}

impl PeftConfig {
    /// The LoRA config, for the paths that only LoRA has (continuing from a parent, the
    /// factor forward).
    pub fn as_lora(&self) -> Option<&PeftLoraConfig> {
        match self {
            PeftConfig::Lora(c) => Some(c),
            _ => None,
        }
    }

    pub fn target_modules(&self) -> &[String] {
        self.family().target_modules()
    }

    /// [`PeftFamily::check_tensors`] of the adapter's family.
    pub fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        self.family().check_tensors(tensors)
    }
}

impl Serialize for PeftConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut fields = self.to_fields().map_err(S::Error::custom)?;
        let object = fields
            .as_object_mut()
            .ok_or_else(|| S::Error::custom("a PEFT config serialises as an object"))?;
        object.insert("peft_type".into(), self.peft_type().into());
        fields.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PeftConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let fields = serde_json::Value::deserialize(deserializer)?;
        let tag = fields
            .get("peft_type")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| D::Error::custom("peft_type is missing or not a string"))?
            .to_string();
        match PeftConfig::from_fields(&tag, fields) {
            Some(parsed) => parsed.map_err(|e| D::Error::custom(format!("{tag} config: {e}"))),
            None => Err(D::Error::custom(format!(
                "peft_type {tag:?} is not one loraforge reads ({})",
                PeftConfig::PEFT_TYPES.join(", ")
            ))),
        }
    }
}

/// `base_model.model.<module path>.<name>`: PEFT's key of an adapter tensor.
pub fn peft_key(module_path: &str, name: &str) -> String {
    format!("base_model.model.{module_path}.{name}")
}

/// The module path of a PEFT key that ends in `.<suffix>` (`miss_block`, `lora_A.weight`).
pub fn module_of<'a>(key: &'a str, suffix: &str) -> Option<&'a str> {
    key.strip_prefix("base_model.model.")?
        .strip_suffix(suffix)?
        .strip_suffix('.')
}

/// Whether `module` (a module path) is one of `targets` (leaf names, as PEFT's list matches).
pub fn is_target(targets: &[String], module: &str) -> bool {
    let leaf = module.rsplit('.').next().unwrap_or(module);
    targets.iter().any(|t| t == leaf)
}

/// PEFT's `LoraConfig` fields that matter for loading; PEFT fills in the rest.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: String,
    pub r: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub init_lora_weights: serde_json::Value,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks where they differ from `r` (adaptive-rank methods).
    pub rank_pattern: BTreeMap<String, u32>,
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl PeftLoraConfig {
    pub fn from_lora(c: &LoraConfig, base_model: &str) -> Self {
        let mut modules = c.target_modules.clone();
        modules.sort();
        PeftLoraConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: base_model.into(),
            r: c.r,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: modules,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: match c.init {
                LoraInit::Kaiming => serde_json::Value::Bool(true),
                LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
            },
            use_rslora: c.use_rslora,
            use_dora: false,
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// PEFT's key for a LoRA factor: `base_model.model.<module path>.lora_A.weight`.
pub fn lora_key(module_path: &str, factor: char) -> String {
    format!("base_model.model.{module_path}.lora_{factor}.weight")
}

/// The largest safetensors header we read (a LoRA's is a few KiB; this bounds a bad file).
pub const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// Name -> shape of every tensor, from a safetensors header: the JSON that follows the
/// file's first 8 bytes (its little-endian length).
pub fn safetensors_shapes(header: &[u8]) -> Result<BTreeMap<String, Vec<u64>>, String> {
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("safetensors header: {e}"))?;
    let mut shapes = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| serde_json::from_value::<Vec<u64>>(s.clone()).ok())
            .ok_or_else(|| format!("safetensors: tensor {name} has no shape"))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

impl PeftFamily for PeftLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    /// Only `lora_A`/`lora_B` keys of target modules, in pairs, with this config's ranks.
    fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        PeftLoraConfig::check_tensors(self, tensors)
    }
}

impl PeftLoraConfig {
    /// The rank PEFT gives a module: `rank_pattern` keys match module paths as suffixes on
    /// a dot boundary; anything unmatched has `r`.
    pub fn rank_of(&self, module_path: &str) -> u32 {
        self.rank_pattern
            .iter()
            .find(|(k, _)| module_path == k.as_str() || module_path.ends_with(&format!(".{k}")))
            .map_or(self.r, |(_, r)| *r)
    }

    /// Checks that `tensors` (name -> shape) is a LoRA that PEFT loads with this config:
    /// only `lora_A`/`lora_B` keys of target modules, in pairs, with this config's ranks.
    pub fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        if tensors.is_empty() {
            return Err("the adapter holds no tensors".into());
        }
        for (name, shape) in tensors {
            let module = name
                .strip_prefix("base_model.model.")
                .and_then(|n| {
                    n.strip_suffix(".lora_A.weight")
                        .or_else(|| n.strip_suffix(".lora_B.weight"))
                })
                .ok_or_else(|| format!("{name} is not a PEFT LoRA key"))?;
            let leaf = module.rsplit('.').next().unwrap_or(module);
            if !self.target_modules.iter().any(|t| t == leaf) {
                return Err(format!("{name}: {leaf} is not among target_modules"));
            }
            let a = tensors.get(&lora_key(module, 'A'));
            let b = tensors.get(&lora_key(module, 'B'));
            let (Some(a), Some(b)) = (a, b) else {
                return Err(format!("{module}: lora_A and lora_B must come in pairs"));
            };
            let rank = self.rank_of(module);
            if a.len() != 2
                || b.len() != 2
                || a[0] != rank as u64
                || b[1] != rank as u64
                || shape.len() != 2
            {
                return Err(format!(
                    "{module}: lora_A {a:?} / lora_B {b:?} do not match rank {rank}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tensor_tests {
    use super::*;

    fn config() -> PeftLoraConfig {
        let mut c = PeftLoraConfig::from_lora(
            &serde_json::from_str(r#"{"r": 4, "target_modules": ["q_proj"]}"#).unwrap(),
            "m",
        );
        c.rank_pattern.insert("layers.1.self_attn.q_proj".into(), 2);
        c
    }

    fn pair(module: &str, r: u64) -> [(String, Vec<u64>); 2] {
        [
            (lora_key(module, 'A'), vec![r, 8]),
            (lora_key(module, 'B'), vec![8, r]),
        ]
    }

    #[test]
    fn ranks_follow_the_pattern_and_pairs_are_required() {
        let c = config();
        let mut t: BTreeMap<String, Vec<u64>> = pair("model.layers.0.self_attn.q_proj", 4)
            .into_iter()
            .chain(pair("model.layers.1.self_attn.q_proj", 2))
            .collect();
        assert_eq!(c.check_tensors(&t), Ok(()));
        t.remove(&lora_key("model.layers.1.self_attn.q_proj", 'B'));
        assert!(c.check_tensors(&t).unwrap_err().contains("pairs"));
        let wrong_rank: BTreeMap<_, _> = pair("model.layers.1.self_attn.q_proj", 4)
            .into_iter()
            .collect();
        assert!(c.check_tensors(&wrong_rank).unwrap_err().contains("rank 2"));
        let foreign: BTreeMap<_, _> = pair("model.layers.0.mlp.up_proj", 4).into_iter().collect();
        assert!(c
            .check_tensors(&foreign)
            .unwrap_err()
            .contains("target_modules"));
        assert!(c.check_tensors(&BTreeMap::new()).is_err());
    }

    #[test]
    fn configs_round_trip_with_their_peft_type() {
        let lora = PeftConfig::from(config());
        let json = serde_json::to_value(&lora).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["r"], 4);
        assert_eq!(serde_json::from_value::<PeftConfig>(json).unwrap(), lora);
        let mut other = serde_json::to_value(&lora).unwrap();
        other["peft_type"] = "VERA".into();
        let err = serde_json::from_value::<PeftConfig>(other).unwrap_err();
        assert!(err.to_string().contains("\"VERA\" is not one"), "{err}");
        let mut broken = serde_json::to_value(&lora).unwrap();
        broken.as_object_mut().unwrap().remove("r");
        let err = serde_json::from_value::<PeftConfig>(broken).unwrap_err();
        assert!(err.to_string().contains("LORA config"), "{err}");
        assert_eq!(
            module_of(
                "base_model.model.model.layers.0.mlp.up_proj.miss_block",
                "miss_block"
            ),
            Some("model.layers.0.mlp.up_proj")
        );
        assert_eq!(
            module_of("base_model.model.x.lora_A.weight", "miss_block"),
            None
        );
    }

    #[test]
    fn header_shapes_skip_metadata() {
        let h = br#"{"__metadata__": {"format": "pt"}, "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}"#;
        assert_eq!(safetensors_shapes(h).unwrap()["x"], vec![2, 3]);
        assert!(safetensors_shapes(br#"{"x": {"dtype": "F32"}}"#).is_err());
    }
}
