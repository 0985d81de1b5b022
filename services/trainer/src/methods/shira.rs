//! SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024, arXiv 2406.13175) with
//! PEFT's semantics (`tuners/shira/layer.py`, `mask_functions.py`), published in PEFT's SHiRA
//! format (`peft_type` `SHIRA`: `shira_weight` and `shira_indices` per module).
//!
//! `y = (W + ΔW) x`, `ΔW` zero but at `K = r · (in + out)` fixed positions of each weight
//! (a LoRA of rank r's parameter count; the update is sparse and of high rank), whose values
//! are trained, starting at zero. The positions (`mask_type: random`, the paper's SHiRA-Rand)
//! are PEFT's `random_mask`: the first `K` of a random permutation of the `out · in` positions,
//! drawn from libtorch's CPU generator seeded with `random_seed` for each module, in row-major
//! order. So, as in PEFT, modules of the same shape get the same positions, and PEFT given the
//! same `random_seed` picks the positions we do. `random_seed` defaults to the job's seed
//! (PEFT's `None` means a fresh generator's default seed).
//!
//! The positions are a non-trainable variable of the store, so checkpoints keep them.

use super::{module_path, refuse_parent, Attach, AttachContext};
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::families::shira::sparse_delta;
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::ShiraConfig;
use loraforge_spec::peft::peft_key;
use loraforge_spec::peft::shira::{PeftShiraConfig, SHIRA_INDICES, SHIRA_WEIGHT};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct ShiraBranch {
    values: Tensor,
    indices: Tensor,
    out: i64,
    inp: i64,
}

impl LinearAdapter for ShiraBranch {
    fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        let delta = sparse_delta(&self.values, &self.indices, self.out, self.inp);
        x.to_kind(Kind::Float)
            .linear::<Tensor>(&delta, None)
            .to_kind(x.kind())
    }
}

/// One module's trained values and their positions `(2, K)` (int64).
struct ShiraModule {
    path: String,
    values: Tensor,
    indices: Tensor,
}

/// SHiRA on every target layer.
pub struct Shira {
    config: ShiraConfig,
    seed: u64,
    store: VarStore,
    modules: Vec<ShiraModule>,
}

/// PEFT's random mask of a `(out, in)` weight: `(2, K)` row and column indices, row-major.
pub fn random_positions(out: i64, inp: i64, k: i64, seed: u64) -> Tensor {
    // PEFT seeds a fresh generator per module; the bits of the u64 seed are libtorch's.
    tch::manual_seed(seed as i64);
    let (chosen, _) = Tensor::randperm(out * inp, (Kind::Int64, Device::Cpu))
        .narrow(0, 0, k)
        .sort(0, false);
    Tensor::stack(
        &[
            chosen.divide_scalar_mode(inp, "floor"),
            chosen.remainder(inp),
        ],
        0,
    )
}

impl Attach for Shira {
    type Config = ShiraConfig;

    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let store = VarStore::new(ctx.device);
        let seed = config.mask_seed(ctx.training);
        let r = i64::from(config.r);
        let mut modules = Vec::new();
        for (path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let k = r * (inp + out);
            if k > inp * out {
                return Err(user_error(format!(
                    "method.r ({r}) asks for r · (in + out) = {k} trained entries of {path}, \
                     which has only {out} x {inp}"
                )));
            }
            let var = module_path(&store, &path);
            let indices = var.add(
                SHIRA_INDICES,
                random_positions(out, inp, k, seed).to_device(ctx.device),
                false,
            );
            let values = var.add(
                SHIRA_WEIGHT,
                Tensor::zeros([k], (Kind::Float, ctx.device)),
                true,
            );
            linear.attach(Box::new(ShiraBranch {
                values: values.shallow_clone(),
                indices: indices.shallow_clone(),
                out,
                inp,
            }));
            modules.push(ShiraModule {
                path,
                values,
                indices,
            });
        }
        Ok(Shira {
            config: config.clone(),
            seed,
            store,
            modules,
        })
    }
}

impl AdapterMethod for Shira {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let cpu = |t: &Tensor, kind| t.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
        let tensors = self
            .modules
            .iter()
            .flat_map(|m| {
                [
                    (peft_key(&m.path, SHIRA_WEIGHT), cpu(&m.values, Kind::Float)),
                    // int32, as PEFT saves them.
                    (peft_key(&m.path, SHIRA_INDICES), cpu(&m.indices, Kind::Int)),
                ]
            })
            .collect();
        let c = &self.config;
        PeftAdapter {
            config: PeftShiraConfig::new(
                c.r,
                "random",
                Some(self.seed),
                &c.target_modules,
                base_model_uri,
            )
            .into(),
            tensors,
        }
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("shira")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};

    /// Values set to random numbers give the same logits in training's forward and in the
    /// published adapter's; positions are distinct, row-major and the count PEFT's.
    #[test]
    fn the_published_adapter_means_the_trained_one() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let fixture = FixtureModel::create();
        let training = plan(10, 3);
        let config: ShiraConfig = serde_json::from_value(serde_json::json!({
            "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]
        }))
        .unwrap();
        let mut model = fixture.load();
        let base = logits(&model);
        let shira = Shira::attach(&mut model, &config, &cpu(&training)).unwrap();
        tch::manual_seed(1);
        for m in &shira.modules {
            tch::no_grad(|| {
                m.values
                    .shallow_clone()
                    .copy_(&(m.values.randn_like() * 0.05))
            });
            let flat = m.indices.get(0) * 1_000_000 + m.indices.get(1);
            let (sorted, _) = flat.sort(0, false);
            assert!(flat.equal(&sorted), "{}: not row-major", m.path);
            assert_eq!(flat.unique_dim(0, true, false, false).0.size(), flat.size());
        }
        // q_proj is 64 -> 64: K = 4 · 128.
        assert_eq!(shira.modules[0].values.size(), [512]);
        let adapter = shira.export("file:///m");
        let mut exported = fixture.load();
        families::attach_frozen(&mut exported, &adapter, Device::Cpu).unwrap();
        let trained = logits(&model);
        let diff = max_abs_diff(&trained, &logits(&exported));
        assert!(diff < 1e-5, "{diff}");
        assert!(max_abs_diff(&trained, &base) > 1e-3, "no effect");
        let json = serde_json::to_value(&adapter.config).unwrap();
        assert_eq!(
            (json["peft_type"].as_str(), json["random_seed"].as_u64()),
            (Some("SHIRA"), Some(3))
        );
    }

    #[test]
    fn more_entries_than_the_weight_has_are_the_users_error() {
        let fixture = FixtureModel::create();
        let training = plan(10, 0);
        // v_proj is 64 -> 32: 32 · 96 > 64 · 32.
        let config: ShiraConfig = serde_json::from_value(serde_json::json!({"r": 32})).unwrap();
        let err = Shira::attach(&mut fixture.load(), &config, &cpu(&training))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("method.r"), "{err:#}");
    }
}
