//! LoRA-GGPO (Chang, Guo, Chang, Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA
//! Fine-Tuning via Gradient-Guided Perturbation Optimization", 2025, arXiv 2502.14538v1).
//! The authors' repository (`llm172/LoRA-GGPO`) could not be read here; the rule follows the
//! implementation in kohya-ss/sd-scripts (`networks/lora_flux.py`, `LoRAModule`:
//! `initialize_norm_cache`, `update_norms`, `update_grad_norms`, the perturbation in
//! `forward`; called from `train_network.py` after clipping, before the optimizer step).
//!
//! Plain PEFT LoRA factors trained at randomly perturbed weights `W' + ε` (the perturbation
//! changes the forward pass of the step, not the parameters; no gradient flows into it):
//! every training forward adds `x εᵀ` to the layer's output, with `ε (out, in)` drawn fresh,
//! row `i` from `N(0, ((σ c_i + β g_i²) / √out)²)`, where after each step
//!
//! - `c_i = sqrt(w̄² + ‖(BA)_{i,:}‖²)`: `w̄` the mean row norm of the frozen base weight, `BA`
//!   the factors' product before the step (unscaled: sd-scripts' `module_weights.mul(scale)`
//!   is not in place), and
//! - `g_i = ‖(s (B ∂L/∂A + ∂L/∂B A))_{i,:}‖`: the row norms of the step's (clipped) gradient
//!   mapped to the full weight, with the factors before the step.
//!
//! The first step runs unperturbed (no norms yet). `σ` (`sigma`) and `β` (`beta`) default to
//! sd-scripts' documented `ggpo_sigma=0.03`, `ggpo_beta=0.01`. The noise is drawn from
//! libtorch's generator, which the loop seeds per micro-batch from the job's seed, so a resumed
//! run draws the same perturbations. Where we differ from sd-scripts: `w̄` is the mean over every
//! row (it samples at most 1000 rows), and `g` is computed in fp32 (it runs under autocast).

use super::lora::LoraBranch;
use super::{module_path, refuse_parent, Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, StepInfo};
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::GgpoConfig;
use loraforge_spec::{LoraConfig, LoraInit};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

struct GgpoBranch {
    lora: LoraBranch,
    /// `(σ c_i + β g_i²) / √out` per output row, `(out, 1)`; all zero until the first step.
    noise_scale: Tensor,
}

impl LinearAdapter for GgpoBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.lora.forward(x, train);
        if !train || self.noise_scale.max().double_value(&[]) == 0.0 {
            return y;
        }
        let (out, inp) = (self.noise_scale.size()[0], x.size()[x.dim() - 1]);
        let perturbation = tch::no_grad(|| {
            let eps = Tensor::randn([out, inp], (Kind::Float, x.device())) * &self.noise_scale;
            x.matmul(&eps.to_kind(x.kind()).tr())
        });
        y + perturbation
    }
}

struct GgpoModule {
    module_path: String,
    a: Tensor,
    b: Tensor,
    noise_scale: Tensor,
    /// `w̄`: the base weight's mean row norm.
    base_norm: f64,
    /// The factors before the step, and the rows' `c_i` from them.
    before: Option<(Tensor, Tensor, Tensor)>,
}

pub struct Ggpo {
    config: GgpoConfig,
    store: VarStore,
    modules: Vec<GgpoModule>,
}

impl Attach for Ggpo {
    type Config = GgpoConfig;

    /// PEFT's LoRA init (A Kaiming-uniform, B = 0).
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let store = VarStore::new(ctx.device);
        let r = i64::from(config.r);
        let mut modules = Vec::new();
        for (path_name, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let base_norm = tch::no_grad(|| {
                linear
                    .weight
                    .to_kind(Kind::Float)
                    .norm_scalaropt_dim(2.0, [1i64].as_slice(), false)
                    .mean(Kind::Float)
                    .double_value(&[])
            });
            let path = module_path(&store, &path_name);
            let a = path.add("lora_A", super::kaiming_uniform(r, inp, ctx.device), true);
            let b = path.add(
                "lora_B",
                Tensor::zeros([out, r], (Kind::Float, ctx.device)),
                true,
            );
            let noise_scale = path.add(
                "ggpo_noise_scale",
                Tensor::zeros([out, 1], (Kind::Float, ctx.device)),
                false,
            );
            linear.attach(Box::new(GgpoBranch {
                lora: LoraBranch::new(
                    a.shallow_clone(),
                    b.shallow_clone(),
                    config.scaling(),
                    config.dropout,
                ),
                noise_scale: noise_scale.shallow_clone(),
            }));
            modules.push(GgpoModule {
                module_path: path_name,
                a,
                b,
                noise_scale,
                base_norm,
                before: None,
            });
        }
        Ok(Ggpo {
            config: config.clone(),
            store,
            modules,
        })
    }
}

/// Row norms of `t (rows, cols)` as `(rows, 1)`.
fn row_norms(t: &Tensor) -> Tensor {
    t.norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
}

impl AdapterMethod for Ggpo {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// Keeps the factors as they are before the step, and the rows' weight norms from them.
    fn adjust_gradients(&mut self, _step: StepInfo) {
        tch::no_grad(|| {
            for m in &mut self.modules {
                let (a, b) = (m.a.copy(), m.b.copy());
                let product = b.matmul(&a);
                let combined =
                    ((&product * &product).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
                        + m.base_norm * m.base_norm)
                        .sqrt();
                m.before = Some((a, b, combined));
            }
        });
    }

    /// The next steps' perturbation sizes, from the step's clipped gradients (still in place)
    /// and the factors before it.
    fn after_step(&mut self, _step: StepInfo) {
        let (s, sigma, beta) = (self.config.scaling(), self.config.sigma, self.config.beta);
        tch::no_grad(|| {
            for m in &mut self.modules {
                let (grad_a, grad_b) = (m.a.grad(), m.b.grad());
                let Some((a, b, combined)) = m.before.take() else {
                    continue;
                };
                if !grad_a.defined() || !grad_b.defined() {
                    continue;
                }
                let full = (b.matmul(&grad_a) + grad_b.matmul(&a)) * s;
                let g = row_norms(&full);
                let out = m.noise_scale.size()[0] as f64;
                let scale = (combined * sigma + &g * &g * beta) / out.sqrt();
                m.noise_scale.copy_(&scale);
            }
        });
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let plain = LoraConfig {
            r: self.config.r,
            alpha: self.config.alpha,
            dropout: self.config.dropout,
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
        refuse_parent("lora_ggpo")
    }
}
