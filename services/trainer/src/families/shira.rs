//! The SHiRA family (`peft_type` `SHIRA`; PEFT `tuners/shira/layer.py`): per module, `K` trained
//! values `shira_weight` at positions `shira_indices (2, K)` (row, column) of `W (out, in)`;
//! `ΔW` is zero elsewhere (PEFT builds it as a sparse COO tensor, so repeated positions add).
//!
//! The trainer's `methods::shira` runs the same update in its forward.

use super::{DenseUpdate, Update, Updates};
use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::peft::module_of;
use loraforge_spec::peft::shira::{PeftShiraConfig, SHIRA_INDICES, SHIRA_WEIGHT};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub fn updates(_config: &PeftShiraConfig, tensors: &[(String, Tensor)]) -> Result<Updates> {
    let mut pairs: BTreeMap<&str, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
    for (key, tensor) in tensors {
        if let Some(module) = module_of(key, SHIRA_WEIGHT) {
            pairs.entry(module).or_default().0 = Some(tensor);
        } else if let Some(module) = module_of(key, SHIRA_INDICES) {
            pairs.entry(module).or_default().1 = Some(tensor);
        } else {
            return Err(user_error(format!(
                "adapter tensor {key} is not a SHiRA tensor ({SHIRA_WEIGHT}/{SHIRA_INDICES})"
            )));
        }
    }
    let mut updates = BTreeMap::new();
    for (module, pair) in pairs {
        let (Some(values), Some(indices)) = pair else {
            return Err(user_error(format!(
                "adapter module {module} lacks {SHIRA_WEIGHT} or {SHIRA_INDICES}"
            )));
        };
        let k = values.size()[0];
        if values.dim() != 1 || indices.size() != [2, k] {
            return Err(user_error(format!(
                "{module}: {SHIRA_WEIGHT} {:?} and {SHIRA_INDICES} {:?} are not K values and their (2, K) positions",
                values.size(),
                indices.size()
            )));
        }
        let update = ShiraUpdate {
            values: values.shallow_clone(),
            indices: indices.to_kind(Kind::Int64),
        };
        updates.insert(module.to_string(), Update::Dense(Box::new(update)));
    }
    Ok(updates)
}

struct ShiraUpdate {
    values: Tensor,
    indices: Tensor,
}

impl DenseUpdate for ShiraUpdate {
    fn delta(&self, weight: &Tensor) -> Result<Tensor> {
        let (out, inp) = (weight.size()[0], weight.size()[1]);
        let (rows, cols) = (self.indices.get(0), self.indices.get(1));
        let in_range = |t: &Tensor, n: i64| {
            t.numel() == 0 || (t.min().int64_value(&[]) >= 0 && t.max().int64_value(&[]) < n)
        };
        if !in_range(&rows, out) || !in_range(&cols, inp) {
            return Err(user_error(format!(
                "SHiRA positions fall outside the {out} x {inp} weight"
            )));
        }
        let device = weight.device();
        Ok(sparse_delta(
            &self.values.to_device(device).to_kind(Kind::Float),
            &self.indices.to_device(device),
            out,
            inp,
        ))
    }
}

/// `ΔW (out, in)`: `values` at `indices (2, K)` (int64, in range), zero elsewhere; repeated
/// positions add. Differentiable in `values`.
pub fn sparse_delta(values: &Tensor, indices: &Tensor, out: i64, inp: i64) -> Tensor {
    let flat = indices.get(0) * inp + indices.get(1);
    Tensor::zeros([out * inp], (values.kind(), values.device()))
        .index_add(0, &flat, values)
        .view([out, inp])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn values_land_at_their_positions_and_repeats_add() {
        let values = Tensor::from_slice(&[1.0f32, 2.0, 4.0]);
        let indices = Tensor::from_slice(&[0i64, 2, 0, 1, 3, 1]).view([2, 3]);
        let delta = sparse_delta(&values, &indices, 3, 4);
        assert_eq!(delta.double_value(&[0, 1]), 5.0);
        assert_eq!(delta.double_value(&[2, 3]), 2.0);
        assert_eq!(delta.sum(Kind::Float).double_value(&[]), 7.0);
        let update = ShiraUpdate { values, indices };
        let small = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        assert!(update.delta(&small).is_err());
    }
}
