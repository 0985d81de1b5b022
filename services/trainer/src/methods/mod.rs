//! The adapter methods, one module per method, and the registry that attaches the one a job
//! asks for: [`attach_method`], one line per method. Every method implements [`Attach`] (the
//! same `attach(model, config, &ctx)` for all) and [`AdapterMethod`]. The spec side mirrors
//! this in `loraforge_spec::methods`; docs/methods.md says how to add a method and what each
//! one does. Besides LoRA, every method here publishes a plain PEFT LoRA whose ranks differ
//! per module.

pub mod adalora;
pub mod allora;
pub mod codyra;
pub mod dylora;
pub mod eva;
pub mod gated;
pub mod ggpo;
pub mod increlora;
pub mod lora;
pub mod loraga;
pub mod lorapro;
pub mod lorasb;
pub mod miss;
pub mod randlora;
pub mod rank_adam;
pub mod shira;
pub mod sora;
pub mod triadaptlora;

use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::AdapterMethod;
use crate::model::LlamaModel;
use anyhow::Result;
use loraforge_spec::peft::{lora_key, PeftLoraConfig};
use loraforge_spec::{JobSpec, MethodConfig, TrainingConfig};
use std::collections::BTreeMap;
use tch::nn::{Path, VarStore};
use tch::{Device, Kind, Tensor};

/// What attaching a method may need besides its own parameters: the run's plan (its length
/// for schedules, its seed) and the device the adapter lives on.
pub struct AttachContext<'a> {
    pub training: &'a TrainingConfig,
    pub device: Device,
}

/// How a method attaches itself to a model; one implementation per method.
pub trait Attach: AdapterMethod + Sized + 'static {
    /// The method's parameters, as the job spec has them.
    type Config;

    /// Adds the method's freshly initialised adapter to the model's target layers
    /// (`model.target_linears`), its variables in a store of its own on `ctx.device`.
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self>;
}

/// The registry: attaches the method a job asks for, one line per method (the match is
/// exhaustive, so a method declared in the spec but not here does not compile).
pub fn attach_method(
    model: &mut LlamaModel,
    spec: &JobSpec,
    device: Device,
) -> Result<Box<dyn AdapterMethod>> {
    let ctx = AttachContext {
        training: &spec.training,
        device,
    };
    match &spec.method {
        MethodConfig::Lora(config) => boxed::<lora::Lora>(model, config, &ctx),
        MethodConfig::AdaLora(config) => boxed::<adalora::AdaLora>(model, config, &ctx),
        MethodConfig::Sora(config) => boxed::<sora::Sora>(model, config, &ctx),
        MethodConfig::DyLora(config) => boxed::<dylora::DyLora>(model, config, &ctx),
        MethodConfig::IncreLora(config) => boxed::<increlora::IncreLora>(model, config, &ctx),
        MethodConfig::TriAdaptLora(config) => {
            boxed::<triadaptlora::TriAdaptLora>(model, config, &ctx)
        }
        MethodConfig::Codyra(config) => boxed::<codyra::Codyra>(model, config, &ctx),
        MethodConfig::LoraPro(config) => boxed::<lorapro::LoraPro>(model, config, &ctx),
        MethodConfig::Allora(config) => boxed::<allora::Allora>(model, config, &ctx),
        MethodConfig::Ggpo(config) => boxed::<ggpo::Ggpo>(model, config, &ctx),
        MethodConfig::Miss(config) => boxed::<miss::Miss>(model, config, &ctx),
        MethodConfig::Shira(config) => boxed::<shira::Shira>(model, config, &ctx),
        MethodConfig::RandLora(config) => boxed::<randlora::RandLora>(model, config, &ctx),
        MethodConfig::LoraGa(config) => boxed::<loraga::LoraGa>(model, config, &ctx),
        MethodConfig::LoraSb(config) => boxed::<lorasb::LoraSb>(model, config, &ctx),
        MethodConfig::Eva(config) => boxed::<eva::Eva>(model, config, &ctx),
    }
}

fn boxed<M: Attach>(
    model: &mut LlamaModel,
    config: &M::Config,
    ctx: &AttachContext,
) -> Result<Box<dyn AdapterMethod>> {
    Ok(Box::new(M::attach(model, config, ctx)?))
}

/// One module's factors as published: `a (r, in)`, `b (out, r)`, the branch's whole scale
/// already folded into `b`, so the module adds exactly `x a^T b^T`.
pub struct ExportedFactors {
    pub module_path: String,
    pub a: Tensor,
    pub b: Tensor,
}

/// A plain PEFT LoRA with a rank per module. Every module's scale is 1: `lora_alpha = r`
/// globally, and `alpha_pattern` gives each module its own rank as its alpha. So PEFT
/// (`alpha_pattern[m] / rank_pattern[m]`) and engines that take one `lora_alpha / r` for all
/// modules (vLLM, LoRAX) apply the same factors alike. Pattern keys are full module paths,
/// which PEFT's suffix match and the registry's `ends_with` check both resolve to one module.
/// A module of rank 0 is left out of the file and the patterns; PEFT then gives it a zero
/// `lora_B`, so it adds nothing, as pruned.
pub fn per_module_lora(
    modules: Vec<ExportedFactors>,
    target_modules: &[String],
    dropout: f64,
    base_model_uri: &str,
) -> PeftAdapter {
    let kept: Vec<ExportedFactors> = modules.into_iter().filter(|m| m.a.size()[0] > 0).collect();
    let rank_of = |m: &ExportedFactors| m.a.size()[0] as u32;
    let r = kept.iter().map(rank_of).max().unwrap_or(1);
    let rank_pattern: BTreeMap<String, u32> = kept
        .iter()
        .map(|m| (m.module_path.clone(), rank_of(m)))
        .collect();
    let alpha_pattern = rank_pattern
        .iter()
        .map(|(k, &v)| (k.clone(), f64::from(v)))
        .collect();
    let cpu = |t: &Tensor| {
        t.detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
    };
    let tensors = kept
        .iter()
        .flat_map(|m| {
            [
                (lora_key(&m.module_path, 'A'), cpu(&m.a)),
                (lora_key(&m.module_path, 'B'), cpu(&m.b)),
            ]
        })
        .collect();
    let mut targets = target_modules.to_vec();
    targets.sort();
    let config = PeftLoraConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        base_model_name_or_path: base_model_uri.into(),
        r,
        lora_alpha: f64::from(r),
        lora_dropout: dropout,
        target_modules: targets,
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: serde_json::Value::Bool(true),
        use_rslora: false,
        use_dora: false,
        modules_to_save: None,
        rank_pattern,
        alpha_pattern,
    };
    PeftAdapter {
        config: config.into(),
        tensors,
    }
}

/// The store path of a module's variables: one level per dotted part, as `lora` does.
pub fn module_path<'a>(store: &'a VarStore, module_path: &str) -> Path<'a> {
    module_path
        .split('.')
        .fold(store.root(), |p, part| p.sub(part))
}

/// `U(-1/sqrt(in), 1/sqrt(in))`, i.e. `kaiming_uniform_(a=sqrt(5))` as loralib and PEFT use.
pub fn kaiming_uniform(rows: i64, inp: i64, device: Device) -> Tensor {
    let bound = 1.0 / (inp as f64).sqrt();
    tch::no_grad(|| Tensor::empty([rows, inp], (Kind::Float, device)).uniform_(-bound, bound))
}

/// Adaptive-rank methods start from scratch: their state (triplets, gates, importance
/// averages) is not in a published LoRA, so a parent adapter cannot seed them.
pub fn refuse_parent(method: &str) -> Result<()> {
    Err(user_error(format!(
        "{method} cannot continue from a parent adapter: submit the job without `parent`"
    )))
}

/// The orthogonal regulariser of AdaLoRA and its growing relatives: the mean over every
/// module of `||A Aᵀ − I||_F` and `||Bᵀ B − I||_F`, un-squared as the references compute them,
/// each over the ranks marked in the module's `live (K, 1)` (all of them where `None`), for
/// factors `a (K, in)`, `b (out, K)`: the rows of `a` and columns of `b` outside them are
/// zeroed here (one product per stack, not two per module), so the norms are those of the
/// live sub-matrices. The matrices are stacked by shape, one batched Gram product and one
/// norm per stack rather than per matrix (on a GPU, launches were the cost): the same
/// matrices and norms, summed in another order.
pub fn mean_orthogonality(factors: Vec<(Tensor, Tensor, Option<Tensor>)>) -> Tensor {
    let count = 2 * factors.len();
    type Stack = (Vec<Tensor>, Vec<Option<Tensor>>);
    let mut stacks: BTreeMap<Vec<i64>, Stack> = BTreeMap::new();
    for (a, b, live) in factors {
        for x in [a, b.tr()] {
            let stack = stacks.entry(x.size()).or_default();
            stack.0.push(x);
            stack.1.push(live.as_ref().map(Tensor::shallow_clone));
        }
    }
    let sums: Vec<Tensor> = stacks
        .into_values()
        .map(|(xs, lives)| {
            let x = Tensor::stack(&xs, 0);
            let k = x.size()[1];
            let eye = Tensor::eye(k, (Kind::Float, x.device()));
            // Every rank live (AdaLoRA's): the identity alone, no mask per matrix to build.
            let (x, eye) = match lives.iter().any(Option::is_some) {
                false => (x, eye),
                true => {
                    let ones = Tensor::ones([k, 1], (Kind::Float, x.device()));
                    let lives: Vec<Tensor> = lives
                        .into_iter()
                        .map(|l| l.unwrap_or_else(|| ones.shallow_clone()))
                        .collect();
                    let lives = Tensor::stack(&lives, 0);
                    (x * &lives, eye * lives)
                }
            };
            (x.bmm(&x.transpose(1, 2)) - eye)
                .flatten(1, -1)
                .norm_scalaropt_dim(2, [1], false)
                .sum(Kind::Float)
        })
        .collect();
    Tensor::stack(&sums, 0).sum(Kind::Float) / count as f64
}

/// Moves `tensors` (any shapes, one kind, one device) into consecutive parts of one new flat
/// buffer, and returns it: every handle to them (the store's, a branch's) then reads and
/// writes that buffer, values kept, so one op on it updates all of them. A per-step update
/// over every module then costs a few kernel launches instead of a few per module.
pub fn pack(tensors: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors.iter().map(|t| t.detach().reshape([-1])).collect();
    let flat = match parts.is_empty() {
        true => Tensor::empty([0], (Kind::Float, Device::Cpu)),
        false => Tensor::cat(&parts, 0),
    };
    let mut offset = 0;
    for t in tensors {
        let n = t.numel() as i64;
        t.shallow_clone()
            .set_data(&flat.narrow(0, offset, n).view(t.size().as_slice()));
        offset += n;
    }
    flat
}

/// A rank-`q` approximate SVD `a ≈ U diag(S) Vᵀ` of `a (m, n)` (fp32): `U (m, q)`, `S (q)`,
/// `V (n, q)`. The randomised algorithm `torch.svd_lowrank` runs (Halko, Martinsson, Tropp
/// 2009, Algorithms 4.4 and 5.1, as torch 2.11 orders it: a wide `a` is transposed first, one
/// Gaussian test matrix `(n', q)` drawn from libtorch's generator, `niter` power iterations with
/// a QR after each product), so that with the generator in the same state it gives the same
/// factors, and for `q = min(m, n)` the exact SVD up to rounding and signs.
pub fn svd_lowrank(a: &Tensor, q: i64, niter: usize) -> (Tensor, Tensor, Tensor) {
    let (m, n) = (a.size()[0], a.size()[1]);
    let a = if m < n { a.tr() } else { a.shallow_clone() };
    let basis = |x: Tensor| Tensor::linalg_qr(&x, "reduced").0;
    let r = Tensor::randn([a.size()[1], q], (Kind::Float, a.device()));
    let mut basis_q = basis(a.matmul(&r));
    for _ in 0..niter {
        basis_q = basis(a.tr().matmul(&basis_q));
        basis_q = basis(a.matmul(&basis_q));
    }
    let b = basis_q.tr().matmul(&a);
    // `torch.svd` (V, not Vᵀ): `linalg_svd` through tch always passes a driver, which only
    // CUDA accepts.
    let (u, s, v) = b.svd(true, true);
    let u = basis_q.matmul(&u);
    if m < n {
        (v, s, u)
    } else {
        (u, s, v)
    }
}

/// Selects rows `keep` (a bool mask) of `t` along `dim`.
pub fn select(t: &Tensor, dim: i64, keep: &Tensor) -> Tensor {
    t.index_select(dim, &keep.nonzero().view([-1]))
}

#[cfg(test)]
pub mod testing {
    //! The fixture model, loaded as many times as a test needs, and its logits.

    use super::AttachContext;
    use crate::model::LlamaModel;
    use crate::model::ModelConfig;
    use loraforge_spec::TrainingConfig;
    use tch::{Device, Kind, Tensor};

    /// A run of `max_steps` steps with seed `seed`, the rest defaults.
    pub fn plan(max_steps: u32, seed: u64) -> TrainingConfig {
        serde_json::from_value(serde_json::json!({
            "max_steps": max_steps, "learning_rate": 0.01, "seed": seed
        }))
        .unwrap()
    }

    /// Attaching for `training` on the CPU.
    pub fn cpu(training: &TrainingConfig) -> AttachContext<'_> {
        AttachContext {
            training,
            device: Device::Cpu,
        }
    }

    pub struct FixtureModel {
        pub dir: tempfile::TempDir,
    }

    impl FixtureModel {
        pub fn create() -> FixtureModel {
            let dir = tempfile::tempdir().unwrap();
            crate::fixture::write_fixture(dir.path(), 0).unwrap();
            FixtureModel { dir }
        }

        pub fn load(&self) -> LlamaModel {
            let model_dir = self.dir.path().join("model");
            LlamaModel::load(
                &model_dir,
                ModelConfig::load(&model_dir).unwrap(),
                Device::Cpu,
            )
            .unwrap()
        }
    }

    pub fn logits(model: &LlamaModel) -> Tensor {
        let ids = Tensor::from_slice(&[1i64, 5, 9, 14, 20, 33, 41, 2]).unsqueeze(0);
        tch::no_grad(|| model.forward(&ids, false)).to_kind(Kind::Float)
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FixtureModel;
    use crate::error::{classify, Failure};
    use loraforge_spec::{JobSpec, MethodConfig};
    use tch::{Device, Kind, Tensor};

    /// A job of `method` on any inputs (attaching reads only the method and the steps).
    fn job(method: &serde_json::Value, max_steps: u32) -> JobSpec {
        let body = serde_json::json!({
            "adapter_name": "demo", "base_model": "file:///m",
            "dataset": {"train": "file:///d.jsonl"}, "method": method,
            "training": {"max_steps": max_steps, "learning_rate": 0.001}
        });
        JobSpec::parse(body.to_string().as_bytes()).unwrap()
    }

    /// The two registries agree: every method the spec declares attaches here, with the
    /// parameters it gets when a job names only its `type`, to the layers those name.
    #[test]
    fn every_spec_method_attaches() {
        let fixture = FixtureModel::create();
        for tag in MethodConfig::TAGS {
            let method = serde_json::to_value(MethodConfig::example(tag).unwrap()).unwrap();
            let spec = job(&method, 5000);
            let mut model = fixture.load();
            let attached = super::attach_method(&mut model, &spec, Device::Cpu)
                .unwrap_or_else(|e| panic!("{tag}: {e:#}"));
            let variables = attached.var_store().variables();
            for (path, _) in model.target_linears(spec.method.target_modules()).unwrap() {
                assert!(
                    variables.keys().any(|k| k.starts_with(&format!("{path}."))),
                    "{tag} has no variable for {path}"
                );
            }
        }
    }

    /// The methods whose branch is a product of small factors give them as a low-rank branch
    /// (`LinearAdapter::low_rank`: their layers then run by hand, merged with their neighbours'),
    /// and that branch computes what their own forward does, with every variable drawn at
    /// random (B is zero at the start, which would hide a wrong factor).
    #[test]
    fn the_factored_methods_low_rank_form_is_their_forward() {
        let fixture = FixtureModel::create();
        for tag in [
            "lora",
            "adalora",
            "sora",
            "codyra",
            "dylora",
            "triadaptlora",
            "increlora",
        ] {
            let mut method = serde_json::to_value(MethodConfig::example(tag).unwrap()).unwrap();
            if method.get("dropout").is_some() {
                method["dropout"] = serde_json::json!(0.0);
            }
            let spec = job(&method, 5000);
            let mut model = fixture.load();
            let attached = super::attach_method(&mut model, &spec, Device::Cpu).unwrap();
            tch::manual_seed(7);
            tch::no_grad(|| {
                for (_, mut v) in attached.var_store().variables() {
                    if v.is_floating_point() {
                        v.copy_(&(v.randn_like() * 0.5 + 0.5));
                    }
                }
            });
            let targets: Vec<String> = spec.method.target_modules().to_vec();
            for (path, linear) in model.target_linears(&targets).unwrap() {
                let adapter = linear.take_adapter().expect("an attached branch");
                let branch = adapter
                    .low_rank(true)
                    .unwrap_or_else(|| panic!("{tag} {path}: no low-rank form"));
                let x = Tensor::randn([5, linear.in_features()], (Kind::Float, Device::Cpu));
                let want = adapter.forward(&x, true);
                let got = x
                    .linear::<Tensor>(&branch.a, None)
                    .linear::<Tensor>(&branch.b, None)
                    * branch.scaling;
                let gap = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(
                    scale > 1e-3 && gap <= 1e-5 * scale,
                    "{tag} {path}: {gap} on {scale}"
                );
            }
        }
    }

    /// Settings that depend on the model's shapes, which the spec cannot check at submission,
    /// are the user's error when the method attaches, naming the field: LoRA-GA's `2r`
    /// singular vectors and EVA's `round(r * rho)` components must fit every target layer.
    #[test]
    fn settings_the_model_cannot_take_are_the_users_error_naming_the_field() {
        let fixture = FixtureModel::create();
        let width = fixture.load().target_linears(&["q_proj"]).unwrap()[0]
            .1
            .in_features();
        let cases = [
            (
                serde_json::json!({"type": "loraga", "r": width, "target_modules": ["q_proj"]}),
                "method.r",
            ),
            (
                serde_json::json!({"type": "eva", "r": width, "rho": 2.0, "target_modules": ["q_proj"]}),
                "method.rho",
            ),
        ];
        for (method, field) in cases {
            let spec = job(&method, 50);
            let mut model = fixture.load();
            let err = super::attach_method(&mut model, &spec, Device::Cpu)
                .err()
                .unwrap_or_else(|| panic!("{method} attached"));
            assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
            assert!(err.to_string().starts_with(field), "{method}: {err:#}");
        }
    }

    /// Every method attaches through `target_linears`: a list naming no layer of the model is
    /// the user's error, named, and nothing is attached.
    #[test]
    fn targets_matching_no_layer_are_the_users_error() {
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let err = model
            .target_linears(&["lm_head"])
            .err()
            .expect("no layer matches");
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        assert!(err.to_string().contains("[\"lm_head\"]"), "{err:#}");
        assert_eq!(
            model.target_linears(&["q_proj", "v_proj"]).unwrap().len(),
            4
        );
    }
}
