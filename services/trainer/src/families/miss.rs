//! The MiSS family (`peft_type` `MISS`; PEFT `tuners/miss/layer.py`, `MissLinear`): one block
//! per module, `miss_block`, whose update of `W (out, in)` depends on the variant:
//! - balance (`init_weights: true`): a shard `D (r, out)` shared by the input's `r`-wide slices,
//!   `ΔW[:, j] = D[j mod r, :]ᵀ` (the last slice may be partial, as PEFT pads the input);
//! - mini: `D (r, mini_r)` repeated along the output to `(r, out)`, then as balance;
//! - bat: blocks `D (out/r, r, r)`; the `r × r` block `(i, j)` of W gains `W_ij D_i + D_i`,
//!   so `ΔW` depends on W.
//!
//! The trainer's `methods::miss` runs the same formulas in its forward.

use super::{DenseUpdate, Update, Updates};
use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::methods::MissInit;
use loraforge_spec::peft::miss::{PeftMissConfig, MISS_BLOCK};
use loraforge_spec::peft::module_of;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub fn updates(config: &PeftMissConfig, tensors: &[(String, Tensor)]) -> Result<Updates> {
    let variant = config.variant().map_err(user_error)?;
    let mut updates = BTreeMap::new();
    for (key, block) in tensors {
        let module = module_of(key, MISS_BLOCK)
            .ok_or_else(|| user_error(format!("adapter tensor {key} is not a MiSS block")))?;
        let update = MissUpdate {
            block: block.shallow_clone(),
            variant,
            mini_r: i64::from(config.mini_r),
        };
        updates.insert(module.to_string(), Update::Dense(Box::new(update)));
    }
    Ok(updates)
}

struct MissUpdate {
    block: Tensor,
    variant: MissInit,
    mini_r: i64,
}

impl DenseUpdate for MissUpdate {
    fn delta(&self, weight: &Tensor) -> Result<Tensor> {
        let block = self.block.to_device(weight.device()).to_kind(Kind::Float);
        let (out, inp) = (weight.size()[0], weight.size()[1]);
        match self.variant {
            MissInit::Bat => bat_delta(weight, &block),
            variant => Ok(shard_delta(&shard(&block, variant, self.mini_r, out)?, inp)),
        }
    }
}

/// The shard `(r, out)` of a balance or mini block, checked against the layer's `out`.
pub fn shard(block: &Tensor, variant: MissInit, mini_r: i64, out: i64) -> Result<Tensor> {
    let size = block.size();
    match variant {
        MissInit::Mini if size.len() == 2 && size[1] == mini_r && out % mini_r == 0 => {
            Ok(block.repeat([1, out / mini_r]))
        }
        MissInit::Balance if size.len() == 2 && size[1] == out => Ok(block.shallow_clone()),
        _ => Err(user_error(format!(
            "MiSS block {size:?} ({variant:?}, mini_r {mini_r}) does not fit {out} outputs"
        ))),
    }
}

/// `ΔW (out, in)` of a shard `D (r, out)`: column `j` is row `j mod r` of `D`.
pub fn shard_delta(shard: &Tensor, inp: i64) -> Tensor {
    let r = shard.size()[0];
    let slices = (inp + r - 1) / r;
    shard.tr().repeat([1, slices]).narrow(1, 0, inp)
}

/// `ΔW (out, in)` of bat blocks `D (out/r, r, r)` on `W`: `ΔW_ij = W_ij D_i + D_i`.
pub fn bat_delta(weight: &Tensor, blocks: &Tensor) -> Result<Tensor> {
    let (out, inp) = (weight.size()[0], weight.size()[1]);
    let r = *blocks.size().last().unwrap_or(&0);
    if r == 0 || out % r != 0 || inp % r != 0 || blocks.size() != [out / r, r, r] {
        return Err(user_error(format!(
            "MiSS bat blocks {:?} do not fit a {out} x {inp} weight",
            blocks.size()
        )));
    }
    // (out block i, row a, in block j, column b) times D_i (b, c).
    let w = weight.reshape([out / r, r, inp / r, r]);
    let product = Tensor::einsum("iajb,ibc->iajc", &[&w, blocks], None::<i64>);
    Ok((product + blocks.unsqueeze(2)).reshape([out, inp]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The formulas element by element, against loops over the definitions.
    #[test]
    fn deltas_follow_the_definitions() {
        let _turn = crate::training::seeds::torch_rng_turn();
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let (out, inp, r) = (6, 10, 4);
        let d = Tensor::randn([r, out], opts);
        let delta = shard_delta(&d, inp);
        for o in 0..out {
            for j in 0..inp {
                assert_eq!(
                    delta.double_value(&[o, j]),
                    d.double_value(&[j % r, o]),
                    "balance ({o}, {j})"
                );
            }
        }
        let mini = Tensor::randn([r, 2], opts);
        let full = shard(&mini, MissInit::Mini, 2, out).unwrap();
        assert_eq!(full.double_value(&[1, 5]), mini.double_value(&[1, 1]));
        assert!(shard(&mini, MissInit::Mini, 4, out).is_err());

        let (out, inp, r) = (4, 6, 2);
        let w = Tensor::randn([out, inp], opts);
        let blocks = Tensor::randn([out / r, r, r], opts);
        let delta = bat_delta(&w, &blocks).unwrap();
        for o in 0..out {
            for j in 0..inp {
                let (i, a, c) = (o / r, o % r, j % r);
                let mut expected = blocks.double_value(&[i, a, c]);
                for b in 0..r {
                    expected +=
                        w.double_value(&[o, (j / r) * r + b]) * blocks.double_value(&[i, b, c]);
                }
                let got = delta.double_value(&[o, j]);
                assert!(
                    (got - expected).abs() < 1e-5,
                    "bat ({o}, {j}): {got} vs {expected}"
                );
            }
        }
        assert!(bat_delta(&Tensor::randn([4, 5], opts), &blocks).is_err());
    }
}
