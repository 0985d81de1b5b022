//! RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
//! models", ICLR 2025, sections 3-4), with the semantics of PEFT's `tuners/randlora` (peft 0.21:
//! `model.py` draws the bases, `layer.py` applies them).
//!
//! Two random bases are shared by every adapted layer: `A (r, 1, D_min)` and
//! `B (D_max, N, r)`, `D_min`/`D_max` the smaller/larger of the largest adapted output and input
//! widths, `N = ceil(D_min / r)`. A layer with `d = min(in, out)` and `n = ceil(d / r)` bases
//! trains `λ (r, n)` and `γ (n, d)` only:
//!
//! `S = flatten₀₁(λ[:, :, None] ⊙ A[:, :, :d] ⊙ γ[None])  (r·n, d)`,
//! `B̄ = flatten₁₂(B[:max(in, out), :n, :])  (max(in, out), n·r)`,
//! `ΔW = alpha / r · B̄ S` when `in ≤ out`, its transpose otherwise,
//!
//! so `n` rank-`r` terms reach full rank. Note the two flattenings pair `B̄`'s column `b·r + k`
//! with `S`'s row `k·n + b'`: PEFT's layout, kept since a published adapter means what PEFT
//! computes from it. `λ = 0` (the branch starts at zero), `γ = 1 / max(n, d)`.
//!
//! The bases are reproduced bit for bit from `projection_prng_key`: a fresh CPU generator seeded
//! with it (libtorch's global one here, reseeded with the job's seed afterwards), Kaiming-uniform
//! draws in bf16 (what PEFT uses wherever bf16 is available) of `A` and then of `B`'s `N`
//! chunks `(D_max, 1, r)`, each divided by its own standard deviation in bf16; or, for
//! `sparse`/`very_sparse`, fp32 uniform draws thresholded to -1/0/1 and divided by their standard
//! deviation. They are kept in the store (not trained) so a checkpoint carries them.

use super::{module_path, Attach, AttachContext};
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::RandLoraConfig;
use loraforge_spec::peft::peft_key;
use loraforge_spec::peft::randlora::{
    shared_key, PeftRandLoraConfig, BASIS_A, BASIS_B, GAMMA, LAMBDA,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The shared random bases, as PEFT's `RandLoraModel` holds them.
pub struct Bases {
    /// `(r, 1, D_min)`.
    pub a: Tensor,
    /// `(D_max, N, r)`.
    pub b: Tensor,
}

/// How the bases are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BasisKind {
    Dense,
    /// Ternary, each sign with probability `1 / (2 s)`: `s = 3` for `sparse`, `sqrt(D_min)` for
    /// `very_sparse`.
    Ternary(f64),
}

impl BasisKind {
    pub fn of(config: &RandLoraConfig, d_min: i64) -> BasisKind {
        if config.very_sparse {
            BasisKind::Ternary((d_min as f64).sqrt())
        } else if config.sparse {
            BasisKind::Ternary(3.0)
        } else {
            BasisKind::Dense
        }
    }
}

/// `ceil(d / r)`: enough rank-`r` bases to reach rank `d`.
pub fn num_bases(d: i64, r: i64) -> i64 {
    (d + r - 1) / r
}

/// `nn.init.kaiming_uniform_(t, a=sqrt(5))` for a 3-d `t`: fan-in `size(1) · size(2)`.
fn kaiming_uniform_bf16(shape: [i64; 3]) -> Tensor {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
    let bound = 3f64.sqrt() * (gain / ((shape[1] * shape[2]) as f64).sqrt());
    Tensor::empty(shape, (Kind::BFloat16, Device::Cpu)).uniform_(-bound, bound)
}

/// Draws the bases for rank `r` and the largest adapted `(out, in)` widths from libtorch's
/// global CPU generator seeded with `key`, in PEFT's order and dtypes; fp32 on the CPU.
pub fn draw_bases(key: u64, r: i64, widths: (i64, i64), kind: BasisKind) -> Bases {
    let (d_max, d_min) = (widths.0.max(widths.1), widths.0.min(widths.1));
    let n = num_bases(d_min, r);
    // The key's bits as torch's `manual_seed` reads them (it takes any 64-bit value).
    tch::manual_seed(key as i64);
    tch::no_grad(|| {
        let (a, b) = match kind {
            BasisKind::Dense => {
                let a = kaiming_uniform_bf16([r, 1, d_min]);
                let chunks: Vec<Tensor> = (0..n)
                    .map(|_| kaiming_uniform_bf16([d_max, 1, r]))
                    .collect();
                (a, Tensor::cat(&chunks, 1))
            }
            BasisKind::Ternary(s) => {
                let ternary = |u: Tensor| {
                    let (low, high) = (1.0 / (2.0 * s), 1.0 - 1.0 / (2.0 * s));
                    u.lt(low).to_kind(Kind::Float) * -1.0 + u.gt(high).to_kind(Kind::Float)
                };
                let a = Tensor::rand([r, 1, d_min], (Kind::Float, Device::Cpu));
                let b = Tensor::rand([d_max, n, r], (Kind::Float, Device::Cpu));
                (ternary(a), ternary(b))
            }
        };
        // PEFT divides in the draw's dtype (bf16 for dense bases), then casts to the layer's.
        let normalise = |t: Tensor| (&t / t.std(true)).to_kind(Kind::Float);
        Bases {
            a: normalise(a),
            b: normalise(b),
        }
    })
}

/// One adapted layer's trained scalings and its views of the shared bases.
pub struct RandLoraBranch {
    /// `A[:, :, :d]`, `(r, 1, d)`.
    a: Tensor,
    /// `B̄`, `(max(in, out), n·r)`.
    b: Tensor,
    lambda: Tensor,
    gamma: Tensor,
    /// Whether the input is the smaller side, so `S` (the scaled side) meets the input.
    in_is_min: bool,
    scaling: f64,
    dropout: f64,
}

impl RandLoraBranch {
    /// The branch of a `(out, in)` layer over `bases`, with scalings `lambda (r, n)` and
    /// `gamma (n, d)`.
    pub fn new(
        bases: &Bases,
        (out, inp): (i64, i64),
        lambda: Tensor,
        gamma: Tensor,
        scaling: f64,
        dropout: f64,
    ) -> RandLoraBranch {
        let (d_max, d_min) = (out.max(inp), out.min(inp));
        let n = lambda.size()[1];
        RandLoraBranch {
            a: bases.a.narrow(2, 0, d_min),
            b: bases.b.narrow(0, 0, d_max).narrow(1, 0, n).flatten(1, 2),
            lambda,
            gamma,
            in_is_min: inp == d_min,
            scaling,
            dropout,
        }
    }

    /// `S (r·n, d)`: the scaled basis, differentiable in `λ` and `γ`.
    fn scaled(&self) -> Tensor {
        (self.lambda.unsqueeze(2) * &self.a * self.gamma.unsqueeze(0)).flatten(0, 1)
    }

    /// `ΔW (out, in)`, scale included: what merging adds to the layer's weight.
    pub fn delta_weight(&self) -> Tensor {
        let product = self.b.matmul(&self.scaled()) * self.scaling;
        match self.in_is_min {
            true => product,
            false => product.tr(),
        }
    }
}

impl LinearAdapter for RandLoraBranch {
    /// fp32 on the input cast up (the bases and scalings are fp32), as PEFT computes in the
    /// adapter's dtype; cast back to the input's.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let (first, second) = self.factors_unscaled();
        let delta = x32.matmul(&first.tr()).matmul(&second.tr()) * self.scaling;
        delta.to_kind(x.kind())
    }
}

impl RandLoraBranch {
    /// The two matrices of the forward, `x firstᵀ secondᵀ` (scale apart), as PEFT orders them.
    fn factors_unscaled(&self) -> (Tensor, Tensor) {
        let s = self.scaled();
        match self.in_is_min {
            true => (s, self.b.shallow_clone()),
            false => (self.b.tr(), s.tr()),
        }
    }
}

/// One adapted layer: its path and trained scalings.
struct RandLoraLayer {
    module_path: String,
    lambda: Tensor,
    gamma: Tensor,
}

/// RandLoRA attached to every target layer of a model: the shared bases and each layer's
/// scalings in one [`VarStore`].
pub struct RandLora {
    config: RandLoraConfig,
    store: VarStore,
    bases: Bases,
    layers: Vec<RandLoraLayer>,
}

impl Attach for RandLora {
    type Config = RandLoraConfig;

    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let device = ctx.device;
        let store = VarStore::new(device);
        let r = i64::from(config.r);
        let targets = model.target_linears(&config.target_modules)?;
        // PEFT sizes the shared bases by the largest output and the largest input, apart.
        let widths = targets.iter().fold((0, 0), |(o, i), (_, l)| {
            (o.max(l.out_features()), i.max(l.in_features()))
        });
        let kind = BasisKind::of(config, widths.0.min(widths.1));
        let drawn = draw_bases(config.projection_prng_key, r, widths, kind);
        // The draw reseeded the global generator: back to the job's stream.
        tch::manual_seed(ctx.training.seed as i64);
        let root = store.root();
        let bases = Bases {
            a: root.add("randlora_A", drawn.a.to_device(device), false),
            b: root.add("randlora_B", drawn.b.to_device(device), false),
        };
        let scaling = config.alpha / r as f64;
        let mut layers = Vec::new();
        for (path, linear) in targets {
            let shape = (linear.out_features(), linear.in_features());
            let d = shape.0.min(shape.1);
            let n = num_bases(d, r);
            let p = module_path(&store, &path);
            let lambda = p.add(
                "randlora_lambda",
                Tensor::zeros([r, n], (Kind::Float, device)),
                true,
            );
            let gamma = p.add(
                "randlora_gamma",
                Tensor::full([n, d], 1.0 / n.max(d) as f64, (Kind::Float, device)),
                true,
            );
            linear.attach(Box::new(RandLoraBranch::new(
                &bases,
                shape,
                lambda.shallow_clone(),
                gamma.shallow_clone(),
                scaling,
                config.dropout,
            )));
            layers.push(RandLoraLayer {
                module_path: path,
                lambda,
                gamma,
            });
        }
        Ok(RandLora {
            config: config.clone(),
            store,
            bases,
            layers,
        })
    }
}

impl AdapterMethod for RandLora {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// PEFT's RandLoRA, as its `save_pretrained` writes it: every layer's scalings, and the
    /// shared bases once at the model level and once under each layer (PEFT's layers hold
    /// references to them, which its state dict lists too).
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let cpu = |t: &Tensor| {
            t.detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous()
        };
        let (a, b) = (cpu(&self.bases.a), cpu(&self.bases.b));
        let mut tensors = vec![
            (shared_key(BASIS_A), a.shallow_clone()),
            (shared_key(BASIS_B), b.shallow_clone()),
        ];
        for l in &self.layers {
            tensors.extend([
                (peft_key(&l.module_path, LAMBDA), cpu(&l.lambda)),
                (peft_key(&l.module_path, GAMMA), cpu(&l.gamma)),
                (peft_key(&l.module_path, BASIS_A), a.shallow_clone()),
                (peft_key(&l.module_path, BASIS_B), b.shallow_clone()),
            ]);
        }
        PeftAdapter {
            config: PeftRandLoraConfig::new(&self.config, base_model_uri).into(),
            tensors,
        }
    }

    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        super::refuse_parent("randlora")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testing::{cpu, logits, max_abs_diff, plan, FixtureModel};
    use crate::model::llama::Linear;

    fn config(json: serde_json::Value) -> RandLoraConfig {
        serde_json::from_value(json).unwrap()
    }

    /// The fixture's q_proj is 64 -> 64 and v_proj 64 -> 32: bases sized (64, 64), q gets
    /// ceil(64 / r) bases of width 64, v ceil(32 / r) of width 32.
    #[test]
    fn shapes_and_initial_values_follow_peft() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let before = logits(&model);
        let training = plan(10, 0);
        let method = RandLora::attach(
            &mut model,
            &config(serde_json::json!({"r": 7, "alpha": 140})),
            &cpu(&training),
        )
        .unwrap();
        let vars = method.var_store().variables();
        assert_eq!(vars["randlora_A"].size(), [7, 1, 64]);
        assert_eq!(vars["randlora_B"].size(), [64, 10, 7]);
        assert!(!vars["randlora_A"].requires_grad());
        let q = "model.layers.0.self_attn.q_proj";
        let v = "model.layers.1.self_attn.v_proj";
        assert_eq!(vars[&format!("{q}.randlora_lambda")].size(), [7, 10]);
        assert_eq!(vars[&format!("{q}.randlora_gamma")].size(), [10, 64]);
        assert_eq!(vars[&format!("{v}.randlora_lambda")].size(), [7, 5]);
        assert_eq!(vars[&format!("{v}.randlora_gamma")].size(), [5, 32]);
        let gamma = vars[&format!("{v}.randlora_gamma")].double_value(&[0, 0]);
        assert_eq!(gamma as f32, 1.0 / 32.0);
        // Normalised bases: unit standard deviation.
        for name in ["randlora_A", "randlora_B"] {
            let std = vars[name].std(true).double_value(&[]);
            assert!((std - 1.0).abs() < 1e-2, "{name}: std {std}");
        }
        // λ = 0: the adapted model starts as the base.
        assert_eq!(max_abs_diff(&before, &logits(&model)), 0.0);
    }

    /// The bases come from the key alone: the same key gives the same bits whatever the job's
    /// seed, another key other bases; sparse bases are ternary with about the asked density.
    #[test]
    fn bases_are_reproducible_from_the_key() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let draw = |key, kind| draw_bases(key, 4, (32, 48), kind);
        tch::manual_seed(99);
        let first = draw(5, BasisKind::Dense);
        let again = draw(5, BasisKind::Dense);
        assert!(first.a.equal(&again.a) && first.b.equal(&again.b));
        assert_eq!(first.b.size(), [48, 8, 4]);
        assert!(!first.a.equal(&draw(6, BasisKind::Dense).a));
        let sparse = draw(5, BasisKind::Ternary(3.0));
        let levels = sparse.b.flatten(0, -1).unique_dim(0, true, false, false).0;
        assert_eq!(levels.numel(), 3, "{levels}");
        let nonzero = sparse.b.ne(0.0).to_kind(Kind::Float).mean(Kind::Float);
        let density = nonzero.double_value(&[]);
        assert!((density - 1.0 / 3.0).abs() < 0.05, "density {density}");
    }

    /// The unmerged forward (either orientation, dropout off in evaluation) is `x ΔWᵀ`.
    #[test]
    fn forward_and_merged_weight_agree() {
        let _turn = crate::training::seeds::torch_rng_turn();
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (r, scaling) = (3, 2.5);
        let bases = draw_bases(1, r, (24, 40), BasisKind::Dense);
        for (out, inp) in [(24, 40), (40, 24), (16, 16)] {
            let d = i64::min(out, inp);
            let n = num_bases(d, r);
            let (lambda, gamma) = (
                Tensor::randn([r, n], opts),
                Tensor::randn([n, d], opts) / d as f64,
            );
            let branch = RandLoraBranch::new(&bases, (out, inp), lambda, gamma, scaling, 0.5);
            let w = Tensor::randn([out, inp], opts) / (inp as f64).sqrt();
            let mut linear = Linear::new(w.shallow_clone(), None);
            let delta = branch.delta_weight();
            assert_eq!(delta.size(), [out, inp]);
            linear.attach(Box::new(branch));
            let x = Tensor::randn([2, 5, inp], opts);
            let unmerged = linear.forward(&x, false);
            let merged = x.matmul(&(&w + &delta).tr());
            let diff = max_abs_diff(&unmerged, &merged);
            assert!(diff < 1e-4, "({out}, {inp}): {diff}");
            // Full rank: d bases' worth of directions.
            assert_eq!(delta.linalg_matrix_rank(1e-4, false).int64_value(&[]), d);
        }
    }

    /// `S` is built so that λ and γ get gradients; the bases none.
    #[test]
    fn only_the_scalings_train() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let training = plan(10, 0);
        let method = RandLora::attach(
            &mut model,
            &config(serde_json::json!({"r": 16, "sparse": true})),
            &cpu(&training),
        )
        .unwrap();
        let trained: Vec<String> = method
            .optimized_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(trained.len(), 8, "{trained:?}");
        assert!(trained
            .iter()
            .all(|n| n.ends_with(".randlora_lambda") || n.ends_with(".randlora_gamma")));
    }

    /// The published adapter has PEFT's layout (the spec's check of it passes), and attached
    /// frozen through its family it gives the logits of the model it was trained on.
    #[test]
    fn export_is_pefts_randlora_with_the_trained_logits() {
        let _turn = crate::training::seeds::torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let base = logits(&model);
        let training = plan(10, 0);
        let method = RandLora::attach(
            &mut model,
            &config(serde_json::json!({"r": 7, "alpha": 140})),
            &cpu(&training),
        )
        .unwrap();
        tch::manual_seed(1);
        for (_, t) in method.optimized_parameters() {
            let trained = Tensor::randn_like(&t) * 0.05;
            tch::no_grad(|| t.shallow_clone().copy_(&trained));
        }
        let trained = logits(&model);
        let adapter = method.export("file:///m");
        assert_eq!(adapter.config.peft_type(), "RANDLORA");
        let shapes = adapter
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.size().iter().map(|&s| s as u64).collect()))
            .collect();
        adapter.config.check_tensors(&shapes).unwrap();
        assert_eq!(shapes.len(), 4 * 4 + 2);
        let mut fresh = fixture.load();
        crate::families::attach_frozen(&mut fresh, &adapter, Device::Cpu).unwrap();
        let diff = max_abs_diff(&trained, &logits(&fresh));
        assert!(diff < 1e-4, "frozen from the adapter: {diff}");
        assert!(
            max_abs_diff(&trained, &base) > 1e-3,
            "the scalings change nothing"
        );
    }
}
