//! AdaLoRA (Zhang et al., ICLR 2023), following PEFT's `tuners/adalora` (layer.py `SVDLinear`,
//! `RankAllocator`; model.py `update_and_allocate`, the orthogonal regulariser in `forward`):
//! `ΔW = B (A ⊙ E) · alpha / (init_r + 1e-5)` with SVD-like triplets (A rows, E values,
//! B columns), pruned to a cubically shrinking budget by smoothed sensitivity × uncertainty.
//!
//! Chosen where the references differ or are silent:
//! - PEFT's schedule: the allocation is frozen at `global_step == total_step - tfinal` and
//!   re-applied every later step (the original keeps masking with frozen scores: the same).
//! - `global_step` is the optimizer step counted from 0, and `total_step` is
//!   `training.max_steps`, as PEFT's `AdaLoraConfig.total_step`.
//! - PEFT's `kthvalue` fails when the budget still equals the initial one (k = 0); here
//!   nothing is masked then.
//! - The mask is applied once more after the last step, so the trained model is the
//!   published one (PEFT drops the masked triplets only when saving).
//! - Published as plain LoRA: `A' = A_kept ⊙ E_kept`, `B' = B_kept · alpha / (init_r + 1e-5)`.
//!
//! The importance averages of every A, E and B, and the masks, are packed into one buffer
//! each ([`super::pack`]): the per-step update is a few ops over all modules, not a few dozen
//! per module (on a GPU, kernel launches were the cost), with the same element-wise arithmetic.

use super::ExportedFactors;
use super::{mean_orthogonality, module_path, pack, per_module_lora, refuse_parent, select};
use super::{Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation, StepInfo};
use crate::model::llama::LowRank;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::AdaLoraConfig;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The branch `dropout(x) (A ⊙ E)^T B^T · alpha / (init_r + 1e-5)` on one layer.
struct SvdBranch {
    a: Tensor,
    e: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
}

impl LinearAdapter for SvdBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let delta = x32
            .linear::<Tensor>(&(&self.a * &self.e), None)
            .linear::<Tensor>(&self.b, None)
            * self.scaling;
        delta.to_kind(x.kind())
    }

    /// `A ⊙ E` and `B`, derived each pass, so that the layer can run as a low-rank branch
    /// (merged with its neighbours', its backward by hand) and E's gradient still arrives.
    fn low_rank(&self, train: bool) -> Option<LowRank> {
        (!train || self.dropout == 0.0).then(|| {
            LowRank::derived(train, self.scaling, || {
                (&self.a * &self.e, self.b.shallow_clone())
            })
        })
    }
}

/// The EMAs of one parameter's element-wise sensitivity `|p ⊙ grad|` and its uncertainty.
struct Importance {
    sensitivity: Tensor,
    uncertainty: Tensor,
}

impl Importance {
    fn new(path: &tch::nn::Path, name: &str, like: &Tensor) -> Importance {
        Importance {
            sensitivity: path.add(&format!("{name}_ipt"), like.zeros_like(), false),
            uncertainty: path.add(&format!("{name}_unc"), like.zeros_like(), false),
        }
    }

    #[cfg(test)]
    fn score(&self) -> Tensor {
        &self.sensitivity * &self.uncertainty
    }
}

/// Every parameter's [`Importance`] (A, E, B of each module in turn), packed.
struct PackedImportance {
    params: Vec<Tensor>,
    sensitivity: Tensor,
    uncertainty: Tensor,
    /// The modules by projection, for [`PackedImportance::scores`].
    groups: Vec<ScoreGroup>,
    modules: i64,
    rank: i64,
}

/// Modules of one projection and shape whose importances lie at equal steps in the packed
/// buffers (the same projection of every layer): one strided view covers all of them, so
/// their scores are a few ops, not a few per module (154 modules on TinyLlama: about a
/// thousand kernel launches a step on a GPU).
struct ScoreGroup {
    /// Where each module's scores go, `(n)` on the device.
    rows: Tensor,
    /// The element offset of the first module's block (`A`, then `E`, then `B`), the step
    /// between modules', and the shape.
    first: i64,
    step: i64,
    n: i64,
    inp: i64,
    out: i64,
}

impl ScoreGroup {
    /// Groups `(index, projection name, in, out, offset)` of modules by projection and shape,
    /// then splits each into runs at equal steps (a run may be a single module).
    fn of(modules: &[(i64, &str, i64, i64, i64)], device: tch::Device) -> Vec<ScoreGroup> {
        // (projection, in, out) -> (module index, offset) of each module of that kind.
        type Kinds<'a> = std::collections::BTreeMap<(&'a str, i64, i64), Vec<(i64, i64)>>;
        let mut by_kind = Kinds::default();
        for &(index, name, inp, out, offset) in modules {
            by_kind
                .entry((name, inp, out))
                .or_default()
                .push((index, offset));
        }
        let mut groups = Vec::new();
        for ((_, inp, out), members) in by_kind {
            let mut run: Vec<(i64, i64)> = Vec::new();
            let mut flush = |run: &mut Vec<(i64, i64)>| {
                if let Some(&(_, first)) = run.first() {
                    let step = run.get(1).map_or(0, |&(_, o)| o - first);
                    let rows: Vec<i64> = run.iter().map(|&(i, _)| i).collect();
                    groups.push(ScoreGroup {
                        rows: Tensor::from_slice(&rows).to_device(device),
                        first,
                        step,
                        n: run.len() as i64,
                        inp,
                        out,
                    });
                }
                run.clear();
            };
            for member in members {
                let fits = match run.as_slice() {
                    [] | [_] => true,
                    [a, b, ..] => member.1 - run[run.len() - 1].1 == b.1 - a.1,
                };
                if !fits {
                    flush(&mut run);
                }
                run.push(member);
            }
            flush(&mut run);
        }
        groups
    }
}

impl PackedImportance {
    fn new(modules: &[Triplets]) -> PackedImportance {
        let importance = || modules.iter().flat_map(|m| m.importance.iter());
        let each = |pick: fn(&Importance) -> &Tensor| -> Vec<Tensor> {
            importance().map(|i| pick(i).shallow_clone()).collect()
        };
        // Where each module's block starts in the packed buffers: `pack` lays the importances
        // end to end in `importance()`'s order, A `(r, in)`, E `(r, 1)`, B `(out, r)` of each
        // module in turn (the grouped scores are tested against each module's own).
        let rank = modules.first().map_or(0, |m| m.e.size()[0]);
        let mut offset = 0;
        let layout: Vec<(i64, &str, i64, i64, i64)> = modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (inp, out) = (m.a.size()[1], m.b.size()[0]);
                let name = m.module_path.rsplit('.').next().unwrap_or_default();
                let at = offset;
                offset += rank * (inp + out + 1);
                (i as i64, name, inp, out, at)
            })
            .collect();
        let device = modules.first().map_or(tch::Device::Cpu, |m| m.a.device());
        PackedImportance {
            params: modules
                .iter()
                .flat_map(|m| [&m.a, &m.e, &m.b])
                .map(Tensor::shallow_clone)
                .collect(),
            sensitivity: pack(&each(|i| &i.sensitivity)),
            uncertainty: pack(&each(|i| &i.uncertainty)),
            groups: ScoreGroup::of(&layout, device),
            modules: modules.len() as i64,
            rank,
        }
    }

    /// Every module's triplet scores, module by module `(modules x r)` flattened: PEFT's
    /// `_combine_ipt`, `s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))` with `s` the sensitivity
    /// times the uncertainty, computed a [`ScoreGroup`] at a time (the same reductions, row by
    /// row, as [`Triplets::scores`] runs on one module).
    fn scores(&self) -> Tensor {
        let s = &self.sensitivity * &self.uncertainty;
        let r = self.rank;
        let mut all = Tensor::empty([self.modules, r], (Kind::Float, s.device()));
        for g in &self.groups {
            let (n, inp, out) = (g.n, g.inp, g.out);
            let a = s.as_strided([n, r, inp], [g.step, inp, 1], g.first);
            let e = s.as_strided([n, r], [g.step, 1], g.first + r * inp);
            let b = s.as_strided([n, out, r], [g.step, r, 1], g.first + r * inp + r);
            let ab = a.mean_dim(2, false, Kind::Float) + b.mean_dim(1, false, Kind::Float);
            let _ = all.index_copy_(0, &g.rows, &(e + ab));
        }
        all.view([-1])
    }

    /// PEFT's `update_ipt` on every parameter with a gradient: `|p ⊙ grad|` into the
    /// sensitivity average, and the uncertainty from the freshly updated sensitivity.
    fn update(&mut self, beta1: f64, beta2: f64) {
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        if grads.iter().all(|g| !g.defined()) {
            return;
        }
        let flat = |ts: Vec<Tensor>| Tensor::cat(&ts, 0);
        let p = flat(self.params.iter().map(|p| p.reshape([-1])).collect());
        let grad = flat(
            grads
                .iter()
                .zip(&self.params)
                .map(|(g, p)| match g.defined() {
                    true => g.reshape([-1]),
                    false => p.zeros_like().reshape([-1]),
                })
                .collect(),
        );
        let ipt = (&p * &grad).abs();
        let mut sensitivity = &self.sensitivity * beta1 + &ipt * (1.0 - beta1);
        let mut uncertainty =
            &self.uncertainty * beta2 + (&ipt - &sensitivity).abs() * (1.0 - beta2);
        if grads.iter().any(|g| !g.defined()) {
            // A parameter without a gradient keeps its averages.
            let has_grad = flat(
                grads
                    .iter()
                    .zip(&self.params)
                    .map(|(g, p)| p.ones_like().reshape([-1]) * f64::from(u8::from(g.defined())))
                    .collect(),
            )
            .gt(0.5);
            sensitivity = sensitivity.where_self(&has_grad, &self.sensitivity);
            uncertainty = uncertainty.where_self(&has_grad, &self.uncertainty);
        }
        self.sensitivity.copy_(&sensitivity);
        self.uncertainty.copy_(&uncertainty);
    }

    fn reset(&mut self) {
        let _ = self.sensitivity.zero_();
        let _ = self.uncertainty.zero_();
    }
}

/// One adapted matrix: its triplets, their importance, and which are kept (1) or masked (0).
struct Triplets {
    module_path: String,
    a: Tensor,
    e: Tensor,
    b: Tensor,
    importance: [Importance; 3],
    keep: Tensor,
}

impl Triplets {
    /// PEFT's `_combine_ipt`: `s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki))`, shape `(r)`, for
    /// this module alone (the reference [`PackedImportance::scores`] is tested against).
    #[cfg(test)]
    fn scores(&self) -> Tensor {
        let [a, e, b] = &self.importance;
        let ab =
            a.score().mean_dim(1, false, Kind::Float) + b.score().mean_dim(0, false, Kind::Float);
        e.score().view([-1]) + ab
    }
}

pub struct AdaLora {
    config: AdaLoraConfig,
    /// PEFT's `total_step`: the job's `training.max_steps`.
    total_step: u32,
    store: VarStore,
    modules: Vec<Triplets>,
    importance: PackedImportance,
    /// Every module's `keep`, packed `(modules x init_r)`.
    keep: Tensor,
    /// The budget of the last step (derived from the step, so a resumed run recomputes it).
    scheduled_budget: i64,
}

impl Attach for AdaLora {
    type Config = AdaLoraConfig;

    /// PEFT's `reset_lora_parameters`: `E = 0`, `A, B ~ N(0, 0.02)`, so ΔW = 0 at start.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (total_step, device) = (ctx.training.max_steps, ctx.device);
        let store = VarStore::new(device);
        let r = i64::from(config.init_r);
        let scaling = config.alpha / (f64::from(config.init_r) + 1e-5);
        let mut modules = Vec::new();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let path = module_path(&store, &path_name);
            let opts = (Kind::Float, device);
            let a = path.add(
                "lora_A",
                tch::no_grad(|| Tensor::empty([r, inp], opts).normal_(0.0, 0.02)),
                true,
            );
            let e = path.add("lora_E", Tensor::zeros([r, 1], opts), true);
            let b = path.add(
                "lora_B",
                tch::no_grad(|| Tensor::empty([out, r], opts).normal_(0.0, 0.02)),
                true,
            );
            let importance = [
                Importance::new(&path, "lora_A", &a),
                Importance::new(&path, "lora_E", &e),
                Importance::new(&path, "lora_B", &b),
            ];
            let keep = path.add("keep", Tensor::ones([r, 1], opts), false);
            linear.attach(Box::new(SvdBranch {
                a: a.shallow_clone(),
                e: e.shallow_clone(),
                b: b.shallow_clone(),
                scaling,
                dropout: config.dropout,
            }));
            modules.push(Triplets {
                module_path: path_name,
                a,
                e,
                b,
                importance,
                keep,
            });
        }
        let scheduled_budget = i64::from(config.init_r) * modules.len() as i64;
        let keeps: Vec<Tensor> = modules.iter().map(|m| m.keep.shallow_clone()).collect();
        Ok(AdaLora {
            config: config.clone(),
            total_step,
            store,
            importance: PackedImportance::new(&modules),
            keep: pack(&keeps),
            modules,
            scheduled_budget,
        })
    }
}

impl AdaLora {
    fn initial_budget(&self) -> i64 {
        i64::from(self.config.init_r) * self.modules.len() as i64
    }

    /// PEFT's `budget_schedule`: full budget until `tinit`, then a cubic decay to
    /// `target_r` per matrix at `total_step - tfinal`; whether this step masks.
    fn budget(&self, step: i64) -> (i64, bool) {
        let (tinit, tfinal, total) = (
            i64::from(self.config.tinit),
            i64::from(self.config.tfinal),
            i64::from(self.total_step),
        );
        let (initial, target) = (
            self.initial_budget(),
            i64::from(self.config.target_r) * self.modules.len() as i64,
        );
        if step <= tinit {
            (initial, false)
        } else if step > total - tfinal {
            (target, true)
        } else {
            let mul = 1.0 - (step - tinit) as f64 / (total - tfinal - tinit) as f64;
            let budget = ((initial - target) as f64 * mul.powi(3) + target as f64) as i64;
            (budget, step % i64::from(self.config.delta_t) == 0)
        }
    }

    /// PEFT's `mask_to_budget`: keeps the triplets scoring above the `(initial - budget)`-th
    /// smallest score over all matrices, and zeroes the others' E.
    fn mask_to_budget(&mut self, budget: i64) {
        let k = self.initial_budget() - budget;
        let scores = self.importance.scores();
        let keep = match k >= 1 {
            true => scores
                .gt_tensor(&scores.kthvalue(k, 0, false).0)
                .to_kind(Kind::Float),
            false => scores.ones_like(),
        };
        self.keep.copy_(&keep);
        self.apply_mask();
    }

    /// Zeroes the E of every masked triplet.
    fn apply_mask(&mut self) {
        let masked = self.keep.eq(0.0);
        let r = i64::from(self.config.init_r);
        for (i, m) in self.modules.iter_mut().enumerate() {
            let _ =
                m.e.masked_fill_(&masked.narrow(0, i as i64 * r, r).view([r, 1]), 0.0);
        }
    }
}

impl AdapterMethod for AdaLora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// `orth_reg_weight · mean over every A and B of ||A Aᵀ − I||_F, ||Bᵀ B − I||_F`, the
    /// norms un-squared as both codebases compute them.
    fn extra_loss(&self) -> Option<Tensor> {
        if self.config.orth_reg_weight <= 0.0 {
            return None;
        }
        let factors = self
            .modules
            .iter()
            .map(|m| (m.a.shallow_clone(), m.b.shallow_clone(), None))
            .collect();
        Some(mean_orthogonality(factors) * self.config.orth_reg_weight)
    }

    /// PEFT's `update_and_allocate(global_step)`, called after the optimizer step.
    fn after_step(&mut self, step: StepInfo) {
        let global = i64::from(step.index) - 1;
        let freeze_at = i64::from(self.total_step) - i64::from(self.config.tfinal);
        let (beta1, beta2) = (self.config.beta1, self.config.beta2);
        self.scheduled_budget = self.budget(global.min(freeze_at)).0;
        tch::no_grad(|| {
            if global < freeze_at {
                self.importance.update(beta1, beta2);
                let (budget, mask_now) = self.budget(global);
                if mask_now {
                    self.mask_to_budget(budget);
                }
            } else if global == freeze_at {
                let (budget, _) = self.budget(global);
                self.mask_to_budget(budget);
                self.importance.reset();
            } else {
                self.apply_mask();
            }
            if step.index == step.total {
                self.apply_mask();
            }
        });
    }

    /// The loop asks every step: every module's kept count in one copy to the host.
    fn rank_allocation(&self) -> Option<RankAllocation> {
        let r = i64::from(self.config.init_r);
        let kept = self
            .keep
            .view([-1, r])
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        let kept = Vec::<f32>::try_from(&kept).expect("one count per module");
        let per_module = self
            .modules
            .iter()
            .zip(kept)
            .map(|(m, n)| (m.module_path.clone(), n as u32))
            .collect();
        Some(RankAllocation {
            per_module,
            budget: Some(self.scheduled_budget as u32),
            sparsity: None,
        })
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let scaling = self.config.alpha / (f64::from(self.config.init_r) + 1e-5);
        let modules = self
            .modules
            .iter()
            .map(|m| {
                let keep = m.keep.view([-1]).gt(0.5);
                ExportedFactors {
                    module_path: m.module_path.clone(),
                    a: select(&(&m.a * &m.e), 0, &keep),
                    b: select(&m.b, 1, &keep) * scaling,
                }
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
        refuse_parent("adalora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    fn config(json: serde_json::Value) -> AdaLoraConfig {
        serde_json::from_value(json).unwrap()
    }

    /// PEFT's cubic budget: full until tinit, target after total - tfinal, masking every deltaT.
    #[test]
    fn budget_follows_the_cubic_schedule() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let c = config(
            serde_json::json!({"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 5, "delta_t": 2,
                                          "target_modules": ["q_proj", "v_proj"]}),
        );
        let ada = AdaLora::attach(&mut fixture.load(), &c, &cpu(&plan(20, 0))).unwrap();
        // 4 matrices: 24 triplets at first, 8 at the end; 12 steps of decay from step 3.
        let expected = |s: i64| (16.0 * (1.0 - (s - 3) as f64 / 12.0).powi(3) + 8.0) as i64;
        assert_eq!(ada.budget(3), (24, false));
        assert_eq!(ada.budget(4), (expected(4), true));
        assert_eq!(ada.budget(5), (expected(5), false));
        assert_eq!(ada.budget(15), (8, false));
        assert_eq!(ada.budget(16), (8, true));
        assert_eq!(expected(4), 20);
    }

    /// After masking, the lowest-scoring triplets have E = 0, the count kept is the budget,
    /// and the exported plain LoRA (masked triplets dropped) gives the trained model's output.
    #[test]
    fn masking_keeps_the_budget_and_the_export_keeps_the_output() {
        let _turn = torch_rng_turn();
        tch::manual_seed(3);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(
            serde_json::json!({"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"]}),
        );
        let mut ada = AdaLora::attach(&mut model, &c, &cpu(&plan(10, 0))).unwrap();
        tch::no_grad(|| {
            for m in &mut ada.modules {
                m.e.copy_(&Tensor::randn(m.e.size(), (Kind::Float, Device::Cpu)));
                let [a, _, b] = &mut m.importance;
                a.sensitivity.copy_(&Tensor::rand(
                    a.sensitivity.size(),
                    (Kind::Float, Device::Cpu),
                ));
                let _ = a.uncertainty.fill_(1.0);
                let _ = b.sensitivity.fill_(0.0);
            }
            ada.mask_to_budget(11);
        });
        let allocation = ada.rank_allocation().unwrap();
        assert_eq!(allocation.per_module.values().sum::<u32>(), 11);
        for m in &ada.modules {
            let masked = m.keep.eq(0.0).view([-1]);
            assert_eq!(
                m.e.view([-1])
                    .masked_select(&masked)
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
        }
        let mut exported = fixture.load();
        attach_frozen(&mut exported, &ada.export("file:///m"), Device::Cpu).unwrap();
        let (trained, published) = (logits(&model), logits(&exported));
        assert!(max_abs_diff(&trained, &published) < 1e-5);
        assert!(max_abs_diff(&trained, &logits(&fixture.load())) > 1e-4);
    }

    /// The packed update of every parameter's averages equals PEFT's `update_ipt` on each
    /// parameter alone, bit for bit, over several steps, for modules of two shapes.
    #[test]
    fn packed_importance_equals_each_parameters_update() {
        let _turn = torch_rng_turn();
        tch::manual_seed(41);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(
            serde_json::json!({"init_r": 3, "target_r": 2, "beta1": 0.8, "beta2": 0.7,
                               "target_modules": ["q_proj", "up_proj"]}),
        );
        let mut ada = AdaLora::attach(&mut model, &c, &cpu(&plan(10, 0))).unwrap();
        let shapes: std::collections::BTreeSet<Vec<i64>> =
            ada.modules.iter().map(|m| m.b.size()).collect();
        assert_eq!(shapes.len(), 2, "{shapes:?}");
        tch::no_grad(|| {
            for m in &mut ada.modules {
                m.e.copy_(&Tensor::randn(m.e.size(), (Kind::Float, Device::Cpu)));
            }
        });
        let params = |ada: &AdaLora| -> Vec<Tensor> {
            ada.modules
                .iter()
                .flat_map(|m| [&m.a, &m.e, &m.b])
                .map(Tensor::shallow_clone)
                .collect()
        };
        let mut want: Vec<(Tensor, Tensor)> = params(&ada)
            .iter()
            .map(|p| (p.zeros_like().detach(), p.zeros_like().detach()))
            .collect();
        for step in 0..4 {
            crate::training::optimizer::zero_grads(&ada.store.trainable_variables());
            let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
            model
                .forward(&ids, true)
                .square()
                .mean(Kind::Float)
                .backward();
            tch::no_grad(|| {
                ada.importance.update(0.8, 0.7);
                for (p, (s, u)) in params(&ada).iter().zip(&mut want) {
                    let ipt = (p * p.grad()).abs();
                    *s = &*s * 0.8 + &ipt * (1.0 - 0.8);
                    *u = &*u * 0.7 + (&ipt - &*s).abs() * (1.0 - 0.7);
                }
            });
            let got = ada.modules.iter().flat_map(|m| m.importance.iter());
            for (i, (importance, (s, u))) in got.zip(&want).enumerate() {
                let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
                assert_eq!(diff(&importance.sensitivity, s), 0.0, "step {step}, {i}");
                assert_eq!(diff(&importance.uncertainty, u), 0.0, "step {step}, {i}");
            }
            assert!(want
                .iter()
                .any(|(s, _)| s.abs().sum(Kind::Float).double_value(&[]) > 0.0));
        }
    }

    /// The scores computed a projection at a time through strided views equal each module's
    /// own, bit for bit, for projections of three shapes (q and o share one).
    #[test]
    fn grouped_scores_equal_each_modules_scores() {
        let _turn = torch_rng_turn();
        tch::manual_seed(43);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({"init_r": 3, "target_r": 2,
            "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"]}));
        let ada = AdaLora::attach(&mut model, &c, &cpu(&plan(10, 0))).unwrap();
        let layers = ada.modules.len() as i64 / 4;
        assert!(layers > 1);
        // One strided group per projection, each covering every layer.
        assert_eq!(ada.importance.groups.len(), 4);
        assert!(ada.importance.groups.iter().all(|g| g.n == layers));
        tch::no_grad(|| {
            for packed in [&ada.importance.sensitivity, &ada.importance.uncertainty] {
                packed
                    .shallow_clone()
                    .copy_(&Tensor::rand(packed.size(), (Kind::Float, Device::Cpu)));
            }
        });
        let want = Tensor::cat(
            &ada.modules.iter().map(Triplets::scores).collect::<Vec<_>>(),
            0,
        );
        let got = ada.importance.scores();
        assert_eq!(got.size(), want.size());
        assert!(want.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert_eq!((&got - &want).abs().max().double_value(&[]), 0.0);
    }

    /// Modules at unequal steps in the buffer fall into runs of their own, still right.
    #[test]
    fn score_groups_split_where_the_steps_differ() {
        let modules = [
            (0, "q", 4, 4, 0),
            (1, "q", 4, 4, 10),
            (2, "q", 4, 4, 20),
            (3, "q", 4, 4, 35),
            (4, "down", 8, 4, 50),
        ];
        let groups = ScoreGroup::of(&modules, Device::Cpu);
        let runs: Vec<(i64, i64, i64)> = groups.iter().map(|g| (g.first, g.step, g.n)).collect();
        assert_eq!(runs, [(50, 0, 1), (0, 10, 3), (35, 0, 1)]);
    }

    /// The training loop reports the allocation whenever it changes: all triplets first,
    /// then a shrinking total that ends at the target budget.
    #[test]
    fn the_training_loop_reports_the_allocation_as_it_shrinks() {
        use crate::training::{train, Reporter, TrainingInputs};
        use loraforge_spec::worker::EventPayload;

        struct Ranks(Vec<(u32, u32, usize)>, Vec<Option<u32>>);
        impl Reporter for Ranks {
            fn report(&mut self, event: EventPayload) {
                if let EventPayload::Ranks {
                    step,
                    total,
                    budget,
                    per_module,
                    ..
                } = event
                {
                    self.0.push((step, total, per_module.len()));
                    self.1.push(budget);
                }
            }
        }
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let root = fixture.dir.path();
        let spec = loraforge_spec::JobSpec::parse(
            format!(
                r#"{{"adapter_name":"demo","base_model":"file://{root}/model",
                    "dataset":{{"train":"file://{root}/data/train.jsonl"}},
                    "method":{{"type":"adalora","init_r":4,"target_r":1,"tinit":2,"tfinal":3,
                               "target_modules":["q_proj","v_proj"]}},
                    "training":{{"max_steps":12,"learning_rate":0.005,"batch_size":4,"seq_len":32}}}}"#,
                root = root.display()
            )
            .as_bytes(),
        )
        .unwrap();
        let (model_dir, train_data) = (root.join("model"), root.join("data/train.jsonl"));
        let inputs = TrainingInputs {
            model_dir: &model_dir,
            train_data: &train_data,
            validation_data: None,
            replay_data: None,
            parent: None,
            resume: None,
        };
        let mut ranks = Ranks(Vec::new(), Vec::new());
        let outcome = train(
            &spec,
            inputs,
            Device::Cpu,
            None,
            &mut ranks,
            &Default::default(),
        )
        .unwrap();
        let (reported, budgets) = (ranks.0, ranks.1);
        assert_eq!(reported.first(), Some(&(1, 16, 4)), "{reported:?}");
        assert_eq!(reported.last().map(|r| r.1), Some(4), "{reported:?}");
        // PEFT's schedule for 12 steps, tinit 2, tfinal 3: 16 up to step 2 (from 0), then
        // 4 + 12 (1 - (t - 2) / 7)^3, and the target from step 9.
        let schedule = |t: f64| (12.0 * (1.0 - (t - 2.0) / 7.0).powi(3) + 4.0) as u32;
        assert_eq!(budgets.first(), Some(&Some(16)));
        assert_eq!(budgets.last(), Some(&Some(4)));
        let steps: Vec<u32> = reported.iter().map(|r| r.0).collect();
        for (&step, budget) in steps.iter().zip(&budgets) {
            let global = f64::from(step - 1);
            let want = match global {
                g if g <= 2.0 => 16,
                g if g >= 9.0 => 4,
                g => schedule(g),
            };
            assert_eq!(*budget, Some(want), "step {step}: {budgets:?}");
        }
        // An event whenever the allocation or the budget changes, never a repeat.
        assert!(
            reported
                .windows(2)
                .zip(budgets.windows(2))
                .all(|(w, b)| w[0].0 < w[1].0 && (w[0].1 != w[1].1 || b[0] != b[1])),
            "{reported:?} {budgets:?}"
        );
        let published: i64 = outcome
            .adapter
            .tensors
            .iter()
            .filter(|(k, _)| k.ends_with("lora_A.weight"))
            .map(|(_, t)| t.size()[0])
            .sum();
        assert_eq!(published, 4);
    }
}
