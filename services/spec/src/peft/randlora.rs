//! PEFT's RandLoRA adapter config (`peft_type` `RANDLORA`; `tuners/randlora/config.py`,
//! `RandLoraConfig`) and the layout of its tensors, as PEFT's `save_pretrained` writes them: per
//! adapted module `randlora_lambda (r, n)` and `randlora_gamma (n, d)` (`d = min(in, out)`,
//! `n = ceil(d / r)`), and with `save_projection` the shared bases `randlora_A (r, 1, D_min)` and
//! `randlora_B (D_max, N, r)`, once per module and once at `base_model.randlora_A`/`_B`.

use super::{is_target, module_of, PeftFamily};
use crate::methods::RandLoraConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const LAMBDA: &str = "randlora_lambda";
pub const GAMMA: &str = "randlora_gamma";
pub const BASIS_A: &str = "randlora_A";
pub const BASIS_B: &str = "randlora_B";

/// The model-level key of a shared basis (`base_model.randlora_A`).
pub fn shared_key(basis: &str) -> String {
    format!("base_model.{basis}")
}

/// PEFT's `RandLoraConfig` fields that matter for loading; PEFT fills in the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftRandLoraConfig {
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: u32,
    pub randlora_alpha: f64,
    #[serde(default)]
    pub randlora_dropout: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub projection_prng_key: u64,
    pub save_projection: bool,
    #[serde(default)]
    pub sparse: bool,
    #[serde(default)]
    pub very_sparse: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_weights: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn none() -> String {
    "none".into()
}

fn yes() -> bool {
    true
}

impl PeftRandLoraConfig {
    /// The config of an adapter trained with `c`.
    pub fn new(c: &RandLoraConfig, base_model: &str) -> PeftRandLoraConfig {
        let mut targets = c.target_modules.clone();
        targets.sort();
        PeftRandLoraConfig {
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            r: c.r,
            randlora_alpha: c.alpha,
            randlora_dropout: c.dropout,
            target_modules: targets,
            projection_prng_key: c.projection_prng_key,
            save_projection: c.save_projection,
            sparse: c.sparse,
            very_sparse: c.very_sparse,
            bias: none(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_weights: true,
            modules_to_save: None,
        }
    }
}

impl PeftFamily for PeftRandLoraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        if self.bias != "none" {
            return Err(format!("bias {:?}: only \"none\" is read", self.bias));
        }
        if self.fan_in_fan_out {
            return Err("fan_in_fan_out: Llama-family linears are (out, in)".into());
        }
        let r = u64::from(self.r);
        let (a, b) = (
            tensors.get(&shared_key(BASIS_A)),
            tensors.get(&shared_key(BASIS_B)),
        );
        match (a, b, self.save_projection) {
            (Some(a), Some(b), true) => {
                let n_all = b.get(1).copied().unwrap_or(0);
                if a.len() != 3 || a[0] != r || a[1] != 1 || b.len() != 3 || b[2] != r || n_all == 0
                {
                    return Err(format!(
                        "the bases randlora_A {a:?} / randlora_B {b:?} are not of rank {r}"
                    ));
                }
            }
            (None, None, false) => {}
            (_, _, true) => {
                return Err("save_projection: the shared bases must be in the adapter".into())
            }
            (_, _, false) => {
                return Err("the adapter holds bases but save_projection is false".into())
            }
        }
        let mut modules: BTreeMap<&str, BTreeMap<&str, &Vec<u64>>> = BTreeMap::new();
        for (name, shape) in tensors {
            if name == &shared_key(BASIS_A) || name == &shared_key(BASIS_B) {
                continue;
            }
            let (module, kind) = [LAMBDA, GAMMA, BASIS_A, BASIS_B]
                .into_iter()
                .find_map(|kind| module_of(name, kind).map(|m| (m, kind)))
                .ok_or_else(|| format!("{name} is not a PEFT RandLoRA key"))?;
            if !is_target(&self.target_modules, module) {
                return Err(format!("{name}: the module is not among target_modules"));
            }
            let shared = match kind {
                BASIS_A => a,
                BASIS_B => b,
                _ => None,
            };
            if matches!(kind, BASIS_A | BASIS_B) && shared != Some(shape) {
                return Err(format!("{name} {shape:?} is not the shared basis"));
            }
            modules.entry(module).or_default().insert(kind, shape);
        }
        if modules.is_empty() {
            return Err("the adapter adapts no module".into());
        }
        for (module, parts) in modules {
            let (Some(lambda), Some(gamma)) = (parts.get(LAMBDA), parts.get(GAMMA)) else {
                return Err(format!(
                    "{module}: randlora_lambda and randlora_gamma come in pairs"
                ));
            };
            if self.save_projection && parts.len() != 4 {
                return Err(format!(
                    "{module}: save_projection: its copies of the bases are missing"
                ));
            }
            // λ (r, n), γ (n, d) with n = ceil(d / r): enough bases for full rank.
            let fits = lambda.len() == 2
                && gamma.len() == 2
                && lambda[0] == r
                && lambda[1] == gamma[0]
                && gamma[0] == gamma[1].div_ceil(r.max(1));
            if !fits {
                return Err(format!(
                    "{module}: randlora_lambda {lambda:?} / randlora_gamma {gamma:?} do not fit r {r}"
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

    /// The layout of the fixture's q_proj (64 -> 64) and v_proj (64 -> 32) at r 8.
    fn layout() -> BTreeMap<String, Vec<u64>> {
        let (a, b) = (vec![8, 1, 64], vec![64, 8, 8]);
        let mut t = BTreeMap::from([
            (shared_key(BASIS_A), a.clone()),
            (shared_key(BASIS_B), b.clone()),
        ]);
        for (m, d) in [
            ("model.layers.0.self_attn.q_proj", 64),
            ("model.layers.0.self_attn.v_proj", 32),
        ] {
            let n = d / 8;
            t.insert(peft_key(m, LAMBDA), vec![8, n]);
            t.insert(peft_key(m, GAMMA), vec![n, d]);
            t.insert(peft_key(m, BASIS_A), a.clone());
            t.insert(peft_key(m, BASIS_B), b.clone());
        }
        t
    }

    /// adapter_config.json as PEFT 0.21.2 saves `RandLoraConfig(r=8, target_modules=[...])`.
    const PEFTS: &str = r#"{"auto_mapping": {"base_model_class": "LlamaForCausalLM"},
        "base_model_name_or_path": null, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "init_weights": true, "layers_pattern": null, "layers_to_transform": null, "modules_to_save": null,
        "peft_type": "RANDLORA", "peft_version": "0.21.2", "projection_prng_key": 0, "r": 8,
        "randlora_alpha": 640, "randlora_dropout": 0.0, "revision": null, "save_projection": true,
        "sparse": false, "target_modules": ["q_proj", "v_proj"], "task_type": null, "very_sparse": false}"#;

    #[test]
    fn reads_what_peft_writes_and_checks_its_layout() {
        let config: PeftConfig = serde_json::from_str(PEFTS).unwrap();
        assert_eq!(config.peft_type(), "RANDLORA");
        assert_eq!(config.check_tensors(&layout()), Ok(()));
        let back: PeftConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(back, config);

        let q = "model.layers.0.self_attn.q_proj";
        let mut t = layout();
        t.remove(&peft_key(q, GAMMA));
        assert!(config.check_tensors(&t).unwrap_err().contains("pairs"));
        let mut t = layout();
        t.insert(peft_key(q, LAMBDA), vec![8, 4]);
        assert!(config.check_tensors(&t).unwrap_err().contains("do not fit"));
        let mut t = layout();
        t.remove(&shared_key(BASIS_B));
        assert!(config.check_tensors(&t).is_err());
        let mut t = layout();
        t.insert(peft_key("model.layers.0.mlp.up_proj", LAMBDA), vec![8, 8]);
        assert!(config
            .check_tensors(&t)
            .unwrap_err()
            .contains("target_modules"));
        let mut t = layout();
        t.insert(peft_key(q, BASIS_A), vec![8, 1, 32]);
        assert!(config
            .check_tensors(&t)
            .unwrap_err()
            .contains("shared basis"));
    }
}
