//! IncreLoRA (Zhang et al., 2023), following `FeiyuZhang98/IncreLoRA` (`loralib/increlora.py`
//! `SVDLinear`, `RankAllocator.update_and_increase`; `NLU/src/transformers/trainer.py`, and
//! `optimization.py` `Multi_LambdaLR`): `ΔW = B (A ⊙ E) · alpha / (active rank + 1e-5)` in
//! SVD-like triplets, starting from `lora_r` per module; every `incre_interval` steps after
//! `init_warmup`, the `top_h` modules of highest smoothed importance `Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`
//! gain `incre_rank_num` ranks each, until the total reaches the budget.
//!
//! Ranks are preallocated per module, so shapes never change (checkpoints restore by name and
//! shape): masks say which ranks are active and which are the reserve (the next ranks, trained
//! ahead with their E held at 1e-5: `advance_learn`); the others add exactly 0 and are never
//! updated. The factors are stepped here, not by the loop's AdamW, by [`RankAdam`]: every rank
//! starts its moments and bias correction where the reference adds its parameter group, and
//! with `multi_lr` its learning rate restarts the job's warmup and schedule from that step.
//! Each factor of every module and its moments, the births, masks and importance averages
//! are packed into one buffer each ([`super::pack`]), so the per-step AdamW and averages run
//! over all modules at once.
//!
//! The importance needs every element of `∂L/∂ΔW` (the abs keeps `Σ|ΔW ⊙ G|` from factoring
//! through `B` and `A`), so it costs one dense `out x in` product per module and step, as in
//! the reference: `2 · tokens · out · in` FLOPs, half of what the frozen layer costs forward
//! and backward, so the busy phase cannot reach LoRA's speed (docs/methods.md). Where the
//! reference runs the forward through the materialised ΔW and takes ∂L/∂ΔW from a backward
//! hook (a dense forward product, and dense products for ∂L/∂x and ∂L/∂ΔW in the backward),
//! the forward here stays factored, and the importance is measured only while a module can
//! still grow (budget not reached, a module below its cap, an allocation step ahead in
//! `training.max_steps`):
//! - Without dropout the branch is low-rank (`A ⊙ E` and `B` scaled, derived from the
//!   parameters), so its layer runs by hand like LoRA's, and the backward by hand hands it
//!   `∂L/∂ΔW = Gᵀ x` from the projection's input and output gradient, which it has at hand
//!   ([`crate::model::llama::DeltaGradientSink`]). In a step of one micro-batch the importance is
//!   taken at once, so no module's dense gradient outlives its layer's backward; over several,
//!   the dense gradients are summed until `after_step`.
//! - Elsewhere (dropout, a layer under autograd) each training forward keeps its input `x`
//!   (after dropout) and adds a zero "probe" to its output, whose gradient is
//!   `G = ∂L/∂output`; `∂L/∂ΔW = Gᵀ x` is then one product per module in `after_step`, summed
//!   over the step's micro-batches. The price is memory: every module's `x` and `G` of the
//!   step are held until `after_step`.
//!
//! Chosen where the reference differs or is silent:
//! - `max_module_rank` (not in the reference) caps each module's active rank, bounding its
//!   preallocation; the cap is further lowered to what the schedule can reach in
//!   `training.max_steps`. A module at its cap takes no part in an allocation: it is left out of
//!   the top-k, and k is at most the number of modules that can still grow.
//! - The first reserve exists from the start and trains from step 0 (the reference adds it
//!   after step 0's backward, so its first gradient is step 1's).
//! - A rank added at step `s` (0-based) was masked in `s`'s forward, so, like the reference's
//!   new group (whose gradient is `None` at `s`, which AdamW skips), it first steps at `s + 1`
//!   with bias correction from 1. Its learning rate is the job's schedule restarted at `s`
//!   (`warmup⁻¹` of the peak on that first step under warmup, as `Multi_LambdaLR` gives); the
//!   reference always decays it linearly. Ranks present from the start use the job's schedule.
//! - With gradient accumulation the importance uses the step's whole ∂L/∂ΔW (the reference's
//!   hook sees the last micro-batch's).
//! - Growth stops once the total reaches the budget even if ties overshoot it (the reference
//!   then never zeroes the reserves); the reserves are zeroed then, or after the last step if
//!   the budget was not reached, so the trained model is the published one.
//! - Published as plain LoRA without the reserves: `A' = A_active ⊙ E_active`,
//!   `B' = B_active · alpha / (rank + 1e-5)`.

use super::rank_adam::{Moments, RankAdam, RankAxis, RankGroup, UNBORN};
use super::{
    mean_orthogonality, module_path, pack, per_module_lora, refuse_parent, select, ExportedFactors,
};
use super::{Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation, StepInfo};
use crate::model::llama::{weight_gradient, LowRank};
use crate::model::{LinearAdapter, LlamaModel};
use crate::training::optimizer::learning_rate;
use anyhow::Result;
use loraforge_spec::methods::IncreLoraConfig;
use loraforge_spec::TrainingConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The reserve's E while it learns ahead (`add_reserve_param(advance_learn=True)`).
const RESERVE_E: f64 = 1e-5;

/// `A ⊙ E` over the created ranks, the reserves' E held fixed (the reference freezes it).
fn scaled_rows(a: &Tensor, e: &Tensor, active: &Tensor, reserve: &Tensor) -> Tensor {
    a * (e * active + e.detach() * reserve)
}

/// `alpha / (active rank + 1e-5)`, as a tensor so it follows the masks without a sync.
fn scale(active: &Tensor, alpha: f64) -> Tensor {
    (active.sum(Kind::Float) + 1e-5).reciprocal() * alpha
}

/// `B (A ⊙ E) · scale`, the module's update `(out, in)`.
fn delta_weight(a: &Tensor, e: &Tensor, b: &Tensor, masks: [&Tensor; 2], alpha: f64) -> Tensor {
    let [active, reserve] = masks;
    b.matmul(&scaled_rows(a, e, active, reserve)) * scale(active, alpha)
}

/// `Σ|ΔW ⊙ ∂L/∂ΔW| / √numel` `(1)`, a step's importance (`update_ipt`'s).
fn importance_of(delta: &Tensor, grad: &Tensor) -> Tensor {
    (delta * grad).abs().sum(Kind::Float).view([1]) / (delta.numel() as f64).sqrt()
}

struct GrowingBranch {
    a: Tensor,
    e: Tensor,
    b: Tensor,
    active: Tensor,
    reserve: Tensor,
    alpha: f64,
    dropout: f64,
    seen: Seen,
    /// Whether importance is still measured (a module can still grow).
    collecting: Arc<AtomicBool>,
    /// `training.gradient_accumulation_steps`: one lets a backward by hand take the importance
    /// at once.
    micro_batches: u32,
}

/// What the step's training passes left for the module's importance
/// ([`GrowingModule::importance`]).
#[derive(Default)]
struct StepGradients {
    /// Per forward under autograd: the input after dropout and the zero leaf added to the
    /// output, in the output's kind (its gradient is ∂L/∂output after the backward).
    probes: Vec<(Tensor, Tensor)>,
    /// From backwards by hand: ∂L/∂ΔW summed over the step's micro-batches so far.
    delta_gradient: Option<Tensor>,
    /// From the backward by hand of a step of one micro-batch: the importance itself.
    importance: Option<Tensor>,
}

type Seen = Arc<Mutex<StepGradients>>;

impl GrowingBranch {
    /// Takes a backward by hand's `∂L/∂ΔW`: the importance at once in a step of one
    /// micro-batch (ΔW is the forward's until `after_step` steps the factors), else into the
    /// step's sum.
    fn take_delta_gradient(&self) -> impl Fn(Tensor) + 'static {
        let seen = Arc::clone(&self.seen);
        let factors =
            [&self.a, &self.e, &self.b, &self.active, &self.reserve].map(Tensor::shallow_clone);
        let (alpha, single) = (self.alpha, self.micro_batches <= 1);
        move |grad: Tensor| {
            let mut seen = seen.lock().expect("no backward panicked holding it");
            if single {
                let [a, e, b, active, reserve] = &factors;
                let delta = tch::no_grad(|| delta_weight(a, e, b, [active, reserve], alpha));
                seen.importance = Some(importance_of(&delta, &grad));
                return;
            }
            seen.delta_gradient = Some(match seen.delta_gradient.take() {
                Some(sum) => sum + grad,
                None => grad,
            });
        }
    }
}

impl LinearAdapter for GrowingBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let rows = scaled_rows(&self.a, &self.e, &self.active, &self.reserve);
        let scale = scale(&self.active, self.alpha);
        let delta = (x32
            .linear::<Tensor>(&rows, None)
            .linear::<Tensor>(&self.b, None)
            * scale)
            .to_kind(x.kind());
        // Not in a pass without gradients (a checkpointed forward's first run).
        if !(train && delta.requires_grad() && self.collecting.load(Ordering::Relaxed)) {
            return delta;
        }
        // One zero broadcast to the output's shape: no output-sized buffer, only its gradient.
        let probe = Tensor::zeros([], (delta.kind(), delta.device()))
            .expand(delta.size(), false)
            .set_requires_grad(true);
        // Without dropout the input is `x` itself, kept in its own (maybe half) precision.
        let input = match self.dropout == 0.0 {
            true => x.detach(),
            false => x32.detach(),
        };
        let mut seen = self.seen.lock().expect("no forward panicked holding it");
        seen.probes.push((input, probe.shallow_clone()));
        delta + probe
    }

    /// Without dropout: `A ⊙ E` (reserves' E held) and `B · scale`, derived from the
    /// parameters; while the importance is measured in training, wanting `∂L/∂ΔW` handed over.
    fn low_rank(&self, train: bool) -> Option<LowRank> {
        if train && self.dropout != 0.0 {
            return None;
        }
        let branch = LowRank::derived(train, 1.0, || {
            let rows = scaled_rows(&self.a, &self.e, &self.active, &self.reserve);
            (rows, &self.b * scale(&self.active, self.alpha))
        });
        match train && self.collecting.load(Ordering::Relaxed) {
            true => Some(branch.with_delta_gradient(self.take_delta_gradient())),
            false => Some(branch),
        }
    }
}

/// One adapted matrix with room for `capacity` active ranks plus a reserve.
struct GrowingModule {
    module_path: String,
    a: Tensor,
    e: Tensor,
    b: Tensor,
    /// Per rank `(K, 1)`: the step (from 0) of its A row's and B column's first update, or
    /// UNBORN.
    ab_born: Tensor,
    /// Per rank: the step of its E's first update (the one after its activation), or UNBORN.
    e_born: Tensor,
    /// Per rank, 1 where active (counted in the rank and the scale).
    active: Tensor,
    /// Per rank, 1 where reserve: in the forward with E fixed, not counted.
    reserve: Tensor,
    /// The EMAs of the module's importance and of its uncertainty, shape `(1)`.
    sensitivity: Tensor,
    uncertainty: Tensor,
    seen: Seen,
    capacity: i64,
    /// The host's copy of the active rank and births, so that a step reads the device once
    /// for all modules ([`IncreLora::read_ranks`]).
    host: HostRanks,
}

/// What the host knows of one module's ranks.
#[derive(Default)]
struct HostRanks {
    rank: i64,
    ab_born: Vec<f64>,
    e_born: Vec<f64>,
}

impl GrowingModule {
    /// The active rank as the store holds it (a device read, for the export).
    fn rank(&self) -> i64 {
        self.active.sum(Kind::Int64).int64_value(&[])
    }

    fn delta_weight(&self, alpha: f64) -> Tensor {
        let masks = [&self.active, &self.reserve];
        delta_weight(&self.a, &self.e, &self.b, masks, alpha)
    }

    /// The step's importance `Σ|ΔW ⊙ ∂L/∂ΔW| / √numel` `(1)` (`update_ipt`'s), `∂L/∂ΔW`
    /// summed over the step's passes that had a backward; `None` without any. Forgets them.
    fn importance(&self, alpha: f64) -> Option<Tensor> {
        let seen = std::mem::take(&mut *self.seen.lock().expect("no forward panicked"));
        if seen.importance.is_some() {
            return seen.importance;
        }
        let (x, g): (Vec<Tensor>, Vec<Tensor>) = seen
            .probes
            .into_iter()
            .filter_map(|(x, probe)| {
                let g = probe.grad();
                g.defined().then(|| {
                    let (inp, out) = (x.size()[x.dim() - 1], g.size()[g.dim() - 1]);
                    (x.reshape([-1, inp]), g.reshape([-1, out]))
                })
            })
            .unzip();
        let cat = |t: Vec<Tensor>| match t.len() {
            1 => t.into_iter().next().expect("one"),
            _ => Tensor::cat(&t, 0),
        };
        let probed = (!x.is_empty()).then(|| weight_gradient(&cat(g), &cat(x)));
        let grad = match (probed, seen.delta_gradient) {
            (Some(p), Some(h)) => p + h,
            (p, h) => p.or(h)?,
        };
        Some(importance_of(&self.delta_weight(alpha), &grad))
    }

    #[cfg(test)]
    fn score(&self) -> f64 {
        (&self.sensitivity * &self.uncertainty).double_value(&[0])
    }

    /// The reference's growth of one module at step `now`: the `add` reserve ranks become
    /// active, and `add` new reserve ranks follow them. What starts training now had no part
    /// in `now`'s forward, so its first update is the next step's.
    fn grow(&mut self, now: i64, add: i64, advance_learn: bool) {
        let n = self.host.rank;
        let first = (now + 1) as f64;
        let (activated, fresh) = (n, n + add);
        let _ = self.active.narrow(0, activated, add).fill_(1.0);
        let _ = self.reserve.narrow(0, activated, add).fill_(0.0);
        let _ = self.e_born.narrow(0, activated, add).fill_(first);
        if !advance_learn {
            let _ = self.ab_born.narrow(0, activated, add).fill_(first);
        }
        let _ = self.reserve.narrow(0, fresh, add).fill_(1.0);
        let (e, born) = match advance_learn {
            true => (RESERVE_E, first),
            false => (0.0, UNBORN),
        };
        let _ = self.e.narrow(0, fresh, add).fill_(e);
        let _ = self.ab_born.narrow(0, fresh, add).fill_(born);
        let host = &mut self.host;
        host.rank += add;
        let (activated, fresh) = (activated as usize, fresh as usize);
        let add = add as usize;
        host.e_born[activated..fresh].fill(first);
        if !advance_learn {
            host.ab_born[activated..fresh].fill(first);
        }
        host.ab_born[fresh..fresh + add].fill(born);
    }
}

pub struct IncreLora {
    config: IncreLoraConfig,
    training: TrainingConfig,
    store: VarStore,
    modules: Vec<GrowingModule>,
    target_total: i64,
    collecting: Arc<AtomicBool>,
    /// Every module's variables of one kind, packed in module order: per rank
    /// `(modules x slots)`, the averages `(modules)`.
    packed: Packed,
    /// A, E, B of every module, with their moments.
    factors: [RankGroup; 3],
}

struct Packed {
    slots: i64,
    active: Tensor,
    reserve: Tensor,
    ab_born: Tensor,
    e_born: Tensor,
    sensitivity: Tensor,
    uncertainty: Tensor,
}

impl Attach for IncreLora {
    type Config = IncreLoraConfig;

    /// `reset_parameters`: `E = 0`, `A, B ~ N(0, 0.02)`; the reserve (`add_reserve_param`)
    /// likewise with `E = 1e-5` (0 without `advance_learn`). Ranks beyond them are drawn now
    /// too, and stay masked until created.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (training, device) = (ctx.training, ctx.device);
        let store = VarStore::new(device);
        let (r0, add) = (i64::from(config.lora_r), i64::from(config.rank_step()));
        let reachable = r0 + add * i64::from(config.allocation_steps(training.max_steps));
        let capacity = i64::from(config.module_rank_cap()).min(reachable);
        let slots = capacity + add;
        let per_rank = |initial: f64, reserve: f64, rest: f64| {
            let values: Vec<f32> = (0..slots)
                .map(|i| match i {
                    i if i < r0 => initial,
                    i if i < r0 + add => reserve,
                    _ => rest,
                } as f32)
                .collect();
            Tensor::from_slice(&values)
                .view([slots, 1])
                .to_device(device)
        };
        let (reserve_e, reserve_born) = match config.advance_learn {
            true => (RESERVE_E, 0.0),
            false => (0.0, UNBORN),
        };
        let collecting = Arc::new(AtomicBool::new(true));
        let mut modules = Vec::new();
        let mut moments: [Vec<Moments>; 3] = Default::default();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let path = module_path(&store, &path_name);
            let opts = (Kind::Float, device);
            let normal =
                |shape: [i64; 2]| tch::no_grad(|| Tensor::empty(shape, opts).normal_(0.0, 0.02));
            let a = path.add("lora_A", normal([slots, inp]), true);
            let e = path.add("lora_E", per_rank(0.0, reserve_e, 0.0), true);
            let b = path.add("lora_B", normal([out, slots]), true);
            for (moments, (name, p)) in
                moments
                    .iter_mut()
                    .zip([("lora_A", &a), ("lora_E", &e), ("lora_B", &b)])
            {
                moments.push(Moments::new(&path, name, p));
            }
            let ab_born = path.add("ab_born", per_rank(0.0, reserve_born, UNBORN), false);
            let e_born = path.add("e_born", per_rank(0.0, UNBORN, UNBORN), false);
            let active = path.add("active", per_rank(1.0, 0.0, 0.0), false);
            let reserve = path.add("reserve", per_rank(0.0, 1.0, 0.0), false);
            let sensitivity = path.add("ipt", Tensor::zeros([1], opts), false);
            let uncertainty = path.add("unc", Tensor::zeros([1], opts), false);
            let seen = Seen::default();
            linear.attach(Box::new(GrowingBranch {
                a: a.shallow_clone(),
                e: e.shallow_clone(),
                b: b.shallow_clone(),
                active: active.shallow_clone(),
                reserve: reserve.shallow_clone(),
                alpha: config.alpha,
                dropout: config.dropout,
                seen: Arc::clone(&seen),
                collecting: Arc::clone(&collecting),
                micro_batches: training.gradient_accumulation_steps,
            }));
            modules.push(GrowingModule {
                module_path: path_name,
                a,
                e,
                b,
                ab_born,
                e_born,
                active,
                reserve,
                sensitivity,
                uncertainty,
                seen,
                capacity,
                host: HostRanks::default(),
            });
        }
        let target_total = config
            .target_total_rank
            .map(i64::from)
            .unwrap_or(i64::from(config.target_rank) * modules.len() as i64);
        let count = modules.len() as i64;
        let reachable_total = (count * capacity).min(
            count * r0
                + i64::from(config.allocation_steps(training.max_steps))
                    * i64::from(config.top_h)
                    * add,
        );
        if reachable_total < target_total {
            tracing::warn!(
                target_total,
                reachable_total,
                "increlora: the growth schedule (init_warmup, incre_interval, top_h, \
                 incre_rank_num, max_module_rank) cannot reach the rank budget in \
                 training.max_steps"
            );
        }
        let each = |pick: fn(&GrowingModule) -> &Tensor| -> Vec<Tensor> {
            modules.iter().map(|m| pick(m).shallow_clone()).collect()
        };
        let [ma, me, mb] = moments;
        let factors = [
            RankGroup::by_rank(each(|m| &m.a), ma, RankAxis::Rows, slots),
            RankGroup::by_rank(each(|m| &m.e), me, RankAxis::Rows, slots),
            RankGroup::by_rank(each(|m| &m.b), mb, RankAxis::Columns, slots),
        ];
        let packed = Packed {
            slots,
            active: pack(&each(|m| &m.active)),
            reserve: pack(&each(|m| &m.reserve)),
            ab_born: pack(&each(|m| &m.ab_born)),
            e_born: pack(&each(|m| &m.e_born)),
            sensitivity: pack(&each(|m| &m.sensitivity)),
            uncertainty: pack(&each(|m| &m.uncertainty)),
        };
        let mut method = IncreLora {
            config: config.clone(),
            training: training.clone(),
            store,
            modules,
            target_total,
            collecting,
            packed,
            factors,
        };
        method.read_ranks();
        Ok(method)
    }
}

impl IncreLora {
    /// Refreshes every module's [`HostRanks`] from the store (which a checkpoint restore may
    /// have replaced) in one device read.
    fn read_ranks(&mut self) {
        let p = &self.packed;
        // (module, field, slot) on the host.
        let all = Tensor::stack(&[&p.active, &p.ab_born, &p.e_born], 0)
            .view([3, -1, p.slots])
            .transpose(0, 1)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        let values = Vec::<f64>::try_from(all.contiguous().view([-1])).unwrap_or_default();
        let slots = p.slots as usize;
        for (m, fields) in self.modules.iter_mut().zip(values.chunks(3 * slots)) {
            let (active, births) = fields.split_at(slots);
            let (ab_born, e_born) = births.split_at(slots);
            m.host = HostRanks {
                rank: active.iter().map(|&a| a as i64).sum(),
                ab_born: ab_born.to_vec(),
                e_born: e_born.to_vec(),
            };
        }
    }

    /// `update_ipt` of every module that had a backward this step: the uncertainty uses the
    /// freshly updated sensitivity average.
    fn update_importance(&mut self, alpha: f64, beta1: f64, beta2: f64) {
        let ipt: Vec<Option<Tensor>> = self.modules.iter().map(|m| m.importance(alpha)).collect();
        if ipt.iter().all(Option::is_none) {
            return;
        }
        let p = &mut self.packed;
        let device = p.sensitivity.device();
        let measured: Vec<bool> = ipt.iter().map(Option::is_some).collect();
        let ipt: Vec<Tensor> = ipt
            .into_iter()
            .map(|i| i.unwrap_or_else(|| Tensor::zeros([1], (Kind::Float, device))))
            .collect();
        let ipt = Tensor::cat(&ipt, 0);
        let mut sensitivity = &p.sensitivity * beta1 + &ipt * (1.0 - beta1);
        let mut uncertainty = &p.uncertainty * beta2 + (&ipt - &sensitivity).abs() * (1.0 - beta2);
        if measured.contains(&false) {
            // A module without a backward keeps its averages.
            let measured = Tensor::from_slice(&measured).to_device(device);
            sensitivity = sensitivity.where_self(&measured, &p.sensitivity);
            uncertainty = uncertainty.where_self(&measured, &p.uncertainty);
        }
        p.sensitivity.copy_(&sensitivity);
        p.uncertainty.copy_(&uncertainty);
    }

    /// Zeroes every reserve's E.
    fn zero_reserves(&mut self) {
        let reserve = self.packed.reserve.gt(0.5);
        let _ = self.factors[1]
            .value()
            .shallow_clone()
            .masked_fill_(&reserve, 0.0);
    }

    fn total_rank(&self) -> i64 {
        self.modules.iter().map(|m| m.host.rank).sum()
    }

    /// Whether an allocation at step `now` (from 0) or later can still add a rank: the budget
    /// is not reached, a module is below its cap, and an allocation step is ahead. Once false,
    /// it stays false.
    fn can_grow(&self, now: i64) -> bool {
        let add = i64::from(self.config.rank_step());
        let interval = i64::from(self.config.incre_interval.max(1));
        let first = (i64::from(self.config.init_warmup) / interval + 1) * interval;
        let next = first.max((now + interval - 1) / interval * interval);
        next < i64::from(self.training.max_steps)
            && self.modules.iter().any(|m| m.host.rank + add <= m.capacity)
            && self.total_rank() < self.target_total
    }

    /// The learning rate at `step` of ranks first updated at step `born` (from 0), so created
    /// at `born - 1`: the job's schedule for those present from the start (and all of them
    /// without `multi_lr`), the same schedule restarted at their creation for the others
    /// (`Multi_LambdaLR`).
    fn rank_lr(&self, born: f64, step: StepInfo) -> f64 {
        if born <= 0.0 || !self.config.multi_lr {
            return step.lr;
        }
        let created = born as u32 - 1;
        learning_rate(
            self.training.schedule,
            self.training.learning_rate,
            step.index.saturating_sub(created),
            self.training.warmup_steps,
            step.total.saturating_sub(created),
        )
    }

    /// Every rank's learning rate at `step`, `([A and B, E], module x slot)`, in one upload:
    /// each distinct birth's rate is computed once.
    fn rank_lrs(&self, step: StepInfo) -> Tensor {
        let mut by_birth: Vec<(f64, f64)> = Vec::new();
        let mut lrs = Vec::new();
        let ab = self.modules.iter().flat_map(|m| &m.host.ab_born);
        let e = self.modules.iter().flat_map(|m| &m.host.e_born);
        for &born in ab.chain(e) {
            let lr = match by_birth.iter().find(|(b, _)| *b == born) {
                Some(&(_, lr)) => lr,
                None => {
                    let lr = self.rank_lr(born, step);
                    by_birth.push((born, lr));
                    lr
                }
            };
            lrs.push(lr);
        }
        Tensor::from_slice(&lrs)
            .view([2, -1])
            .to_device(self.store.device())
    }

    /// `increase_to_target_rank`: the `k = min(top_h, budget left)` highest-scoring modules
    /// that can still grow gain `incre_rank_num` ranks each (every module scoring at least
    /// the k-th score, so ties may add more).
    fn allocate(&mut self, now: i64) {
        let add = i64::from(self.config.rank_step());
        let all = &self.packed.sensitivity * &self.packed.uncertainty;
        let all = Vec::<f64>::try_from(all.to_kind(Kind::Double)).unwrap_or_default();
        let scores: Vec<Option<f64>> = self
            .modules
            .iter()
            .zip(all)
            .map(|(m, score)| (m.host.rank + add <= m.capacity).then_some(score))
            .collect();
        let mut growable: Vec<f64> = scores.iter().flatten().copied().collect();
        growable.sort_by(|x, y| y.total_cmp(x));
        let k = i64::from(self.config.top_h)
            .min(self.target_total - self.total_rank())
            .min(growable.len() as i64);
        if k < 1 {
            return;
        }
        let threshold = growable[(k - 1) as usize];
        for (m, score) in self.modules.iter_mut().zip(scores) {
            if score.is_some_and(|s| s >= threshold) {
                m.grow(now, add, self.config.advance_learn);
            }
        }
    }
}

impl AdapterMethod for IncreLora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// Everything is stepped in `after_step` by the rank-aware AdamW.
    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn before_step(&mut self, step: u32) {
        self.read_ranks();
        let collecting = self.can_grow(i64::from(step) - 1);
        self.collecting.store(collecting, Ordering::Relaxed);
        for m in &self.modules {
            *m.seen.lock().expect("no forward panicked") = StepGradients::default();
        }
    }

    /// `reg_orth_coef · mean over modules' A and B of ||A Aᵀ − I||_F, ||Bᵀ B − I||_F` over the
    /// created ranks (reserves included), un-squared as the reference's trainer computes it.
    fn extra_loss(&self) -> Option<Tensor> {
        if self.config.reg_orth_coef <= 0.0 {
            return None;
        }
        let factors = self
            .modules
            .iter()
            .map(|m| {
                let live = &m.active + &m.reserve;
                // Reserve factors that do not learn ahead (no `advance_learn`) get no gradient.
                let trained = m.ab_born.ge(0.0).to_kind(Kind::Float);
                let frozen = &live - &trained;
                let a = &m.a * &trained + m.a.detach() * &frozen;
                let b = &m.b * trained.view([1, -1]) + m.b.detach() * frozen.view([1, -1]);
                (a, b, Some(live))
            })
            .collect();
        Some(mean_orthogonality(factors) * self.config.reg_orth_coef)
    }

    /// `update_and_increase(global_step)` (the reference calls it before the optimizer step),
    /// then the AdamW step of every created rank.
    fn after_step(&mut self, step: StepInfo) {
        let now = i64::from(step.index) - 1;
        let c = &self.config;
        let (alpha, beta1, beta2) = (c.alpha, c.beta1, c.beta2);
        let allocates = now > i64::from(c.init_warmup) && now % i64::from(c.incre_interval) == 0;
        tch::no_grad(|| {
            if self.collecting.load(Ordering::Relaxed) {
                self.update_importance(alpha, beta1, beta2);
                if allocates {
                    self.allocate(now);
                }
                if self.total_rank() >= self.target_total {
                    self.zero_reserves();
                }
            }
            if step.index == step.total {
                self.zero_reserves();
            }
            let adam = RankAdam {
                weight_decay: self.training.weight_decay,
            };
            let lrs = self.rank_lrs(step);
            let p = &self.packed;
            let [a, e, b] = &self.factors;
            a.step(&adam, &p.ab_born, &lrs.get(0), now);
            e.step(&adam, &p.e_born, &lrs.get(1), now);
            b.step(&adam, &p.ab_born, &lrs.get(0), now);
        });
    }

    /// Active ranks per module (reserves not counted).
    fn rank_allocation(&self) -> Option<RankAllocation> {
        let per_module = self
            .modules
            .iter()
            .map(|m| (m.module_path.clone(), m.host.rank as u32))
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
            .map(|m| {
                let keep = m.active.view([-1]).gt(0.5);
                let scale = self.config.alpha / (m.rank() as f64 + 1e-5);
                ExportedFactors {
                    module_path: m.module_path.clone(),
                    a: select(&(&m.a * &m.e), 0, &keep),
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
        refuse_parent("increlora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, FixtureModel};
    use crate::model::llama::Checkpointing;
    use crate::training::optimizer::EPSILON;
    use crate::training::seeds::torch_rng_turn;

    fn config(json: serde_json::Value) -> IncreLoraConfig {
        serde_json::from_value(json).unwrap()
    }

    fn training(max_steps: u32, warmup_steps: u32) -> TrainingConfig {
        serde_json::from_value(serde_json::json!({
            "max_steps": max_steps, "learning_rate": 0.01, "warmup_steps": warmup_steps,
            "schedule": "linear"
        }))
        .unwrap()
    }

    /// Steps `index` of `total` the way the loop does: forward, backward of a loss through
    /// every adapted layer (plus the regulariser), then `after_step`; `inspect` gets the ranks
    /// before the step and the method after it.
    fn run_steps(
        model: &LlamaModel,
        method: &mut IncreLora,
        steps: std::ops::RangeInclusive<u32>,
        total: u32,
        mut inspect: impl FnMut(u32, Vec<i64>, &IncreLora),
    ) {
        for index in steps {
            forward_backward(model, method, index);
            let before = ranks(method);
            method.after_step(StepInfo {
                index,
                total,
                lr: 0.01,
            });
            inspect(index, before, method);
        }
    }

    /// Step `index` up to `after_step`: gradients of a loss through every adapted layer
    /// (plus the regulariser).
    fn forward_backward(model: &LlamaModel, method: &mut IncreLora, index: u32) {
        method.before_step(index);
        crate::training::optimizer::zero_grads(&method.store.trainable_variables());
        let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
        let loss = model.forward(&ids, true).square().mean(Kind::Float)
            + method.extra_loss().unwrap_or_else(|| Tensor::from(0.0f32));
        loss.backward();
    }

    fn ranks(method: &IncreLora) -> Vec<i64> {
        method.modules.iter().map(GrowingModule::rank).collect()
    }

    fn reserve_e(method: &IncreLora) -> Vec<f64> {
        method
            .modules
            .iter()
            .flat_map(|m| {
                Vec::<f64>::try_from(&m.e.masked_select(&m.reserve.gt(0.5)).to_kind(Kind::Double))
                    .unwrap()
            })
            .collect()
    }

    /// Allocations happen exactly at steps (from 0) above init_warmup that incre_interval
    /// divides; each grows the `min(top_h, budget left)` modules of highest score by
    /// incre_rank_num; growth stops at the budget, and the unused reserves are then zeroed.
    #[test]
    fn ranks_grow_on_schedule_to_the_budget() {
        let _turn = torch_rng_turn();
        tch::manual_seed(5);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "lora_r": 1, "target_rank": 2, "init_warmup": 2, "incre_interval": 2, "top_h": 3,
            "incre_rank_num": 1, "target_modules": ["q_proj", "v_proj"]
        }));
        let mut method = IncreLora::attach(&mut model, &c, &cpu(&training(12, 0))).unwrap();
        let n = method.modules.len() as i64;
        assert!(n >= 4, "the fixture has {n} modules");
        let target = 2 * n;
        let mut allocations = Vec::new();
        run_steps(&model, &mut method, 1..=12, 12, |index, was, after| {
            let now = i64::from(index) - 1;
            let is = ranks(after);
            let left = target - was.iter().sum::<i64>();
            if now > 2 && now % 2 == 0 && left > 0 {
                let scores: Vec<f64> = after.modules.iter().map(GrowingModule::score).collect();
                let mut order: Vec<usize> = (0..scores.len()).collect();
                order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
                let k = 3.min(left) as usize;
                let mut chosen: Vec<usize> = order[..k].to_vec();
                chosen.sort();
                let grown: Vec<usize> = (0..was.len()).filter(|&i| is[i] != was[i]).collect();
                assert_eq!(grown, chosen, "step {now}: scores {scores:?}");
                assert!(grown.iter().all(|&i| is[i] == was[i] + 1));
                allocations.push((now, is.iter().sum::<i64>()));
            } else {
                assert_eq!(was, is, "step {now} allocates nothing");
            }
        });
        // n = 4: 4 -> 7 at step 4 (top_h = 3), -> 8 at step 6 (one rank left).
        assert_eq!(
            allocations.last().map(|a| a.1),
            Some(target),
            "{allocations:?}"
        );
        assert!(allocations.len() >= 2, "{allocations:?}");
        assert_eq!(allocations[0], (4, n + 3));
        assert_eq!(method.total_rank(), target);
        assert!(reserve_e(&method).iter().all(|&e| e == 0.0));
        method.before_step(13);
        assert!(!method.collecting.load(Ordering::Relaxed));
        let allocation = method.rank_allocation().unwrap();
        assert_eq!(
            allocation
                .per_module
                .values()
                .map(|&r| i64::from(r))
                .collect::<Vec<_>>(),
            ranks(&method)
        );
    }

    /// Modules stop at `max_module_rank`; the trained model's reserves are zeroed after the
    /// last step, and the published LoRA (reserves dropped) gives the trained model's logits.
    #[test]
    fn capped_growth_and_the_export_keeps_the_output() {
        let _turn = torch_rng_turn();
        tch::manual_seed(7);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "lora_r": 1, "target_rank": 2, "max_module_rank": 2, "target_total_rank": 100,
            "init_warmup": 0, "incre_interval": 1, "top_h": 10, "incre_rank_num": 1,
            "target_modules": ["q_proj", "v_proj"]
        }));
        let mut method = IncreLora::attach(&mut model, &c, &cpu(&training(6, 0))).unwrap();
        // Two active ranks at most, plus the reserve.
        assert!(method.modules.iter().all(|m| m.a.size()[0] == 3));
        run_steps(&model, &mut method, 1..=6, 6, |_, _, _| {});
        assert!(
            ranks(&method).iter().all(|&r| r == 2),
            "{:?}",
            ranks(&method)
        );
        assert!(reserve_e(&method).iter().all(|&e| e == 0.0));

        let adapter = method.export("file:///m");
        assert!(adapter
            .config
            .as_lora()
            .unwrap()
            .rank_pattern
            .values()
            .all(|&r| r == 2));
        assert_eq!(adapter.tensors.len(), 2 * method.modules.len());
        let mut exported = fixture.load();
        attach_frozen(&mut exported, &adapter, Device::Cpu).unwrap();
        let (trained, published) = (logits(&model), logits(&exported));
        assert!(max_abs_diff(&trained, &published) < 1e-5);
        assert!(max_abs_diff(&trained, &logits(&fixture.load())) > 1e-4);
    }

    /// The regulariser against its definition on the created ranks' rows of A and columns
    /// of B (the reference's concatenated blocks).
    #[test]
    fn the_orthogonal_regulariser_covers_the_created_ranks() {
        let _turn = torch_rng_turn();
        tch::manual_seed(9);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "lora_r": 2, "target_rank": 4, "incre_rank_num": 1, "reg_orth_coef": 0.3,
            "init_warmup": 0, "incre_interval": 1, "target_modules": ["q_proj", "down_proj"]
        }));
        let mut method = IncreLora::attach(&mut model, &c, &cpu(&training(20, 0))).unwrap();
        tch::no_grad(|| method.modules[0].grow(0, 1, true));
        let got = method.extra_loss().unwrap().double_value(&[]);
        let mut norms = Vec::new();
        for m in &method.modules {
            let live = (&m.active + &m.reserve).view([-1]).gt(0.5);
            let (a, b) = (select(&m.a, 0, &live), select(&m.b, 1, &live));
            let eye = Tensor::eye(a.size()[0], (Kind::Float, Device::Cpu));
            norms.push((a.matmul(&a.tr()) - &eye).norm().double_value(&[]));
            norms.push((b.tr().matmul(&b) - &eye).norm().double_value(&[]));
        }
        // Module 0: 2 + 1 active and 1 reserve; the others 2 + 1 reserve.
        assert_eq!(ranks(&method)[0], 3);
        let want = norms.iter().sum::<f64>() / norms.len() as f64 * 0.3;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }

    /// Ranks present from the start follow the job's schedule; later ones restart its warmup
    /// at their creation step (`multi_lr`), or share the job's rate without it.
    #[test]
    fn added_ranks_restart_the_warmup() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut c = config(serde_json::json!({
            "lora_r": 1, "target_rank": 2, "init_warmup": 0, "incre_interval": 1,
            "target_modules": ["q_proj"]
        }));
        let method = IncreLora::attach(&mut fixture.load(), &c, &cpu(&training(20, 2))).unwrap();
        let step = |index| StepInfo {
            index,
            total: 20,
            lr: 0.123,
        };
        assert_eq!(method.rank_lr(0.0, step(7)), 0.123);
        // Created at step 5 (0-based), first updated at 6: its steps 7, 8 (1-based) are the
        // 2nd and 3rd of the restarted schedule (the 1st, rate 0, is the step it was masked in).
        assert_eq!(method.rank_lr(6.0, step(7)), 0.005);
        assert_eq!(method.rank_lr(6.0, step(8)), 0.01);
        // Then linear decay to 0 at the end of training: 13 steps of decay after warmup.
        assert!((method.rank_lr(6.0, step(14)) - 0.01 * 7.0 / 13.0).abs() < 1e-12);
        c.multi_lr = false;
        let method = IncreLora::attach(&mut fixture.load(), &c, &cpu(&training(20, 2))).unwrap();
        assert_eq!(method.rank_lr(6.0, step(7)), 0.123);
    }

    /// What a growth creates at step `s` was masked in `s`'s forward: it is left untouched
    /// then (no moments, no weight decay), and its first update at `s + 1` is a fresh AdamW's
    /// first step on that step's gradient: `p (1 - lr wd) - lr g / (|g| + eps)`.
    #[test]
    fn created_ranks_first_step_is_a_fresh_adamws_first() {
        let _turn = torch_rng_turn();
        tch::manual_seed(11);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "lora_r": 1, "target_rank": 3, "init_warmup": 0, "incre_interval": 1, "top_h": 1,
            "incre_rank_num": 1, "multi_lr": false, "target_modules": ["q_proj"]
        }));
        let mut training = training(6, 0);
        training.weight_decay = 0.1;
        let mut method = IncreLora::attach(&mut model, &c, &cpu(&training)).unwrap();
        let (lr, wd) = (0.01, 0.1);
        let info = |index| StepInfo {
            index,
            total: 6,
            lr,
        };
        // What the growth at step 1 (index 2) creates in the module that grows: the
        // activated reserve's E (rank 1) and the new reserve's A row and B column (rank 2).
        let created = |m: &GrowingModule| {
            [
                m.e.get(1).copy(),
                m.a.get(2).copy(),
                m.b.select(1, 2).copy(),
            ]
        };
        let grads = |m: &GrowingModule| {
            [
                m.e.grad().get(1).copy(),
                m.a.grad().get(2).copy(),
                m.b.grad().select(1, 2).copy(),
            ]
        };
        run_steps(&model, &mut method, 1..=1, 6, |_, _, _| {});
        forward_backward(&model, &mut method, 2);
        let before: Vec<_> = method.modules.iter().map(created).collect();
        method.after_step(info(2));
        let grown = ranks(&method).iter().position(|&r| r == 2).unwrap();
        assert_eq!(
            ranks(&method).iter().sum::<i64>(),
            method.modules.len() as i64 + 1
        );
        for (b, a) in before[grown].iter().zip(created(&method.modules[grown])) {
            assert_eq!(max_abs_diff(b, &a), 0.0, "untouched at its creation step");
        }

        forward_backward(&model, &mut method, 3);
        let m = &method.modules[grown];
        let (values, g) = (created(m), grads(m));
        assert!(g
            .iter()
            .all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0));
        let want: Vec<Tensor> = values
            .iter()
            .zip(&g)
            .map(|(p, g)| {
                let (p, g) = (p.to_kind(Kind::Double), g.to_kind(Kind::Double));
                p * (1.0 - lr * wd) - &g * lr / (g.abs() + EPSILON)
            })
            .collect();
        method.after_step(info(3));
        for (got, want) in created(&method.modules[grown]).iter().zip(&want) {
            let diff = max_abs_diff(&got.to_kind(Kind::Double), want);
            assert!(diff < 1e-7, "{diff}: {got} vs {want}");
        }
    }

    /// Importance stops being measured (the forwards keep nothing, add no probe) once no
    /// allocation can add a rank although the budget is not reached: every module at its cap,
    /// or no allocation step left. Training goes on.
    #[test]
    fn importance_stops_when_no_growth_is_possible() {
        let _turn = torch_rng_turn();
        tch::manual_seed(13);
        let fixture = FixtureModel::create();
        // Per step: whether it measured, and whether its forwards kept inputs and probes.
        let run = |c: IncreLoraConfig| {
            let mut model = fixture.load();
            let mut method = IncreLora::attach(&mut model, &c, &cpu(&training(6, 0))).unwrap();
            let mut steps = Vec::new();
            for index in 1..=6 {
                forward_backward(&model, &mut method, index);
                let kept = method
                    .modules
                    .iter()
                    .map(|m| m.seen.lock().unwrap().probes.len())
                    .collect::<Vec<_>>();
                let collecting = method.collecting.load(Ordering::Relaxed);
                assert!(
                    kept.iter().all(|&n| n == usize::from(collecting)),
                    "{kept:?}"
                );
                steps.push(collecting);
                method.after_step(StepInfo {
                    index,
                    total: 6,
                    lr: 0.01,
                });
                assert!(method
                    .modules
                    .iter()
                    .all(|m| m.seen.lock().unwrap().probes.is_empty()));
            }
            (method, steps)
        };
        // Every module reaches its cap (2) at step 1 (0-based), far below the budget.
        let (method, collecting) = run(config(serde_json::json!({
            "lora_r": 1, "target_rank": 2, "max_module_rank": 2, "target_total_rank": 100,
            "init_warmup": 0, "incre_interval": 1, "top_h": 10, "incre_rank_num": 1,
            "target_modules": ["q_proj", "v_proj"]
        })));
        assert_eq!(collecting, [true, true, false, false, false, false]);
        assert!(ranks(&method).iter().all(|&r| r == 2));

        // One allocation step (4) in 6 steps: one module grows, then none can.
        let (method, collecting) = run(config(serde_json::json!({
            "lora_r": 1, "target_rank": 4, "init_warmup": 0, "incre_interval": 4, "top_h": 1,
            "incre_rank_num": 1, "target_modules": ["q_proj", "v_proj"]
        })));
        assert_eq!(collecting, [true, true, true, true, true, false]);
        assert_eq!(
            ranks(&method).iter().sum::<i64>(),
            method.modules.len() as i64 + 1
        );
    }

    /// The importance a step measures through the layers by hand (the sink: at once with one
    /// micro-batch, summed over two) is what the probes give under autograd for the same
    /// batches, module by module; and the by-hand pass keeps no probe.
    #[test]
    fn the_layers_by_hand_measure_the_probes_importance() {
        let _turn = torch_rng_turn();
        tch::manual_seed(19);
        let fixture = FixtureModel::create();
        let c = config(serde_json::json!({
            "lora_r": 2, "target_rank": 4, "init_warmup": 100, "incre_interval": 10,
            "reg_orth_coef": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]
        }));
        for micro_batches in [1u32, 2] {
            let mut model = fixture.load();
            let mut training = training(200, 0);
            training.gradient_accumulation_steps = micro_batches;
            let mut method = IncreLora::attach(&mut model, &c, &cpu(&training)).unwrap();
            // E away from 0, so that ΔW is not.
            run_steps(&model, &mut method, 1..=3, 200, |_, _, _| {});
            let batches: Vec<Tensor> = (0..micro_batches)
                .map(|_| Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu)))
                .collect();
            let measure = |method: &mut IncreLora, by_hand: bool| -> Vec<f64> {
                method.before_step(4);
                for ids in &batches {
                    match by_hand {
                        true => {
                            let pass = model.training_pass(ids, true, Checkpointing::None);
                            let logits = pass.hidden.linear::<Tensor>(model.lm_head(), None);
                            logits.square().mean(Kind::Float).backward();
                            pass.backward();
                        }
                        false => model
                            .forward(ids, true)
                            .square()
                            .mean(Kind::Float)
                            .backward(),
                    }
                }
                let kept: Vec<usize> = method
                    .modules
                    .iter()
                    .map(|m| m.seen.lock().unwrap().probes.len())
                    .collect();
                let want = if by_hand { 0 } else { batches.len() };
                assert!(kept.iter().all(|&n| n == want), "{kept:?}");
                tch::no_grad(|| {
                    method
                        .modules
                        .iter()
                        .map(|m| m.importance(c.alpha).unwrap().double_value(&[0]))
                        .collect()
                })
            };
            let probed = measure(&mut method, false);
            let by_hand = measure(&mut method, true);
            for (got, want) in by_hand.iter().zip(&probed) {
                assert!(*want > 0.0, "{micro_batches}: {probed:?}");
                assert!(
                    (got - want).abs() <= 1e-4 * want,
                    "{micro_batches}: {by_hand:?} vs {probed:?}"
                );
            }
        }
    }

    /// A branch adding `x ΔWᵀ` for a given ΔW, to take ∂L/∂ΔW by autograd.
    struct ExplicitDelta(Tensor);

    impl LinearAdapter for ExplicitDelta {
        fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
            x.to_kind(Kind::Float)
                .linear::<Tensor>(&self.0, None)
                .to_kind(x.kind())
        }
    }

    /// The importance update against its definition: a second model adds every module's ΔW
    /// explicitly, module 0's as a leaf, and autograd gives ∂L/∂ΔW for the same batch; then
    /// `ipt = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`, `sensitivity' = β1 s + (1 - β1) ipt` and
    /// `uncertainty' = β2 u + (1 - β2) |ipt - sensitivity'|`.
    #[test]
    fn importance_is_the_smoothed_sensitivity_of_the_explicit_delta() {
        let _turn = torch_rng_turn();
        tch::manual_seed(17);
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let c = config(serde_json::json!({
            "lora_r": 2, "target_rank": 4, "init_warmup": 100, "incre_interval": 10,
            "beta1": 0.7, "beta2": 0.6, "reg_orth_coef": 0.0,
            "target_modules": ["q_proj", "v_proj"]
        }));
        let mut method = IncreLora::attach(&mut model, &c, &cpu(&training(200, 0))).unwrap();
        // E away from 0 and the EMAs away from their start.
        run_steps(&model, &mut method, 1..=3, 200, |_, _, _| {});
        let (s0, u0) = (
            method.modules[0].sensitivity.double_value(&[0]),
            method.modules[0].uncertainty.double_value(&[0]),
        );
        assert!(s0 > 0.0 && u0 > 0.0, "{s0} {u0}");

        let ids = Tensor::randint(40, [2, 8], (Kind::Int64, Device::Cpu));
        method.before_step(4);
        crate::training::optimizer::zero_grads(&method.store.trainable_variables());
        model
            .forward(&ids, true)
            .square()
            .mean(Kind::Float)
            .backward();
        let deltas: Vec<Tensor> = tch::no_grad(|| {
            method
                .modules
                .iter()
                .map(|m| m.delta_weight(c.alpha))
                .collect()
        });
        let leaf = deltas[0].copy().set_requires_grad(true);
        let mut explicit = fixture.load();
        let names: Vec<String> = method
            .modules
            .iter()
            .map(|m| m.module_path.clone())
            .collect();
        for (name, linear) in explicit.linears_mut(&c.target_modules) {
            let i = names.iter().position(|n| *n == name).unwrap();
            let delta = match i {
                0 => leaf.shallow_clone(),
                _ => deltas[i].shallow_clone(),
            };
            linear.attach(Box::new(ExplicitDelta(delta)));
        }
        explicit
            .forward(&ids, true)
            .square()
            .mean(Kind::Float)
            .backward();
        let grad = leaf.grad().to_kind(Kind::Double);
        let delta = deltas[0].to_kind(Kind::Double);
        let ipt = (&delta * &grad).abs().sum(Kind::Double).double_value(&[])
            / (delta.numel() as f64).sqrt();
        assert!(ipt > 0.0);
        let sensitivity = 0.7 * s0 + 0.3 * ipt;
        let uncertainty = 0.6 * u0 + 0.4 * (ipt - sensitivity).abs();

        method.after_step(StepInfo {
            index: 4,
            total: 200,
            lr: 0.01,
        });
        let m = &method.modules[0];
        let (got_s, got_u) = (
            m.sensitivity.double_value(&[0]),
            m.uncertainty.double_value(&[0]),
        );
        assert!(
            (got_s - sensitivity).abs() <= 1e-5 * sensitivity,
            "{got_s} vs {sensitivity}"
        );
        assert!(
            (got_u - uncertainty).abs() <= 1e-4 * uncertainty,
            "{got_u} vs {uncertainty}"
        );
    }
}
