//! What a published adapter does to the layers it adapts, per PEFT family
//! (`loraforge_spec::peft::PeftConfig`): [`updates`] turns an adapter's tensors into one
//! [`Update`] per adapted module. Merging (`model::merge`), the frozen forward for evaluation
//! and logits ([`attach_frozen`]) and the safety gate's intruder count read adapters only
//! through here, so they take every family.
//!
//! LoRA keeps its factors ([`Update::LowRank`]): it merges as `W + s·B A` and runs frozen as a
//! low-rank branch (`methods::lora::attach_frozen`, which the batched q/k/v product uses).
//! Every other family gives a dense `ΔW` per module ([`Update::Dense`]), a function of the base
//! weight because some updates depend on it (MiSS's `bat`); evaluated frozen, `ΔW` is added to
//! the layer's output as a dense branch, `x ΔWᵀ`, which is `x (W + ΔW)ᵀ` as PEFT computes it.
//!
//! Adding a family `X` (after its config on the spec side, `loraforge_spec::peft`):
//! 1. `families/x.rs` with `pub fn updates(config: &PeftXConfig, tensors: &[(String, Tensor)])
//!    -> Result<Updates>`: each module's tensors checked and wrapped in a type implementing
//!    [`DenseUpdate`] (or [`Update::LowRank`] where the family is a low-rank product);
//! 2. `pub mod x;` below and its arm in [`updates`] (the match is exhaustive).

pub mod lora;
pub mod miss;
pub mod randlora;
pub mod shira;

use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::model::llama::{Linear, LinearAdapter};
use crate::model::LlamaModel;
use anyhow::Result;
use loraforge_spec::model::LLAMA_TARGET_MODULES;
use loraforge_spec::peft::PeftConfig;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Each adapted module's update, by module path (`model.layers.0.self_attn.q_proj`).
pub type Updates = BTreeMap<String, Update>;

/// How a family's tensors change one layer's weight `W (out, in)`.
pub trait DenseUpdate {
    /// `ΔW (out, in)`, fp32 on `weight`'s device, for the base weight `weight` (fp32). A
    /// weight whose shape does not fit the adapter's tensors is the user's error (an adapter
    /// for another model).
    fn delta(&self, weight: &Tensor) -> Result<Tensor>;
}

/// One adapted layer's update.
pub enum Update {
    /// `scaling · B A` (LoRA): `a (r, in)`, `b (out, r)`.
    LowRank { a: Tensor, b: Tensor, scaling: f64 },
    /// Any other family's `ΔW`.
    Dense(Box<dyn DenseUpdate>),
}

impl Update {
    /// `ΔW` for the base weight `weight` (any dtype and device): fp32, on `weight`'s device.
    /// `name` is the weight's name, for errors.
    pub fn delta(&self, name: &str, weight: &Tensor) -> Result<Tensor> {
        let weight = weight.to_kind(Kind::Float);
        let delta = match self {
            Update::LowRank { a, b, scaling } => {
                let (out_features, r) = (b.size()[0], b.size()[1]);
                if weight.size() != [out_features, a.size()[1]] || a.size()[0] != r {
                    return Err(user_error(format!(
                        "adapter factors A {:?} and B {:?} do not fit {name} {:?}",
                        a.size(),
                        b.size(),
                        weight.size()
                    )));
                }
                let on = |t: &Tensor| t.to_device(weight.device()).to_kind(Kind::Float);
                on(b).matmul(&on(a)) * *scaling
            }
            Update::Dense(update) => update
                .delta(&weight)
                .map_err(|e| user_error(format!("{name}: {e}")))?,
        };
        if delta.size() != weight.size() {
            return Err(user_error(format!(
                "the adapter's update of {name} is {:?}, the weight {:?}",
                delta.size(),
                weight.size()
            )));
        }
        Ok(delta)
    }
}

/// The adapter's update of every module it adapts. The registry of families: one arm each.
pub fn updates(adapter: &PeftAdapter) -> Result<Updates> {
    let updates = match &adapter.config {
        PeftConfig::Lora(config) => lora::updates(config, &adapter.tensors)?,
        PeftConfig::Miss(config) => miss::updates(config, &adapter.tensors)?,
        PeftConfig::Shira(config) => shira::updates(config, &adapter.tensors)?,
        PeftConfig::RandLora(config) => randlora::updates(config, &adapter.tensors)?,
    };
    if updates.is_empty() {
        return Err(user_error(format!(
            "the {} adapter adapts no module",
            adapter.config.peft_type()
        )));
    }
    Ok(updates)
}

/// Attaches a published adapter of any family, frozen and without dropout, for inference:
/// LoRA as its low-rank branch, any other family as a dense `ΔW` computed from the layer's
/// weight.
pub fn attach_frozen(model: &mut LlamaModel, adapter: &PeftAdapter, device: Device) -> Result<()> {
    if adapter.config.as_lora().is_some() {
        return crate::methods::lora::attach_frozen(model, adapter, device);
    }
    let mut updates = updates(adapter)?;
    for (module_path, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
        let Some(update) = updates.remove(&module_path) else {
            continue;
        };
        attach_dense(linear, &module_path, &update, device)?;
    }
    if let Some(module) = updates.keys().next() {
        return Err(user_error(format!(
            "the adapter adapts {module}, which the model has no layer for"
        )));
    }
    Ok(())
}

fn attach_dense(
    linear: &mut Linear,
    module_path: &str,
    update: &Update,
    device: Device,
) -> Result<()> {
    let weight = linear.weight.to_device(device);
    let delta = update.delta(&format!("{module_path}.weight"), &weight)?;
    // In the layer's dtype, as PEFT adds ΔW to the weight itself.
    linear.attach(Box::new(DenseBranch {
        delta: delta.to_kind(weight.kind()),
    }));
    Ok(())
}

/// `x ΔWᵀ` added to a frozen layer's output.
struct DenseBranch {
    delta: Tensor,
}

impl LinearAdapter for DenseBranch {
    fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        x.to_kind(self.delta.kind())
            .linear::<Tensor>(&self.delta, None)
            .to_kind(x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A family that adds `ΔW = W` (doubles the weight): the dense branch must give the
    /// forward of `2W`, and a weight of the wrong shape is refused by name.
    struct Double;

    impl DenseUpdate for Double {
        fn delta(&self, weight: &Tensor) -> Result<Tensor> {
            Ok(weight.shallow_clone())
        }
    }

    #[test]
    fn a_dense_update_runs_as_a_branch_of_the_weight() {
        let _turn = crate::training::seeds::torch_rng_turn();
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let (w, bias) = (Tensor::randn([6, 4], opts), Tensor::randn([6], opts));
        let mut linear = Linear::new(w.shallow_clone(), Some(bias.shallow_clone()));
        attach_dense(
            &mut linear,
            "m",
            &Update::Dense(Box::new(Double)),
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::randn([2, 3, 4], opts);
        let expected = x.linear(&(&w * 2.0), Some(&bias));
        let diff = (linear.forward(&x, false) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "max abs diff {diff}");

        let low_rank = Update::LowRank {
            a: Tensor::ones([2, 5], opts),
            b: Tensor::ones([6, 2], opts),
            scaling: 1.0,
        };
        let err = low_rank.delta("m.weight", &w).unwrap_err().to_string();
        assert!(err.contains("do not fit m.weight"), "{err}");
    }
}
