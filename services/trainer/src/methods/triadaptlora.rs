//! TriAdaptLoRA (Liang, Wang, Zeng, 2025, arXiv 2501.08008), following the authors' PEFT fork
//! (`YaoLiang2023/DiverValue-Bench`, `peft/src/peft/tuners/triadaptlora.py`: `TriAdaptLinear`,
//! `TriAdaptLoraLayer.compute_score`, `RankAllocator.compute_threshold`):
//! `ΔW = B C A · alpha / (rank + 1e-5)` with `C` block-triangular: every growth by `add_r`
//! ranks adds a block row `C_row` (add_r × new rank) below and a block column `C_col`
//! (new rank × add_r) to the right, so `C = C_row + C_col` (both on the diagonal blocks).
//! At allocation steps, a module's score is the change of `||C||_F / blocks` since the
//! previous allocation, and the `n` highest-scoring modules grow, `n` from the budget left
//! times the run's progress (linear) or its power (non-linear).
//!
//! Ranks are preallocated per module (shapes never change; checkpoints restore by name and
//! shape): each rank's birth (`born`, the step of its first update) says which entries exist; a `C_row` entry
//! (p, q) exists when rank q is no younger than rank p, a `C_col` entry when rank p is no
//! younger than q, and an entry is born with the later of its two ranks. The factors are
//! stepped here by [`RankAdam`]: fresh moments and bias correction per added block, as the
//! reference's `optimizer.add_param_group`. Each factor of every module, its moments, the
//! births and the triangles' masks are packed into one buffer each ([`super::pack`]), so the
//! per-step AdamW runs over all modules at once.
//!
//! Chosen where the reference is silent or unusable:
//! - Initialisation: the stored code sets `B = 0` and `C = 0` (its random lines commented
//!   out), which leaves every gradient zero forever. Here `A ~ N(0, 0.02)`, both triangles of
//!   `C ~ N(0, 0.02)`, `B = 0`, for the first ranks and every added block, so ΔW starts at 0
//!   and every factor learns.
//! - Every rank's learning rate is the job's (the call site, and so how the reference's
//!   scheduler treats added groups, is not in the stored code); the weight decay is the job's
//!   for all ranks (the reference's `weight_decay` field sets the added groups' only).
//! - The reference has no per-module cap; `max_module_rank` caps each module's rank, further
//!   lowered to what the schedule can reach in `training.max_steps`. Modules at their cap take
//!   no part in an allocation: `n` is at most the number that can still grow.
//! - The progress `mul` uses the run's real length (`StepInfo.total`, shorter than
//!   `training.max_steps` when `training.epochs` ends the run), the reference's `total_step`.
//! - Ranks added at step `s` are born at `s + 1`: they were masked in step `s`'s forward pass,
//!   so their gradient there is 0, and PyTorch's AdamW skips a new group until its first real
//!   gradient (bias correction from 1 at `s + 1`, no weight decay at `s`).
//! - `top_k` (unused by the reference's growth) is not a field. The allocation runs before the
//!   optimizer step, as IncreLoRA's `update_and_increase`, the code it derives from.
//! - Published as plain LoRA with C folded into A: `A' = C A`, `B' = B · alpha / (rank + 1e-5)`.

use super::rank_adam::{Moments, RankAdam, RankAxis, RankGroup, UNBORN};
use super::{
    mean_orthogonality, module_path, pack, per_module_lora, refuse_parent, select, ExportedFactors,
};
use super::{Attach, AttachContext};
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation, StepInfo};
use crate::model::llama::LowRank;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::{RankGrowthModel, TriAdaptLoraConfig};
use loraforge_spec::TrainingConfig;
use tch::nn::{Path, VarStore};
use tch::{Kind, Tensor};

/// Which ranks exist, and which entries of the two triangles, derived from each rank's birth
/// `(K, 1)`. Kept in the store (non-trainable) so that no forward pass rebuilds it: a growth
/// re-derives it ([`Layout::update`]) and a checkpoint restores it with the births.
struct Layout {
    /// `(K, 1)`, 1 for created ranks.
    created: Tensor,
    /// `(K, K)`: `C_row` entry (p, q) exists when q is no younger than p (block lower part).
    lower: Tensor,
    /// `(K, K)`: `C_col` entry (p, q) exists when p is no younger than q (block upper part).
    upper: Tensor,
    /// `(1)`: `alpha / (rank + 1e-5)`.
    scale: Tensor,
}

impl Layout {
    fn derive(born: &Tensor, alpha: f64) -> Layout {
        let created = born.ge(0.0);
        let (p, q) = (born.view([-1, 1]), born.view([1, -1]));
        let both = created.view([-1, 1]).logical_and(&created.view([1, -1]));
        let created = created.to_kind(Kind::Float);
        Layout {
            lower: both.logical_and(&q.le_tensor(&p)).to_kind(Kind::Float),
            upper: both.logical_and(&p.le_tensor(&q)).to_kind(Kind::Float),
            scale: ((created.sum(Kind::Float) + 1e-5).reciprocal() * alpha).view([1]),
            created,
        }
    }

    /// The layout of `born`, as variables under `path`.
    fn add(path: &Path, born: &Tensor, alpha: f64) -> Layout {
        let derived = Layout::derive(born, alpha);
        Layout {
            created: path.add("layout_created", derived.created, false),
            lower: path.add("layout_lower", derived.lower, false),
            upper: path.add("layout_upper", derived.upper, false),
            scale: path.add("layout_scale", derived.scale, false),
        }
    }

    /// Re-derives the stored layout after `born` changed.
    fn update(&mut self, born: &Tensor, alpha: f64) {
        let derived = Layout::derive(born, alpha);
        self.created.copy_(&derived.created);
        self.lower.copy_(&derived.lower);
        self.upper.copy_(&derived.upper);
        self.scale.copy_(&derived.scale);
    }

    fn shallow_clone(&self) -> Layout {
        Layout {
            created: self.created.shallow_clone(),
            lower: self.lower.shallow_clone(),
            upper: self.upper.shallow_clone(),
            scale: self.scale.shallow_clone(),
        }
    }

    fn core(&self, c_row: &Tensor, c_col: &Tensor) -> Tensor {
        c_row * &self.lower + c_col * &self.upper
    }
}

struct TriangularBranch {
    a: Tensor,
    b: Tensor,
    c_row: Tensor,
    c_col: Tensor,
    layout: Layout,
    dropout: f64,
}

impl LinearAdapter for TriangularBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let layout = &self.layout;
        let delta = x32
            .linear::<Tensor>(&(&self.a * &layout.created), None)
            .linear::<Tensor>(&layout.core(&self.c_row, &self.c_col), None)
            .linear::<Tensor>(&(&self.b * layout.created.view([1, -1])), None)
            * &layout.scale;
        delta.to_kind(x.kind())
    }

    /// The same product as two factors: `C (A ⊙ created)` `(K, in)` and
    /// `(B ⊙ createdᵀ) · scale` `(out, K)`, derived each pass (the `K x K` core folded into
    /// `A`), so that the layer can run as a low-rank branch.
    fn low_rank(&self, train: bool) -> Option<LowRank> {
        (!train || self.dropout == 0.0).then(|| {
            LowRank::derived(train, 1.0, || {
                let layout = &self.layout;
                let core = layout.core(&self.c_row, &self.c_col);
                let a = core.mm(&(&self.a * &layout.created));
                let b = &self.b * layout.created.view([1, -1]) * &layout.scale;
                (a, b)
            })
        })
    }
}

/// One adapted matrix with room for `capacity` ranks.
struct TriangularModule {
    module_path: String,
    a: Tensor,
    b: Tensor,
    c_row: Tensor,
    c_col: Tensor,
    /// Per rank `(K, 1)`: the step (from 0) of its first update, 0 for the first ones, the
    /// step after its allocation for added ones, or UNBORN.
    born: Tensor,
    layout: Layout,
    /// `||C||_F / blocks` at the previous allocation (`preNormValue`), shape `(1)`.
    previous_norm: Tensor,
    capacity: i64,
}

impl TriangularModule {
    /// `||C||_F / blocks` `(1)` at rank `rank`, blocks counting the first one and every growth
    /// since: this module alone (the reference [`TriAdaptLora::normalized_norms`] is tested
    /// against).
    #[cfg(test)]
    fn normalized_norm(&self, rank: i64, initial: i64, add: i64) -> Tensor {
        let blocks = 1 + (rank - initial) / add;
        (self.layout.core(&self.c_row, &self.c_col).norm() / blocks as f64).view([1])
    }
}

pub struct TriAdaptLora {
    config: TriAdaptLoraConfig,
    training: TrainingConfig,
    store: VarStore,
    modules: Vec<TriangularModule>,
    target_total: i64,
    /// Every module's variables of one kind, packed (module order): `born` `(modules x K)`,
    /// the triangles' masks `(modules x K x K)`, the norms at the last allocation `(modules)`.
    born: Tensor,
    lower: Tensor,
    upper: Tensor,
    previous_norm: Tensor,
    /// A, B, C_row, C_col of every module, with their moments.
    factors: [RankGroup; 4],
    capacity: i64,
}

impl Attach for TriAdaptLora {
    type Config = TriAdaptLoraConfig;

    /// `A ~ N(0, 0.02)`, `C_row, C_col ~ N(0, 0.02)`, `B = 0` everywhere (see the module
    /// docs); ranks not yet created are masked until then.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (training, device) = (ctx.training, ctx.device);
        let store = VarStore::new(device);
        let (r0, add) = (i64::from(config.init_rank), i64::from(config.rank_step()));
        let reachable = r0 + add * i64::from(config.allocation_steps(training.max_steps));
        let capacity = i64::from(config.module_rank_cap()).min(reachable);
        let births: Vec<f32> = (0..capacity)
            .map(|i| if i < r0 { 0.0 } else { UNBORN as f32 })
            .collect();
        let count = model.target_linears(&config.target_modules)?.len() as i64;
        let target_total = config
            .target_total_rank
            .map(i64::from)
            .unwrap_or(i64::from(config.reference_rank) * count);
        // Growth needs `total_rank < target_total`: a budget already met at the start would
        // train a fixed init_rank LoRA under this method's name.
        if target_total <= r0 * count {
            let budget = match config.target_total_rank {
                Some(_) => format!("method.target_total_rank ({target_total})"),
                None => format!(
                    "method.reference_rank x modules ({} x {count} = {target_total})",
                    config.reference_rank
                ),
            };
            return Err(user_error(format!(
                "the rank budget {budget} must exceed init_rank x modules ({r0} x {count} = {}), \
                 the rank at the start: otherwise no rank is ever added",
                r0 * count
            )));
        }
        let mut modules = Vec::new();
        let mut moments: [Vec<Moments>; 4] = Default::default();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let path = module_path(&store, &path_name);
            let opts = (Kind::Float, device);
            let normal =
                |shape: [i64; 2]| tch::no_grad(|| Tensor::empty(shape, opts).normal_(0.0, 0.02));
            let a = path.add("lora_A", normal([capacity, inp]), true);
            let b = path.add("lora_B", Tensor::zeros([out, capacity], opts), true);
            let c_row = path.add("lora_C_row", normal([capacity, capacity]), true);
            let c_col = path.add("lora_C_col", normal([capacity, capacity]), true);
            for (moments, (name, p)) in moments.iter_mut().zip([
                ("lora_A", &a),
                ("lora_B", &b),
                ("lora_C_row", &c_row),
                ("lora_C_col", &c_col),
            ]) {
                moments.push(Moments::new(&path, name, p));
            }
            let born = path.add(
                "born",
                Tensor::from_slice(&births)
                    .view([capacity, 1])
                    .to_device(device),
                false,
            );
            let layout = Layout::add(&path, &born, config.alpha);
            // `reset_lora_parameters` records the first norm.
            let norm = layout.core(&c_row, &c_col).norm().detach().view([1]);
            let previous_norm = path.add("previous_norm", norm, false);
            linear.attach(Box::new(TriangularBranch {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                c_row: c_row.shallow_clone(),
                c_col: c_col.shallow_clone(),
                layout: layout.shallow_clone(),
                dropout: config.dropout,
            }));
            modules.push(TriangularModule {
                module_path: path_name,
                a,
                b,
                c_row,
                c_col,
                born,
                layout,
                previous_norm,
                capacity,
            });
        }
        let each = |pick: fn(&TriangularModule) -> &Tensor| -> Vec<Tensor> {
            modules.iter().map(|m| pick(m).shallow_clone()).collect()
        };
        let [ma, mb, mrow, mcol] = moments;
        let factors = [
            RankGroup::by_rank(each(|m| &m.a), ma, RankAxis::Rows, capacity),
            RankGroup::by_rank(each(|m| &m.b), mb, RankAxis::Columns, capacity),
            RankGroup::by_element(each(|m| &m.c_row), mrow),
            RankGroup::by_element(each(|m| &m.c_col), mcol),
        ];
        Ok(TriAdaptLora {
            born: pack(&each(|m| &m.born)),
            lower: pack(&each(|m| &m.layout.lower)),
            upper: pack(&each(|m| &m.layout.upper)),
            previous_norm: pack(&each(|m| &m.previous_norm)),
            config: config.clone(),
            training: training.clone(),
            store,
            modules,
            target_total,
            factors,
            capacity,
        })
    }
}

impl TriAdaptLora {
    /// Every module's rank, with one copy to the host.
    fn ranks(&self) -> Vec<i64> {
        let counts = self.born.view([-1, self.capacity]).ge(0.0).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Int64,
        );
        Vec::<i64>::try_from(&counts).expect("one count per module")
    }

    /// `compute_threshold`'s count of growing modules at step `now` of a `total`-step run:
    /// the budget left times the progress `mul` (linear), or the budget left to the power
    /// `mul` (non-linear), at least 1 and at most the modules that can grow.
    fn growing_count(&self, now: i64, total: u32, total_rank: i64, growable: usize) -> usize {
        let warmup = f64::from(self.config.init_warmup);
        let mul = (now as f64 - warmup) / (f64::from(total) - warmup);
        let left = (self.target_total - total_rank) as f64;
        let n = match self.config.rank_growth_model {
            RankGrowthModel::Linear => (left * mul) as i64,
            RankGrowthModel::Nonlinear => (mul * left.ln()).exp() as i64,
        };
        (n.max(1) as usize).min(growable)
    }

    /// Every module's [`TriangularModule::normalized_norm`] at once, from the packed cores and
    /// masks: a few kernels for all modules rather than five per module (on a GPU, launches
    /// were the allocation's cost).
    fn normalized_norms(&self, ranks: &[i64], initial: i64, add: i64) -> Tensor {
        let k = self.capacity;
        let cube = |t: &Tensor| t.view([-1, k, k]);
        let [_, _, c_row, c_col] = &self.factors;
        let core =
            cube(c_row.value()) * cube(&self.lower) + cube(c_col.value()) * cube(&self.upper);
        let blocks: Vec<f32> = ranks
            .iter()
            .map(|&rank| (1 + (rank - initial) / add) as f32)
            .collect();
        let blocks = Tensor::from_slice(&blocks).to_device(core.device());
        core.flatten(1, -1).norm_scalaropt_dim(2, [1], false) / blocks
    }

    /// `increase_to_target_rank` at the modules' ranks `ranks`: every module's score (the
    /// change of its normalised norm since the last call, which it records, as
    /// `compute_score`), then the modules scoring at least the n-th highest among those below
    /// their cap grow by `incre_rank_num` ranks, born at the next step.
    fn allocate(&mut self, now: i64, total: u32, ranks: &[i64]) {
        let (r0, add) = (
            i64::from(self.config.init_rank),
            i64::from(self.config.rank_step()),
        );
        let norms = self.normalized_norms(ranks, r0, add);
        let changes = (&norms - &self.previous_norm).to_kind(Kind::Double);
        let changes = Vec::<f64>::try_from(&changes).expect("one score per module");
        self.previous_norm.copy_(&norms);
        let scores: Vec<Option<f64>> = self
            .modules
            .iter()
            .zip(ranks.iter().zip(changes))
            .map(|(m, (&rank, score))| (rank + add <= m.capacity).then_some(score))
            .collect();
        let mut growable: Vec<f64> = scores.iter().flatten().copied().collect();
        let n = self.growing_count(now, total, ranks.iter().sum(), growable.len());
        if n == 0 {
            return;
        }
        growable.sort_by(|x, y| y.total_cmp(x));
        let threshold = growable[n - 1];
        let alpha = self.config.alpha;
        for ((m, score), &rank) in self.modules.iter_mut().zip(scores).zip(ranks) {
            if score.is_some_and(|s| s >= threshold) {
                let _ = m.born.narrow(0, rank, add).fill_((now + 1) as f64);
                m.layout.update(&m.born, alpha);
            }
        }
    }
}

impl AdapterMethod for TriAdaptLora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// Everything is stepped in `after_step` by the rank-aware AdamW.
    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// `orth_reg_weight · mean over modules' A and B of ||A Aᵀ − I||_F, ||Bᵀ B − I||_F` over
    /// the created ranks; skipped at weight 0, as the reference.
    fn extra_loss(&self) -> Option<Tensor> {
        if self.config.orth_reg_weight <= 0.0 {
            return None;
        }
        let factors = self
            .modules
            .iter()
            .map(|m| {
                let created = &m.layout.created;
                (
                    m.a.shallow_clone(),
                    m.b.shallow_clone(),
                    Some(created.shallow_clone()),
                )
            })
            .collect();
        Some(mean_orthogonality(factors) * self.config.orth_reg_weight)
    }

    /// `update_and_increase(global_step)`, then the AdamW step of every created entry.
    fn after_step(&mut self, step: StepInfo) {
        let now = i64::from(step.index) - 1;
        let c = &self.config;
        let allocates = now > i64::from(c.init_warmup) && now % i64::from(c.incre_interval) == 0;
        tch::no_grad(|| {
            if allocates {
                let ranks = self.ranks();
                if ranks.iter().sum::<i64>() < self.target_total {
                    self.allocate(now, step.total, &ranks);
                }
            }
            let adam = RankAdam {
                weight_decay: self.training.weight_decay,
            };
            let device = self.store.device();
            let lr = Tensor::from(step.lr).to_device(device);
            let unborn = Tensor::from(UNBORN as f32).to_device(device);
            // An entry of C is born with the later of its row's and column's ranks.
            let k = self.capacity;
            let later = self
                .born
                .view([-1, k, 1])
                .maximum(&self.born.view([-1, 1, k]));
            let lower_born = later.where_self(&self.lower.view([-1, k, k]).gt(0.5), &unborn);
            let upper_born = later.where_self(&self.upper.view([-1, k, k]).gt(0.5), &unborn);
            let [a, b, c_row, c_col] = &self.factors;
            a.step(&adam, &self.born, &lr, now);
            b.step(&adam, &self.born, &lr, now);
            c_row.step(&adam, &lower_born, &lr, now);
            c_col.step(&adam, &upper_born, &lr, now);
        });
    }

    fn rank_allocation(&self) -> Option<RankAllocation> {
        let per_module = self
            .modules
            .iter()
            .zip(self.ranks())
            .map(|(m, rank)| (m.module_path.clone(), rank as u32))
            .collect();
        Some(RankAllocation {
            per_module,
            budget: Some(self.target_total as u32),
            sparsity: None,
        })
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let modules = self
            .modules
            .iter()
            .zip(self.ranks())
            .map(|(m, rank)| {
                let layout = &m.layout;
                let keep = layout.created.view([-1]).gt(0.5);
                let folded = layout
                    .core(&m.c_row, &m.c_col)
                    .matmul(&(&m.a * &layout.created));
                let scale = self.config.alpha / (rank as f64 + 1e-5);
                ExportedFactors {
                    module_path: m.module_path.clone(),
                    a: select(&folded, 0, &keep),
                    b: select(&m.b, 1, &keep) * scale,
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
        refuse_parent("triadaptlora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    fn config(json: serde_json::Value) -> TriAdaptLoraConfig {
        serde_json::from_value(json).unwrap()
    }

    fn training(max_steps: u32) -> TrainingConfig {
        serde_json::from_value(serde_json::json!({"max_steps": max_steps, "learning_rate": 0.01}))
            .unwrap()
    }

    fn ranks(method: &TriAdaptLora) -> Vec<i64> {
        method.ranks()
    }

    /// The norms of all modules at once equal each module's own.
    #[test]
    fn the_packed_norms_are_each_modules_norm() {
        let _turn = torch_rng_turn();
        tch::manual_seed(47);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({"init_rank": 2, "reference_rank": 4,
            "incre_rank_num": 1, "target_modules": ["q_proj", "down_proj"]}));
        let method = TriAdaptLora::attach(&mut model, &c, &cpu(&training(10))).unwrap();
        tch::no_grad(|| {
            for group in &method.factors[2..] {
                let v = group.value();
                v.shallow_clone()
                    .copy_(&Tensor::randn(v.size(), (Kind::Float, Device::Cpu)));
            }
            // Modules at different ranks, so that the blocks differ.
            let k = method.capacity;
            for (i, m) in method.modules.iter().enumerate() {
                let grown = (i as i64 % 3).min(k - 2);
                let _ = m.born.shallow_clone().narrow(0, 2, grown).fill_(1.0);
                m.layout.shallow_clone().update(&m.born, 8.0);
            }
        });
        let ranks = method.ranks();
        assert!(ranks.iter().any(|&r| r != ranks[0]), "{ranks:?}");
        let want = Tensor::cat(
            &method
                .modules
                .iter()
                .zip(&ranks)
                .map(|(m, &rank)| m.normalized_norm(rank, 2, 1))
                .collect::<Vec<_>>(),
            0,
        );
        let got = method.normalized_norms(&ranks, 2, 1);
        let gap = (&got - &want).abs().max().double_value(&[]);
        assert!(gap <= 1e-6 * want.abs().max().double_value(&[]), "{gap}");
    }

    /// Trains `steps` steps as the loop does and checks every allocation: at steps above
    /// init_warmup that incre_interval divides, the `n` modules with the largest change of
    /// `||C||_F / blocks` grow by incre_rank_num, n from the budget left and the progress
    /// (`expected_n(left, mul)`), the progress from the run's length (12 steps, cut short of
    /// `training.max_steps` = 40 as an `epochs` limit does). Returns the trained model and method.
    fn grow_and_check(
        growth: &str,
        expected_n: impl Fn(f64, f64) -> i64,
    ) -> (FixtureModel, LlamaModel, TriAdaptLora, usize) {
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "init_rank": 1, "reference_rank": 4, "incre_rank_num": 1, "init_warmup": 1,
            "incre_interval": 2, "rank_growth_model": growth,
            "target_modules": ["q_proj", "v_proj"]
        }));
        let total = 12;
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training(40))).unwrap();
        let modules = method.modules.len();
        assert!(modules >= 4, "the fixture has {modules} modules");
        let target = 4 * modules as i64;
        let mut allocations = 0;
        for index in 1..=total {
            let now = i64::from(index) - 1;
            crate::training::optimizer::zero_grads(&method.store.trainable_variables());
            let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
            let loss =
                model.forward(&ids, true).square().mean(Kind::Float) + method.extra_loss().unwrap();
            loss.backward();
            let was = ranks(&method);
            // The scores the allocation will see: the normalised norms' change.
            let scores: Vec<f64> = method
                .modules
                .iter()
                .zip(&was)
                .map(|(m, &rank)| {
                    (m.normalized_norm(rank, 1, 1) - &m.previous_norm).double_value(&[0])
                })
                .collect();
            method.after_step(StepInfo {
                index,
                total,
                lr: 0.01,
            });
            let is = ranks(&method);
            let left = target - was.iter().sum::<i64>();
            if now > 1 && now % 2 == 0 && left > 0 {
                let mul = (now - 1) as f64 / (f64::from(total) - 1.0);
                let n = expected_n(left as f64, mul).max(1).min(modules as i64) as usize;
                let mut order: Vec<usize> = (0..modules).collect();
                order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
                let mut chosen = order[..n].to_vec();
                chosen.sort();
                let grown: Vec<usize> = (0..modules).filter(|&i| is[i] != was[i]).collect();
                assert_eq!(grown, chosen, "step {now}: n = {n}, scores {scores:?}");
                assert!(grown.iter().all(|&i| is[i] == was[i] + 1));
                allocations += 1;
            } else {
                assert_eq!(was, is, "step {now} allocates nothing");
            }
        }
        (fixture, model, method, allocations)
    }

    #[test]
    fn linear_growth_follows_the_threshold_rule_and_the_export_folds_c_into_a() {
        let _turn = torch_rng_turn();
        tch::manual_seed(13);
        let (fixture, model, method, allocations) =
            grow_and_check("linear", |left, mul| (left * mul) as i64);
        assert_eq!(allocations, 5);
        // Some allocation grew more than one module (the count rises with the progress).
        let grown: i64 = ranks(&method).iter().sum::<i64>() - method.modules.len() as i64;
        assert!(grown > 5, "{:?}", ranks(&method));

        let adapter = method.export("file:///m");
        let allocation = method.rank_allocation().unwrap();
        for (module, rank) in &adapter.config.as_lora().unwrap().rank_pattern {
            assert_eq!(*rank, allocation.per_module[module]);
        }
        let mut exported = fixture.load();
        attach_frozen(&mut exported, &adapter, Device::Cpu).unwrap();
        let (trained, published) = (logits(&model), logits(&exported));
        assert!(max_abs_diff(&trained, &published) < 1e-5);
        assert!(max_abs_diff(&trained, &logits(&fixture.load())) > 1e-4);
    }

    #[test]
    fn nonlinear_growth_follows_the_exponential_rule() {
        let _turn = torch_rng_turn();
        tch::manual_seed(17);
        let (_, _, method, allocations) =
            grow_and_check("nonlinear", |left, mul| (mul * left.ln()).exp() as i64);
        assert_eq!(allocations, 5);
        assert!(ranks(&method).iter().any(|&r| r > 1));
    }

    /// The layout of docs/methods.md (TriAdaptLoRA) built block by block: after the first block of
    /// `init_rank` ranks and growths by 3 and then 5 ranks (R_i = 2, 5, 10), `C` is the
    /// vertical stack of `C_row_i` (add_r x R_i) zero-padded on the right plus the horizontal
    /// stack of `C_col_i` (R_i x add_r) zero-padded at the bottom, the diagonal blocks taking
    /// both; ranks past R are absent and the scale is `alpha / (R + 1e-5)`.
    #[test]
    fn the_layout_is_the_block_triangular_c_of_the_reference() {
        let _turn = torch_rng_turn();
        tch::manual_seed(31);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "init_rank": 2, "reference_rank": 8, "incre_rank_num": 3, "target_modules": ["q_proj"]
        }));
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training(40))).unwrap();
        let capacity = method.modules[0].capacity;
        assert!(capacity >= 12, "capacity {capacity}");
        tch::no_grad(|| {
            for m in &mut method.modules {
                let _ = m.c_row.normal_(0.0, 1.0);
                let _ = m.c_col.normal_(0.0, 1.0);
            }
            // Late in the run every module grows (n = the budget left x 39/40, above 2).
            for (now, add) in [(38, 3), (39, 5)] {
                method.config.incre_rank_num = Some(add);
                let ranks = method.ranks();
                method.allocate(now, 40, &ranks);
            }
        });
        assert!(
            method.ranks().iter().all(|&r| r == 10),
            "{:?}",
            method.ranks()
        );
        let opts = (Kind::Float, Device::Cpu);
        for m in &method.modules {
            let (rows, cols) = (
                Tensor::zeros([capacity, capacity], opts),
                Tensor::zeros([capacity, capacity], opts),
            );
            let mut start = 0;
            for end in [2, 5, 10] {
                let add = end - start;
                // C_row_i: rows start..end, columns 0..R_i; C_col_i: rows 0..R_i, its columns.
                rows.narrow(0, start, add)
                    .narrow(1, 0, end)
                    .copy_(&m.c_row.narrow(0, start, add).narrow(1, 0, end));
                cols.narrow(0, 0, end)
                    .narrow(1, start, add)
                    .copy_(&m.c_col.narrow(0, 0, end).narrow(1, start, add));
                start = end;
            }
            let want = rows + cols;
            let got = m.layout.core(&m.c_row, &m.c_col);
            assert_eq!(max_abs_diff(&got, &want), 0.0);
            let created = Vec::<f32>::try_from(&m.layout.created.view([-1])).unwrap();
            let want_created: Vec<f32> = (0..capacity).map(|i| f32::from(i < 10)).collect();
            assert_eq!(created, want_created);
            let scale = m.layout.scale.double_value(&[0]);
            assert!((scale - c.alpha / (10.0 + 1e-5)).abs() < 1e-6 * scale);
            // The births: the first block at 0, each added one at the step after its growth.
            let born = Vec::<f32>::try_from(&m.born.view([-1]).narrow(0, 0, 11)).unwrap();
            assert_eq!(born, [0., 0., 39., 39., 39., 40., 40., 40., 40., 40., -1.]);
        }
    }

    /// A rank added at step s was masked in s's forward pass (gradient 0): as a parameter
    /// group PyTorch's AdamW skips until its first gradient, it is left untouched at s (no
    /// weight decay) and takes AdamW's first step (bias correction from 1) at s + 1.
    #[test]
    fn added_ranks_take_their_first_adam_step_at_their_first_gradient() {
        let _turn = torch_rng_turn();
        tch::manual_seed(29);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "init_rank": 1, "reference_rank": 4, "incre_rank_num": 1, "init_warmup": 0,
            "incre_interval": 1, "orth_reg_weight": 0.0, "target_modules": ["q_proj"]
        }));
        let (lr, wd) = (0.01, 0.1);
        let training: TrainingConfig = serde_json::from_value(serde_json::json!({
            "max_steps": 6, "learning_rate": lr, "weight_decay": wd
        }))
        .unwrap();
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training)).unwrap();
        let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
        // Every module's second rank: its row of A and that row's gradient.
        let rows = |method: &TriAdaptLora| -> Vec<(Tensor, Tensor)> {
            let rows = method.modules.iter();
            rows.map(|m| (m.a.get(1).copy(), m.a.grad().get(1).copy()))
                .collect()
        };
        let mut grown = None;
        for index in 1..=3 {
            crate::training::optimizer::zero_grads(&method.store.trainable_variables());
            model
                .forward(&ids, true)
                .square()
                .mean(Kind::Float)
                .backward();
            let before = rows(&method);
            method.after_step(StepInfo {
                index,
                total: 6,
                lr,
            });
            let after = rows(&method);
            match index {
                1 => assert!(ranks(&method).iter().all(|&r| r == 1)),
                // Step 1 (from 0) adds a module's rank 1: masked, so no gradient, and left as
                // it is.
                2 => {
                    let m = ranks(&method).iter().position(|&r| r == 2).unwrap();
                    let ((row, grad), (row_after, _)) = (&before[m], &after[m]);
                    assert_eq!(grad.abs().max().double_value(&[]), 0.0);
                    assert!(max_abs_diff(row_after, row) == 0.0);
                    grown = Some(m);
                }
                // Its first real gradient: AdamW's first step, `-lr g / (|g| + eps)`.
                _ => {
                    let m = grown.unwrap();
                    let ((row, grad), (row_after, _)) = (&before[m], &after[m]);
                    assert!(grad.abs().max().double_value(&[]) > 1e-6);
                    let want = row * (1.0 - lr * wd) - grad / (grad.abs() + 1e-8) * lr;
                    let diff = max_abs_diff(row_after, &want);
                    assert!(diff < 1e-6, "{diff}");
                }
            }
        }
    }

    /// A budget the first ranks already meet is the user's error, naming the field.
    #[test]
    fn a_budget_met_at_the_start_is_refused() {
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let modules = model.linears_mut(&["q_proj"]).count() as u32;
        for (json, field) in [
            (
                serde_json::json!({"init_rank": 2, "target_total_rank": 2 * modules,
                                   "target_modules": ["q_proj"]}),
                "method.target_total_rank",
            ),
            (
                serde_json::json!({"init_rank": 3, "reference_rank": 3,
                                   "target_modules": ["q_proj"]}),
                "method.reference_rank",
            ),
        ] {
            let err = TriAdaptLora::attach(&mut model, &config(json), &cpu(&training(10)))
                .err()
                .unwrap();
            assert!(crate::error::classify(&err).is_some_and(|f| matches!(
                f,
                crate::error::Failure::User(m) if m.contains(field)
            )));
        }
        let one_more = config(serde_json::json!({
            "init_rank": 2, "target_total_rank": 2 * modules + 1, "target_modules": ["q_proj"]
        }));
        assert!(TriAdaptLora::attach(&mut model, &one_more, &cpu(&training(10))).is_ok());
    }

    /// The stored reference initialises B = 0 and C = 0 together, which leaves every gradient
    /// zero; with C random, one step moves B and C and the output.
    #[test]
    fn every_factor_learns_from_the_start() {
        let _turn = torch_rng_turn();
        tch::manual_seed(19);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({"target_modules": ["q_proj"]}));
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training(10))).unwrap();
        assert!(max_abs_diff(&logits(&model), &logits(&fixture.load())) == 0.0);
        let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
        model
            .forward(&ids, true)
            .square()
            .mean(Kind::Float)
            .backward();
        let m = &method.modules[0];
        assert!(m.b.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        method.after_step(StepInfo {
            index: 1,
            total: 10,
            lr: 0.01,
        });
        model
            .forward(&ids, true)
            .square()
            .mean(Kind::Float)
            .backward();
        let m = &method.modules[0];
        for t in [&m.a, &m.c_row, &m.c_col] {
            assert!(t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }

    /// The regulariser against its definition on the created ranks' rows of A and columns of B.
    #[test]
    fn the_orthogonal_regulariser_covers_the_created_ranks() {
        let _turn = torch_rng_turn();
        tch::manual_seed(23);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "init_rank": 2, "reference_rank": 4, "orth_reg_weight": 0.4,
            "target_modules": ["q_proj", "up_proj"]
        }));
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training(10))).unwrap();
        let alpha = method.config.alpha;
        tch::no_grad(|| {
            let m = &mut method.modules[0];
            let _ = m.born.narrow(0, 2, 2).fill_(3.0);
            m.layout.update(&m.born, alpha);
            let _ = m.b.normal_(0.0, 0.1);
        });
        let got = method.extra_loss().unwrap().double_value(&[]);
        let mut norms = Vec::new();
        for m in &method.modules {
            let created = m.born.view([-1]).ge(0.0);
            let (a, b) = (select(&m.a, 0, &created), select(&m.b, 1, &created));
            let eye = Tensor::eye(a.size()[0], (Kind::Float, Device::Cpu));
            norms.push((a.matmul(&a.tr()) - &eye).norm().double_value(&[]));
            norms.push((b.tr().matmul(&b) - &eye).norm().double_value(&[]));
        }
        assert_eq!(ranks(&method)[..2], [4, 2]);
        let want = norms.iter().sum::<f64>() / norms.len() as f64 * 0.4;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }

    /// The packed AdamW over all modules equals each module's factors stepped alone (the
    /// per-parameter definition), exactly, over steps that grow ranks, for modules of three
    /// shapes: a copy of every factor takes the same gradients and per-module steps.
    #[test]
    fn packed_steps_equal_per_module_steps() {
        let _turn = torch_rng_turn();
        tch::manual_seed(37);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "init_rank": 1, "reference_rank": 3, "incre_rank_num": 1, "init_warmup": 0,
            "incre_interval": 1, "target_modules": ["q_proj", "up_proj", "down_proj"]
        }));
        let training: TrainingConfig = serde_json::from_value(serde_json::json!({
            "max_steps": 6, "learning_rate": 0.01, "weight_decay": 0.1
        }))
        .unwrap();
        let mut method = TriAdaptLora::attach(&mut model, &c, &cpu(&training)).unwrap();
        let shapes: std::collections::BTreeSet<(Vec<i64>, Vec<i64>)> = method
            .modules
            .iter()
            .map(|m| (m.a.size(), m.b.size()))
            .collect();
        assert_eq!(shapes.len(), 3, "{shapes:?}");
        let copies = VarStore::new(Device::Cpu);
        let factors =
            |m: &TriangularModule| [&m.a, &m.b, &m.c_row, &m.c_col].map(|t| t.detach().copy());
        let mut alone: Vec<Vec<(Tensor, Moments)>> = method
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                factors(m)
                    .into_iter()
                    .enumerate()
                    .map(|(j, t)| {
                        let p = copies.root().add(&format!("m{i}_{j}"), t, true);
                        let moments = Moments::new(&copies.root(), &format!("m{i}_{j}"), &p);
                        (p, moments)
                    })
                    .collect()
            })
            .collect();
        let adam = RankAdam { weight_decay: 0.1 };
        let (lr, unborn) = (Tensor::from(0.01), Tensor::from(UNBORN as f32));
        for index in 1..=6 {
            crate::training::optimizer::zero_grads(&method.store.trainable_variables());
            crate::training::optimizer::zero_grads(&copies.trainable_variables());
            let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
            let loss =
                model.forward(&ids, true).square().mean(Kind::Float) + method.extra_loss().unwrap();
            loss.backward();
            let same: Vec<Tensor> = method
                .modules
                .iter()
                .zip(&alone)
                .flat_map(|(m, copy)| {
                    [&m.a, &m.b, &m.c_row, &m.c_col]
                        .into_iter()
                        .zip(copy)
                        .map(|(p, (q, _))| (q * p.grad()).sum(Kind::Float))
                        .collect::<Vec<_>>()
                })
                .collect();
            Tensor::stack(&same, 0).sum(Kind::Float).backward();
            method.after_step(StepInfo {
                index,
                total: 6,
                lr: 0.01,
            });
            let now = i64::from(index) - 1;
            for (i, (m, copy)) in method.modules.iter().zip(&mut alone).enumerate() {
                let later = m.born.view([-1, 1]).maximum(&m.born.view([1, -1]));
                let lower_born = later.where_self(&m.layout.lower.gt(0.5), &unborn);
                let upper_born = later.where_self(&m.layout.upper.gt(0.5), &unborn);
                let births = [
                    m.born.shallow_clone(),
                    m.born.view([1, -1]),
                    lower_born,
                    upper_born,
                ];
                for ((q, moments), born) in copy.iter_mut().zip(&births) {
                    adam.step(q, moments, born, &lr, now);
                }
                for (j, (got, (want, _))) in factors(m).iter().zip(copy.iter()).enumerate() {
                    let diff = (got - want).abs().max().double_value(&[]);
                    assert_eq!(diff, 0.0, "step {index}, module {i}, factor {j}");
                }
            }
        }
        assert!(
            ranks(&method).iter().any(|&r| r > 1),
            "{:?}",
            ranks(&method)
        );
    }
}
