//! SoRA (Ding et al., EMNLP 2023), following `TsinghuaC3I/SoRA` (`src/lora.py`
//! `LowRankLinear`, `src/sparse_optimizer.py` `SparseAdamW`, `src/trainer.py`):
//! `y = W x + ((dropout(x) Aᵀ) ⊙ g) Bᵀ · alpha / r` with a gate `g (1, r)` per module.
//!
//! The gates are left out of the loop's AdamW and stepped here after it, as the reference's
//! second optimizer does: Hugging Face's AdamW (betas 0.9/0.999, eps 1e-6 added to √v before
//! bias correction, no weight decay) at the main learning rate, then the soft threshold ξ
//! (`threshold`) **not** scaled by the learning rate: the file `run_glue.py` imports
//! (`sparse_optimizer.py`), not `sparse_optimizer_multiply_lr.py`. Its three masked in-place
//! statements run in order, so a gate within 2ξ of zero ends at exactly zero
//! ([`sequential_soft_threshold`]), not the textbook `sign(g)·max(|g|−ξ, 0)`. The loss gets
//! `lambda · mean |g|`. Differences from the reference: the gates' learning rate follows the
//! job's schedule (the reference's is linear with the main warmup), and the post-training
//! λ-schedule phases are not run. The loop's gradient clipping covers the gates, as the
//! reference's Trainer clips every parameter before both optimizers step.
//! Published with the zeroed ranks removed: `A' = g_kept ⊙ A_kept`, `B' = B_kept · alpha / r`.

use super::gated::{
    attach_gated, export_gated, gate_allocation, sequential_soft_threshold, GatedModule, GATE,
};
use super::{module_path, refuse_parent};
use super::{Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation, StepInfo};
use crate::model::LlamaModel;
use anyhow::Result;
use loraforge_spec::methods::SoraConfig;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

const GATE_BETA1: f64 = 0.9;
const GATE_BETA2: f64 = 0.999;
const GATE_EPSILON: f64 = 1e-6;

/// The gate optimizer's moments for one module (in the store, so checkpoints keep them).
struct GateMoments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct Sora {
    config: SoraConfig,
    store: VarStore,
    modules: Vec<GatedModule>,
    moments: Vec<GateMoments>,
}

impl Attach for Sora {
    type Config = SoraConfig;

    /// The reference's init: A Kaiming-uniform, `B = 0`, `g ~ N(0, 1)`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let device = ctx.device;
        let store = VarStore::new(device);
        let modules = attach_gated(
            model,
            &store,
            &config.target_modules,
            config.r,
            config.alpha / f64::from(config.r),
            config.dropout,
        )?;
        let moments = modules
            .iter()
            .map(|m| {
                let path = module_path(&store, &m.module_path);
                GateMoments {
                    exp_avg: path.add("gate_exp_avg", m.gate.zeros_like(), false),
                    exp_avg_sq: path.add("gate_exp_avg_sq", m.gate.zeros_like(), false),
                }
            })
            .collect();
        Ok(Sora {
            config: config.clone(),
            store,
            modules,
            moments,
        })
    }
}

impl AdapterMethod for Sora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        let gate_suffix = format!(".{GATE}");
        self.store
            .variables()
            .into_iter()
            .filter(|(n, t)| t.requires_grad() && !n.ends_with(&gate_suffix))
            .collect()
    }

    /// `lambda · Σ|g| / numel(all gates)` (`SparseTrainerMixin.compute_loss`).
    fn extra_loss(&self) -> Option<Tensor> {
        if self.config.lambda <= 0.0 {
            return None;
        }
        let gates: Vec<Tensor> = self.modules.iter().map(|m| m.gate.view([-1])).collect();
        Some(Tensor::cat(&gates, 0).abs().mean(Kind::Float) * self.config.lambda)
    }

    /// `SparseAdamW.step`: an AdamW step on each gate, then the soft threshold.
    fn after_step(&mut self, step: StepInfo) {
        let t = f64::from(step.index);
        let step_size = step.lr * (1.0 - GATE_BETA2.powf(t)).sqrt() / (1.0 - GATE_BETA1.powf(t));
        tch::no_grad(|| {
            for (m, moments) in self.modules.iter_mut().zip(&mut self.moments) {
                let grad = m.gate.grad();
                if grad.defined() {
                    let exp_avg = &moments.exp_avg * GATE_BETA1 + &grad * (1.0 - GATE_BETA1);
                    let exp_avg_sq =
                        &moments.exp_avg_sq * GATE_BETA2 + &grad * &grad * (1.0 - GATE_BETA2);
                    let update = &exp_avg / (exp_avg_sq.sqrt() + GATE_EPSILON) * step_size;
                    moments.exp_avg.copy_(&exp_avg);
                    moments.exp_avg_sq.copy_(&exp_avg_sq);
                    let _ = m.gate.g_sub_(&update);
                }
                let thresholded = sequential_soft_threshold(&m.gate, self.config.threshold);
                m.gate.copy_(&thresholded);
            }
        });
    }

    fn rank_allocation(&self) -> Option<RankAllocation> {
        Some(gate_allocation(&self.modules))
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        export_gated(
            &self.modules,
            self.config.alpha / f64::from(self.config.r),
            &self.config.target_modules,
            self.config.dropout,
            base_model_uri,
        )
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("sora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    #[test]
    fn soft_threshold_is_the_references_proximal_step() {
        // `SparseAdamW.step`'s three in-place statements, in order: 0.5 shrinks to 0.2, which
        // the third then zeroes; 0.7 ends at 0.4; exactly ±ξ is left alone.
        let g = Tensor::from_slice(&[0.5f32, -0.5, 0.2, -0.1, 0.3, -0.3, 0.7, -0.7]);
        let got = Vec::<f32>::try_from(&sequential_soft_threshold(&g, 0.3)).unwrap();
        let want = [0.0f32, 0.0, 0.0, 0.0, 0.3, -0.3, 0.4, -0.4];
        assert!(
            got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?}"
        );
    }

    /// The proximal step leaves gates at exactly zero, and the export drops those ranks (a
    /// module with none left entirely) without changing the model's output.
    #[test]
    fn zeroed_gates_are_dropped_by_the_export_without_changing_the_output() {
        let _turn = torch_rng_turn();
        tch::manual_seed(11);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let config: SoraConfig = serde_json::from_value(serde_json::json!({
            "r": 8, "threshold": 0.6, "target_modules": ["q_proj", "v_proj"]
        }))
        .unwrap();
        let mut sora = Sora::attach(&mut model, &config, &cpu(&plan(1, 0))).unwrap();
        tch::no_grad(|| {
            for m in &mut sora.modules {
                m.b.copy_(&(Tensor::randn(m.b.size(), (Kind::Float, Device::Cpu)) * 0.2));
            }
            // One module loses every rank.
            let low = sora.modules[1].gate.zeros_like() + 0.1;
            sora.modules[1].gate.copy_(&low);
        });
        sora.after_step(StepInfo {
            index: 1,
            total: 1,
            lr: 0.0,
        });
        let allocation = sora.rank_allocation().unwrap();
        let zeros: i64 = sora
            .modules
            .iter()
            .map(|m| m.gate.eq(0.0).sum(Kind::Int64).int64_value(&[]))
            .sum();
        assert!(zeros > 8 && zeros < 32, "{zeros} exact zeros");
        assert_eq!(allocation.per_module[&sora.modules[1].module_path], 0);
        assert_eq!(allocation.sparsity, Some(zeros as f64 / 32.0));

        let adapter = sora.export("file:///m");
        assert_eq!(adapter.config.as_lora().unwrap().rank_pattern.len(), 3);
        assert!(!adapter
            .tensors
            .iter()
            .any(|(k, _)| k.contains(&sora.modules[1].module_path)));
        for (module, rank) in &adapter.config.as_lora().unwrap().rank_pattern {
            assert_eq!(*rank, allocation.per_module[module]);
        }
        let mut exported = fixture.load();
        attach_frozen(&mut exported, &adapter, Device::Cpu).unwrap();
        let (trained, published, base) =
            (logits(&model), logits(&exported), logits(&fixture.load()));
        assert!(max_abs_diff(&trained, &published) < 1e-5);
        assert!(
            max_abs_diff(&trained, &base) > 1e-3,
            "the adapter should change the output"
        );
    }
}
