//! LoRA-GA (Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
//! NeurIPS 2024, arXiv 2407.05000, §3.2–3.3), with PEFT 0.21's semantics
//! (`peft/tuners/lora/loraga.py` `estimate_gradients`, `layer.py` `lora_ga_init`), which port
//! the authors' `Outsider565/LoRA-GA`.
//!
//! Calibration: `G = (1/n) Σ_b ∂L_b/∂W` over the first `batches` batches of `batch_size`
//! training rows (each `L_b` the batch's mean token loss), then per layer
//! `U, S, V = svd_lowrank(G, q = min(4r, min(out, in)), niter = 4)`; for `direction`
//! `ArB2r` `A = V[:, :r]ᵀ`, `B = U[:, r:2r] diag(S[r:2r])` (the other directions pick other
//! halves of the first `2r`), and `scale` `stable` multiplies `B` by `out^(1/4) / sqrt(γ)`.
//! PEFT then subtracts `s·B₀A₀` from the base weight, so the model starts as the base model.
//!
//! Where we differ, on purpose:
//! - The base weight is not modified. The branch carries the frozen initial product instead:
//!   `y = W x + s·(B A dropout(x) − B₀ A₀ x)`, `A₀, B₀` non-trainable copies of the initial
//!   factors. It is the same function (PEFT's `W − s B₀A₀` is not rounded to the base dtype
//!   here), the resumed run needs no base rewrite (the store holds `A₀, B₀`), and it is
//!   exactly what the published adapter does to the original base.
//! - PEFT multiplies `B` by the singular values and scales only `B` (`stable`); the authors'
//!   code uses bare singular vectors and scales both. We follow PEFT, the reference we test.
//! - The SVD is ours ([`super::svd_lowrank`], torch's algorithm), drawing from libtorch's
//!   generator seeded from the job's seed (PEFT's draws from the global state).
//!
//! Published as a plain LoRA of rank `2r` for the original base, as PEFT's
//! `path_initial_model_for_weight_conversion`: `A' = [A; A₀]`, `B' = s·[B, −B₀]`
//! (the scale folded into `B'`, `lora_alpha = 2r`).

use super::{module_path, per_module_lora, refuse_parent, svd_lowrank, ExportedFactors};
use super::{Attach, AttachContext};
use crate::calibration::Calibration;
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use crate::training::seeds::{derive_seed, SeedUse};
use anyhow::Result;
use loraforge_spec::methods::{LoraGaConfig, LoraGaDirection, LoraGaScale};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// `s·(B A dropout(x) − B₀ A₀ x)`, in fp32 and cast back to `x`'s dtype.
struct GaBranch {
    a: Tensor,
    b: Tensor,
    a0: Tensor,
    b0: Tensor,
    scaling: f64,
    dropout: f64,
}

impl LinearAdapter for GaBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let trained = x32
            .dropout(self.dropout, train)
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None);
        let initial = x32
            .linear::<Tensor>(&self.a0, None)
            .linear::<Tensor>(&self.b0, None);
        ((trained - initial) * self.scaling).to_kind(x.kind())
    }
}

struct GaLayer {
    module_path: String,
    out_features: i64,
    a: Tensor,
    b: Tensor,
    a0: Tensor,
    b0: Tensor,
}

pub struct LoraGa {
    config: LoraGaConfig,
    seed: u64,
    store: VarStore,
    layers: Vec<GaLayer>,
}

impl Attach for LoraGa {
    type Config = LoraGaConfig;

    /// Zero factors (the branch adds nothing until calibration sets them), trainable `A`, `B`
    /// and frozen `A₀`, `B₀`. `2r` singular vectors must exist: `2r ≤ min(out, in)`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let (device, r) = (ctx.device, i64::from(config.r));
        let store = VarStore::new(device);
        let mut layers = Vec::new();
        for (path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            if 2 * r > inp.min(out) {
                return Err(user_error(format!(
                    "method.r: LoRA-GA takes 2r = {} singular vectors of the gradient, but {path} \
                     is {inp} -> {out}: r must be at most {}",
                    2 * r,
                    inp.min(out) / 2
                )));
            }
            let p = module_path(&store, &path);
            let zeros = |rows, cols| Tensor::zeros([rows, cols], (Kind::Float, device));
            let a = p.add("lora_A", zeros(r, inp), true);
            let b = p.add("lora_B", zeros(out, r), true);
            let a0 = p.add("lora_A0", zeros(r, inp), false);
            let b0 = p.add("lora_B0", zeros(out, r), false);
            linear.attach(Box::new(GaBranch {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                a0: a0.shallow_clone(),
                b0: b0.shallow_clone(),
                scaling: config.scaling(),
                dropout: config.dropout,
            }));
            layers.push(GaLayer {
                module_path: path,
                out_features: out,
                a,
                b,
                a0,
                b0,
            });
        }
        Ok(LoraGa {
            config: config.clone(),
            seed: ctx.training.seed,
            store,
            layers,
        })
    }
}

impl LoraGa {
    /// PEFT's `lora_ga_init` for one layer's gradient `g (out, in)`: `(A, B)`. `weight` is
    /// the base weight, for the `weight_svd` scale.
    fn init_factors(&self, g: &Tensor, weight: Option<Tensor>) -> (Tensor, Tensor) {
        let r = i64::from(self.config.r);
        let q = (4 * r).min(g.size()[0]).min(g.size()[1]);
        let (u, s, v) = svd_lowrank(g, q, 4);
        let (u, s, vh) = (
            u.narrow(1, 0, 2 * r),
            s.narrow(0, 0, 2 * r),
            v.tr().narrow(0, 0, 2 * r),
        );
        let device = g.device();
        let (a_idx, b_idx) = match self.config.direction {
            LoraGaDirection::ArBr => (
                Tensor::arange_start_step(1, 2 * r, 2, (Kind::Int64, device)),
                Tensor::arange_start_step(0, 2 * r, 2, (Kind::Int64, device)),
            ),
            LoraGaDirection::A2rBr => (
                Tensor::arange_start(r, 2 * r, (Kind::Int64, device)),
                Tensor::arange(r, (Kind::Int64, device)),
            ),
            LoraGaDirection::ArB2r => (
                Tensor::arange(r, (Kind::Int64, device)),
                Tensor::arange_start(r, 2 * r, (Kind::Int64, device)),
            ),
            LoraGaDirection::Random => {
                let picked = Tensor::randperm(2 * r, (Kind::Int64, device)).narrow(0, 0, r);
                (picked.shallow_clone(), picked)
            }
        };
        let a = vh.index_select(0, &a_idx);
        let s_b = s.index_select(0, &b_idx);
        let mut b = u.index_select(1, &b_idx) * s_b.unsqueeze(0);
        let mut a = a;
        let out = g.size()[0] as f64;
        match self.config.scale {
            LoraGaScale::Stable => b *= out.powf(0.25) / self.config.stable_gamma.sqrt(),
            LoraGaScale::WeightSvd => {
                let w = weight
                    .expect("the base weight for weight_svd")
                    .to_kind(Kind::Float);
                let (_, weight_s, _) = svd_lowrank(&w, r.min(w.size()[0]).min(w.size()[1]), 4);
                let s_b0 = s_b.double_value(&[0]);
                if s_b0 > 0.0 {
                    b *= weight_s.double_value(&[0]) / s_b0;
                }
            }
            LoraGaScale::GdScale => {
                let scaling = self.config.scaling();
                a /= scaling;
                b /= scaling;
            }
            LoraGaScale::Unit => {}
        }
        (a, b)
    }
}

impl AdapterMethod for LoraGa {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// The gradient over the first `batches × batch_size` training rows, then each layer's
    /// factors from its SVD; `A₀, B₀` are copies of the initial `A, B`.
    fn calibrate(&mut self, calibration: &mut Calibration) -> Result<()> {
        let mut batches = Vec::new();
        while batches.len() < self.config.batches as usize {
            match calibration.next_batch(self.config.batch_size as usize)? {
                Some(batch) => batches.push(batch),
                None => break,
            }
        }
        if batches.len() < self.config.batches as usize {
            calibration.log(format!(
                "loraga: the first epoch has fewer than method.batches x method.batch_size = {} rows: \
                 the gradient is estimated from {} batches",
                self.config.batches * self.config.batch_size,
                batches.len()
            ));
        }
        let paths: Vec<String> = self.layers.iter().map(|l| l.module_path.clone()).collect();
        let weights = vec![1.0 / batches.len() as f64; batches.len()];
        let gradients = calibration.weight_gradients(&paths, &batches, &weights)?;
        tch::manual_seed(derive_seed(self.seed, SeedUse::Calibration, 0) as i64);
        for (layer, g) in self.layers.iter().zip(&gradients) {
            debug_assert_eq!(g.size()[0], layer.out_features);
            let weight = match self.config.scale {
                LoraGaScale::WeightSvd => Some(calibration.linear_weight(&layer.module_path)?),
                _ => None,
            };
            let (a, b) = tch::no_grad(|| self.init_factors(g, weight));
            tch::no_grad(|| {
                for (variable, value) in [
                    (&layer.a, &a),
                    (&layer.b, &b),
                    (&layer.a0, &a),
                    (&layer.b0, &b),
                ] {
                    variable.shallow_clone().copy_(value);
                }
            });
        }
        Ok(())
    }

    /// `A' = [A; A₀]`, `B' = s·[B, −B₀]`: rank `2r`, for the original base.
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let scaling = self.config.scaling();
        let modules = self
            .layers
            .iter()
            .map(|l| ExportedFactors {
                module_path: l.module_path.clone(),
                a: Tensor::cat(&[&l.a, &l.a0], 0),
                b: Tensor::cat(&[&l.b * scaling, &l.b0 * -scaling], 1),
            })
            .collect();
        per_module_lora(
            modules,
            &self.config.target_modules,
            self.config.dropout,
            base_model_uri,
        )
    }

    /// A published LoRA-GA adapter is a plain LoRA of rank 2r: continue it as `lora`.
    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("loraga")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lora::attach_frozen;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    fn config(extra: serde_json::Value) -> LoraGaConfig {
        let mut body = serde_json::json!({"r": 4, "alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    /// Before calibration the branch adds nothing; with any factors (as after training), the
    /// original base plus the published rank-2r adapter is the trained model.
    #[test]
    fn the_published_adapter_on_the_original_base_is_the_trained_model() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let base = logits(&fixture.load());
        for extra in [
            serde_json::json!({}),
            serde_json::json!({"use_rslora": true}),
        ] {
            let config = config(extra);
            let training = plan(10, 0);
            let mut model = fixture.load();
            let method = LoraGa::attach(&mut model, &config, &cpu(&training)).unwrap();
            assert_eq!(max_abs_diff(&logits(&model), &base), 0.0);
            tch::manual_seed(5);
            tch::no_grad(|| {
                for l in &method.layers {
                    for t in [&l.a, &l.b, &l.a0, &l.b0] {
                        let mut t = t.shallow_clone();
                        t.copy_(&(t.randn_like() * 0.3));
                    }
                }
            });
            let trained = logits(&model);
            assert!(max_abs_diff(&trained, &base) > 1e-3);
            let adapter = method.export("file:///m");
            assert_eq!(adapter.config.as_lora().unwrap().r, 8, "rank 2r");
            let mut published = fixture.load();
            attach_frozen(&mut published, &adapter, Device::Cpu).unwrap();
            let diff = max_abs_diff(&logits(&published), &trained);
            assert!(diff < 1e-5, "{diff}");
        }
    }

    /// With the whole spectrum sampled (`q = min(m, n)`), the randomised SVD is the SVD.
    #[test]
    fn svd_lowrank_with_full_q_is_the_svd() {
        let _turn = torch_rng_turn();
        tch::manual_seed(1);
        for (m, n) in [(12, 7), (7, 12)] {
            let g = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
            let (u, s, v) = svd_lowrank(&g, m.min(n), 4);
            let rebuilt = (u * s.unsqueeze(0)).matmul(&v.tr());
            assert!(max_abs_diff(&rebuilt, &g) < 1e-5);
            let (_, exact, _) = g.svd(true, true);
            assert!(max_abs_diff(&s, &exact) < 1e-5);
        }
    }

    /// `ArB2r` with the `stable` scale: `A` the top r right singular vectors, `B` the next r
    /// left ones times their singular values and `out^(1/4)/sqrt(γ)`; `A B` is therefore
    /// orthogonal to `G`'s top r directions.
    #[test]
    fn factors_follow_the_gradients_singular_vectors() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let training = plan(10, 0);
        let mut model = fixture.load();
        let method =
            LoraGa::attach(&mut model, &config(serde_json::json!({})), &cpu(&training)).unwrap();
        tch::manual_seed(2);
        // Of rank 16 = q (4r): the randomised SVD then finds it exactly.
        let g = Tensor::randn([32, 16], (Kind::Float, Device::Cpu))
            .matmul(&Tensor::randn([16, 64], (Kind::Float, Device::Cpu)));
        let (a, b) = method.init_factors(&g, None);
        let (u, s, v) = g.svd(true, true);
        let r = 4;
        // Up to sign, per singular vector.
        let a_ref = v.narrow(1, 0, r).tr();
        let signs = (&a * &a_ref).sum_dim_intlist(1, true, Kind::Float).sign();
        assert!(max_abs_diff(&(&a * &signs), &a_ref) < 1e-4);
        let scale = 32f64.powf(0.25) / 4.0;
        let b_ref = u.narrow(1, r, r) * s.narrow(0, r, r).unsqueeze(0) * scale;
        let signs = (&b * &b_ref).sum_dim_intlist(0, true, Kind::Float).sign();
        assert!(max_abs_diff(&(&b * &signs), &b_ref) < 1e-4);
    }
}
