//! LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025),
//! the released code's "full adjustment" (`mrflogs/LoRA-Pro` @ fe26027,
//! `DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py`, `lorapro_full_adjustment`).
//!
//! The factors are PEFT's LoRA (`ΔW = s B A`); only their update differs. A LoRA step moves
//! `W` by the equivalent gradient `g̃ = s (B ĝ_A + ĝ_B A)`; LoRA-Pro picks `ĝ_A, ĝ_B` so that
//! `g̃` is the closest to the full gradient `G`. With the raw gradients `g_A = s Bᵀ G`,
//! `g_B = s G Aᵀ`, `P = pinv(BᵀB + 1e-8 I)`, `Q = pinv(AAᵀ + 1e-8 I)`, every step and module:
//!
//! 1. `ĝ_A = P g_A / s²`, `ĝ_B = (I − B P Bᵀ) g_B Q / s²`, `g̃ = s (B ĝ_A + ĝ_B A)` (out × in);
//! 2. Adam on `g̃` (β 0.9/0.999, ε 1e-8, moments of the full matrix kept in the store):
//!    `u = m̂ / (√v̂ + ε)`;
//! 3. `u` projected back, `g_A' = s Bᵀ u`, `g_B' = s u Aᵀ`, and adjusted again with the
//!    Sylvester term (Theorem 2.3): `ĝ_A = P g_A' / s² + X A`,
//!    `ĝ_B = (I − B P Bᵀ) g_B' Q / s² − B X`, `X` solving `BᵀB X + X AAᵀ = −P g_A' Aᵀ / s²`,
//!    here by eigendecomposing the two symmetric r × r matrices ([`solve_sylvester`]);
//! 4. plain SGD on the factors at the job's learning rate, `p −= lr (ĝ + weight_decay · p)`
//!    (`torch.optim.SGD`: the reference trains with `optim="sgd"` so that nothing else steps
//!    them).
//!
//! The gradient norm the job reports and clips with is the raw gradients', and clipping
//! scales the adjusted gradients, DeepSpeed's order. Where we differ from the released code:
//! `s` is the job's scaling (the file hard-codes `16 / 8`); Adam's bias corrections count this
//! step from 1 as the paper's algorithm does (the file increments `global_step` before the
//! adjustment, so its corrections count from 2 and its first-step branch never runs; with
//! `B = 0` at the start that branch would give the same gradients); `v` is kept in fp32
//! (bf16 there).

use super::lora::Lora;
use super::{module_path, refuse_parent, Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, StepInfo};
use crate::model::LlamaModel;
use crate::training::optimizer::{BETA1, BETA2, EPSILON};
use anyhow::Result;
use loraforge_spec::methods::LoraProConfig;
use loraforge_spec::{LoraConfig, LoraInit};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The ridge the reference adds before its pseudo-inverses.
const RIDGE: f64 = 1e-8;

/// One adapted module: its factors and the Adam moments of its equivalent gradient.
struct ProModule {
    a: Tensor,
    b: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct LoraPro {
    lora: Lora,
    modules: Vec<ProModule>,
    scaling: f64,
    weight_decay: f64,
}

impl Attach for LoraPro {
    type Config = LoraProConfig;

    /// PEFT's LoRA init (A Kaiming-uniform, B = 0), as the reference's `get_peft_model`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let lora_config = LoraConfig {
            r: config.r,
            alpha: config.alpha,
            dropout: config.dropout,
            target_modules: config.target_modules.clone(),
            use_rslora: config.use_rslora,
            init: LoraInit::Kaiming,
            freeze_a: false,
        };
        let lora = Lora::attach(model, &lora_config, ctx)?;
        let modules = lora
            .factor_pairs()
            .into_iter()
            .map(|(path, a, b)| {
                let full = Tensor::zeros([b.size()[0], a.size()[1]], (Kind::Float, ctx.device));
                let p = module_path(lora.var_store(), &path);
                ProModule {
                    exp_avg: p.add("lorapro_exp_avg", full.zeros_like(), false),
                    exp_avg_sq: p.add("lorapro_exp_avg_sq", full, false),
                    a,
                    b,
                }
            })
            .collect();
        Ok(LoraPro {
            lora,
            modules,
            scaling: config.scaling(),
            weight_decay: ctx.training.weight_decay,
        })
    }
}

/// `X` with `p X + X q = c`, for symmetric positive semi-definite `p (r, r)`, `q (r, r)`:
/// `p = U diag(λ) Uᵀ`, `q = V diag(μ) Vᵀ`, `X = U ((Uᵀ c V) / (λ_i + μ_j)) Vᵀ`. The
/// reference's `solve_sylvester` does the same with the general (complex) `torch.linalg.eig`.
pub fn solve_sylvester(p: &Tensor, q: &Tensor, c: &Tensor) -> Tensor {
    let (lambda, u) = p.linalg_eigh("L");
    let (mu, v) = q.linalg_eigh("L");
    let denominators = lambda.unsqueeze(1) + mu.unsqueeze(0);
    let y = u.tr().matmul(c).matmul(&v) / denominators;
    u.matmul(&y).matmul(&v.tr())
}

/// `torch.linalg.pinv(m + 1e-8 I)` with torch's default tolerances.
fn ridge_pinv(m: &Tensor) -> Tensor {
    let eye = Tensor::eye(m.size()[0], (m.kind(), m.device()));
    (m + eye * RIDGE).linalg_pinv_atol_rtol_float(None, None, false)
}

/// The adjusted gradients of one module's factors `a (r, in)`, `b (out, r)` from its raw ones,
/// the closed form of the reference (`with_sylvester` adds the `X` terms it uses on the
/// Adam-projected gradients).
pub fn adjust(
    a: &Tensor,
    b: &Tensor,
    grad_a: &Tensor,
    grad_b: &Tensor,
    s: f64,
    with_sylvester: bool,
) -> (Tensor, Tensor) {
    let btb = b.tr().matmul(b);
    let aat = a.matmul(&a.tr());
    let (p, q) = (ridge_pinv(&btb), ridge_pinv(&aat));
    let inv_s2 = 1.0 / (s * s);
    let pga = p.matmul(grad_a) * inv_s2;
    // (I − B P Bᵀ) g_B without the out × out matrix.
    let projected = grad_b - b.matmul(&p.matmul(&b.tr().matmul(grad_b)));
    let gb = projected.matmul(&q) * inv_s2;
    if !with_sylvester {
        return (pga, gb);
    }
    let x = solve_sylvester(&btb, &aat, &(-pga.matmul(&a.tr())));
    (pga + x.matmul(a), gb - b.matmul(&x))
}

impl AdapterMethod for LoraPro {
    fn var_store(&self) -> &VarStore {
        self.lora.var_store()
    }

    /// None: the factors are stepped in [`AdapterMethod::after_step`] by SGD on the adjusted
    /// gradients, as the reference's outer optimizer.
    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn adjust_gradients(&mut self, step: StepInfo) {
        let s = self.scaling;
        let t = f64::from(step.index);
        let (bias_correction1, bias_correction2) = (1.0 - BETA1.powf(t), 1.0 - BETA2.powf(t));
        tch::no_grad(|| {
            for m in &mut self.modules {
                let (mut grad_a, mut grad_b) = (m.a.grad(), m.b.grad());
                if !grad_a.defined() || !grad_b.defined() {
                    continue;
                }
                let (ga, gb) = adjust(&m.a, &m.b, &grad_a, &grad_b, s, false);
                let equivalent = (m.b.matmul(&ga) + gb.matmul(&m.a)) * s;
                let _ = m.exp_avg.lerp_(&equivalent, 1.0 - BETA1);
                let _ = m.exp_avg_sq.g_mul_scalar_(BETA2);
                let _ = m
                    .exp_avg_sq
                    .g_add_(&(&equivalent * (1.0 - BETA2) * &equivalent));
                let denom = m.exp_avg_sq.sqrt() / bias_correction2.sqrt() + EPSILON;
                let update = (&m.exp_avg / bias_correction1) / denom;
                let projected_a = m.b.tr().matmul(&update) * s;
                let projected_b = update.matmul(&m.a.tr()) * s;
                let (ga, gb) = adjust(&m.a, &m.b, &projected_a, &projected_b, s, true);
                grad_a.copy_(&ga);
                grad_b.copy_(&gb);
            }
        });
    }

    /// `torch.optim.SGD` (no momentum) on the adjusted, clipped gradients.
    fn after_step(&mut self, step: StepInfo) {
        tch::no_grad(|| {
            for m in &mut self.modules {
                for p in [&mut m.a, &mut m.b] {
                    let grad = p.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let d_p = if self.weight_decay != 0.0 {
                        &grad + &*p * self.weight_decay
                    } else {
                        grad
                    };
                    let _ = p.g_add_(&(d_p * -step.lr));
                }
            }
        });
    }

    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        self.lora.export(base_model_uri)
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("lorapro")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::seeds::torch_rng_turn;
    use tch::Device;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    #[test]
    fn sylvester_solution_satisfies_the_equation() {
        let _turn = torch_rng_turn();
        tch::manual_seed(3);
        let (a, b, c) = (randn(&[4, 9]), randn(&[7, 4]), randn(&[4, 4]));
        let (p, q) = (b.tr().matmul(&b), a.matmul(&a.tr()));
        let x = solve_sylvester(&p, &q, &c);
        let residual = (p.matmul(&x) + x.matmul(&q) - &c)
            .abs()
            .max()
            .double_value(&[]);
        assert!(residual < 1e-10, "{residual}");
    }

    /// Theorem 2.1's point: the adjusted gradients give the equivalent gradient closest to the
    /// full gradient `G`, its projection `P_B G + G P_A − P_B G P_A` onto what a step of the
    /// factors can reach (`P_B`, `P_A` the projectors on B's columns and A's rows), and
    /// the Sylvester term changes the factors' gradients but not the equivalent gradient.
    #[test]
    fn adjusted_gradients_project_the_full_gradient() {
        let _turn = torch_rng_turn();
        tch::manual_seed(5);
        let s = 2.0;
        let (a, b, g) = (randn(&[3, 10]), randn(&[8, 3]), randn(&[8, 10]));
        let (grad_a, grad_b) = (b.tr().matmul(&g) * s, g.matmul(&a.tr()) * s);
        let equivalent = |(ga, gb): &(Tensor, Tensor)| (b.matmul(ga) + gb.matmul(&a)) * s;
        let plain = adjust(&a, &b, &grad_a, &grad_b, s, false);
        let full = adjust(&a, &b, &grad_a, &grad_b, s, true);
        // Orthogonal projectors onto B's column space and A's row space.
        let pb = b.matmul(&b.tr().matmul(&b).inverse()).matmul(&b.tr());
        let pa = a.tr().matmul(&a.matmul(&a.tr()).inverse()).matmul(&a);
        let projection = pb.matmul(&g) + g.matmul(&pa) - pb.matmul(&g).matmul(&pa);
        let diff = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]);
        assert!(diff(&equivalent(&plain), &projection) < 1e-8);
        assert!(diff(&equivalent(&full), &projection) < 1e-8);
        assert!(diff(&plain.0, &full.0) > 1e-3, "X changes A's gradient");
        // The raw LoRA step's equivalent gradient is not the projection.
        assert!(diff(&((b.matmul(&grad_a) + grad_b.matmul(&a)) * s), &projection) > 1e-2);
    }
}
