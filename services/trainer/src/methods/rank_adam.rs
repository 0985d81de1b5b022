//! AdamW for adapters whose ranks are created during training (IncreLoRA, TriAdaptLoRA).
//!
//! The references add each new rank to the optimizer as a new parameter group
//! (`optimizer.add_param_group`): fresh moments, their own step count (bias correction from 1)
//! and, with IncreLoRA's `multi_lr`, their own learning rate. Here the factors are preallocated
//! at their largest size, so one tensor holds elements of several "groups": every element has
//! a birth step (broadcast from a per-rank tensor), elements not yet born are left untouched,
//! and the others take `torch.optim.AdamW`'s step with their own step count and learning rate.
//! The arithmetic is that of [`crate::training::optimizer::AdamW::step`].

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

/// The per-rank factors of one step, shaped like the `born` they come from (they broadcast to
/// the parameter): parameters sharing births share them.
pub struct StepFactors {
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
    /// The same factors for a parameter whose ranks lie along its columns (`born` of shape
    /// `(K, 1)` viewed as `(1, K)`).
    pub fn transposed(&self) -> StepFactors {
        let t = |x: &Tensor| x.view([1, -1]);
        StepFactors {
            live: t(&self.live),
            step_size: t(&self.step_size),
            bias_correction2_sqrt: t(&self.bias_correction2_sqrt),
            decay: self.decay.as_ref().map(t),
        }
    }
}

impl RankAdam {
    /// One step at optimizer step `now` (counted from 0) on the elements of `param` born at
    /// or before `now`. `born` (the 0-based step of an element's first update, or [`UNBORN`])
    /// and `lr` (each element's learning rate) broadcast to `param`. An element born at step
    /// `b` takes its `now - b + 1`-th step, as a parameter group added at step `b` would.
    pub fn step(
        &self,
        param: &Tensor,
        moments: &mut Moments,
        born: &Tensor,
        lr: &Tensor,
        now: i64,
    ) {
        self.apply(param, moments, &self.factors(born, lr, now));
    }

    /// The factors of [`RankAdam::step`] for `born` and `lr`, to apply to every parameter that
    /// shares them.
    pub fn factors(&self, born: &Tensor, lr: &Tensor, now: i64) -> StepFactors {
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

    /// [`RankAdam::step`] with its factors computed.
    pub fn apply(&self, param: &Tensor, moments: &mut Moments, factors: &StepFactors) {
        let grad = param.grad();
        if !grad.defined() {
            return;
        }
        tch::no_grad(|| {
            let live = &factors.live;
            let mut value = param.copy();
            if let Some(decay) = &factors.decay {
                value *= decay;
            }
            let exp_avg = moments.exp_avg.lerp(&grad, 1.0 - BETA1);
            let exp_avg_sq = &moments.exp_avg_sq * BETA2 + &grad * (1.0 - BETA2) * &grad;
            let denom = exp_avg_sq.sqrt() / &factors.bias_correction2_sqrt + EPSILON;
            let value = value + &exp_avg * (-&factors.step_size) / denom;
            moments
                .exp_avg
                .copy_(&exp_avg.where_self(live, &moments.exp_avg));
            moments
                .exp_avg_sq
                .copy_(&exp_avg_sq.where_self(live, &moments.exp_avg_sq));
            let mut param = param.shallow_clone();
            param.copy_(&value.where_self(live, &param));
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
}
