//! MiSS (Kang & Yin, "Bone/MiSS: Balancing LoRA performance and efficiency with simple shard
//! sharing", arXiv 2409.15371) with PEFT's semantics (`tuners/miss/layer.py`, `MissLinear`),
//! published in PEFT's MiSS format (`peft_type` `MISS`, one `miss_block` per module).
//!
//! - balance (PEFT's default): `y = W x + (Σ_k dropout(x)_[k·r, (k+1)·r)) D`, `D (r, out)`: the
//!   input's `r`-wide slices (the last zero-padded) are summed and multiplied by one shared
//!   shard, which is `ΔW[:, j] = D[j mod r, :]ᵀ`;
//! - mini: `D (r, mini_r)` repeated along the output to `(r, out)`, then as balance;
//! - bat (Bone's block-affine transform): `y = (W + ΔW) x`, `ΔW_ij = W_ij D_i + D_i` for the
//!   `r × r` blocks `W_ij` and `D (out/r, r, r)`; no dropout (PEFT's bat forward has none).
//!
//! Every block starts at zero, so training starts from the base model; the blocks stay fp32
//! over a bf16 base. The formulas are `crate::families::miss`'s, which merging and evaluation
//! use on the published adapter.

use super::{module_path, refuse_parent, Attach, AttachContext};
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::families::miss::{bat_delta, shard};
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::{MissConfig, MissInit};
use loraforge_spec::peft::miss::{PeftMissConfig, MISS_BLOCK};
use loraforge_spec::peft::peft_key;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct MissBranch {
    block: Tensor,
    variant: MissInit,
    mini_r: i64,
    dropout: f64,
    /// The frozen base weight, which bat's update multiplies.
    weight: Tensor,
}

impl LinearAdapter for MissBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (out, inp) = (self.weight.size()[0], self.weight.size()[1]);
        let mut shape = x.size();
        let x32 = x.to_kind(Kind::Float).reshape([-1, inp]);
        let y = match self.variant {
            MissInit::Bat => {
                let delta = bat_delta(&self.weight.to_kind(Kind::Float), &self.block)
                    .expect("bat blocks are checked against the weight at attach");
                x32.linear::<Tensor>(&delta, None)
            }
            variant => {
                let shard = shard(&self.block, variant, self.mini_r, out)
                    .expect("blocks are checked against the layer at attach");
                let r = shard.size()[0];
                let padding = (r - inp % r) % r;
                let x = x32.dropout(self.dropout, train);
                let x = if padding > 0 {
                    x.constant_pad_nd([0, padding])
                } else {
                    x
                };
                let slices = (inp + padding) / r;
                x.view([-1, slices, r])
                    .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                    .matmul(&shard)
            }
        };
        if let Some(features) = shape.last_mut() {
            *features = out;
        }
        y.view(shape.as_slice()).to_kind(x.kind())
    }
}

/// MiSS on every target layer, its blocks in one [`VarStore`].
pub struct Miss {
    config: MissConfig,
    store: VarStore,
    blocks: Vec<(String, Tensor)>,
}

impl Attach for Miss {
    type Config = MissConfig;

    /// A zero block per target layer, shaped by the variant; sizes PEFT refuses are the user's
    /// error, named by the layer.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let store = VarStore::new(ctx.device);
        let (r, mini_r) = (i64::from(config.r), i64::from(config.mini_r));
        let mut blocks = Vec::new();
        for (path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            if r > inp {
                return Err(user_error(format!(
                    "method.r ({r}) must be at most the input size of {path} ({inp})"
                )));
            }
            let shape = match config.init {
                MissInit::Balance => vec![r, out],
                MissInit::Bat if inp % r == 0 && out % r == 0 => vec![out / r, r, r],
                MissInit::Bat => {
                    return Err(user_error(format!(
                    "method.r ({r}) must divide both sizes of {path} ({out} x {inp}) for init: bat"
                )))
                }
                MissInit::Mini if out % mini_r == 0 => vec![r, mini_r],
                MissInit::Mini => {
                    return Err(user_error(format!(
                        "method.mini_r ({mini_r}) must divide the output size of {path} ({out})"
                    )))
                }
            };
            let block = module_path(&store, &path).add(
                MISS_BLOCK,
                Tensor::zeros(shape.as_slice(), (Kind::Float, ctx.device)),
                true,
            );
            linear.attach(Box::new(MissBranch {
                block: block.shallow_clone(),
                variant: config.init,
                mini_r,
                dropout: config.dropout,
                weight: linear.weight.shallow_clone(),
            }));
            blocks.push((path, block));
        }
        Ok(Miss {
            config: config.clone(),
            store,
            blocks,
        })
    }
}

impl AdapterMethod for Miss {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let tensors = self
            .blocks
            .iter()
            .map(|(path, block)| {
                (
                    peft_key(path, MISS_BLOCK),
                    block
                        .detach()
                        .to_device(Device::Cpu)
                        .to_kind(Kind::Float)
                        .contiguous(),
                )
            })
            .collect();
        let c = &self.config;
        PeftAdapter {
            config: PeftMissConfig::new(
                c.r,
                c.dropout,
                c.init,
                c.mini_r,
                &c.target_modules,
                base_model_uri,
            )
            .into(),
            tensors,
        }
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("miss")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};

    /// For each variant: blocks set to random values give the same logits in training's
    /// forward and in the published adapter's (dense `ΔW` from `families::miss`), and the
    /// blocks change the logits at all.
    #[test]
    fn the_published_adapter_means_the_trained_one() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let fixture = FixtureModel::create();
        let training = plan(10, 0);
        for (init, mini_r) in [
            (MissInit::Balance, 1),
            (MissInit::Bat, 1),
            (MissInit::Mini, 8),
        ] {
            // r = 6 leaves a partial slice of the 64 inputs for balance and mini.
            let r = if init == MissInit::Bat { 8 } else { 6 };
            let config: MissConfig = serde_json::from_value(serde_json::json!({
                "r": r, "init": init, "mini_r": mini_r, "target_modules": ["q_proj", "v_proj", "down_proj"]
            }))
            .unwrap();
            let mut model = fixture.load();
            let base = logits(&model);
            let miss = Miss::attach(&mut model, &config, &cpu(&training)).unwrap();
            tch::manual_seed(1);
            for (_, block) in &miss.blocks {
                tch::no_grad(|| block.shallow_clone().copy_(&(block.randn_like() * 0.05)));
            }
            let trained = logits(&model);
            let mut exported = fixture.load();
            families::attach_frozen(&mut exported, &miss.export("file:///m"), Device::Cpu).unwrap();
            let diff = max_abs_diff(&trained, &logits(&exported));
            assert!(diff < 1e-5, "{init:?}: {diff}");
            assert!(max_abs_diff(&trained, &base) > 1e-3, "{init:?}: no effect");
        }
    }

    #[test]
    fn sizes_peft_refuses_are_the_users_error() {
        let fixture = FixtureModel::create();
        let training = plan(10, 0);
        for (json, field) in [
            (serde_json::json!({"r": 65}), "method.r"),
            (serde_json::json!({"r": 6, "init": "bat"}), "method.r"),
            (
                serde_json::json!({"r": 4, "init": "mini", "mini_r": 5}),
                "method.mini_r",
            ),
        ] {
            let config: MissConfig = serde_json::from_value(json).unwrap();
            let err = Miss::attach(&mut fixture.load(), &config, &cpu(&training))
                .err()
                .expect("refused");
            assert!(err.to_string().contains(field), "{err:#}");
        }
    }
}
