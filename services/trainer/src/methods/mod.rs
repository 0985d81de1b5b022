//! The adaptive-rank adapter methods (specifications in DESIGN.md's `methods.md`), and what
//! they share: every one publishes a plain PEFT LoRA whose ranks differ per module.

pub mod adalora;
pub mod codyra;
pub mod dylora;
pub mod gated;
pub mod increlora;
pub mod rank_adam;
pub mod sora;
pub mod triadaptlora;

use crate::error::user_error;
use crate::export::PeftAdapter;
use anyhow::Result;
use loraforge_spec::peft::{lora_key, PeftLoraConfig};
use std::collections::BTreeMap;
use tch::nn::{Path, VarStore};
use tch::{Device, Kind, Tensor};

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
    PeftAdapter { config, tensors }
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

/// `||A Aᵀ − I||_F` and `||Bᵀ B − I||_F` over the ranks marked in `live (K, 1)`, for factors
/// `a (K, in)`, `b (out, K)` that are zero outside them: the norms of the live sub-matrices,
/// un-squared as the references compute them (for methods whose ranks grow).
pub fn orthogonality(a: &Tensor, b: &Tensor, live: &Tensor) -> [Tensor; 2] {
    let eye = Tensor::eye(live.size()[0], (Kind::Float, live.device())) * live;
    [
        (a.matmul(&a.tr()) - &eye).norm(),
        (b.tr().matmul(b) - eye).norm(),
    ]
}

/// Selects rows `keep` (a bool mask) of `t` along `dim`.
pub fn select(t: &Tensor, dim: i64, keep: &Tensor) -> Tensor {
    t.index_select(dim, &keep.nonzero().view([-1]))
}

#[cfg(test)]
pub mod testing {
    //! The fixture model, loaded as many times as a test needs, and its logits.

    use crate::model::LlamaModel;
    use crate::model::ModelConfig;
    use tch::{Device, Kind, Tensor};

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
