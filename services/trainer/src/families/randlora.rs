//! The RandLoRA family (`peft_type` `RANDLORA`; PEFT `tuners/randlora/layer.py`): a module's
//! `ΔW` from its scalings `randlora_lambda`, `randlora_gamma` and the shared bases, by the same
//! formula the trainer's `methods::randlora` trains with ([`RandLoraBranch::delta_weight`]).

use super::{DenseUpdate, Update, Updates};
use crate::error::user_error;
use crate::methods::randlora::{num_bases, Bases, RandLoraBranch};
use anyhow::Result;
use loraforge_spec::peft::module_of;
use loraforge_spec::peft::randlora::{
    shared_key, PeftRandLoraConfig, BASIS_A, BASIS_B, GAMMA, LAMBDA,
};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub fn updates(config: &PeftRandLoraConfig, tensors: &[(String, Tensor)]) -> Result<Updates> {
    let find = |key: &str| tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t);
    let (Some(a), Some(b)) = (find(&shared_key(BASIS_A)), find(&shared_key(BASIS_B))) else {
        // PEFT would redraw them from projection_prng_key, sized by the whole model's widths,
        // which a module's weight alone does not give.
        return Err(user_error(
            "this RandLoRA adapter was saved without its bases (save_projection false): \
             loraforge reads them from the adapter",
        ));
    };
    let mut scalings: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in tensors {
        if let Some(module) = module_of(key, LAMBDA) {
            scalings.entry(module.into()).or_default().0 = Some(t.shallow_clone());
        } else if let Some(module) = module_of(key, GAMMA) {
            scalings.entry(module.into()).or_default().1 = Some(t.shallow_clone());
        }
    }
    let mut updates = BTreeMap::new();
    for (module, pair) in scalings {
        let (Some(lambda), Some(gamma)) = pair else {
            return Err(user_error(format!(
                "{module}: randlora_lambda and randlora_gamma come in pairs"
            )));
        };
        let update = RandLoraUpdate {
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            lambda,
            gamma,
            scaling: config.randlora_alpha / f64::from(config.r),
        };
        updates.insert(module, Update::Dense(Box::new(update)));
    }
    Ok(updates)
}

struct RandLoraUpdate {
    a: Tensor,
    b: Tensor,
    lambda: Tensor,
    gamma: Tensor,
    scaling: f64,
}

impl DenseUpdate for RandLoraUpdate {
    fn delta(&self, weight: &Tensor) -> Result<Tensor> {
        let on = |t: &Tensor| t.to_device(weight.device()).to_kind(Kind::Float);
        let (out, inp) = (weight.size()[0], weight.size()[1]);
        let (d, r) = (out.min(inp), self.lambda.size()[0]);
        let n = num_bases(d, r);
        let (a, b) = (self.a.size(), self.b.size());
        let fits = self.lambda.size() == [r, n]
            && self.gamma.size() == [n, d]
            && a.len() == 3
            && a[0] == r
            && a[2] >= d
            && b.len() == 3
            && b[0] >= out.max(inp)
            && b[1] >= n
            && b[2] == r;
        if !fits {
            return Err(user_error(format!(
                "RandLoRA scalings λ {:?}, γ {:?} and bases {a:?}, {b:?} do not fit a {out} x {inp} weight",
                self.lambda.size(),
                self.gamma.size()
            )));
        }
        let bases = Bases {
            a: on(&self.a),
            b: on(&self.b),
        };
        let branch = RandLoraBranch::new(
            &bases,
            (out, inp),
            on(&self.lambda),
            on(&self.gamma),
            self.scaling,
            0.0,
        );
        Ok(tch::no_grad(|| branch.delta_weight()))
    }
}
