//! DyLoRA (Valipour et al., EACL 2023), following `huawei-noah/Efficient-NLP`
//! (`DyLoRA/loralib/DyLoRA.py`, `layers.py`, the `run_glue.py` callback): a rank-r LoRA of
//! which every step trains the truncation to a random rank `b` (uniform, one draw for all
//! layers), the `b − 1` leading components detached so only component `b` learns ("frozen"
//! mode, the one the reference trains with). Truncated to `b`, it is a LoRA of rank b with
//! scale `alpha / b` (the reference's `sqrt(r/b)` on both factors times `alpha / r`).
//!
//! Chosen here: `b` is drawn from `[min_r, r]` (the reference: `[1, r]`) by a hash of the job's
//! seed and the step, so a resumed run draws what an uninterrupted one does; validation and
//! the published adapter use the rank `export_r` (default r).

use super::{kaiming_uniform, module_path, per_module_lora, refuse_parent, ExportedFactors};
use super::{Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::llama::LowRank;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::DyLoraConfig;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

struct NestedBranch {
    a: Tensor,
    b: Tensor,
    alpha: f64,
    dropout: f64,
    /// The rank trained this step, shared by every layer.
    train_rank: Arc<AtomicI64>,
    eval_rank: i64,
}

impl NestedBranch {
    /// The rank this pass uses: the step's in training, else `eval_rank`.
    fn rank(&self, train: bool) -> i64 {
        match train {
            true => self.train_rank.load(Ordering::Relaxed),
            false => self.eval_rank,
        }
    }

    /// The first `rank` components; in training those before the last detached (only
    /// component `rank` learns).
    fn factors(&self, rank: i64, train: bool) -> (Tensor, Tensor) {
        if !train {
            return (self.a.narrow(0, 0, rank), self.b.narrow(1, 0, rank));
        }
        let a = Tensor::cat(
            &[
                self.a.narrow(0, 0, rank - 1).detach(),
                self.a.narrow(0, rank - 1, 1),
            ],
            0,
        );
        let b = Tensor::cat(
            &[
                self.b.narrow(1, 0, rank - 1).detach(),
                self.b.narrow(1, rank - 1, 1),
            ],
            1,
        );
        (a, b)
    }
}

impl LinearAdapter for NestedBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let rank = self.rank(train);
        let (a, b) = self.factors(rank, train);
        (x32.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * (self.alpha / rank as f64))
            .to_kind(x.kind())
    }

    /// [`NestedBranch::factors`], derived each pass: a low-rank branch.
    fn low_rank(&self, train: bool) -> Option<LowRank> {
        (!train || self.dropout == 0.0).then(|| {
            let rank = self.rank(train);
            LowRank::derived(train, self.alpha / rank as f64, || {
                self.factors(rank, train)
            })
        })
    }
}

struct Factors {
    module_path: String,
    a: Tensor,
    b: Tensor,
}

pub struct DyLora {
    config: DyLoraConfig,
    seed: u64,
    store: VarStore,
    modules: Vec<Factors>,
    train_rank: Arc<AtomicI64>,
}

impl Attach for DyLora {
    type Config = DyLoraConfig;

    /// loralib's init: A Kaiming-uniform, `B = 0`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (seed, device) = (ctx.training.seed, ctx.device);
        let store = VarStore::new(device);
        let r = i64::from(config.r);
        let train_rank = Arc::new(AtomicI64::new(r));
        let eval_rank = i64::from(config.export_r.unwrap_or(config.r));
        let mut modules = Vec::new();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let path = module_path(&store, &path_name);
            let a = path.add("lora_A", kaiming_uniform(r, inp, device), true);
            let b = path.add(
                "lora_B",
                Tensor::zeros([out, r], (Kind::Float, device)),
                true,
            );
            linear.attach(Box::new(NestedBranch {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                alpha: config.alpha,
                dropout: config.dropout,
                train_rank: Arc::clone(&train_rank),
                eval_rank,
            }));
            modules.push(Factors {
                module_path: path_name,
                a,
                b,
            });
        }
        Ok(DyLora {
            config: config.clone(),
            seed,
            store,
            modules,
            train_rank,
        })
    }
}

impl DyLora {
    /// The rank step `step` trains: uniform over `[min_r, r]`, from (seed, step) alone.
    pub fn rank_for_step(&self, step: u32) -> i64 {
        let span = u64::from(self.config.r - self.config.min_r + 1);
        i64::from(self.config.min_r)
            + (splitmix64(self.seed ^ u64::from(step).rotate_left(32)) % span) as i64
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of its input.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl AdapterMethod for DyLora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn before_step(&mut self, step: u32) {
        self.train_rank
            .store(self.rank_for_step(step), Ordering::Relaxed);
    }

    /// Rank `export_r` as a plain LoRA: `A[:k]`, `B[:, :k] · alpha / k`.
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let k = i64::from(self.config.export_r.unwrap_or(self.config.r));
        let scaling = self.config.alpha / k as f64;
        let modules = self
            .modules
            .iter()
            .map(|m| ExportedFactors {
                module_path: m.module_path.clone(),
                a: m.a.narrow(0, 0, k),
                b: m.b.narrow(1, 0, k) * scaling,
            })
            .collect();
        per_module_lora(
            modules,
            &self.config.target_modules,
            self.config.dropout,
            base_model_uri,
        )
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("dylora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    /// Truncated to rank b, the adapter's forward is exactly its exported rank-b adapter.
    #[test]
    fn truncated_forward_equals_the_exported_adapter_of_that_rank() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut previous: Option<Tensor> = None;
        for b in [1u32, 3, 8] {
            let mut model = fixture.load();
            let config: DyLoraConfig = serde_json::from_value(serde_json::json!({
                "r": 8, "export_r": b, "target_modules": ["q_proj", "v_proj", "down_proj"]
            }))
            .unwrap();
            // The same factors for every b.
            tch::manual_seed(5);
            let dylora = DyLora::attach(&mut model, &config, &cpu(&plan(1, 0))).unwrap();
            tch::no_grad(|| {
                for m in &dylora.modules {
                    m.b.shallow_clone()
                        .copy_(&(Tensor::randn(m.b.size(), (Kind::Float, Device::Cpu)) * 0.2));
                }
            });
            let mut exported = fixture.load();
            attach_frozen(&mut exported, &dylora.export("file:///m"), Device::Cpu).unwrap();
            let truncated = logits(&model);
            assert!(
                max_abs_diff(&truncated, &logits(&exported)) < 1e-5,
                "rank {b}"
            );
            if let Some(p) = previous.replace(truncated.shallow_clone()) {
                assert!(
                    max_abs_diff(&p, &truncated) > 1e-4,
                    "rank {b} should differ from the rank before"
                );
            }
        }
    }

    /// Each step's rank is drawn from [min_r, r] by (seed, step) alone, covering the range.
    #[test]
    fn the_trained_rank_is_uniform_over_the_range_and_reproducible() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let config: DyLoraConfig =
            serde_json::from_value(serde_json::json!({"r": 6, "min_r": 2})).unwrap();
        let dylora = DyLora::attach(&mut fixture.load(), &config, &cpu(&plan(1, 9))).unwrap();
        let ranks: Vec<i64> = (1..=600).map(|s| dylora.rank_for_step(s)).collect();
        for rank in 2..=6 {
            let n = ranks.iter().filter(|&&r| r == rank).count();
            assert!(
                (80..=160).contains(&n),
                "rank {rank} drawn {n} times of 600"
            );
        }
        assert!(ranks.iter().all(|r| (2..=6).contains(r)));
        assert_eq!(
            ranks,
            (1..=600)
                .map(|s| dylora.rank_for_step(s))
                .collect::<Vec<_>>()
        );
    }
}
