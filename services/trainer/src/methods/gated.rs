//! What the gated-rank methods (SoRA, CoDyRA) share: a branch
//! `y = W x + ((dropout(x) Aᵀ) ⊙ g) Bᵀ · s` with a gate `g (1, r)` per module, initialised as
//! both references do, the ranks its non-zero gates leave, and the export that drops the
//! ranks whose gate is exactly zero.

use super::{kaiming_uniform, module_path, per_module_lora, select, ExportedFactors};
use crate::export::PeftAdapter;
use crate::method::RankAllocation;
use crate::model::llama::LowRank;
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The gate's variable name under its module's path.
pub const GATE: &str = "gate";

struct GatedBranch {
    a: Tensor,
    gate: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: f64,
}

impl LinearAdapter for GatedBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let h = x32.linear::<Tensor>(&self.a, None) * &self.gate;
        (h.linear::<Tensor>(&self.b, None) * self.scaling).to_kind(x.kind())
    }

    /// The gate folded into `A`'s rows, `A ⊙ gᵀ`, and `B`: a low-rank branch whose gate still
    /// gets its gradient (and SoRA's proximal step its value).
    fn low_rank(&self, train: bool) -> Option<LowRank> {
        (!train || self.dropout == 0.0).then(|| {
            LowRank::derived(train, self.scaling, || {
                (&self.a * self.gate.view([-1, 1]), self.b.shallow_clone())
            })
        })
    }
}

/// One adapted module's factors and gate (variables of the method's store).
pub struct GatedModule {
    pub module_path: String,
    pub a: Tensor,
    pub b: Tensor,
    pub gate: Tensor,
}

/// Adds `lora_A` (Kaiming-uniform), `lora_B = 0` and `gate ~ N(0, 1)` under every target
/// module's path in `store` and attaches the branch, scaled by `scaling`.
pub fn attach_gated(
    model: &mut LlamaModel,
    store: &VarStore,
    target_modules: &[String],
    r: u32,
    scaling: f64,
    dropout: f64,
) -> Result<Vec<GatedModule>> {
    let r = i64::from(r);
    let device = store.device();
    let mut modules = Vec::new();
    for (path_name, linear) in model.target_linears(target_modules)? {
        let (inp, out) = (linear.in_features(), linear.out_features());
        let path = module_path(store, &path_name);
        let opts = (Kind::Float, device);
        let a = path.add("lora_A", kaiming_uniform(r, inp, device), true);
        let b = path.add("lora_B", Tensor::zeros([out, r], opts), true);
        let gate = path.add(GATE, Tensor::randn([1, r], opts), true);
        linear.attach(Box::new(GatedBranch {
            a: a.shallow_clone(),
            gate: gate.shallow_clone(),
            b: b.shallow_clone(),
            scaling,
            dropout,
        }));
        modules.push(GatedModule {
            module_path: path_name,
            a,
            b,
            gate,
        });
    }
    Ok(modules)
}

/// Per module, the ranks whose gate is not exactly zero; and the fraction of all gates at zero.
/// The loop asks every step: one count over all gates (every gate is `(1, r)` with the same
/// `r`) and one copy to the host.
pub fn gate_allocation(modules: &[GatedModule]) -> RankAllocation {
    let gates: Vec<&Tensor> = modules.iter().map(|m| &m.gate).collect();
    let open =
        Tensor::cat(&gates, 0)
            .ne(0.0)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
    let open = Vec::<i64>::try_from(&open).expect("one count per module");
    let per_module: BTreeMap<String, u32> = modules
        .iter()
        .zip(open)
        .map(|(m, n)| (m.module_path.clone(), n as u32))
        .collect();
    let total_gates: i64 = modules.iter().map(|m| m.gate.numel() as i64).sum();
    let open: u32 = per_module.values().sum();
    RankAllocation {
        per_module,
        budget: None,
        sparsity: Some(1.0 - f64::from(open) / total_gates as f64),
    }
}

/// The published LoRA: zero-gated ranks removed, `A' = g_kept ⊙ A_kept`,
/// `B' = B_kept · scaling`; a module with no rank left is left out.
pub fn export_gated(
    modules: &[GatedModule],
    scaling: f64,
    target_modules: &[String],
    dropout: f64,
    base_model_uri: &str,
) -> PeftAdapter {
    let factors = modules
        .iter()
        .map(|m| {
            let keep = m.gate.view([-1]).ne(0.0);
            ExportedFactors {
                module_path: m.module_path.clone(),
                a: select(&(&m.a * m.gate.view([-1, 1])), 0, &keep),
                b: select(&m.b, 1, &keep) * scaling,
            }
        })
        .collect();
    per_module_lora(factors, target_modules, dropout, base_model_uri)
}

/// The references' proximal step on a gate, `g[g>κ]-=κ; g[g<-κ]+=κ; g[|g|<κ]=0`, the three
/// in-place statements run in order as written: the last one sees the already shrunk values,
/// so a gate with κ < |g| < 2κ ends at 0, and one at exactly ±κ is left as it is.
pub fn sequential_soft_threshold(g: &Tensor, kappa: f64) -> Tensor {
    let g = (g - kappa).where_self(&g.gt(kappa), g);
    let g = (&g + kappa).where_self(&g.lt(-kappa), &g);
    g.zeros_like().where_self(&g.abs().lt(kappa), &g)
}
