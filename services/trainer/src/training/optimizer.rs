//! AdamW over the adapter's parameters, with gradient clipping and the learning-rate schedules.
//!
//! Written out here rather than taken from `tch::nn::Optimizer` because checkpoints need the
//! moments and the step count, which libtorch's C++ optimizer does not hand out through tch.
//! The arithmetic is `torch.optim.AdamW`'s single-tensor path (the one PyTorch takes on the
//! CPU) op for op, and clipping is `torch.nn.utils.clip_grad_norm_`'s, so a run follows what
//! the same run in PyTorch would do.

use crate::error::user_error;
use anyhow::Result;
use loraforge_spec::LrSchedule;
use std::collections::HashMap;
use tch::Tensor;

/// PyTorch's (and Hugging Face Trainer's) defaults; the job spec does not set them, a method
/// may ([`AdamW::with_betas`]).
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPSILON: f64 = 1e-8;

/// One trainable parameter and its AdamW state.
struct ParameterState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    parameters: Vec<ParameterState>,
    weight_decay: f64,
    betas: (f64, f64),
    /// Optimizer steps taken (PyTorch's per-parameter `step`, the same for all of them here).
    steps: u64,
}

impl AdamW {
    /// Starts with zero moments, as `torch.optim.AdamW` does on its first step. Parameters are
    /// kept in name order, so their state is saved and restored in one fixed order.
    pub fn new(mut named: Vec<(String, Tensor)>, weight_decay: f64) -> AdamW {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let parameters = named
            .into_iter()
            .map(|(name, param)| ParameterState {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                name,
                param,
            })
            .collect();
        AdamW {
            parameters,
            weight_decay,
            betas: (BETA1, BETA2),
            steps: 0,
        }
    }

    /// Other Adam betas than PyTorch's defaults (CoDyRA's reference uses 0.9 and 0.9999).
    pub fn with_betas(mut self, betas: (f64, f64)) -> AdamW {
        self.betas = betas;
        self
    }

    /// One AdamW step at learning rate `lr`, for every parameter with a gradient.
    pub fn step(&mut self, lr: f64) {
        let (beta1, beta2) = self.betas;
        self.steps += 1;
        let step = self.steps as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        tch::no_grad(|| {
            for p in &mut self.parameters {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 {
                    let _ = p.param.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = p.exp_avg.lerp_(&grad, 1.0 - beta1);
                // addcmul_(grad, grad, value=1-beta2) computes (value * grad) * grad.
                let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = p.exp_avg_sq.g_add_(&(&grad * (1.0 - beta2) * &grad));
                let denom = p.exp_avg_sq.sqrt() / bias_correction2_sqrt + EPSILON;
                // addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom.
                let _ = p.param.g_add_(&(&p.exp_avg * (-step_size) / denom));
            }
        });
    }

    /// The moments, named `exp_avg.<parameter>` and `exp_avg_sq.<parameter>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.parameters
            .iter()
            .flat_map(|p| {
                [
                    (format!("exp_avg.{}", p.name), &p.exp_avg),
                    (format!("exp_avg_sq.{}", p.name), &p.exp_avg_sq),
                ]
            })
            .map(|(name, t)| (name, t.detach().to_device(tch::Device::Cpu).contiguous()))
            .collect()
    }

    /// Restores what [`AdamW::state`] saved, after `steps` steps.
    pub fn load_state(&mut self, saved: &[(String, Tensor)], steps: u64) -> Result<()> {
        let saved: HashMap<&str, &Tensor> =
            saved.iter().map(|(name, t)| (name.as_str(), t)).collect();
        for p in &mut self.parameters {
            for (kind, moment) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{kind}.{}", p.name);
                let tensor = saved
                    .get(key.as_str())
                    .ok_or_else(|| anyhow::anyhow!("checkpoint has no {key}"))?;
                if tensor.size() != moment.size() {
                    return Err(user_error(format!(
                        "checkpoint's {key} has shape {:?}; the parameter has {:?}",
                        tensor.size(),
                        moment.size()
                    )));
                }
                tch::no_grad(|| moment.copy_(tensor));
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Clears the gradients of `params` (`zero_grad(set_to_none=False)`).
pub fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
}

/// Scales the gradients of `params` so their global L2 norm is at most `max_norm`, exactly as
/// `clip_grad_norm_` does (`max_norm / (norm + 1e-6)`, capped at 1, always applied); returns
/// the norm before clipping. The loop runs its two halves apart ([`total_grad_norm`],
/// [`scale_to_norm`]) around a method's gradient adjustment.
#[cfg(test)]
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let Some(total) = total_grad_norm(params) else {
        return 0.0;
    };
    scale_to_norm(params, &total, max_norm);
    total.double_value(&[])
}

/// The global L2 norm of the gradients of `params` as `clip_grad_norm_` computes it, as a
/// tensor; `None` without gradients.
pub fn total_grad_norm(params: &[Tensor]) -> Option<Tensor> {
    global_norm(&defined_grads(params))
}

/// `clip_grad_norm_`'s scaling for a global norm `total` measured earlier: the training loop
/// measures before a method adjusts the gradients and clips what the method leaves, in the
/// order DeepSpeed runs LoRA-Pro's reference.
pub fn scale_to_norm(params: &[Tensor], total: &Tensor, max_norm: f64) {
    // Python's `max_norm / tensor` is `tensor.reciprocal() * max_norm`.
    let coefficient = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    tch::no_grad(|| {
        for mut grad in defined_grads(params) {
            let _ = grad.g_mul_(&coefficient);
        }
    });
}

fn defined_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect()
}

/// The norm of the per-tensor norms, as `clip_grad_norm_` computes it; `None` without gradients.
fn global_norm(grads: &[Tensor]) -> Option<Tensor> {
    if grads.is_empty() {
        return None;
    }
    let norms: Vec<Tensor> = grads.iter().map(Tensor::norm).collect();
    Some(Tensor::stack(&norms, 0).norm())
}

/// The learning rate of optimizer step `step` (1-based) of `total`: Hugging Face's
/// `get_{constant,linear,cosine}_schedule_with_warmup` evaluated at `step - 1`, as the
/// Trainer does (it steps the scheduler after the optimizer). Warmup rises linearly from 0;
/// linear and cosine then decay to 0 at `total`.
pub fn learning_rate(schedule: LrSchedule, peak: f64, step: u32, warmup: u32, total: u32) -> f64 {
    let current = step.saturating_sub(1);
    if current < warmup {
        return peak * f64::from(current) / f64::from(warmup.max(1));
    }
    let decay_steps = f64::from(total.saturating_sub(warmup).max(1));
    let factor = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => (f64::from(total.saturating_sub(current)) / decay_steps).max(0.0),
        LrSchedule::Cosine => {
            let progress = f64::from(current - warmup) / decay_steps;
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
    };
    peak * factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn schedules_follow_hugging_face() {
        let lrs = |schedule| {
            (1..=6)
                .map(|s| learning_rate(schedule, 1.0, s, 2, 6))
                .collect::<Vec<_>>()
        };
        assert_eq!(lrs(LrSchedule::Constant), [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(lrs(LrSchedule::Linear), [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
        let cosine = lrs(LrSchedule::Cosine);
        let expected = [
            0.0,
            0.5,
            1.0,
            0.853_553_390_593_273_8,
            0.5,
            0.146_446_609_406_726_3,
        ];
        for (got, want) in cosine.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{cosine:?}");
        }
        // No warmup: the peak from the first step.
        assert_eq!(learning_rate(LrSchedule::Constant, 0.1, 1, 0, 10), 0.1);
        assert_eq!(learning_rate(LrSchedule::Linear, 1.0, 1, 0, 4), 1.0);
        assert_eq!(learning_rate(LrSchedule::Linear, 1.0, 4, 0, 4), 0.25);
    }

    /// Two steps on one scalar, against AdamW's formulas evaluated in f64 by hand.
    #[test]
    fn adamw_matches_its_definition() {
        let param = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut optimizer = AdamW::new(vec![("w".into(), param.shallow_clone())], 0.1);
        let (lr, grads) = (0.01, [0.5, -0.25]);
        let (mut w, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in grads.iter().enumerate() {
            zero_grads(&[param.shallow_clone()]);
            (&param * *g).sum(Kind::Float).backward();
            optimizer.step(lr);
            let t = (t + 1) as f64;
            w *= 1.0 - lr * 0.1;
            m = BETA1 * m + (1.0 - BETA1) * g;
            v = BETA2 * v + (1.0 - BETA2) * g * g;
            w -= lr / (1.0 - BETA1.powf(t)) * m
                / (v.sqrt() / (1.0 - BETA2.powf(t)).sqrt() + EPSILON);
        }
        let got = param.double_value(&[0]);
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
        assert_eq!(optimizer.steps, 2);

        // Its state restores into a fresh optimizer, which then steps the same.
        let twin = Tensor::from_slice(&[got as f32]).set_requires_grad(true);
        let mut restored = AdamW::new(vec![("w".into(), twin.shallow_clone())], 0.1);
        restored
            .load_state(&optimizer.state(), optimizer.steps)
            .unwrap();
        for (p, o) in [(&param, &mut optimizer), (&twin, &mut restored)] {
            zero_grads(&[p.shallow_clone()]);
            (p * 0.3).sum(Kind::Float).backward();
            o.step(lr);
        }
        assert_eq!(param.double_value(&[0]), twin.double_value(&[0]));
    }

    #[test]
    fn clipping_scales_the_global_norm_down_only() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32, 0.0]).set_requires_grad(true);
        let params = [a.shallow_clone(), b.shallow_clone()];
        let backward = || {
            zero_grads(&params);
            ((&a * &a).sum(Kind::Float) / 2.0 + (&b * &b).sum(Kind::Float) / 2.0).backward();
        };
        backward();
        // Measuring leaves the gradients as they are; clipping reports the same norm.
        assert_eq!(total_grad_norm(&params).unwrap().double_value(&[]), 5.0);
        assert_eq!(a.grad().double_value(&[0]), 3.0);
        assert_eq!(clip_grad_norm(&params, 1.0), 5.0);
        let clipped = Tensor::cat(&[a.grad(), b.grad()], 0);
        let norm = clipped.norm().double_value(&[]);
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        backward();
        clip_grad_norm(&params, 10.0);
        assert_eq!(
            Vec::<f32>::try_from(&b.grad().to_device(Device::Cpu)).unwrap(),
            [4.0, 0.0]
        );
    }
}
