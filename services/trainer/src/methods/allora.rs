//! ALLoRA (Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
//! 2024, arXiv 2410.09692v1): the rule of the paper's Section 4.2, computed as its Listing 1
//! (Appendix F) does; the codebase the paper links (`rbalestr-lab/allora`) could not be read.
//! The adapter is LoRA without dropout and without an output scale, `ΔW = B A` (out × in). Only
//! the factors' gradients change: with `δ` the gradient of the layer's output, output row `i`
//! has `δ_i` multiplied by `s_i = 1 / sqrt(‖(BA)_{i,:}‖ + 1/η²)` (the row's ℓ2 norm, not its
//! square) before it forms the gradients of `A` and `B`, which is the paper's scaling of row `i`
//! of `∂L/∂(BA)`. So `∂L/∂B = (s ⊙ δ)ᵀ (x Aᵀ)` and `∂L/∂A = Bᵀ (s ⊙ δ)ᵀ x`; the gradient passed
//! on to the layer's input is left as it is (Section 4.2's implementation note). `s_i` is at
//! most `η`, where a row is zero: at the start (`B = 0`) every row's factor is `η`, the value of
//! the scale `α/r` it replaces (Section 3.3 names that scale `η`). The paper keeps LoRA's zero
//! `B`; the factors are PEFT's (A Kaiming-uniform, B = 0) and train with the loop's AdamW.
//! Published as a plain PEFT LoRA with scale 1 (`lora_alpha = r`).

use super::{kaiming_uniform, module_path, refuse_parent, Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::AlloraConfig;
use loraforge_spec::{LoraConfig, LoraInit};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

struct AlloraBranch {
    a: Tensor,
    b: Tensor,
    /// `1/η²`.
    floor: f64,
}

impl AlloraBranch {
    /// `1 / sqrt(‖(BA)_{i,:}‖ + 1/η²)` per output row, from `‖(BA)_i‖² = b_i (A Aᵀ) b_iᵀ`.
    fn row_factors(&self) -> Tensor {
        tch::no_grad(|| {
            let gram = self.a.matmul(&self.a.tr());
            let squared = (self.b.matmul(&gram) * &self.b)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                .clamp_min(0.0);
            (squared.sqrt() + self.floor).rsqrt()
        })
    }
}

impl LinearAdapter for AlloraBranch {
    /// In training, two products of the same value: one carries the input's gradient (factors
    /// detached), the other the factors' gradient scaled per output row (input detached).
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let delta = if train {
            let to_input = x32
                .linear::<Tensor>(&self.a.detach(), None)
                .linear::<Tensor>(&self.b.detach(), None);
            let to_factors = x32
                .detach()
                .linear::<Tensor>(&self.a, None)
                .linear::<Tensor>(&self.b, None);
            to_input + (&to_factors - to_factors.detach()) * self.row_factors()
        } else {
            x32.linear::<Tensor>(&self.a, None)
                .linear::<Tensor>(&self.b, None)
        };
        delta.to_kind(x.kind())
    }
}

struct AlloraModule {
    module_path: String,
    a: Tensor,
    b: Tensor,
}

pub struct Allora {
    config: AlloraConfig,
    store: VarStore,
    modules: Vec<AlloraModule>,
}

impl Attach for Allora {
    type Config = AlloraConfig;

    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let store = VarStore::new(ctx.device);
        let r = i64::from(config.r);
        let mut modules = Vec::new();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let path = module_path(&store, &path_name);
            let a = path.add("lora_A", kaiming_uniform(r, inp, ctx.device), true);
            let b = path.add(
                "lora_B",
                Tensor::zeros([out, r], (Kind::Float, ctx.device)),
                true,
            );
            linear.attach(Box::new(AlloraBranch {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                floor: 1.0 / (config.eta * config.eta),
            }));
            modules.push(AlloraModule {
                module_path: path_name,
                a,
                b,
            });
        }
        Ok(Allora {
            config: config.clone(),
            store,
            modules,
        })
    }
}

impl AdapterMethod for Allora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// A plain LoRA of scale 1: `lora_alpha = r`, no dropout.
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let plain = LoraConfig {
            r: self.config.r,
            alpha: f64::from(self.config.r),
            dropout: 0.0,
            target_modules: self.config.target_modules.clone(),
            use_rslora: false,
            init: LoraInit::Kaiming,
            freeze_a: false,
        };
        super::lora::plain_lora(
            &plain,
            self.modules
                .iter()
                .map(|m| (m.module_path.as_str(), &m.a, &m.b)),
            base_model_uri,
        )
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("allora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::seeds::torch_rng_turn;

    /// The branch's output is `x Aᵀ Bᵀ` in training too; the input's gradient is LoRA's; the
    /// factors' gradients are those of the row-scaled output gradient, written out by hand.
    #[test]
    fn factor_gradients_are_scaled_per_output_row() {
        let _turn = torch_rng_turn();
        tch::manual_seed(9);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (inp, out, r, eta) = (6, 5, 2, 0.7);
        let a = Tensor::randn([r, inp], opts).set_requires_grad(true);
        let b = (Tensor::randn([out, r], opts) * 0.5).set_requires_grad(true);
        let branch = AlloraBranch {
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            floor: 1.0 / (eta * eta),
        };
        let x = Tensor::randn([3, 4, inp], opts).set_requires_grad(true);
        let upstream = Tensor::randn([3, 4, out], opts);
        let y = branch.forward(&x, true);
        let plain = x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None);
        let diff = |p: &Tensor, q: &Tensor| (p - q).abs().max().double_value(&[]);
        assert!(diff(&y, &plain) < 1e-6);
        (&y * &upstream).sum(Kind::Float).backward();

        let delta = tch::no_grad(|| b.matmul(&a));
        let rows = delta.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
        let s = (rows + 1.0 / (eta * eta)).rsqrt();
        let (x2, d2) = (x.detach().view([-1, inp]), upstream.view([-1, out]));
        let scaled = &d2 * &s;
        let want_b = scaled.tr().matmul(&x2.matmul(&a.detach().tr()));
        let want_a = b.detach().tr().matmul(&scaled.tr()).matmul(&x2);
        let want_x = d2.matmul(&delta).view([3, 4, inp]);
        assert!(diff(&b.grad(), &want_b) < 1e-5, "B");
        assert!(diff(&a.grad(), &want_a) < 1e-5, "A");
        assert!(diff(&x.grad(), &want_x) < 1e-5, "input");
        // The factors really are scaled (not the plain LoRA gradient).
        let plain_b = d2.tr().matmul(&x2.matmul(&a.detach().tr()));
        assert!(diff(&b.grad(), &plain_b) > 1e-3);
    }
}
