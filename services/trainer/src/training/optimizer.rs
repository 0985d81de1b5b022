//! AdamW over the adapter's parameters, with gradient clipping and the learning-rate schedules.
//!
//! Written out here rather than taken from `tch::nn::Optimizer` because checkpoints need the
//! moments and the step count, which libtorch's C++ optimizer does not hand out through tch.
//! The arithmetic is `torch.optim.AdamW`'s single-tensor path (the one PyTorch takes on the
//! CPU) op for op, and clipping is `torch.nn.utils.clip_grad_norm_`'s, so a run follows what
//! the same run in PyTorch would do.
//!
//! Flat buffers: a LoRA adapter is hundreds of small tensors (TinyLlama, all seven projections:
//! 308), and stepping them one by one costs about a dozen kernel launches each, thousands a
//! step, where the arithmetic itself is a few microseconds. So [`AdamW::new`] lays the
//! parameters of each (device, dtype) end to end in one buffer and re-points every parameter's
//! storage into it (`set_data`: the variable, its autograd identity and every module holding it
//! stay the same; only where its numbers live changes); the moments are flat buffers of the same
//! layout.
//! Gradients are moved the same way the first time autograd creates them (it then accumulates
//! into them in place), so a step is AdamW's dozen kernels over each buffer, and the loop's
//! clearing, global norm and clipping are one kernel each; on CUDA the step itself is one kernel
//! of ours over each buffer (the same operations, each rounded as its libtorch kernel rounds:
//! `cuda_kernels::adamw_step`). The arithmetic per element is the
//! single-tensor path's, so the result is the same. A group falls back to the per-tensor loop
//! in a step where one of its parameters has no gradient (never had one: AdamW skips it, and
//! must neither decay nor move it), and checkpoints still hold one tensor per parameter.

use crate::error::user_error;
use crate::model::cuda_kernels;
use anyhow::Result;
use loraforge_spec::LrSchedule;
use std::collections::{HashMap, HashSet};
use tch::{Device, Kind, Tensor};

/// PyTorch's (and Hugging Face Trainer's) defaults; the job spec does not set them, a method
/// may ([`AdamW::with_betas`]).
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPSILON: f64 = 1e-8;

/// One trainable parameter and its AdamW state, all views into its group's flat buffers.
struct ParameterState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Where the parameter lives in its group's flat buffer, and where its gradient goes in
    /// the flat gradient buffer.
    home: Tensor,
    grad_slot: Tensor,
}

/// The parameters of one device and dtype, end to end, with their gradients and moments in the
/// same layout.
struct FlatGroup {
    /// Indices into [`AdamW::parameters`], in buffer order.
    members: Vec<usize>,
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    /// In name order.
    parameters: Vec<ParameterState>,
    groups: Vec<FlatGroup>,
    weight_decay: f64,
    betas: (f64, f64),
    /// Optimizer steps taken (PyTorch's per-parameter `step`, the same for all of them here).
    steps: u64,
}

impl AdamW {
    /// Starts with zero moments, as `torch.optim.AdamW` does on its first step. Parameters are
    /// kept in name order, so their state is saved and restored in one fixed order. Each
    /// parameter is moved into its group's flat buffer (module doc), keeping its value.
    pub fn new(mut named: Vec<(String, Tensor)>, weight_decay: f64) -> AdamW {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut keys: Vec<(Kind, Device)> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, (_, param)) in named.iter().enumerate() {
            let key = (param.kind(), param.device());
            match keys.iter().position(|k| *k == key) {
                Some(g) => members[g].push(i),
                None => {
                    keys.push(key);
                    members.push(vec![i]);
                }
            }
        }
        let mut slots: Vec<Option<ParameterState>> = named.iter().map(|_| None).collect();
        let groups = tch::no_grad(|| {
            keys.into_iter()
                .zip(members)
                .map(|(options, members)| {
                    let total: i64 = members.iter().map(|&i| named[i].1.numel() as i64).sum();
                    let params = Tensor::empty([total], options);
                    let grads = Tensor::zeros([total], options);
                    let exp_avg = Tensor::zeros([total], options);
                    let exp_avg_sq = Tensor::zeros([total], options);
                    let mut offset = 0;
                    for &i in &members {
                        let (name, param) = &named[i];
                        let size = param.size();
                        let numel = param.numel() as i64;
                        let view =
                            |flat: &Tensor| flat.narrow(0, offset, numel).view(size.as_slice());
                        let flat_param = view(&params);
                        flat_param.shallow_clone().copy_(param);
                        param.shallow_clone().set_data(&flat_param);
                        slots[i] = Some(ParameterState {
                            name: name.clone(),
                            param: param.shallow_clone(),
                            exp_avg: view(&exp_avg),
                            exp_avg_sq: view(&exp_avg_sq),
                            grad_slot: view(&grads),
                            home: flat_param,
                        });
                        offset += numel;
                    }
                    FlatGroup {
                        members,
                        params,
                        grads,
                        exp_avg,
                        exp_avg_sq,
                    }
                })
                .collect()
        });
        AdamW {
            parameters: slots.into_iter().map(Option::unwrap).collect(),
            groups,
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
        let update = Update {
            lr,
            weight_decay: self.weight_decay,
            beta1,
            beta2,
            step_size: lr / (1.0 - beta1.powf(step)),
            bias_correction2_sqrt: (1.0 - beta2.powf(step)).powf(0.5),
        };
        let complete = self.gather_grads();
        tch::no_grad(|| {
            for (group, complete) in self.groups.iter_mut().zip(complete) {
                if complete {
                    let buffers = [&group.params, &group.grads, &group.exp_avg];
                    if !update.fused(buffers, &group.exp_avg_sq) {
                        update.apply(
                            &mut group.params,
                            &group.grads,
                            &mut group.exp_avg,
                            &mut group.exp_avg_sq,
                        );
                    }
                    continue;
                }
                for &i in &group.members {
                    let p = &mut self.parameters[i];
                    let grad = p.param.grad();
                    if grad.defined() {
                        update.apply(&mut p.param, &grad, &mut p.exp_avg, &mut p.exp_avg_sq);
                    }
                }
            }
        });
    }

    /// Moves every gradient autograd created since the last call into its slot of the flat
    /// gradient buffer (autograd then accumulates there in place); returns, per group, whether
    /// every member and its gradient are in the group's buffers. Only pointers are compared
    /// when nothing moves.
    fn gather_grads(&self) -> Vec<bool> {
        tch::no_grad(|| {
            self.groups
                .iter()
                .map(|group| {
                    let mut complete = true;
                    for &i in &group.members {
                        let p = &self.parameters[i];
                        // Something re-pointed the parameter since: step it on its own.
                        if p.param.data_ptr() != p.home.data_ptr() {
                            complete = false;
                        }
                        let mut grad = p.param.grad();
                        if !grad.defined() {
                            complete = false;
                        } else if grad.data_ptr() != p.grad_slot.data_ptr() {
                            p.grad_slot.shallow_clone().copy_(&grad);
                            grad.set_data(&p.grad_slot);
                        }
                    }
                    complete
                })
                .collect()
        })
    }

    /// Splits `trained` into the flat gradient buffers that hold the gradients of some of them
    /// (groups whose every member has one there, all of whose members are in `trained`) and the
    /// tensors whose gradients are not in such a buffer.
    fn split_grads(&self, trained: &[Tensor]) -> (Vec<&Tensor>, Vec<Tensor>) {
        let complete = self.gather_grads();
        let flat: Vec<&FlatGroup> = self
            .groups
            .iter()
            .zip(complete)
            .filter_map(|(group, complete)| complete.then_some(group))
            .collect();
        let covered: HashSet<usize> = flat
            .iter()
            .flat_map(|g| &g.members)
            .map(|&i| &self.parameters[i].param)
            .filter(|p| p.numel() > 0)
            .map(|p| p.data_ptr() as usize)
            .collect();
        let (mut found, mut others) = (0, Vec::new());
        for t in trained {
            if t.numel() > 0 && covered.contains(&(t.data_ptr() as usize)) {
                found += 1;
            } else {
                others.push(t.shallow_clone());
            }
        }
        if found != covered.len() {
            // A parameter outside `trained` would be counted: measure tensor by tensor.
            return (
                Vec::new(),
                trained.iter().map(Tensor::shallow_clone).collect(),
            );
        }
        (flat.iter().map(|g| &g.grads).collect(), others)
    }

    /// Clears the gradients of `trained` (every trainable variable, this optimizer's parameters
    /// among them) as [`zero_grads`] does: one kernel per flat gradient buffer.
    pub fn zero_grads(&self, trained: &[Tensor]) {
        let (flat, others) = self.split_grads(trained);
        tch::no_grad(|| {
            for grads in flat {
                let _ = grads.shallow_clone().zero_();
            }
        });
        zero_grads(&others);
    }

    /// [`total_grad_norm`] of `trained`, one reduction per flat gradient buffer. On CUDA the
    /// gradients outside the buffers (the parameters a method steps itself: TriAdaptLoRA's,
    /// hundreds of tensors) count as one concatenation, one reduction rather than one per
    /// tensor (kernel launches were the cost); like the buffers', that differs from the norm
    /// of per-tensor norms in rounding only.
    pub fn total_grad_norm(&self, trained: &[Tensor]) -> Option<Tensor> {
        let (flat, others) = self.split_grads(trained);
        let mut grads: Vec<Tensor> = flat.into_iter().map(Tensor::shallow_clone).collect();
        let others = defined_grads(&others);
        let on_cuda = others.first().is_some_and(|g| g.device().is_cuda());
        grads.extend(norm_terms(others, on_cuda));
        global_norm(&grads)
    }

    /// [`scale_to_norm`] of `trained`, one kernel per flat gradient buffer.
    pub fn scale_to_norm(&self, trained: &[Tensor], total: &Tensor, max_norm: f64) {
        let (flat, others) = self.split_grads(trained);
        let coefficient = clip_coefficient(total, max_norm);
        tch::no_grad(|| {
            for grads in flat {
                let _ = grads.shallow_clone().g_mul_(&coefficient);
            }
        });
        scale_to_norm(&others, total, max_norm);
    }

    /// The moments, named `exp_avg.<parameter>` and `exp_avg_sq.<parameter>`, for a checkpoint:
    /// copies on the CPU, each group's buffer brought over in one transfer.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let on_cpu = |flat: &Tensor| {
            flat.detach()
                .to_device_(Device::Cpu, flat.kind(), false, true)
        };
        let mut moments: HashMap<usize, (Tensor, Tensor)> = HashMap::new();
        for group in &self.groups {
            let (exp_avg, exp_avg_sq) = (on_cpu(&group.exp_avg), on_cpu(&group.exp_avg_sq));
            let mut offset = 0;
            for &i in &group.members {
                let p = &self.parameters[i];
                let numel = p.param.numel() as i64;
                let size = p.param.size();
                let view = |flat: &Tensor| flat.narrow(0, offset, numel).view(size.as_slice());
                moments.insert(i, (view(&exp_avg), view(&exp_avg_sq)));
                offset += numel;
            }
        }
        self.parameters
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                let (exp_avg, exp_avg_sq) =
                    moments.remove(&i).expect("every parameter is in a group");
                [
                    (format!("exp_avg.{}", p.name), exp_avg),
                    (format!("exp_avg_sq.{}", p.name), exp_avg_sq),
                ]
            })
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

/// The constants of one AdamW step.
struct Update {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl Update {
    /// [`Update::apply`] on a flat group in one CUDA kernel (`cuda_kernels::adamw_step`), where
    /// the dozen libtorch kernels of the single-tensor path were each a pass over the group's
    /// buffers (on Llama-3-8B with LoRA r16 on every projection, 42 M parameters: about 2 ms
    /// of an H100's step); the same operations in the same order, each rounded as its kernel
    /// rounds. `false` where it does not apply (not CUDA, or the kernels are off).
    fn fused(&self, [param, grad, exp_avg]: [&Tensor; 3], exp_avg_sq: &Tensor) -> bool {
        let constants = cuda_kernels::AdamwConstants {
            decay: 1.0 - self.lr * self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            step_size: self.step_size,
            bias_correction2_sqrt: self.bias_correction2_sqrt,
            eps: EPSILON,
        };
        cuda_kernels::adamw_step(param, grad, exp_avg, exp_avg_sq, &constants)
    }

    /// `torch.optim.AdamW`'s single-tensor step, op for op, on one parameter or one flat buffer
    /// (element by element the same either way).
    fn apply(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
    ) {
        if self.weight_decay != 0.0 {
            let _ = param.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
        }
        let _ = exp_avg.lerp_(grad, 1.0 - self.beta1);
        // addcmul_(grad, grad, value=1-beta2) computes (value * grad) * grad.
        let _ = exp_avg_sq.g_mul_scalar_(self.beta2);
        let _ = exp_avg_sq.g_add_(&(grad * (1.0 - self.beta2) * grad));
        let denom = exp_avg_sq.sqrt() / self.bias_correction2_sqrt + EPSILON;
        // addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom.
        let _ = param.g_add_(&(&*exp_avg * (-self.step_size) / denom));
    }
}

/// Clears the gradients of `params` (`zero_grad(set_to_none=False)`), tensor by tensor.
pub fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
}

/// Scales the gradients of `params` so their global L2 norm is at most `max_norm`, exactly as
/// `clip_grad_norm_` does (`max_norm / (norm + 1e-6)`, capped at 1, always applied); returns
/// the norm before clipping; tensor by tensor, the reference for the tests. The loop runs
/// AdamW's halves ([`AdamW::total_grad_norm`], [`AdamW::scale_to_norm`]), which take the flat
/// gradient buffers whole, apart around a method's gradient adjustment.
#[cfg(test)]
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    let Some(total) = total_grad_norm(params) else {
        return 0.0;
    };
    scale_to_norm(params, &total, max_norm);
    total.double_value(&[])
}

/// The global L2 norm of the gradients of `params` as `clip_grad_norm_` computes it (the norm
/// of the per-tensor norms), as a tensor; `None` without gradients.
#[cfg(test)]
fn total_grad_norm(params: &[Tensor]) -> Option<Tensor> {
    global_norm(&defined_grads(params))
}

/// `clip_grad_norm_`'s scaling for a global norm `total` measured earlier: the training loop
/// measures before a method adjusts the gradients and clips what the method leaves, in the
/// order DeepSpeed runs LoRA-Pro's reference.
fn scale_to_norm(params: &[Tensor], total: &Tensor, max_norm: f64) {
    let coefficient = clip_coefficient(total, max_norm);
    tch::no_grad(|| {
        for mut grad in defined_grads(params) {
            let _ = grad.g_mul_(&coefficient);
        }
    });
}

/// `max_norm / (total + 1e-6)`, capped at 1. Python's `max_norm / tensor` is
/// `tensor.reciprocal() * max_norm`.
fn clip_coefficient(total: &Tensor, max_norm: f64) -> Tensor {
    ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0)
}

fn defined_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect()
}

/// What [`global_norm`] takes the norms of for `grads`: each tensor, or with `one_reduction`
/// (and more than one of them) their concatenation, whose norm is the same up to rounding.
fn norm_terms(grads: Vec<Tensor>, one_reduction: bool) -> Vec<Tensor> {
    if !one_reduction || grads.len() < 2 {
        return grads;
    }
    let parts: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
    vec![Tensor::cat(&parts, 0)]
}

/// The norm of the per-tensor (or per-buffer) norms, as `clip_grad_norm_` computes it; `None`
/// without gradients.
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

    /// On CUDA a flat group's step is one kernel (`cuda_kernels::adamw_step`); it gives what
    /// the libtorch kernels of the single-tensor path give, up to the last bit of lerp (whose
    /// libtorch kernel may fuse its multiply and add): three steps on a million parameters,
    /// with weight decay, every element within two fp32 steps of the other.
    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn the_fused_step_is_the_libtorch_one_on_cuda() {
        let opts = (Kind::Float, Device::Cuda(0));
        tch::manual_seed(23);
        let n = 1 << 20;
        let start = [
            Tensor::randn([n], opts),
            Tensor::zeros([n], opts),
            Tensor::zeros([n], opts),
        ];
        let mut fused = start.each_ref().map(Tensor::copy);
        let mut reference = start.each_ref().map(Tensor::copy);
        for step in 1..=3 {
            let grad = Tensor::randn([n], opts) * 1e-2;
            let update = Update {
                lr: 2e-4,
                weight_decay: 0.01,
                beta1: BETA1,
                beta2: BETA2,
                step_size: 2e-4 / (1.0 - BETA1.powi(step)),
                bias_correction2_sqrt: (1.0 - BETA2.powi(step)).sqrt(),
            };
            let [p, m, v] = &mut fused;
            assert!(update.fused([&*p, &grad, &*m], v), "the kernel applies");
            let [p, m, v] = &mut reference;
            tch::no_grad(|| update.apply(p, &grad, m, v));
        }
        for (got, want) in fused.iter().zip(&reference) {
            let spacing = want.abs().clamp_min(1e-30) * 2f64.powi(-23);
            let ulps = ((got - want).abs() / spacing).max().double_value(&[]);
            assert!(ulps <= 2.0, "{ulps} fp32 steps apart");
        }
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
    fn one_reduction_over_many_gradients_is_their_global_norm() {
        let grads: Vec<Tensor> = [[3, 4], [7, 1], [2, 5]]
            .iter()
            .map(|&[r, c]| Tensor::randn([r, c], (Kind::Float, tch::Device::Cpu)))
            .collect();
        let norm = |terms: Vec<Tensor>| global_norm(&terms).unwrap().double_value(&[]);
        let each = norm(norm_terms(
            grads.iter().map(Tensor::shallow_clone).collect(),
            false,
        ));
        let terms = norm_terms(grads.iter().map(Tensor::shallow_clone).collect(), true);
        assert_eq!(terms.len(), 1);
        let one = norm(terms);
        assert!(
            each > 0.0 && (one - each).abs() <= 1e-6 * each,
            "{one} vs {each}"
        );
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

    /// The per-tensor loop the flat buffers replaced, as it was: `torch.optim.AdamW`'s
    /// single-tensor path on each parameter that has a gradient.
    struct PerTensor {
        params: Vec<Tensor>,
        exp_avg: Vec<Tensor>,
        exp_avg_sq: Vec<Tensor>,
        steps: u64,
        weight_decay: f64,
    }

    impl PerTensor {
        fn new(params: Vec<Tensor>, weight_decay: f64) -> PerTensor {
            PerTensor {
                exp_avg: params.iter().map(Tensor::zeros_like).collect(),
                exp_avg_sq: params.iter().map(Tensor::zeros_like).collect(),
                params,
                steps: 0,
                weight_decay,
            }
        }

        fn step(&mut self, lr: f64) {
            self.steps += 1;
            let step = self.steps as f64;
            let bias_correction1 = 1.0 - BETA1.powf(step);
            let bias_correction2 = 1.0 - BETA2.powf(step);
            let step_size = lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.powf(0.5);
            tch::no_grad(|| {
                for ((param, exp_avg), exp_avg_sq) in self
                    .params
                    .iter_mut()
                    .zip(&mut self.exp_avg)
                    .zip(&mut self.exp_avg_sq)
                {
                    let grad = param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    if self.weight_decay != 0.0 {
                        let _ = param.g_mul_scalar_(1.0 - lr * self.weight_decay);
                    }
                    let _ = exp_avg.lerp_(&grad, 1.0 - BETA1);
                    let _ = exp_avg_sq.g_mul_scalar_(BETA2);
                    let _ = exp_avg_sq.g_add_(&(&grad * (1.0 - BETA2) * &grad));
                    let denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + EPSILON;
                    let _ = param.g_add_(&(&*exp_avg * (-step_size) / denom));
                }
            });
        }
    }

    /// A small adapter in two dtypes (two flat groups). `gate` is trained but stepped by no
    /// optimizer (as SoRA's gates): only cleared and clipped.
    fn adapter() -> Vec<(String, Tensor)> {
        tch::manual_seed(7);
        let double = (Kind::Double, Device::Cpu);
        [
            ("a", Tensor::randn([3, 4], double)),
            ("b", Tensor::randn([5], double)),
            ("c", Tensor::randn([2, 2], double)),
            ("d", Tensor::randn([7], (Kind::Float, Device::Cpu))),
            ("gate", Tensor::randn([3], double)),
        ]
        .into_iter()
        .map(|(name, t)| (name.to_string(), t.set_requires_grad(true)))
        .collect()
    }

    /// Step `step`'s gradients in two micro-batches (the second accumulates onto the first):
    /// the gradient of `Σ p·G` is `G` exactly. `c` gets none in steps 1 and 2 (AdamW skips it:
    /// no decay, no move), one in steps 3 and 4, then a zero one (still stepped).
    fn backward(params: &[(String, Tensor)], step: i64) {
        for micro in 0..2 {
            tch::manual_seed(step * 10 + micro);
            let mut loss = Tensor::zeros([], (Kind::Double, Device::Cpu));
            for (name, p) in params {
                let g = p.randn_like();
                if name != "c" || (3..=4).contains(&step) {
                    loss += (p * g).sum(Kind::Double);
                }
            }
            loss.backward();
        }
    }

    fn tensors(named: &[(String, Tensor)]) -> Vec<Tensor> {
        named.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    fn optimized(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        named
            .iter()
            .filter(|(name, _)| name != "gate")
            .map(|(name, t)| (name.clone(), t.shallow_clone()))
            .collect()
    }

    /// At most `tolerance` apart (in f64), or bitwise equal where `tolerance` is 0.
    fn assert_same(what: &str, ours: &Tensor, theirs: &Tensor, tolerance: f64) {
        assert_eq!(ours.size(), theirs.size(), "{what}");
        if tolerance == 0.0 {
            assert!(ours.equal(theirs), "{what}: {ours} vs {theirs}");
        } else {
            let diff = (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff <= tolerance, "{what}: {diff}");
        }
    }

    /// Fresh leaves with the same names and values, so two optimizers start from the same place.
    fn trainable_copy(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        named
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true)))
            .collect()
    }

    /// The flat buffers against the per-tensor loop on the same parameters and gradients, with
    /// weight decay, a parameter without a gradient in some steps, a trained tensor outside
    /// the optimizer, and the state saved after step 3 into a fresh optimizer that goes on. No
    /// clipping: bitwise equal. Clipping measures one norm per buffer instead of one per
    /// tensor, which rounds differently: within 1e-12.
    #[test]
    fn flat_buffers_step_as_the_per_tensor_loop() {
        for (max_norm, tolerance) in [(None, 0.0), (Some(0.5), 1e-12)] {
            let init = adapter();
            let (flat, reference) = (trainable_copy(&init), trainable_copy(&init));
            let mut optimizer = AdamW::new(optimized(&flat), 0.1);
            let mut per_tensor = PerTensor::new(tensors(&optimized(&reference)), 0.1);
            // The parameters keep their values when moved into the buffers.
            for ((name, ours), (_, theirs)) in flat.iter().zip(&init) {
                assert_same(name, ours, theirs, 0.0);
            }
            let mut resumed: Option<(Vec<(String, Tensor)>, AdamW)> = None;
            let mut saved_at_3 = Vec::new();
            for step in 1..=6 {
                let lr = 0.01 * step as f64;
                zero_grads(&tensors(&reference));
                backward(&reference, step);
                if let Some(max_norm) = max_norm {
                    clip_grad_norm(&tensors(&reference), max_norm);
                }
                per_tensor.step(lr);
                let runs = std::iter::once((&flat, &mut optimizer))
                    .chain(resumed.as_mut().map(|(p, o)| (&*p, o)));
                for (params, optimizer) in runs {
                    let trained = tensors(params);
                    optimizer.zero_grads(&trained);
                    backward(params, step);
                    if let Some(max_norm) = max_norm {
                        let total = optimizer.total_grad_norm(&trained).unwrap();
                        optimizer.scale_to_norm(&trained, &total, max_norm);
                    }
                    optimizer.step(lr);
                    // The f64 group steps as one buffer once `c` has a gradient; the f32 one
                    // from the start.
                    assert_eq!(optimizer.gather_grads(), [step >= 3, true], "step {step}");
                    for ((name, ours), (_, theirs)) in params.iter().zip(&reference) {
                        let what = format!("{name} after step {step}");
                        assert_same(&what, ours, theirs, tolerance);
                        let (ours, theirs) = (ours.grad(), theirs.grad());
                        assert_eq!(ours.defined(), theirs.defined(), "{what}");
                        if ours.defined() {
                            assert_same(&format!("{what}: gradient"), &ours, &theirs, tolerance);
                        }
                    }
                }
                if step == 3 {
                    let state = optimizer.state();
                    saved_at_3 = state
                        .iter()
                        .map(|(n, t)| (n.clone(), t.copy(), t.shallow_clone()))
                        .collect();
                    let twin = trainable_copy(&flat);
                    let mut restored = AdamW::new(optimized(&twin), 0.1);
                    restored.load_state(&state, optimizer.steps).unwrap();
                    resumed = Some((twin, restored));
                }
            }
            // The moments are the per-tensor loop's, per parameter name; the state saved after
            // step 3 is a copy, which later steps left alone.
            let (twin, restored) = resumed.unwrap();
            let names = ["a", "b", "c", "d"];
            for state in [optimizer.state(), restored.state()] {
                let expected: Vec<String> = names
                    .iter()
                    .flat_map(|n| [format!("exp_avg.{n}"), format!("exp_avg_sq.{n}")])
                    .collect();
                assert_eq!(
                    state.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                    expected
                );
                for (k, (name, moment)) in state.iter().enumerate() {
                    let theirs = match k % 2 {
                        0 => &per_tensor.exp_avg[k / 2],
                        _ => &per_tensor.exp_avg_sq[k / 2],
                    };
                    assert_same(name, moment, theirs, tolerance);
                }
            }
            for ((name, then, saved), (_, now)) in saved_at_3.iter().zip(optimizer.state()) {
                assert!(saved.equal(then), "{name}: the saved state changed");
                assert!(!saved.equal(&now), "{name} did not change after step 3");
            }
            for ((name, ours), (_, theirs)) in twin.iter().zip(&flat) {
                assert_same(&format!("resumed {name}"), ours, theirs, 0.0);
            }
        }
    }

    /// A parameter something re-points after the optimizer laid out its buffers (`set_data`
    /// again) no longer lives there: its group steps tensor by tensor, and it still trains.
    #[test]
    fn a_parameter_moved_out_of_its_buffer_still_steps() {
        let init = adapter();
        let (flat, reference) = (trainable_copy(&init), trainable_copy(&init));
        let mut optimizer = AdamW::new(optimized(&flat), 0.1);
        let mut per_tensor = PerTensor::new(tensors(&optimized(&reference)), 0.1);
        let a = &flat[0].1;
        a.shallow_clone().set_data(&a.detach().copy());
        for step in 3..=4 {
            for params in [&flat, &reference] {
                zero_grads(&tensors(params));
                backward(params, step);
            }
            optimizer.step(0.01);
            per_tensor.step(0.01);
            assert_eq!(optimizer.gather_grads(), [false, true]);
        }
        for ((name, ours), (_, theirs)) in flat.iter().zip(&reference) {
            assert_same(name, ours, theirs, 0.0);
        }
        assert!(!flat[0].1.equal(&init[0].1), "a did not move");
    }
}
