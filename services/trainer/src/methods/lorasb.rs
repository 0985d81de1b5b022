//! LoRA-SB (Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver
//! Bullet for Extreme Efficient Low-Rank Fine-Tuning", arXiv 2411.19557, §3–4), following the
//! authors' `CERT-Lab/lora-sb` (`utils/gradient_utils.py` `estimate_and_process_grads_torch`,
//! `utils/initialization_utils.py` `find_and_initialize_grad`, `utils/svd_utils.py`
//! `get_svd_grad`, `utils/latent_utils.py` `forward_latent`, `train_arithmetic.py`).
//!
//! The LoRA-XS structure `y = W x + B R A dropout(x)`, `A (r, in)` and `B (out, r)` frozen,
//! only `R (r, r)` trained (the reference forces `lora_alpha = r`: no scale).
//!
//! Calibration: the gradient summed over the first `samples` training rows in batches of
//! `batch_size` (each batch's mean token loss divided by its rows, as the reference), the
//! first AdamW step approximated by its sign, `ΔW = −η·sign(Σ ∂L/∂W)`, `η` the schedule's
//! first non-zero learning rate (the reference's `lr / (warmup_ratio · total_steps)`, its
//! first warmup step), then `U, S, V = svd_lowrank(ΔWᵀ, q = r, niter = 10)` with the
//! generator seeded 42 and one `(out, r)` Gaussian drawn and discarded first, as
//! `get_svd_grad` does: `A = Uᵀ`, `B = V`, `R = diag(S)`, so `B R A` is the rank-`r`
//! approximation of `ΔW`. The base weight is not changed: training starts from
//! `W + B R A`.
//!
//! Where we differ: the factors stay fp32 (the reference casts them to bf16); the SVD is ours
//! ([`super::svd_lowrank`], torch's algorithm, with the reference's seeding).
//!
//! Published as a plain LoRA of rank `r`: `A' = R A`, `B' = B`.

use super::{module_path, per_module_lora, refuse_parent, svd_lowrank, ExportedFactors};
use super::{Attach, AttachContext};
use crate::calibration::Calibration;
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use crate::training::optimizer::learning_rate;
use anyhow::Result;
use loraforge_spec::methods::LoraSbConfig;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// `get_svd_grad`'s seed, set before every layer's SVD.
const SVD_SEED: i64 = 42;
/// `reconstruct_config.yaml`'s `svd.n_iter`.
const SVD_NITER: usize = 10;

/// `B R A dropout(x)`, in fp32 and cast back to `x`'s dtype.
struct SbBranch {
    a: Tensor,
    r: Tensor,
    b: Tensor,
    dropout: f64,
}

impl LinearAdapter for SbBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        x.to_kind(Kind::Float)
            .dropout(self.dropout, train)
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.r, None)
            .linear::<Tensor>(&self.b, None)
            .to_kind(x.kind())
    }
}

struct SbLayer {
    module_path: String,
    a: Tensor,
    r: Tensor,
    b: Tensor,
}

pub struct LoraSb {
    config: LoraSbConfig,
    /// The AdamW step the update approximates: the schedule's first non-zero learning rate.
    first_lr: f64,
    store: VarStore,
    layers: Vec<SbLayer>,
}

impl Attach for LoraSb {
    type Config = LoraSbConfig;

    /// Zero factors (the branch adds nothing until calibration sets them): `A`, `B` frozen,
    /// `R` trained.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (device, r) = (ctx.device, i64::from(config.r));
        let store = VarStore::new(device);
        let mut layers = Vec::new();
        for (path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            let p = module_path(&store, &path);
            let zeros = |rows, cols| Tensor::zeros([rows, cols], (Kind::Float, device));
            let a = p.add("lora_A", zeros(r, inp), false);
            let r_mat = p.add("lora_R", zeros(r, r), true);
            let b = p.add("lora_B", zeros(out, r), false);
            linear.attach(Box::new(SbBranch {
                a: a.shallow_clone(),
                r: r_mat.shallow_clone(),
                b: b.shallow_clone(),
                dropout: config.dropout,
            }));
            layers.push(SbLayer {
                module_path: path,
                a,
                r: r_mat,
                b,
            });
        }
        let t = ctx.training;
        let lr_at = |step| {
            learning_rate(
                t.schedule,
                t.learning_rate,
                step,
                t.warmup_steps,
                t.max_steps,
            )
        };
        let first_lr = Some(lr_at(1))
            .filter(|&lr| lr > 0.0)
            .unwrap_or_else(|| lr_at(2));
        Ok(LoraSb {
            config: config.clone(),
            first_lr,
            store,
            layers,
        })
    }
}

impl AdapterMethod for LoraSb {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn calibrate(&mut self, calibration: &mut Calibration) -> Result<()> {
        let (mut batches, mut weights, mut rows) = (Vec::new(), Vec::new(), 0usize);
        let (samples, batch_size) = (
            self.config.samples as usize,
            self.config.batch_size as usize,
        );
        while rows < samples {
            let Some(batch) = calibration.next_batch(batch_size.min(samples - rows))? else {
                break;
            };
            let n = batch.input_ids.size()[0] as usize;
            rows += n;
            weights.push(1.0 / n as f64);
            batches.push(batch);
        }
        if rows < samples {
            calibration.log(format!(
                "lorasb: the first epoch has {rows} rows, fewer than method.samples ({samples}): \
                 the update is estimated from those"
            ));
        }
        let paths: Vec<String> = self.layers.iter().map(|l| l.module_path.clone()).collect();
        let gradients = calibration.weight_gradients(&paths, &batches, &weights)?;
        let r = i64::from(self.config.r);
        for (layer, g) in self.layers.iter().zip(&gradients) {
            let (out, inp) = (g.size()[0], g.size()[1]);
            if r > out.min(inp) {
                return Err(user_error(format!(
                    "method.r: {} is {inp} -> {out}, so LoRA-SB's rank can be at most {}, got {r}",
                    layer.module_path,
                    out.min(inp)
                )));
            }
            tch::no_grad(|| {
                let update = g.sign() * -self.first_lr;
                tch::manual_seed(SVD_SEED);
                let _ = Tensor::randn([out, r], (Kind::Float, g.device()));
                let (u, s, v) = svd_lowrank(&update.tr(), r, SVD_NITER);
                for (variable, value) in [(&layer.a, u.tr()), (&layer.b, v), (&layer.r, s.diag(0))]
                {
                    variable.shallow_clone().copy_(&value);
                }
            });
        }
        Ok(())
    }

    /// `A' = R A`, `B' = B`.
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let modules = self
            .layers
            .iter()
            .map(|l| ExportedFactors {
                module_path: l.module_path.clone(),
                a: l.r.matmul(&l.a),
                b: l.b.shallow_clone(),
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
        refuse_parent("lorasb")
    }
}
