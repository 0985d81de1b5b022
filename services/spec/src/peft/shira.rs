//! PEFT's SHiRA adapter config (`peft_type` `SHIRA`; `tuners/shira/config.py`, `ShiraConfig`)
//! and the layout of its tensors: per adapted module, the trained values
//! `base_model.model.<module>.shira_weight (K,)` and where they go in the weight,
//! `base_model.model.<module>.shira_indices (2, K)` (row, column; int32), with
//! `K = r · (in + out)`.

use super::{is_target, module_of, PeftFamily};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The tensor names of a module's SHiRA values and their positions.
pub const SHIRA_WEIGHT: &str = "shira_weight";
pub const SHIRA_INDICES: &str = "shira_indices";

/// PEFT's `ShiraConfig` fields that matter for loading; PEFT fills in the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftShiraConfig {
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: u32,
    /// How the positions were chosen (the positions themselves are in the file, so loading
    /// does not depend on it): PEFT's `"random"`.
    #[serde(default = "random")]
    pub mask_type: String,
    #[serde(default)]
    pub random_seed: Option<u64>,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "yes")]
    pub init_weights: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn random() -> String {
    "random".into()
}

fn yes() -> bool {
    true
}

impl PeftShiraConfig {
    pub fn new(
        r: u32,
        mask_type: &str,
        random_seed: Option<u64>,
        target_modules: &[String],
        base_model: &str,
    ) -> PeftShiraConfig {
        let mut targets = target_modules.to_vec();
        targets.sort();
        PeftShiraConfig {
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            r,
            mask_type: mask_type.into(),
            random_seed,
            target_modules: targets,
            fan_in_fan_out: false,
            init_weights: true,
            inference_mode: true,
            modules_to_save: None,
        }
    }
}

impl PeftFamily for PeftShiraConfig {
    fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    fn check_tensors(&self, tensors: &BTreeMap<String, Vec<u64>>) -> Result<(), String> {
        if tensors.is_empty() {
            return Err("the adapter holds no tensors".into());
        }
        if self.fan_in_fan_out {
            return Err("fan_in_fan_out (Conv1D layers) is not read".into());
        }
        for name in tensors.keys() {
            let (module, partner) = match (
                module_of(name, SHIRA_WEIGHT),
                module_of(name, SHIRA_INDICES),
            ) {
                (Some(m), _) => (m, SHIRA_INDICES),
                (_, Some(m)) => (m, SHIRA_WEIGHT),
                _ => return Err(format!("{name} is not a PEFT SHiRA key")),
            };
            if !is_target(&self.target_modules, module) {
                return Err(format!("{name}: the module is not among target_modules"));
            }
            let values = tensors.get(&super::peft_key(module, SHIRA_WEIGHT));
            let indices = tensors.get(&super::peft_key(module, SHIRA_INDICES));
            let (Some(values), Some(indices)) = (values, indices) else {
                return Err(format!(
                    "{module}: shira_weight and shira_indices must come in pairs (no {partner})"
                ));
            };
            if values.len() != 1 || values[0] == 0 || indices != &[2, values[0]] {
                return Err(format!(
                    "{module}: shira_weight {values:?} / shira_indices {indices:?} are not K values and their (2, K) positions"
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

    #[test]
    fn values_and_positions_come_in_pairs() {
        let c = PeftShiraConfig::new(2, "random", Some(5), &["q_proj".into()], "m");
        let m = "model.layers.0.self_attn.q_proj";
        let mut t = BTreeMap::from([
            (peft_key(m, SHIRA_WEIGHT), vec![128]),
            (peft_key(m, SHIRA_INDICES), vec![2, 128]),
        ]);
        assert_eq!(c.check_tensors(&t), Ok(()));
        t.insert(peft_key(m, SHIRA_INDICES), vec![2, 127]);
        assert!(c.check_tensors(&t).is_err());
        t.remove(&peft_key(m, SHIRA_INDICES));
        assert!(c.check_tensors(&t).unwrap_err().contains("pairs"));
        let v = "model.layers.0.self_attn.v_proj";
        let foreign = BTreeMap::from([
            (peft_key(v, SHIRA_WEIGHT), vec![96]),
            (peft_key(v, SHIRA_INDICES), vec![2, 96]),
        ]);
        assert!(c
            .check_tensors(&foreign)
            .unwrap_err()
            .contains("target_modules"));
    }

    #[test]
    fn reads_what_peft_writes() {
        // adapter_config.json as PEFT 0.21.2 saves a ShiraConfig(r=2, random_seed=5).
        let json = r#"{"auto_mapping": null, "base_model_name_or_path": null, "fan_in_fan_out": false,
            "inference_mode": true, "init_weights": true, "mask_type": "random", "modules_to_save": null,
            "peft_type": "SHIRA", "peft_version": "0.21.2", "r": 2, "random_seed": 5, "revision": null,
            "target_modules": ["v_proj", "q_proj"], "task_type": null}"#;
        let config: PeftConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.peft_type(), "SHIRA");
        let back: PeftConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(back, config);
    }
}
