//! LoRA (Hu et al., 2021) with PEFT's semantics: `y = W x + dropout(x) A^T B^T * scaling`,
//! `A (r, in)`, `B (out, r)`, B starting at zero so training starts from the base model.

use super::{Attach, AttachContext};
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::llama::LowRank;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::model::LLAMA_TARGET_MODULES;
use loraforge_spec::peft::{lora_key, PeftLoraConfig};
use loraforge_spec::{LoraConfig, LoraInit};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The low-rank branch on one linear layer. The factors stay fp32 even over a bf16 base,
/// so the input is cast up for the branch and the result cast back (as PEFT does).
pub struct LoraBranch {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
}

impl LoraBranch {
    pub fn new(a: Tensor, b: Tensor, scaling: f64, dropout: f64) -> LoraBranch {
        LoraBranch {
            a,
            b,
            scaling,
            dropout,
        }
    }
}

impl LinearAdapter for LoraBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let delta = x32
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scaling;
        delta.to_kind(x.kind())
    }

    /// `B` multiplies straight into the base output (scaling applied to the rank-r activations,
    /// the smallest tensor): no separate scale and add over `(tokens, out)` forward, no scale
    /// backward. Over a bf16 base (CUDA) the branch runs in bf16 too, its fp32 factors cast for
    /// the product (their gradients come back in fp32, and AdamW updates the fp32 factors):
    /// [`LoraBranch::forward`]'s fp32 detour would keep an fp32 copy of every adapted layer's
    /// input for the backward pass, on TinyLlama at batch 8 x seq 2048 about 25 GiB.
    /// Dropout included: the dropped input goes through the same product.
    fn add_to(&self, y: Tensor, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        if y.kind() != kind || !matches!(kind, Kind::Float | Kind::BFloat16) {
            return y + self.forward(x, train);
        }
        self.factors().add_to(y, &x.dropout(self.dropout, train))
    }

    fn low_rank(&self, train: bool) -> Option<LowRank> {
        (!train || self.dropout == 0.0).then(|| self.factors())
    }
}

impl LoraBranch {
    fn factors(&self) -> LowRank {
        LowRank {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scaling: self.scaling,
            delta_gradient: None,
        }
    }
}

/// The factors of one adapted layer, shared with its [`LoraBranch`].
struct LoraFactors {
    module_path: String,
    a: Tensor,
    b: Tensor,
}

/// LoRA attached to every target layer of a model, its factors in one [`VarStore`].
pub struct Lora {
    config: LoraConfig,
    store: VarStore,
    factors: Vec<LoraFactors>,
}

impl Attach for Lora {
    type Config = LoraConfig;

    /// Adds freshly initialised factors to every layer named in `config.target_modules`:
    /// `A` Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as PEFT and
    /// `nn.Linear` do, or N(0, 1/r) for `gaussian`; `B = 0`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let device = ctx.device;
        let store = VarStore::new(device);
        let r = i64::from(config.r);
        let mut factors = Vec::new();
        for (module_path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let mut a = Tensor::empty([r, inp], (Kind::Float, device));
            let a = tch::no_grad(|| match config.init {
                LoraInit::Kaiming => {
                    let bound = 1.0 / (inp as f64).sqrt();
                    a.uniform_(-bound, bound)
                }
                LoraInit::Gaussian => a.normal_(0.0, 1.0 / r as f64),
            });
            let path = module_path
                .split('.')
                .fold(store.root(), |p, part| p.sub(part));
            let a = path.add("lora_A", a, !config.freeze_a);
            let b = path.add(
                "lora_B",
                Tensor::zeros([out, r], (Kind::Float, device)),
                true,
            );
            linear.attach(Box::new(LoraBranch::new(
                a.shallow_clone(),
                b.shallow_clone(),
                config.scaling(),
                config.dropout,
            )));
            factors.push(LoraFactors { module_path, a, b });
        }
        Ok(Lora {
            config: config.clone(),
            store,
            factors,
        })
    }
}

impl Lora {
    /// Every adapted module's path and factors `(A, B)`, for methods that train plain LoRA
    /// factors with another update rule.
    pub fn factor_pairs(&self) -> Vec<(String, Tensor, Tensor)> {
        self.factors
            .iter()
            .map(|f| {
                (
                    f.module_path.clone(),
                    f.a.shallow_clone(),
                    f.b.shallow_clone(),
                )
            })
            .collect()
    }
}

impl AdapterMethod for Lora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        plain_lora(
            &self.config,
            self.factors
                .iter()
                .map(|f| (f.module_path.as_str(), &f.a, &f.b)),
            base_model_uri,
        )
    }

    fn start_from(&mut self, parent: &PeftAdapter) -> Result<()> {
        if parent.config.as_lora().is_none() {
            return Err(user_error(format!(
                "the parent adapter is a {} adapter, not a LoRA",
                parent.config.peft_type()
            )));
        }
        let mut tensors: HashMap<&str, &Tensor> = parent
            .tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t))
            .collect();
        for factors in &mut self.factors {
            for (which, factor) in [('A', &mut factors.a), ('B', &mut factors.b)] {
                let key = lora_key(&factors.module_path, which);
                let Some(source) = tensors.remove(key.as_str()) else {
                    return Err(user_error(format!(
                        "the parent adapter has no {key}: it adapts other modules"
                    )));
                };
                if source.size() != factor.size() {
                    return Err(user_error(format!(
                        "the parent adapter's {key} has shape {:?}, this job's {:?}: the ranks differ",
                        source.size(),
                        factor.size()
                    )));
                }
                let source = source.to_device(factor.device()).to_kind(Kind::Float);
                tch::no_grad(|| factor.copy_(&source));
            }
        }
        if let Some(key) = tensors.keys().min() {
            return Err(user_error(format!(
                "the parent adapter's {key} matches no layer this job adapts"
            )));
        }
        Ok(())
    }
}

/// Attaches a published PEFT LoRA adapter, frozen and without dropout, for inference.
/// Ranks come from the tensors, so adapters with a `rank_pattern` load as well.
/// A plain PEFT LoRA of `config` from each module's `(path, A, B)`, fp32 on the CPU: what LoRA
/// and the methods that train plain LoRA factors under another rule (ALLoRA, LoRA-GGPO) publish.
pub fn plain_lora<'a>(
    config: &LoraConfig,
    factors: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor)>,
    base_model_uri: &str,
) -> PeftAdapter {
    let cpu = |t: &Tensor| {
        t.detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
    };
    let tensors = factors
        .into_iter()
        .flat_map(|(path, a, b)| [(lora_key(path, 'A'), cpu(a)), (lora_key(path, 'B'), cpu(b))])
        .collect();
    PeftAdapter {
        config: PeftLoraConfig::from_lora(config, base_model_uri).into(),
        tensors,
    }
}

pub fn attach_frozen(model: &mut LlamaModel, adapter: &PeftAdapter, device: Device) -> Result<()> {
    let Some(config) = adapter.config.as_lora() else {
        return Err(user_error(format!(
            "a {} adapter is not a LoRA",
            adapter.config.peft_type()
        )));
    };
    if config.use_dora {
        return Err(user_error("adapters with DoRA are not supported"));
    }
    let mut tensors: HashMap<&str, &Tensor> = adapter
        .tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t))
        .collect();
    for (module_path, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
        let (key_a, key_b) = (lora_key(&module_path, 'A'), lora_key(&module_path, 'B'));
        let (Some(a), Some(b)) = (
            tensors.remove(key_a.as_str()),
            tensors.remove(key_b.as_str()),
        ) else {
            continue;
        };
        let r = a.size()[0];
        if a.size() != [r, linear.in_features()] || b.size() != [linear.out_features(), r] {
            return Err(user_error(format!(
                "adapter factors of {module_path} have shapes {:?} and {:?}; the layer is {} -> {}",
                a.size(),
                b.size(),
                linear.in_features(),
                linear.out_features()
            )));
        }
        // PEFT's `alpha_pattern`: a key names the module or a dotted suffix of its path.
        let alpha = config
            .alpha_pattern
            .iter()
            .find(|(key, _)| module_path == **key || module_path.ends_with(&format!(".{key}")))
            .map_or(config.lora_alpha, |(_, alpha)| *alpha);
        let scaling = if config.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let to_device = |t: &Tensor| t.to_device(device).to_kind(Kind::Float);
        linear.attach(Box::new(LoraBranch::new(
            to_device(a),
            to_device(b),
            scaling,
            0.0,
        )));
    }
    if let Some(key) = tensors.keys().min() {
        return Err(user_error(format!(
            "adapter tensor {key} matches no layer of the model"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::Linear;

    /// Merging `W + s B A` must give the unmerged forward: the identity that makes a
    /// published adapter mean the same thing in every serving engine.
    #[test]
    fn merged_weight_matches_unmerged_forward() {
        let _turn = crate::training::seeds::torch_rng_turn();
        tch::manual_seed(7);
        let (inp, out, r, scaling) = (24, 16, 4, 2.5);
        let opts = (Kind::Float, Device::Cpu);
        // Scales like a real layer's (unit-variance outputs), so 1e-5 is a fair fp32 tolerance.
        let fan_in = (inp as f64).sqrt();
        let (w, bias) = (
            Tensor::randn([out, inp], opts) / fan_in,
            Tensor::randn([out], opts),
        );
        let (a, b) = (
            Tensor::randn([r, inp], opts) / fan_in,
            Tensor::randn([out, r], opts) * 0.3,
        );
        let mut linear = Linear::new(w.shallow_clone(), Some(bias.shallow_clone()));
        // Dropout is on in the branch, so this also checks that evaluation ignores it.
        linear.attach(Box::new(LoraBranch::new(
            a.shallow_clone(),
            b.shallow_clone(),
            scaling,
            0.5,
        )));
        let x = Tensor::randn([3, 5, inp], opts);
        let unmerged = linear.forward(&x, false);
        let merged = x.linear(&(w + b.matmul(&a) * scaling), Some(&bias));
        let diff = (unmerged - merged).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }
}
