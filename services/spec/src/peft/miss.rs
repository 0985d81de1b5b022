//! PEFT's MiSS adapter config (`peft_type` `MISS`; `tuners/miss/config.py`, `MissConfig`) and
//! the layout of its tensors: one `base_model.model.<module>.miss_block` per adapted module,
//! shaped by the variant (`init_weights`): `(r, out)` for the default ("balance", `true`),
//! `(out / r, r, r)` for `"bat"`, `(r, mini_r)` for `"mini"`.

use super::{is_target, module_of, PeftFamily};
use crate::methods::MissInit;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The tensor name of a module's MiSS block.
pub const MISS_BLOCK: &str = "miss_block";

/// PEFT's `MissConfig` fields that matter for loading; PEFT fills in the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftMissConfig {
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: u32,
    #[serde(default)]
    pub miss_dropout: f64,
    #[serde(default = "one")]
    pub mini_r: u32,
    pub target_modules: Vec<String>,
    /// `true` (balance), `"bat"` or `"mini"`; PEFT's `false` (a random block, for its tests)
    /// runs as balance.
    pub init_weights: serde_json::Value,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn one() -> u32 {
    1
}

fn none() -> String {
    "none".into()
}

impl PeftMissConfig {
    /// The config of an adapter trained with `init`.
    pub fn new(
        r: u32,
        dropout: f64,
        init: MissInit,
        mini_r: u32,
        target_modules: &[String],
        base_model: &str,
    ) -> PeftMissConfig {
        let mut targets = target_modules.to_vec();
        targets.sort();
        PeftMissConfig {
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            r,
            miss_dropout: dropout,
            mini_r,
            target_modules: targets,
            init_weights: match init {
                MissInit::Balance => serde_json::Value::Bool(true),
                MissInit::Bat => "bat".into(),
                MissInit::Mini => "mini".into(),
            },
            bias: none(),
            inference_mode: true,
            modules_to_save: None,
        }
    }

    /// The variant `init_weights` names.
    pub fn variant(&self) -> Result<MissInit, String> {
        match &self.init_weights {
            serde_json::Value::Bool(_) => Ok(MissInit::Balance),
            serde_json::Value::String(s) if s == "bat" => Ok(MissInit::Bat),
            serde_json::Value::String(s) if s == "mini" => Ok(MissInit::Mini),
            other => Err(format!(
                "init_weights {other} is not a MiSS variant (true, \"bat\", \"mini\")"
            )),
        }
    }
}

impl PeftFamily for PeftMissConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        if tensors.is_empty() {
            return Err("the adapter holds no tensors".into());
        }
        if self.bias != "none" {
            return Err(format!("bias {:?}: only \"none\" is read", self.bias));
        }
        let variant = self.variant()?;
        let (r, mini_r) = (u64::from(self.r), u64::from(self.mini_r));
        for (name, shape) in tensors {
            let module = module_of(name, MISS_BLOCK)
                .ok_or_else(|| format!("{name} is not a PEFT MiSS key"))?;
            if !is_target(&self.target_modules, module) {
                return Err(format!("{name}: the module is not among target_modules"));
            }
            let fits = match variant {
                MissInit::Balance => shape.len() == 2 && shape[0] == r && shape[1] > 0,
                MissInit::Bat => shape.len() == 3 && shape[0] > 0 && shape[1] == r && shape[2] == r,
                MissInit::Mini => shape == &[r, mini_r],
            };
            if !fits {
                return Err(format!(
                    "{name} {shape:?} is not a {variant:?} block of r {r} (mini_r {mini_r})"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{peft_key, PeftConfig};

    fn config(init: MissInit) -> PeftMissConfig {
        PeftMissConfig::new(4, 0.0, init, 2, &["v_proj".into(), "q_proj".into()], "m")
    }

    #[test]
    fn blocks_are_shaped_by_the_variant() {
        let q = peft_key("model.layers.0.self_attn.q_proj", MISS_BLOCK);
        let check = |init, shape: Vec<u64>| {
            config(init).check_tensors(&BTreeMap::from([(q.clone(), shape)]))
        };
        assert_eq!(check(MissInit::Balance, vec![4, 64]), Ok(()));
        assert_eq!(check(MissInit::Bat, vec![16, 4, 4]), Ok(()));
        assert_eq!(check(MissInit::Mini, vec![4, 2]), Ok(()));
        assert!(check(MissInit::Balance, vec![8, 64]).is_err());
        assert!(check(MissInit::Bat, vec![4, 64]).is_err());
        assert!(check(MissInit::Mini, vec![4, 64]).is_err());
        let up = peft_key("model.layers.0.mlp.up_proj", MISS_BLOCK);
        let foreign = BTreeMap::from([(up, vec![4, 64])]);
        assert!(config(MissInit::Balance)
            .check_tensors(&foreign)
            .unwrap_err()
            .contains("target_modules"));
        let lora = BTreeMap::from([(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            vec![4, 64],
        )]);
        assert!(config(MissInit::Balance).check_tensors(&lora).is_err());
    }

    #[test]
    fn reads_what_peft_writes() {
        // adapter_config.json as PEFT 0.21.2 saves a MissConfig(r=4, init_weights="bat").
        let json = r#"{"auto_mapping": {"base_model_class": "LlamaForCausalLM"}, "base_model_name_or_path": null,
            "bias": "none", "exclude_modules": null, "inference_mode": true, "init_weights": "bat",
            "layers_pattern": null, "layers_to_transform": null, "mini_r": 1, "miss_dropout": 0.0,
            "modules_to_save": null, "peft_type": "MISS", "peft_version": "0.21.2", "r": 4, "revision": null,
            "target_modules": ["v_proj", "q_proj"], "task_type": null}"#;
        let PeftConfig::Miss(c) = serde_json::from_str::<PeftConfig>(json).unwrap() else {
            panic!("not MISS")
        };
        assert_eq!((c.r, c.variant()), (4, Ok(MissInit::Bat)));
        let ours = PeftConfig::from(config(MissInit::Mini));
        let back: PeftConfig =
            serde_json::from_value(serde_json::to_value(&ours).unwrap()).unwrap();
        assert_eq!(back, ours);
    }
}
