//! CoDyRA (Lu et al., "Adaptive Rank, Reduced Forgetting", arXiv 2412.01004), following
//! `Artificer-AI-Lab/CoDyRA` (`loralib/codyra.py` `codyra_Linear`, `models/codyra.py`
//! `train_model`): `y = W x + ((dropout(x) Aᵀ) ⊙ g) Bᵀ` with a gate `g (1, r)` per module and
//! no scaling (`lora_scaling = 1` is never applied).
//!
//! One job is one task: the reference's continual-learning loop (`increment_task`: merge the
//! task's adapter into the base, keep it as `old_lora_*`, start a fresh one) is out of scope;
//! a later task is a new job on the merged model.
//!
//! Training, as `train_model` does it: the loop's AdamW steps A, B and the gates together,
//! with the reference's betas (0.9, 0.9999); its learning-rate schedule is the job's
//! `training.schedule` (the reference uses cosine); the loss has no L1 term (the layers
//! return 0 as auxiliary loss). Sparsity comes from the proximal step alone: after every
//! optimizer step past the dense phase, every gate is soft-thresholded by κ, not scaled by the
//! learning rate, with the reference's three statements run in order
//! ([`sequential_soft_threshold`]). κ follows `linspace(0, max_kappa, lambda_num)`, starting
//! at 0 and moving one place whenever `it >= dense_iters` and `it % lambda_step == 0`.
//!
//! Choices: the reference's iteration `it` (0-based, the schedule checked before the step's
//! forward pass) is `StepInfo.index - 1`; both the schedule and the proximal step run in
//! `after_step`, in that order, which is the same since κ is used by nothing else. T is
//! `training.max_steps` (an `epochs` limit that ends the run earlier cuts the schedule short).
//! `dense_iters = dense_iters · T` is kept unrounded, as the reference compares iterations with
//! the float; `lambda_step` is the reference's `int((T - dense) // lambda_num)` with Python's
//! float floor division (`CodyraConfig::lambda_step`). Where that is 0 the reference silently
//! never raises κ; the spec refuses such a plan (`method.lambda_num`) instead, and likewise
//! `lambda_num = 1` (`linspace(0, κ, 1) = [0]`) and `max_kappa = 0`, which never prune.
//! The schedule position (`threshold_id`) is in the store, so a resumed run continues it.
//!
//! Published as the reference merges at the end of a task, `W += B[:, g≠0] diag(g≠0) A[g≠0]`:
//! a plain LoRA with `A' = g_kept ⊙ A_kept`, `B' = B_kept`, modules with no rank left out.

use super::gated::{
    attach_gated, export_gated, gate_allocation, sequential_soft_threshold, GatedModule,
};
use super::refuse_parent;
use super::{Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation, StepInfo};
use crate::model::LlamaModel;
use anyhow::Result;
use loraforge_spec::methods::CodyraConfig;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The reference's `torch.optim.AdamW(..., betas=(0.9, 0.9999))`.
const BETAS: (f64, f64) = (0.9, 0.9999);

/// The threshold schedule of one run of `total` steps.
struct ThresholdSchedule {
    /// `np.linspace(0, max_kappa, lambda_num)`.
    lambdas: Vec<f64>,
    dense_iters: f64,
    lambda_step: u32,
}

impl ThresholdSchedule {
    /// `config.lambda_num` is at least 2 (the spec's check).
    fn new(config: &CodyraConfig, total: u32) -> ThresholdSchedule {
        let n = config.lambda_num as usize;
        // NumPy: `i * (stop / (n - 1))`, the last value exactly `stop`.
        let lambdas = (0..n)
            .map(|i| match i == n - 1 {
                true => config.max_kappa,
                false => i as f64 * (config.max_kappa / (n - 1) as f64),
            })
            .collect();
        ThresholdSchedule {
            lambdas,
            dense_iters: config.dense_iters_at(total),
            lambda_step: config.lambda_step(total),
        }
    }

    /// Whether iteration `it` moves the threshold one place on.
    fn rises_at(&self, it: u32) -> bool {
        self.lambda_step > 0
            && f64::from(it) >= self.dense_iters
            && it.is_multiple_of(self.lambda_step)
    }

    /// Whether iteration `it` ends with the proximal step.
    fn prunes_at(&self, it: u32) -> bool {
        f64::from(it) > self.dense_iters
    }

    /// `lambdas[min(n - 1, id)]`.
    fn threshold(&self, id: i64) -> f64 {
        self.lambdas[(id.max(0) as usize).min(self.lambdas.len() - 1)]
    }
}

pub struct Codyra {
    config: CodyraConfig,
    store: VarStore,
    modules: Vec<GatedModule>,
    schedule: ThresholdSchedule,
    /// The reference's `threshold_id`: how often the threshold has risen.
    threshold_id: Tensor,
}

impl Attach for Codyra {
    type Config = CodyraConfig;

    /// The reference's init: A Kaiming-uniform, `B = 0`, `g ~ N(0, 1)`, for a run of
    /// `max_steps` steps.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (max_steps, device) = (ctx.training.max_steps, ctx.device);
        let store = VarStore::new(device);
        let modules = attach_gated(
            model,
            &store,
            &config.target_modules,
            config.r,
            1.0,
            config.dropout,
        )?;
        let threshold_id = store.root().add(
            "threshold_id",
            Tensor::zeros([1], (Kind::Int64, device)),
            false,
        );
        Ok(Codyra {
            config: config.clone(),
            store,
            modules,
            schedule: ThresholdSchedule::new(config, max_steps),
            threshold_id,
        })
    }
}

impl Codyra {
    /// The current soft threshold κ.
    fn threshold(&self) -> f64 {
        self.schedule.threshold(self.threshold_id.int64_value(&[0]))
    }
}

impl AdapterMethod for Codyra {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn adam_betas(&self) -> (f64, f64) {
        BETAS
    }

    /// The schedule, then the proximal step, of the reference's iteration `index - 1`.
    fn after_step(&mut self, step: StepInfo) {
        let it = step.index.saturating_sub(1);
        tch::no_grad(|| {
            if self.schedule.rises_at(it) {
                let _ = self.threshold_id.g_add_scalar_(1);
            }
            if self.schedule.prunes_at(it) {
                let kappa = self.threshold();
                for m in &mut self.modules {
                    let shrunk = sequential_soft_threshold(&m.gate, kappa);
                    m.gate.copy_(&shrunk);
                }
            }
        });
    }

    fn rank_allocation(&self) -> Option<RankAllocation> {
        Some(gate_allocation(&self.modules))
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        export_gated(
            &self.modules,
            1.0,
            &self.config.target_modules,
            self.config.dropout,
            base_model_uri,
        )
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("codyra")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    fn config(value: serde_json::Value) -> CodyraConfig {
        serde_json::from_value(value).unwrap()
    }

    fn gates(codyra: &Codyra, module: usize) -> Vec<f32> {
        Vec::<f32>::try_from(&codyra.modules[module].gate.view([-1])).unwrap()
    }

    fn set_gates(codyra: &Codyra, module: usize, values: &[f32]) {
        let mut gate = codyra.modules[module].gate.shallow_clone();
        tch::no_grad(|| gate.copy_(&Tensor::from_slice(values).view([1, -1])));
    }

    fn step(codyra: &mut Codyra, index: u32) {
        codyra.after_step(StepInfo {
            index,
            total: 16,
            lr: 0.0,
        });
    }

    #[test]
    fn the_proximal_step_runs_the_references_statements_in_order() {
        let g = Tensor::from_slice(&[1.0f32, -1.0, 0.5, -0.5, 0.375, 0.25, -0.25, 0.125, 0.0]);
        let got = Vec::<f32>::try_from(&sequential_soft_threshold(&g, 0.25)).unwrap();
        // 0.5 - κ = κ is not below κ and stays; 0.375 - κ = 0.125 is, and goes to 0.
        assert_eq!(
            got,
            [0.75f32, -0.75, 0.25, -0.25, 0.0, 0.25, -0.25, 0.0, 0.0]
        );
        // κ = 0 (the dense phase's threshold) changes nothing.
        let same = sequential_soft_threshold(&g, 0.0);
        assert_eq!(max_abs_diff(&same, &g), 0.0);
    }

    /// T = 16, dense_iters 0.5 -> 8.0, lambda_num 3 -> lambdas [0, κ/2, κ], lambda_step
    /// (16 - 8) // 3 = 2: κ rises at it = 8, 10, 12, 14 (steps 9, 11, 13, 15), the last two
    /// clamped at max_kappa; the proximal step runs from it = 9 (step 10), not at it = 8 though
    /// κ is already κ/2 there. A run resumed from the store continues the same schedule.
    #[test]
    fn the_threshold_follows_the_references_schedule_and_resumes() {
        let _turn = torch_rng_turn();
        tch::manual_seed(5);
        let fixture = FixtureModel::create();
        let cfg = config(serde_json::json!({
            "r": 4, "max_kappa": 0.25, "lambda_num": 3, "dense_iters": 0.5,
            "target_modules": ["q_proj"]
        }));
        let mut codyra = Codyra::attach(&mut fixture.load(), &cfg, &cpu(&plan(16, 0))).unwrap();
        let start = [1.0f32, -1.0, 2.0, 0.0625];
        set_gates(&codyra, 0, &start);
        let mut thresholds = Vec::new();
        let mut history = Vec::new();
        let mut resumed: Option<Codyra> = None;
        for index in 1..=16 {
            step(&mut codyra, index);
            thresholds.push(codyra.threshold());
            history.push(gates(&codyra, 0));
            if let Some(other) = resumed.as_mut() {
                step(other, index);
                assert_eq!(other.threshold(), codyra.threshold(), "step {index}");
                assert_eq!(gates(other, 0), gates(&codyra, 0), "step {index}");
            }
            if index == 11 {
                // What `restore` does with a checkpoint written after step 11.
                let other = Codyra::attach(&mut fixture.load(), &cfg, &cpu(&plan(16, 0))).unwrap();
                let saved = codyra.store.variables();
                for (name, mut variable) in other.store.variables() {
                    tch::no_grad(|| variable.copy_(&saved[&name]));
                }
                resumed = Some(other);
            }
        }
        let (half, full) = (0.125, 0.25);
        let want = [
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, half, half, full, full, full, full, full, full,
        ];
        assert_eq!(thresholds, want);
        assert_eq!(codyra.threshold_id.int64_value(&[0]), 4);
        for (i, g) in history.iter().enumerate().take(9) {
            assert_eq!(g, &start, "no proximal step at step {}", i + 1);
        }
        assert_eq!(history[9], [0.875f32, -0.875, 1.875, 0.0]);
        assert_eq!(history[10], [0.625f32, -0.625, 1.625, 0.0]);
        assert_eq!(history[11], [0.375f32, -0.375, 1.375, 0.0]);
        // 0.375 - 0.25 = 0.125 < κ: set to exactly 0 in the same step.
        assert_eq!(history[12], [0.0f32, 0.0, 1.125, 0.0]);
        assert_eq!(history[15], [0.0f32, 0.0, 0.375, 0.0]);
        let allocation = codyra.rank_allocation().unwrap();
        assert_eq!(allocation.per_module[&codyra.modules[0].module_path], 1);
    }

    /// The loop's AdamW trains the gates with A and B, with the reference's betas.
    #[test]
    fn the_loops_adamw_steps_the_gates_too() {
        let fixture = FixtureModel::create();
        let codyra = Codyra::attach(
            &mut fixture.load(),
            &config(serde_json::json!({"r": 2})),
            &cpu(&plan(100, 0)),
        )
        .unwrap();
        let names: Vec<String> = codyra
            .optimized_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let gates = names.iter().filter(|n| n.ends_with(".gate")).count();
        assert_eq!(gates, codyra.modules.len());
        assert_eq!(names.len(), 3 * codyra.modules.len(), "{names:?}");
        assert_eq!(codyra.adam_betas(), (0.9, 0.9999));
    }

    /// The proximal step leaves exact zeros; the export drops those ranks (a module with none
    /// left entirely) and adds exactly what the trained branch adds, with no scaling.
    #[test]
    fn zeroed_gates_are_dropped_by_the_export_without_changing_the_output() {
        let _turn = torch_rng_turn();
        tch::manual_seed(11);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let cfg = config(serde_json::json!({
            "r": 8, "max_kappa": 0.3, "lambda_num": 2, "dense_iters": 0.0,
            "target_modules": ["q_proj", "v_proj"]
        }));
        let mut codyra = Codyra::attach(&mut model, &cfg, &cpu(&plan(16, 0))).unwrap();
        tch::no_grad(|| {
            for m in &mut codyra.modules {
                m.b.copy_(&(Tensor::randn(m.b.size(), (Kind::Float, Device::Cpu)) * 0.2));
            }
        });
        // One module loses every rank.
        set_gates(&codyra, 1, &[0.1, -0.2, 0.05, -0.29, 0.15, 0.2, -0.1, 0.25]);
        // Step 1 (it 0) raises κ to max_kappa but does not prune (it > dense_iters = 0 fails);
        // step 2 (it 1) prunes.
        step(&mut codyra, 1);
        assert_eq!(codyra.threshold(), 0.3);
        assert_eq!(codyra.rank_allocation().unwrap().sparsity, Some(0.0));
        step(&mut codyra, 2);
        let allocation = codyra.rank_allocation().unwrap();
        let zeros: i64 = codyra
            .modules
            .iter()
            .map(|m| m.gate.eq(0.0).sum(Kind::Int64).int64_value(&[]))
            .sum();
        assert!(zeros > 8 && zeros < 32, "{zeros} exact zeros");
        assert_eq!(allocation.per_module[&codyra.modules[1].module_path], 0);
        assert_eq!(allocation.sparsity, Some(zeros as f64 / 32.0));

        let adapter = codyra.export("file:///m");
        assert_eq!(adapter.config.as_lora().unwrap().rank_pattern.len(), 3);
        assert!(!adapter
            .tensors
            .iter()
            .any(|(k, _)| k.contains(&codyra.modules[1].module_path)));
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

    #[test]
    fn a_parent_adapter_is_refused() {
        let fixture = FixtureModel::create();
        let mut codyra = Codyra::attach(
            &mut fixture.load(),
            &config(serde_json::json!({})),
            &cpu(&plan(100, 0)),
        )
        .unwrap();
        let parent = codyra.export("file:///m");
        assert!(codyra.start_from(&parent).is_err());
    }
}
