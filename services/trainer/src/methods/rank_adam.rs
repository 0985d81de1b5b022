//! AdamW for adapters whose ranks are created during training (IncreLoRA, TriAdaptLoRA).
//!
//! The references add each new rank to the optimizer as a new parameter group
//! (`optimizer.add_param_group`): fresh moments, their own step count (bias correction from 1)
//! and, with IncreLoRA's `multi_lr`, their own learning rate. Here the factors are preallocated
//! at their largest size, so one tensor holds elements of several "groups": every element has
//! a birth step, elements not yet born are left untouched, and the others take
//! `torch.optim.AdamW`'s step with their own step count and learning rate. The arithmetic is
//! that of [`crate::training::optimizer::AdamW::step`].
//!
//! A [`RankGroup`] holds one factor of every module (every A, say) and its moments packed
//! into flat buffers ([`super::pack`]), so a step is some twenty ops over all modules, not
//! twenty per module: on a GPU, the per-module loop was launch-bound. Its result is, element
//! for element, that of the per-parameter definition (`RankAdam::step`, in the tests).

use super::pack;
use crate::training::optimizer::{BETA1, BETA2, EPSILON};
use tch::nn::Path;
use tch::{Kind, Tensor};

/// The birth of an element that does not exist yet (it is never updated).
pub const UNBORN: f64 = -1.0;

/// One parameter's moments, in the method's store so checkpoints keep them.
pub struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl Moments {
    pub fn new(path: &Path, name: &str, like: &Tensor) -> Moments {
        Moments {
            exp_avg: path.add(&format!("{name}_exp_avg"), like.zeros_like(), false),
            exp_avg_sq: path.add(&format!("{name}_exp_avg_sq"), like.zeros_like(), false),
        }
    }
}

/// AdamW with PyTorch's betas and epsilon and the job's weight decay.
pub struct RankAdam {
    pub weight_decay: f64,
}

/// The factors of one step, one per unit (a rank, or an element) they were computed for.
struct StepFactors {
    /// Whether the element is updated at all.
    live: Tensor,
    /// `lr / (1 - beta1^t)`, f32.
    step_size: Tensor,
    /// `sqrt(1 - beta2^t)`, f32.
    bias_correction2_sqrt: Tensor,
    /// `1 - lr * weight_decay`, f32, absent without weight decay.
    decay: Option<Tensor>,
}

impl StepFactors {
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> StepFactors {
        StepFactors {
            live: f(&self.live),
            step_size: f(&self.step_size),
            bias_correction2_sqrt: f(&self.bias_correction2_sqrt),
            decay: self.decay.as_ref().map(f),
        }
    }
}

impl RankAdam {
    /// The factors at optimizer step `now` (counted from 0) of units born at `born` (the
    /// 0-based step of the first update, or [`UNBORN`]) with learning rate `lr` (broadcast to
    /// `born`): a unit born at step `b` takes its `now - b + 1`-th step, as a parameter group
    /// added at step `b` would.
    fn factors(&self, born: &Tensor, lr: &Tensor, now: i64) -> StepFactors {
        tch::no_grad(|| {
            let born = born.to_kind(Kind::Double);
            let live = born.ge(0.0).logical_and(&born.le(now as f64));
            // Bias corrections in f64 from each element's own step count.
            let t = (-&born + (now + 1) as f64).clamp_min(1.0);
            let lr = lr.to_kind(Kind::Double);
            let bias_correction1 = -(&t * BETA1.ln()).exp() + 1.0;
            let bias_correction2_sqrt = (-(&t * BETA2.ln()).exp() + 1.0).sqrt();
            StepFactors {
                live,
                step_size: (&lr / bias_correction1).to_kind(Kind::Float),
                bias_correction2_sqrt: bias_correction2_sqrt.to_kind(Kind::Float),
                decay: (self.weight_decay != 0.0)
                    .then(|| (-&lr * self.weight_decay + 1.0).to_kind(Kind::Float)),
            }
        })
    }

    /// AdamW on `param` with its gradient `grad` and `moments`, the factors broadcast to it;
    /// only live elements change.
    fn apply(
        param: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        f: &StepFactors,
    ) {
        tch::no_grad(|| {
            let live = &f.live;
            let mut value = param.copy();
            if let Some(decay) = &f.decay {
                value *= decay;
            }
            let new_avg = exp_avg.lerp(grad, 1.0 - BETA1);
            let new_avg_sq = exp_avg_sq * BETA2 + grad * (1.0 - BETA2) * grad;
            let denom = new_avg_sq.sqrt() / &f.bias_correction2_sqrt + EPSILON;
            let value = value + &new_avg * (-&f.step_size) / denom;
            exp_avg
                .shallow_clone()
                .copy_(&new_avg.where_self(live, exp_avg));
            exp_avg_sq
                .shallow_clone()
                .copy_(&new_avg_sq.where_self(live, exp_avg_sq));
            param.shallow_clone().copy_(&value.where_self(live, param));
        });
    }

    /// One step of `param` alone, `born` and `lr` broadcast to it: the definition a
    /// [`RankGroup`] step is checked against.
    #[cfg(test)]
    pub fn step(
        &self,
        param: &Tensor,
        moments: &mut Moments,
        born: &Tensor,
        lr: &Tensor,
        now: i64,
    ) {
        let grad = param.grad();
        if grad.defined() {
            let f = self.factors(born, lr, now);
            RankAdam::apply(param, &grad, &moments.exp_avg, &moments.exp_avg_sq, &f);
        }
    }
}

/// Along which axis of a factor its ranks lie.
#[derive(Clone, Copy)]
pub enum RankAxis {
    /// `(K, n)`: rank `k` is row `k` (A, E).
    Rows,
    /// `(n, K)`: rank `k` is column `k` (B).
    Columns,
}

/// The same factor of every module (and its moments), packed into flat buffers, stepped
/// together. Births and learning rates come per unit: per rank, `(modules x K)` in module
/// order ([`RankGroup::by_rank`]), or per element ([`RankGroup::by_element`]).
pub struct RankGroup {
    params: Vec<Tensor>,
    value: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// For every element, the index of its unit (absent when units are elements).
    unit: Option<Tensor>,
}

impl RankGroup {
    /// Factors with `slots` ranks each along `axis`.
    pub fn by_rank(params: Vec<Tensor>, moments: Vec<Moments>, axis: RankAxis, slots: i64) -> Self {
        let unit: Vec<Tensor> = params
            .iter()
            .enumerate()
            .map(|(m, p)| {
                let ranks = Tensor::arange(slots, (Kind::Int64, p.device())) + m as i64 * slots;
                let shape = match axis {
                    RankAxis::Rows => [slots, 1],
                    RankAxis::Columns => [1, slots],
                };
                ranks.view(shape).expand(p.size(), false).reshape([-1])
            })
            .collect();
        let unit = (!unit.is_empty()).then(|| Tensor::cat(&unit, 0));
        RankGroup {
            unit,
            ..RankGroup::by_element(params, moments)
        }
    }

    /// Factors whose every element has its own birth (TriAdaptLoRA's C).
    pub fn by_element(params: Vec<Tensor>, moments: Vec<Moments>) -> Self {
        let (exp_avg, exp_avg_sq): (Vec<Tensor>, Vec<Tensor>) = moments
            .into_iter()
            .map(|m| (m.exp_avg, m.exp_avg_sq))
            .unzip();
        RankGroup {
            value: pack(&params),
            exp_avg: pack(&exp_avg),
            exp_avg_sq: pack(&exp_avg_sq),
            params,
            unit: None,
        }
    }

    /// Every parameter's values, packed.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// One AdamW step at `now` of every element born at or before it; `born` and `lr` per
    /// unit (`lr` may be one value for all). A parameter without a gradient is left as it is.
    pub fn step(&self, adam: &RankAdam, born: &Tensor, lr: &Tensor, now: i64) {
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        if grads.iter().all(|g| !g.defined()) {
            return;
        }
        tch::no_grad(|| {
            let flat: Vec<Tensor> = grads
                .iter()
                .zip(&self.params)
                .map(|(g, p)| match g.defined() {
                    true => g.reshape([-1]),
                    false => p.zeros_like().reshape([-1]),
                })
                .collect();
            let grad = Tensor::cat(&flat, 0);
            let f = adam.factors(born, &lr.expand_as(born), now);
            let mut f = match &self.unit {
                Some(unit) => f.map(|x| x.reshape([-1]).index_select(0, unit)),
                None => f.map(|x| x.reshape([-1])),
            };
            if grads.iter().any(|g| !g.defined()) {
                let has_grad: Vec<Tensor> = grads
                    .iter()
                    .zip(&self.params)
                    .map(|(g, p)| {
                        let (n, opts) = (p.numel() as i64, (Kind::Bool, p.device()));
                        match g.defined() {
                            true => Tensor::ones([n], opts),
                            false => Tensor::zeros([n], opts),
                        }
                    })
                    .collect();
                f.live = f.live.logical_and(&Tensor::cat(&has_grad, 0));
            }
            RankAdam::apply(&self.value, &grad, &self.exp_avg, &self.exp_avg_sq, &f);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    /// AdamW evaluated in f64 by hand: one element from step 0, one born at step 2 (a fresh
    /// parameter then, at its own learning rate), one never born (untouched despite gradients
    /// and weight decay).
    #[test]
    fn each_element_steps_as_a_parameter_group_added_at_its_birth() {
        let store = VarStore::new(Device::Cpu);
        let init = [1.0f64, -0.5, 2.0];
        let param = store
            .root()
            .add("w", Tensor::from_slice(&init.map(|x| x as f32)), true);
        let mut moments = Moments::new(&store.root(), "w", &param);
        let born = Tensor::from_slice(&[0.0f32, 2.0, UNBORN as f32]);
        let (wd, lrs) = (0.1, [0.01, 0.03, 0.05]);
        let adam = RankAdam { weight_decay: wd };
        let grads = [
            [0.5, -0.25, 1.0],
            [-0.1, 0.4, 1.0],
            [0.3, 0.2, 1.0],
            [0.05, -0.6, 1.0],
        ];
        let mut want = init;
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        let births = [0, 2];
        for (now, g) in grads.iter().enumerate() {
            let mut p = param.shallow_clone();
            p.zero_grad();
            (&param * Tensor::from_slice(&g.map(|x| x as f32)))
                .sum(Kind::Float)
                .backward();
            adam.step(
                &param,
                &mut moments,
                &born,
                &Tensor::from_slice(&lrs),
                now as i64,
            );
            for i in 0..2 {
                if now < births[i] {
                    continue;
                }
                let t = (now - births[i] + 1) as f64;
                want[i] *= 1.0 - lrs[i] * wd;
                m[i] = BETA1 * m[i] + (1.0 - BETA1) * g[i];
                v[i] = BETA2 * v[i] + (1.0 - BETA2) * g[i] * g[i];
                want[i] -= lrs[i] / (1.0 - BETA1.powf(t)) * m[i]
                    / (v[i].sqrt() / (1.0 - BETA2.powf(t)).sqrt() + EPSILON);
            }
            let got = Vec::<f64>::try_from(&param.to_kind(Kind::Double)).unwrap();
            for i in 0..3 {
                assert!(
                    (got[i] - want[i]).abs() < 1e-6,
                    "step {now}: {got:?} vs {want:?}"
                );
            }
            if now < 2 {
                assert_eq!(got[1], init[1], "unborn until step 2");
            }
        }
        assert_eq!(param.double_value(&[2]), 2.0);
        assert_eq!(moments.exp_avg.double_value(&[2]), 0.0);
    }

    /// A group of factors of different shapes, ranks along rows, along columns or births per
    /// element, steps exactly as each parameter stepped alone over several steps, births and
    /// learning rates differing per rank; a parameter that gets no gradient is left as it is.
    #[test]
    fn a_group_steps_every_parameter_exactly_as_alone() {
        tch::manual_seed(5);
        let slots = 3;
        let opts = (Kind::Float, Device::Cpu);
        for layout in ["rows", "columns", "elements"] {
            let shape = |n: i64| match layout {
                "rows" => vec![slots, n],
                "columns" => vec![n, slots],
                _ => vec![n, slots + 1],
            };
            let (alone, packed) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
            let mut params = Vec::new();
            let (mut moments, mut group_moments) = (Vec::new(), Vec::new());
            for (m, n) in [5i64, 2, 7].into_iter().enumerate() {
                let init = Tensor::randn(shape(n), opts);
                let name = format!("p{m}");
                let p = alone.root().add(&name, init.copy(), true);
                let q = packed.root().add(&name, init, true);
                moments.push(Moments::new(&alone.root(), &name, &p));
                group_moments.push(Moments::new(&packed.root(), &name, &q));
                params.push((p, q));
            }
            let group_params = params.iter().map(|(_, q)| q.shallow_clone()).collect();
            let group = match layout {
                "rows" => RankGroup::by_rank(group_params, group_moments, RankAxis::Rows, slots),
                "columns" => {
                    RankGroup::by_rank(group_params, group_moments, RankAxis::Columns, slots)
                }
                _ => RankGroup::by_element(group_params, group_moments),
            };
            // Per unit: births in {-1, 0, 1, 2, 3}, a learning rate each.
            let units = |p: &Tensor| match layout {
                "elements" => p.size(),
                _ => vec![slots],
            };
            let born: Vec<Tensor> = params
                .iter()
                .map(|(p, _)| Tensor::randint_low(-1, 4, units(p), opts))
                .collect();
            let lr: Vec<Tensor> = params
                .iter()
                .map(|(p, _)| Tensor::rand(units(p), opts) * 0.1)
                .collect();
            let broadcast = |t: &Tensor| match layout {
                "rows" => t.view([slots, 1]),
                "columns" => t.view([1, slots]),
                _ => t.shallow_clone(),
            };
            let flat = |ts: &[Tensor]| {
                Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)
            };
            let adam = RankAdam { weight_decay: 0.1 };
            let untouched = params[1].0.copy();
            for now in 0..5 {
                // Every parameter but the second gets the same gradient in both copies.
                let mut losses = Vec::new();
                for (m, (p, q)) in params.iter().enumerate() {
                    let (mut p, mut q) = (p.shallow_clone(), q.shallow_clone());
                    p.zero_grad();
                    q.zero_grad();
                    if m != 1 {
                        let g = Tensor::randn(p.size(), opts);
                        losses.push((&p * &g).sum(Kind::Float) + (&q * &g).sum(Kind::Float));
                    }
                }
                Tensor::stack(&losses, 0).sum(Kind::Float).backward();
                for (((p, _), moments), (born, lr)) in
                    params.iter().zip(&mut moments).zip(born.iter().zip(&lr))
                {
                    adam.step(p, moments, &broadcast(born), &broadcast(lr), now);
                }
                group.step(&adam, &flat(&born), &flat(&lr), now);
                for (m, ((p, q), moments)) in params.iter().zip(&moments).enumerate() {
                    let (got, want) = (q.copy(), p.copy());
                    assert_eq!(
                        (&got - &want).abs().max().double_value(&[]),
                        0.0,
                        "{layout}, parameter {m}, step {now}"
                    );
                    let offset = params[..m].iter().map(|(p, _)| p.numel()).sum::<usize>();
                    let n = p.numel() as i64;
                    let packed_avg = group.exp_avg.narrow(0, offset as i64, n);
                    assert_eq!(
                        (&packed_avg - moments.exp_avg.reshape([-1]))
                            .abs()
                            .max()
                            .double_value(&[]),
                        0.0
                    );
                }
            }
            assert_eq!(
                (&params[1].1 - &untouched).abs().max().double_value(&[]),
                0.0
            );
            // The store's variables are the packed buffer's parts.
            let named = packed.variables();
            let q0 = &named["p0"];
            assert_eq!(q0.data_ptr(), group.value.data_ptr());
        }
    }
}
