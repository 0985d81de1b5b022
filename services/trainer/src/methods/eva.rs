//! EVA, Explained Variance Adaptation (Paischer et al., 2024, arXiv 2410.07170, section 3),
//! as PEFT implements it (`peft/tuners/lora/eva.py`, `peft/utils/incremental_pca.py`; the
//! paper's reference implementation).
//!
//! Before the first step, the first training batches run through the base model and each
//! target layer's inputs `X (tokens, in)` (only the positions whose token is a training target,
//! with `use_label_mask`) feed an incremental PCA, batch after batch, cycling through the
//! batches until every layer's components have settled: each of the components the layer needs
//! has cosine similarity at least `tau` with the previous batch's. A settled layer takes no
//! more batches unless the redistribution below gives it more components than have settled.
//! Layers that see the same inputs (the query and value projections of one block) share one
//! PCA, as PEFT detects by hashing the first batch's inputs.
//!
//! Ranks are redistributed by explained variance: every layer offers the explained-variance
//! ratios of its first `round(r * rho)` components, and the `r × layers` largest over all layers
//! are kept; a layer's rank is the number of its own that were (0 drops the layer). `A` is the
//! layer's first `rank` components (right-singular vectors of the centred inputs), each divided
//! by the square root of its singular value with `whiten`; `B = 0`. With
//! `adjust_scaling_factors` a layer's alpha becomes `alpha * rank / r`, so every layer keeps the
//! scale `alpha / r`; without, its scale is `alpha / rank`.
//!
//! The incremental PCA is sklearn's `IncrementalPCA` as PEFT ports it: the running mean and
//! variance in fp64, each batch centred and stacked under the previous components (scaled by
//! their singular values) and a mean-correction row, then a randomized SVD (Halko et al. 2009,
//! algorithm 5.1: `q = 2 × components`, 4 subspace iterations, libtorch's generator seeded 42
//! for every call, as PEFT's `lowrank_seed`) with the sign convention of `svd_flip`. The same
//! libtorch operations in the same order give PEFT's numbers, so the components agree with
//! PEFT's on the same batches (tests/tests/parity.rs).

use super::{module_path, per_module_lora, refuse_parent, Attach, AttachContext, ExportedFactors};
use crate::calibration::Calibration;
use crate::data::{Batch, IGNORE_INDEX};
use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::method::{AdapterMethod, RankAllocation};
use crate::model::{LinearAdapter, LlamaModel};
use anyhow::Result;
use loraforge_spec::methods::EvaConfig;
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// PEFT's `IncrementalPCA(lowrank=True, lowrank_seed=42)` settings.
const LOWRANK_NITER: i64 = 4;
const LOWRANK_SEED: i64 = 42;

/// The randomized SVD of `a (m, n)` with a `q`-column basis and `niter` subspace iterations
/// (torch's `svd_lowrank`, which PEFT's PCA calls): `(U (m, k), S (k), V (n, k))`. The
/// Gaussian test matrix is drawn from libtorch's generator as it stands.
pub fn svd_lowrank(a: &Tensor, q: i64, niter: i64) -> (Tensor, Tensor, Tensor) {
    let [m, n] = a.size()[..] else {
        panic!("svd_lowrank of a matrix, got {:?}", a.size())
    };
    let a = if m < n { a.tr() } else { a.shallow_clone() };
    // In `a`'s dtype, as torch draws it: the passes after the first are fp64.
    let r = Tensor::randn([a.size()[1], q], (a.kind(), a.device()));
    let basis = |x: Tensor| Tensor::linalg_qr(&x, "reduced").0;
    let mut basis_q = basis(a.matmul(&r));
    for _ in 0..niter {
        basis_q = basis(a.tr().matmul(&basis_q));
        basis_q = basis(a.matmul(&basis_q));
    }
    let b = basis_q.tr().matmul(&a);
    // `torch.svd` (V, not Vᵀ; `linalg_svd(full_matrices=False)` underneath): tch's
    // `linalg_svd` always passes a driver, which only CUDA accepts.
    let (u, s, v) = b.svd(true, true);
    let u = basis_q.matmul(&u);
    if m < n {
        (v, s, u)
    } else {
        (u, s, v)
    }
}

/// The running state of an incremental PCA after at least one batch.
pub struct PcaState {
    /// Rows: the principal axes, `(n_components, features)`.
    pub components: Tensor,
    pub singular_values: Tensor,
    pub explained_variance_ratio: Tensor,
    mean: Tensor,
    var: Tensor,
    /// Samples seen, an int64 tensor of shape `[1]` as PEFT keeps it (dtype promotion follows).
    seen: Tensor,
}

/// sklearn's incremental PCA as PEFT ports it (`peft/utils/incremental_pca.py`), in its
/// randomized-SVD mode.
pub struct IncrementalPca {
    pub n_components: i64,
    pub state: Option<PcaState>,
}

impl IncrementalPca {
    pub fn new(n_components: i64) -> IncrementalPca {
        IncrementalPca {
            n_components,
            state: None,
        }
    }

    /// Folds the batch `x (samples, features)` in.
    pub fn partial_fit(&mut self, x: &Tensor) {
        let x = match x.kind() {
            Kind::Float | Kind::Double => x.copy(),
            _ => x.to_kind(Kind::Float),
        };
        let samples = x.size()[0];
        let (mean, var, total) = incremental_mean_and_var(&x, self.state.as_ref());
        let stacked = match &self.state {
            None => {
                // In place: the batch keeps its dtype, as PEFT's `X -= col_mean`.
                let mut x = x;
                let _ = x.g_sub_(&mean);
                x
            }
            Some(prev) => {
                let batch_mean = x.mean_dim(0, false, None);
                let centred = &x - &batch_mean;
                let factor = (prev.seen.to_kind(Kind::Double) / &total * samples as f64).sqrt();
                let correction = factor * (&prev.mean - &batch_mean);
                Tensor::vstack(&[
                    prev.singular_values.view([-1, 1]) * &prev.components,
                    centred,
                    correction.view([1, -1]),
                ])
            }
        };
        let (_u, s, v) = {
            let _seeded = SeededRng::new();
            svd_lowrank(&stacked, 2 * self.n_components, LOWRANK_NITER)
        };
        let vt = flip_signs(&v.tr());
        let k = self.n_components.min(s.size()[0]);
        let ratio = s.square() / (&var * &total).sum(None);
        self.state = Some(PcaState {
            components: vt.narrow(0, 0, k),
            singular_values: s.narrow(0, 0, k),
            explained_variance_ratio: ratio.narrow(0, 0, k),
            mean,
            var,
            seen: total,
        });
    }
}

/// libtorch's generator seeded as PEFT seeds it for each randomized SVD. PEFT forks the
/// generator around the call; libtorch's state is not exposed through tch, and nothing after
/// the data pass draws from it unseeded (every micro-batch reseeds its dropout).
struct SeededRng;

impl SeededRng {
    fn new() -> SeededRng {
        tch::manual_seed(LOWRANK_SEED);
        SeededRng
    }
}

/// The updated mean, variance (fp64) and sample count after the batch `x`
/// (sklearn's `_incremental_mean_and_var`, as PEFT ports it).
fn incremental_mean_and_var(x: &Tensor, prev: Option<&PcaState>) -> (Tensor, Tensor, Tensor) {
    let samples = x.size()[0];
    let new_count = Tensor::from_slice(&[samples]).to_device(x.device());
    let last_count = match prev {
        Some(p) => p.seen.shallow_clone(),
        None => Tensor::from_slice(&[0i64]).to_device(x.device()),
    };
    let total = &last_count + &new_count;
    let last_sum = match prev {
        Some(p) => &p.mean * &last_count,
        None => Tensor::zeros([x.size()[1]], (Kind::Double, x.device())),
    };
    let new_sum = x.sum_dim_intlist(0, false, Kind::Double);
    let mean = (&last_sum + &new_sum) / &total;
    let batch_mean = &new_sum / &new_count;
    let mut temp = x - &batch_mean;
    let correction = temp.sum_dim_intlist(0, false, Kind::Double).square();
    let _ = temp.square_();
    let new_unnormalized = temp.sum_dim_intlist(0, false, Kind::Double) - correction / &new_count;
    let var = match prev {
        None => new_unnormalized / &total,
        Some(p) => {
            let last_unnormalized = &p.var * &last_count;
            let last_over_new = last_count.to_kind(Kind::Double) / &new_count;
            let between = (&last_sum / &last_over_new - &new_sum).square();
            (last_unnormalized + new_unnormalized + &last_over_new / &total * between) / &total
        }
    };
    (mean, var, total)
}

/// sklearn's `svd_flip` decided by the rows of `vt`: each row's largest-magnitude entry made
/// positive (only the right-singular vectors are kept, so `u` is not flipped).
fn flip_signs(vt: &Tensor) -> Tensor {
    let largest = vt.abs().argmax(1, true);
    let signs = vt.gather(1, &largest, false).sign();
    vt * signs
}

/// The data pass's bookkeeping over the target layers, in the model's order (PEFT's
/// `_get_eva_state_dict` loop): which layers still take inputs, their PCAs, and the current
/// rank distribution.
pub struct EvaPass {
    layers: Vec<String>,
    /// For each layer, the layer whose PCA it uses (itself, or the first with equal inputs).
    source: Vec<usize>,
    pca: Vec<Option<LayerPca>>,
    /// Each layer's rank under the current distribution.
    ranks: Vec<i64>,
    max_components: i64,
    budget: i64,
    tau: f64,
    /// Settled layers (PEFT's `convergence_dict`), for layers with a PCA of their own.
    settled: Vec<bool>,
}

struct LayerPca {
    pca: IncrementalPca,
    /// Per component: whether it moved less than `tau` over the last batch.
    converged: Tensor,
}

impl EvaPass {
    /// `first` are the layers' inputs on the first batch: layers with equal inputs share a PCA.
    pub fn new(
        layers: Vec<String>,
        first: &[Tensor],
        r: i64,
        max_components: i64,
        tau: f64,
    ) -> EvaPass {
        let source: Vec<usize> = (0..layers.len())
            .map(|i| {
                (0..i)
                    .find(|&j| first[j].size() == first[i].size() && first[j].equal(&first[i]))
                    .unwrap_or(i)
            })
            .collect();
        let pca = source
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                (s == i).then(|| LayerPca {
                    pca: IncrementalPca::new(max_components),
                    converged: Tensor::zeros([max_components], (Kind::Bool, Device::Cpu)),
                })
            })
            .collect();
        let n = layers.len();
        EvaPass {
            layers,
            source,
            pca,
            ranks: vec![max_components; n],
            max_components,
            budget: r * n as i64,
            tau,
            settled: vec![false; n],
        }
    }

    /// Before a forward pass: updates which layers have settled (all the components their
    /// current rank needs); true once every layer has.
    pub fn settled(&mut self) -> bool {
        for (i, layer) in self.pca.iter().enumerate() {
            if let Some(layer) = layer {
                let needed = self.ranks[i].min(layer.converged.size()[0]);
                self.settled[i] = layer.converged.narrow(0, 0, needed).all().int64_value(&[]) != 0;
            }
        }
        (0..self.layers.len()).all(|i| self.pca[i].is_none() || self.settled[i])
    }

    /// Whether layer `i`'s inputs feed this pass (a layer with a PCA of its own, not settled).
    pub fn wants(&self, i: usize) -> bool {
        self.pca[i].is_some() && !self.settled[i]
    }

    /// One forward pass's inputs, `(tokens, in)` for every layer that [`EvaPass::wants`] them
    /// (`None` for the others). A layer with fewer tokens than components skips the batch.
    pub fn feed(&mut self, inputs: &[Option<Tensor>]) {
        for (i, input) in inputs.iter().enumerate() {
            let (Some(x), true) = (input, self.wants(i)) else {
                continue;
            };
            let Some(layer) = self.pca[i].as_mut() else {
                continue;
            };
            if x.size()[0] < layer.pca.n_components {
                continue;
            }
            let previous = layer.pca.state.as_ref().map(|s| s.components.copy());
            layer.pca.partial_fit(x);
            if let (Some(previous), Some(state)) = (previous, &layer.pca.state) {
                layer.converged = Tensor::cosine_similarity(&state.components, &previous, 1, 1e-8)
                    .ge(self.tau)
                    .to_device(Device::Cpu);
            }
        }
        if self
            .pca
            .iter()
            .flatten()
            .all(|layer| layer.pca.state.is_some())
        {
            self.ranks = self.distribution();
        }
    }

    /// The ranks by explained variance: each layer offers the ratios of its first
    /// `max_components` components (a layer sharing a PCA offers the same ones), and the
    /// `budget` largest are kept. Layers are listed as PEFT lists them (those with a PCA of
    /// their own first), and where a layer sharing another's PCA got more ranks than that one,
    /// the two swap, as PEFT does.
    fn distribution(&self) -> Vec<i64> {
        let owners = (0..self.layers.len()).filter(|&i| self.source[i] == i);
        let sharers = (0..self.layers.len()).filter(|&i| self.source[i] != i);
        let order: Vec<usize> = owners.chain(sharers).collect();
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for &i in &order {
            let state = self.pca[self.source[i]]
                .as_ref()
                .and_then(|l| l.pca.state.as_ref())
                .expect("every PCA has seen a batch");
            let ratios = &state.explained_variance_ratio;
            let k = self.max_components.min(ratios.size()[0]);
            keys.extend(std::iter::repeat_n(i, k as usize));
            values.push(ratios.narrow(0, 0, k).to_kind(Kind::Double));
        }
        let sorted = Tensor::cat(&values, 0).argsort(0, true);
        let kept = sorted.narrow(0, 0, self.budget.min(sorted.size()[0]));
        let mut ranks = vec![0i64; self.layers.len()];
        for idx in Vec::<i64>::try_from(&kept.to_device(Device::Cpu)).expect("indices") {
            ranks[keys[idx as usize]] += 1;
        }
        for i in (0..self.layers.len()).filter(|&i| self.source[i] != i) {
            let owner = self.source[i];
            if ranks[owner] < ranks[i] {
                ranks.swap(owner, i);
            }
        }
        ranks
    }

    /// Each layer's rank.
    pub fn ranks(&self) -> &[i64] {
        &self.ranks
    }

    /// Each layer's `A (rank, in)`: its PCA's first `rank` components, each divided by the
    /// square root of its singular value with `whiten`.
    pub fn factors(&self, whiten: bool) -> Vec<Tensor> {
        (0..self.layers.len())
            .map(|i| {
                let state = self.pca[self.source[i]]
                    .as_ref()
                    .and_then(|l| l.pca.state.as_ref())
                    .expect("every PCA has seen a batch");
                let a = state.components.narrow(0, 0, self.ranks[i]);
                match whiten {
                    true => {
                        &a / state
                            .singular_values
                            .narrow(0, 0, self.ranks[i])
                            .sqrt()
                            .view([-1, 1])
                    }
                    false => a.copy(),
                }
            })
            .collect()
    }
}

/// The low-rank branch of one layer: `dropout(x) Aᵀ Bᵀ · scale` with `A (round(r·rho), in)` and
/// `B (out, round(r·rho))`, of which the first `rank` rows of `A` and columns of `B` are live.
/// The rest are zero and stay zero (their gradients are exactly zero: each is multiplied by
/// the other's zeros), so the branch is the rank-`rank` LoRA; the shapes are fixed before the
/// data pass, so a checkpoint restores into them.
struct EvaBranch {
    a: Tensor,
    b: Tensor,
    /// The branch's scale, a store variable so that a checkpoint restores it.
    scale: Tensor,
    dropout: f64,
}

impl LinearAdapter for EvaBranch {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x32 = x.to_kind(Kind::Float).dropout(self.dropout, train);
        let delta = x32
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * &self.scale;
        delta.to_kind(x.kind())
    }

    /// As LoRA's: `B` accumulates into the base output, in the base's dtype.
    fn add_to(&self, mut y: Tensor, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        if y.kind() != kind || !matches!(kind, Kind::Float | Kind::BFloat16) {
            return y + self.forward(x, train);
        }
        let h = x
            .dropout(self.dropout, train)
            .linear::<Tensor>(&self.a.to_kind(kind), None)
            * self.scale.to_kind(kind);
        y.addmm_(&h, &self.b.to_kind(kind).tr())
    }
}

/// One adapted layer's variables.
struct EvaFactors {
    module_path: String,
    a: Tensor,
    b: Tensor,
    /// The layer's rank after redistribution (a float scalar, non-trainable).
    rank: Tensor,
    scale: Tensor,
}

impl EvaFactors {
    fn rank(&self) -> i64 {
        self.rank.double_value(&[]).round() as i64
    }
}

/// EVA attached to every target layer; its factors initialised by [`AdapterMethod::calibrate`].
pub struct Eva {
    config: EvaConfig,
    store: VarStore,
    factors: Vec<EvaFactors>,
}

impl Attach for Eva {
    type Config = EvaConfig;

    /// Zero factors of `round(r * rho)` ranks on every target layer (rank 0 until the data
    /// pass sets them).
    fn attach(model: &mut LlamaModel, config: &Self::Config, ctx: &AttachContext) -> Result<Self> {
        let device = ctx.device;
        let store = VarStore::new(device);
        let width = i64::from(config.max_components());
        let mut factors = Vec::new();
        for (path, linear) in model.target_linears(&config.target_modules)? {
            let (inp, out) = (linear.in_features(), linear.out_features());
            if width > inp {
                return Err(user_error(format!(
                    "method.rho: round(r * rho) = {width} components exceed the {inp} input \
                     features of {path}"
                )));
            }
            let vars = module_path(&store, &path);
            let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, device));
            let a = vars.add("lora_A", zeros(&[width, inp]), true);
            let b = vars.add("lora_B", zeros(&[out, width]), true);
            let rank = vars.add("eva_rank", zeros(&[]), false);
            let scale = vars.add("eva_scale", zeros(&[]), false);
            linear.attach(Box::new(EvaBranch {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                scale: scale.shallow_clone(),
                dropout: config.dropout,
            }));
            factors.push(EvaFactors {
                module_path: path,
                a,
                b,
                rank,
                scale,
            });
        }
        Ok(Eva {
            config: config.clone(),
            store,
            factors,
        })
    }
}

/// The positions of `batch` whose layer inputs feed the SVD, as indices into its flattened
/// `(rows × seq)` positions, in row-major order (PEFT's `mask.nonzero()`). With the label mask,
/// the positions whose token is a training target: PEFT's `labels != -100` on labels in
/// transformers' layout (`labels[t]` the token at `t`), which is ours (`labels[t]` the token
/// after `t`) moved one position on. Without it, every position of a row up to the token its
/// last target predicts (PEFT's attention mask; batches are right-padded and the encoder ends
/// every example on a target).
pub fn svd_positions(batch: &Batch, use_label_mask: bool) -> Tensor {
    let labels = batch.labels.to_device(Device::Cpu);
    let [rows, seq] = labels.size()[..] else {
        panic!("labels are (rows, seq)")
    };
    let target = labels.ne(IGNORE_INDEX);
    let keep = if use_label_mask {
        Tensor::cat(
            &[
                Tensor::zeros([rows, 1], (Kind::Bool, Device::Cpu)),
                target.narrow(1, 0, seq - 1),
            ],
            1,
        )
    } else {
        // Position t is kept when some target sits at t - 1 or later: the reversed cumulative
        // "any" over the targets, moved one position on.
        let later = target
            .flip([1])
            .to_kind(Kind::Int64)
            .cumsum(1, Kind::Int64)
            .flip([1])
            .gt(0);
        Tensor::cat(&[later.narrow(1, 0, 1), later.narrow(1, 0, seq - 1)], 1)
    };
    keep.reshape([-1])
        .nonzero()
        .view([-1])
        .to_device(batch.labels.device())
}

impl Eva {
    /// The layers' SVD inputs for `batch`: each recorded input `(rows, seq, in)` at
    /// `positions`, in fp32.
    fn masked(inputs: Vec<Tensor>, positions: &Tensor) -> Vec<Tensor> {
        inputs
            .into_iter()
            .map(|x| {
                let features = x.size()[x.dim() - 1];
                x.reshape([-1, features])
                    .index_select(0, positions)
                    .to_kind(Kind::Float)
            })
            .collect()
    }

    /// The data pass (PEFT's `get_eva_state_dict`): the first `calibration_batches` batches of
    /// `batch_size` rows, cycled until every layer has settled, then `A`, the ranks and scales.
    fn data_pass(&mut self, calibration: &mut Calibration) -> Result<()> {
        let config = &self.config;
        let rows = calibration.training().batch_size as usize;
        let mut batches = Vec::new();
        while batches.len() < config.calibration_batches as usize {
            match calibration.next_batch(rows)? {
                Some(batch) => batches.push(batch),
                None => break,
            }
        }
        if batches.is_empty() {
            return Err(user_error("EVA's data pass found no training rows"));
        }
        let positions: Vec<Tensor> = batches
            .iter()
            .map(|b| svd_positions(b, config.use_label_mask))
            .collect();
        let paths: Vec<String> = self.factors.iter().map(|f| f.module_path.clone()).collect();
        let first = Self::masked(
            calibration.linear_inputs(&paths, &batches[0])?,
            &positions[0],
        );
        let width = i64::from(config.max_components());
        let mut pass = EvaPass::new(
            paths.clone(),
            &first,
            i64::from(config.r),
            width,
            config.tau,
        );
        let mut passes = 0u32;
        for k in (0..batches.len()).cycle() {
            if pass.settled() {
                break;
            }
            if passes == config.max_calibration_passes {
                return Err(user_error(format!(
                    "EVA's components did not settle within method.max_calibration_passes = {} \
                     forward passes over {} batches (method.tau = {}): raise either, or \
                     method.calibration_batches",
                    config.max_calibration_passes,
                    batches.len(),
                    config.tau
                )));
            }
            let wanted: Vec<usize> = (0..paths.len()).filter(|&i| pass.wants(i)).collect();
            let wanted_paths: Vec<String> = wanted.iter().map(|&i| paths[i].clone()).collect();
            let inputs = Self::masked(
                calibration.linear_inputs(&wanted_paths, &batches[k])?,
                &positions[k],
            );
            let mut fed: Vec<Option<Tensor>> = (0..paths.len()).map(|_| None).collect();
            for (i, x) in wanted.into_iter().zip(inputs) {
                fed[i] = Some(x);
            }
            pass.feed(&fed);
            passes += 1;
        }
        let (r, alpha) = (f64::from(config.r), config.alpha);
        let initial = pass.factors(config.whiten);
        tch::no_grad(|| {
            for ((factors, a), &rank) in self.factors.iter_mut().zip(&initial).zip(pass.ranks()) {
                factors
                    .a
                    .narrow(0, 0, rank)
                    .copy_(&a.to_device(factors.a.device()));
                let _ = factors.rank.fill_(rank as f64);
                // PEFT: alpha * rank / r over rank (adjusted), else alpha over rank; a layer
                // keeping r ranks has alpha / r either way.
                let scale = match (config.adjust_scaling_factors, rank) {
                    (_, 0) => 0.0,
                    (true, _) => alpha / r,
                    (false, rank) => alpha / rank as f64,
                };
                let _ = factors.scale.fill_(scale);
            }
        });
        let ranks: Vec<String> = self
            .factors
            .iter()
            .map(|f| format!("{} {}", f.module_path, f.rank()))
            .collect();
        calibration.log(format!(
            "EVA: components settled after {passes} forward passes over {} batches; ranks: {}",
            batches.len(),
            ranks.join(", ")
        ));
        Ok(())
    }
}

impl AdapterMethod for Eva {
    fn var_store(&self) -> &VarStore {
        &self.store
    }

    fn calibrate(&mut self, calibration: &mut Calibration) -> Result<()> {
        self.data_pass(calibration)
    }

    fn rank_allocation(&self) -> Option<RankAllocation> {
        Some(RankAllocation {
            per_module: self
                .factors
                .iter()
                .map(|f| (f.module_path.clone(), f.rank() as u32))
                .collect::<BTreeMap<_, _>>(),
            budget: Some(self.config.r * self.factors.len() as u32),
            sparsity: None,
        })
    }

    /// A plain PEFT LoRA, a rank per module: `A` the live rows, the scale folded into `B`;
    /// modules of rank 0 left out.
    fn export(&self, base_model_uri: &str) -> PeftAdapter {
        let modules = self
            .factors
            .iter()
            .map(|f| {
                let rank = f.rank();
                ExportedFactors {
                    module_path: f.module_path.clone(),
                    a: f.a.narrow(0, 0, rank).detach(),
                    b: f.b.narrow(1, 0, rank).detach() * &f.scale,
                }
            })
            .collect();
        per_module_lora(
            modules,
            &self.config.target_modules,
            self.config.dropout,
            base_model_uri,
        )
    }

    /// EVA's start is its data pass; a published adapter has neither its components nor
    /// the unused ranks.
    fn start_from(&mut self, _parent: &PeftAdapter) -> Result<()> {
        refuse_parent("eva")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::seeds::torch_rng_turn;

    /// PEFT's own `IncrementalPCA` (lowrank, seed 42) over the same batches, in the venv's
    /// Python: per batch its components, singular values and explained-variance ratios.
    const PEFT_IPCA: &str = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from peft.utils.incremental_pca import IncrementalPCA
batches = load_file(sys.argv[1])
n = int(sys.argv[3])
pca = IncrementalPCA(n_components=n, copy=True, lowrank=True, lowrank_seed=42)
out = {}
for k in range(len(batches)):
    pca.partial_fit(batches[f"batch{k}"].to(torch.float32))
    out[f"components{k}"] = pca.components_.double().contiguous()
    out[f"singular{k}"] = pca.singular_values_.double().contiguous()
    out[f"ratio{k}"] = pca.explained_variance_ratio_.double().contiguous()
save_file(out, sys.argv[2])
"#;

    fn python() -> String {
        std::env::var("LORAFORGE_PYTHON").unwrap_or_else(|_| "python3".into())
    }

    /// Batches with a decaying spectrum and a mean, so components are well separated.
    fn batches(sizes: &[i64], features: i64) -> Vec<Tensor> {
        let spectrum = Tensor::arange(features, (Kind::Float, Device::Cpu))
            .neg()
            .g_mul_scalar(0.3)
            .exp();
        sizes
            .iter()
            .map(|&n| Tensor::randn([n, features], (Kind::Float, Device::Cpu)) * &spectrum + 0.5)
            .collect()
    }

    fn peft_ipca(batches: &[Tensor], n_components: i64) -> Vec<(Tensor, Tensor, Tensor)> {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (
            dir.path().join("in.safetensors"),
            dir.path().join("out.safetensors"),
        );
        let named: Vec<(String, Tensor)> = batches
            .iter()
            .enumerate()
            .map(|(k, t)| (format!("batch{k}"), t.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&named, &input).unwrap();
        let run = std::process::Command::new(python())
            .args(["-c", PEFT_IPCA])
            .arg(&input)
            .arg(&output)
            .arg(n_components.to_string())
            .output()
            .expect("running the venv's Python");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out: BTreeMap<String, Tensor> = Tensor::read_safetensors(&output)
            .unwrap()
            .into_iter()
            .collect();
        (0..batches.len())
            .map(|k| {
                let get = |name: &str| out[&format!("{name}{k}")].shallow_clone();
                (get("components"), get("singular"), get("ratio"))
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    }

    /// Our incremental PCA gives PEFT's, batch after batch: the same components (signs
    /// included: both flip by the largest entry), singular values and explained-variance
    /// ratios. Both a tall first batch and wide ones (fewer samples than features, where the
    /// randomized SVD works on the transpose).
    #[test]
    fn incremental_pca_matches_peft() {
        let _turn = torch_rng_turn();
        for (sizes, features, n) in [
            (vec![40i64, 40, 33, 40], 24i64, 6i64),
            (vec![20, 17, 25], 48, 8),
        ] {
            tch::manual_seed(3);
            let data = batches(&sizes, features);
            let expected = peft_ipca(&data, n);
            let mut pca = IncrementalPca::new(n);
            for (k, (x, (components, singular, ratio))) in data.iter().zip(&expected).enumerate() {
                pca.partial_fit(x);
                let state = pca.state.as_ref().unwrap();
                let scale = singular.max().double_value(&[]);
                let what = format!("{features} features, batch {k}");
                assert_eq!(state.components.size(), components.size(), "{what}");
                assert!(
                    max_diff(&state.components, components) < 1e-5,
                    "{what}: components"
                );
                assert!(
                    max_diff(&state.singular_values, singular) < 1e-5 * scale,
                    "{what}: singular values"
                );
                assert!(
                    max_diff(&state.explained_variance_ratio, ratio) < 1e-6,
                    "{what}: ratios"
                );
            }
        }
    }

    /// The randomized SVD recovers an exactly low-rank matrix's singular values, tall or wide.
    #[test]
    fn svd_lowrank_recovers_a_low_rank_matrix() {
        let _turn = torch_rng_turn();
        tch::manual_seed(5);
        let opts = (Kind::Double, Device::Cpu);
        for (m, n) in [(30, 12), (12, 30)] {
            let a = Tensor::randn([m, 4], opts).matmul(&Tensor::randn([4, n], opts));
            let (u, s, v) = svd_lowrank(&a, 8, 4);
            let exact = a.svd(true, false).1.narrow(0, 0, 4);
            assert!(max_diff(&s.narrow(0, 0, 4), &exact) < 1e-9, "{m}x{n}");
            let rebuilt = (u * &s).matmul(&v.tr());
            assert!(max_diff(&rebuilt, &a) < 1e-9, "{m}x{n}");
        }
    }

    /// Rank redistribution: the budget goes to the largest explained-variance ratios; rho 1
    /// gives every layer r; a layer sharing another's inputs shares its PCA, never ends above
    /// it, and the two split the ratios they both offer.
    #[test]
    fn ranks_follow_explained_variance() {
        let _turn = torch_rng_turn();
        tch::manual_seed(11);
        let features = 16;
        let opts = (Kind::Float, Device::Cpu);
        // Layer 0: most variance in few directions (ratios about 0.45, 0.25, 0.14, 0.08);
        // layer 2: spread evenly (each about 1/16); layer 1 = layer 0. The budget of 6 goes
        // 3 and 3 to layers 0 and 1, none to layer 2.
        let steep = Tensor::arange(features, opts).g_mul_scalar(-0.3).exp();
        let x0 = Tensor::randn([256, features], opts) * &steep;
        let x2 = Tensor::randn([256, features], opts);
        let layers = vec!["l0.q".to_string(), "l0.v".to_string(), "l1.q".to_string()];
        let first = [x0.shallow_clone(), x0.shallow_clone(), x2.shallow_clone()];
        let mut pass = EvaPass::new(layers.clone(), &first, 2, 4, 0.0);
        assert!(!pass.settled());
        assert!(pass.wants(0) && !pass.wants(1) && pass.wants(2));
        for _ in 0..2 {
            pass.feed(&[Some(x0.shallow_clone()), None, Some(x2.shallow_clone())]);
        }
        assert!(pass.settled());
        let ranks = pass.ranks().to_vec();
        assert_eq!(ranks, [3, 3, 0]);
        let a = pass.factors(false);
        for (i, a) in a.iter().enumerate() {
            assert_eq!(a.size(), [ranks[i], features]);
        }
        // Orthonormal rows; the shared layers' rows are the same components.
        let gram = a[0].matmul(&a[0].tr());
        assert!(max_diff(&gram, &Tensor::eye(ranks[0], (Kind::Double, Device::Cpu))) < 1e-6);
        assert!(max_diff(&a[1], &a[0].narrow(0, 0, ranks[1])) == 0.0);

        let mut flat = EvaPass::new(layers, &first, 2, 2, 0.0);
        for _ in 0..2 {
            flat.feed(&[Some(x0.shallow_clone()), None, Some(x2.shallow_clone())]);
        }
        assert_eq!(flat.ranks(), [2, 2, 2]);
    }

    /// The SVD's positions: with the label mask those holding a target token (our labels are
    /// the next token's, so one position on); without, every real token, padding left out.
    #[test]
    fn svd_positions_follow_the_labels() {
        use crate::data::Row;
        let row = |ids: &[i64], from: usize| Row {
            ids: ids.to_vec(),
            labels: (0..ids.len())
                .map(|i| match i + 1 < ids.len() && i + 1 >= from {
                    true => ids[i + 1],
                    false => IGNORE_INDEX,
                })
                .collect(),
        };
        // Row 0: 5 tokens, targets at 3 and 4; row 1: 3 tokens (2 padding), target at 2.
        let batch = Batch::from_rows(
            &[row(&[1, 5, 9, 14, 20], 3), row(&[1, 7, 3], 2)],
            0,
            Device::Cpu,
        );
        let positions = |mask| Vec::<i64>::try_from(svd_positions(&batch, mask)).unwrap();
        assert_eq!(positions(true), [3, 4, 7]);
        assert_eq!(positions(false), [0, 1, 2, 3, 4, 5, 6, 7]);
    }
}
