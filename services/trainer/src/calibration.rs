//! Calibration: what a data-driven initialisation (LoRA-GA, LoRA-SB, EVA) sees of the training
//! data before the first optimizer step, through the base model.
//!
//! When it runs: once, in `Run::start` of a *fresh* run, after the method is attached and
//! before step 1. Not on a resume from a checkpoint (the method's calibrated state is in its
//! `VarStore`, which the checkpoint restores), and not when the job continues from a parent
//! adapter (the parent's factors are the start). The loop calls
//! [`crate::method::AdapterMethod::calibrate`] with a [`Calibration`]; the default does nothing.
//!
//! Which data: the rows the run trains on, in the order training draws them (row 0, 1, 2, …
//! of `TrainingRows` for the job's seed: the first epoch's shuffle, packed or not as the job
//! says), at most one epoch and never past the job's row limit (`training.epochs`). A method
//! takes them with [`Calibration::next_batch`], as many rows per batch as its reference uses;
//! they are built exactly as training builds its micro-batches (right-padded, labels `-100`
//! where nothing is predicted). So with `batch_size` rows per batch the calibration batches
//! are the first step's micro-batches, then the next step's, and so on.
//!
//! What through: the *base* model. Every adapter branch is taken off the model for the whole
//! calibration and put back when the [`Calibration`] is dropped, so whatever the method
//! attached (even factors not yet initialised) does not enter. Two measurements:
//! - [`Calibration::weight_gradients`]: `∂L/∂W` of chosen linear layers (frozen, so libtorch
//!   keeps no gradient for them): a probe on each layer records its input `x (tokens, in)` and
//!   adds a zero leaf to its output whose gradient is `∂L/∂y`; after each batch's backward
//!   `Σ_tokens (∂L/∂y)ᵀ x` is added to an fp32 `(out, in)` accumulator for that layer only.
//!   No gradient of any other weight is formed. A method short of memory may ask for its
//!   layers in groups (one pass over the batches per group).
//! - [`Calibration::linear_inputs`]: the input each chosen linear layer receives for a batch
//!   (no gradient), for input statistics (EVA's SVD of layer inputs).
//!
//! What a method may change: it writes its initial values into its variables in place
//! (`copy_` under `no_grad`), or adds and replaces variables in its store; the loop rebuilds
//! its AdamW over [`crate::method::AdapterMethod::optimized_parameters`] and recounts the
//! trainable parameters after the hook, so either works. The trace's `initial.safetensors`
//! (tests) is written after calibration, and the calibration batches are recorded in its
//! `batches.safetensors` as `calibration.batch<K>.{input_ids,labels}`.
//!
//! libtorch's generator: the hook runs after attaching (which draws from it, seeded by the
//! job's seed); a method that draws (randomised SVD) should seed it from
//! `training::seeds::derive_seed`, so the run stays reproducible.

use crate::data::{Batch, TrainingRows};
use crate::eval::validation::summed_loss_of;
use crate::model::llama::{weight_gradient, Checkpointing, LinearAdapter};
use crate::model::LlamaModel;
use crate::training::trace::Trace;
use crate::training::Reporter;
use anyhow::{anyhow, Result};
use loraforge_spec::model::LLAMA_TARGET_MODULES;
use loraforge_spec::worker::EventPayload;
use loraforge_spec::TrainingConfig;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Tensor};

/// One forward pass's record of a probed layer: its input, and the zero leaf added to its
/// output (whose gradient is `∂L/∂y`), if gradients are asked for.
type Records = Rc<RefCell<Vec<(Tensor, Option<Tensor>)>>>;

/// Stands in for a layer's adapter during calibration: adds nothing, records what it saw.
struct Probe {
    records: Records,
    gradient: bool,
}

impl LinearAdapter for Probe {
    fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        // Only reached through `add_to`'s default, which is overridden below.
        x.zeros_like()
    }

    fn add_to(&self, y: Tensor, x: &Tensor, _train: bool) -> Tensor {
        if !self.gradient {
            self.records.borrow_mut().push((x.detach(), None));
            return y;
        }
        let tap = y.zeros_like().detach().set_requires_grad(true);
        self.records
            .borrow_mut()
            .push((x.detach(), Some(tap.shallow_clone())));
        y + tap
    }
}

/// What [`crate::method::AdapterMethod::calibrate`] is given: the base model, the run's
/// training rows in training order, and where to report. See the module doc.
pub struct Calibration<'c, 'd> {
    model: &'c mut LlamaModel,
    /// The method's adapters, taken off until the calibration is dropped.
    detached: Vec<(String, Box<dyn LinearAdapter>)>,
    rows: &'c mut TrainingRows<'d>,
    next_row: u64,
    /// Rows calibration may read: one epoch, within the job's row limit.
    available: u64,
    pad_id: i64,
    device: Device,
    training: &'c TrainingConfig,
    reporter: &'c mut dyn Reporter,
    trace: Option<&'c mut Trace>,
    batches_read: usize,
}

impl<'c, 'd> Calibration<'c, 'd> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'c mut LlamaModel,
        rows: &'c mut TrainingRows<'d>,
        row_limit: Option<u64>,
        pad_id: i64,
        device: Device,
        training: &'c TrainingConfig,
        reporter: &'c mut dyn Reporter,
        trace: Option<&'c mut Trace>,
    ) -> Calibration<'c, 'd> {
        let detached = model
            .linears_mut(LLAMA_TARGET_MODULES)
            .filter_map(|(path, linear)| linear.take_adapter().map(|a| (path, a)))
            .collect();
        let available = rows.rows_per_epoch().min(row_limit.unwrap_or(u64::MAX));
        Calibration {
            model,
            detached,
            rows,
            next_row: 0,
            available,
            pad_id,
            device,
            training,
            reporter,
            trace,
            batches_read: 0,
        }
    }

    /// The base model (every adapter branch off).
    // Part of the hook's interface; no method here reads it yet.
    #[allow(dead_code)]
    pub fn model(&self) -> &LlamaModel {
        self.model
    }

    /// The job's training plan (its seed, learning rate, schedule, length).
    #[allow(dead_code)]
    pub fn training(&self) -> &TrainingConfig {
        self.training
    }

    /// Rows not yet read of those calibration may read (one epoch, within the row limit).
    pub fn rows_left(&self) -> u64 {
        self.available - self.next_row
    }

    /// The next `rows` rows of the training order as one batch, built as training builds its
    /// micro-batches; fewer at the end of the data, `None` once it is used up.
    pub fn next_batch(&mut self, rows: usize) -> Result<Option<Batch>> {
        let end = (self.next_row + rows as u64).min(self.available);
        if end <= self.next_row {
            return Ok(None);
        }
        let batch_rows = (self.next_row..end)
            .map(|k| self.rows.row(k))
            .collect::<Result<Vec<_>>>()?;
        self.next_row = end;
        let batch = Batch::from_rows(&batch_rows, self.pad_id, self.device);
        if let Some(trace) = self.trace.as_deref_mut() {
            trace.record_calibration_batch(self.batches_read, &batch);
        }
        self.batches_read += 1;
        Ok(Some(batch))
    }

    /// Reports a log line in the job's events.
    pub fn log(&mut self, message: String) {
        self.reporter.report(EventPayload::Log { message });
    }

    /// For each of `modules` (full module paths, as `LlamaModel::target_linears` names them),
    /// `Σ_b weights[b] · ∂L_b/∂W` over `batches`, `L_b` the batch's mean loss per target token
    /// (fp32 softmax, as training computes it), as an fp32 `(out, in)` tensor on the device:
    /// weights `1/n` give the mean gradient of `n` batches (LoRA-GA), `1/rows_b` the
    /// reference's loss divided by the batch size (LoRA-SB). No dropout; layer checkpointing
    /// as the job asks. Reports a log line.
    pub fn weight_gradients(
        &mut self,
        modules: &[String],
        batches: &[Batch],
        weights: &[f64],
    ) -> Result<Vec<Tensor>> {
        let started = Instant::now();
        let gradients = weight_gradients(
            self.model,
            modules,
            batches,
            weights,
            self.training.gradient_checkpointing,
        )?;
        let targets: u64 = batches.iter().map(|b| b.targets).sum();
        self.log(format!(
            "calibration: gradients of {} layers over {} batches ({targets} target tokens) in {:.1} s",
            modules.len(),
            batches.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(gradients)
    }

    /// The frozen weight `(out, in)` of the linear layer at `module_path`, in the base dtype.
    pub fn linear_weight(&mut self, module_path: &str) -> Result<Tensor> {
        self.model
            .linears_mut(LLAMA_TARGET_MODULES)
            .find(|(path, _)| path == module_path)
            .map(|(_, linear)| linear.weight.shallow_clone())
            .ok_or_else(|| anyhow!("calibration: the model has no linear layer {module_path}"))
    }

    /// For each of `modules`, its input for `batch`: `(rows, seq, in)` in the base dtype,
    /// padding positions included (`batch.labels`, and `input_ids` past each row's length,
    /// say which count).
    // For input statistics (EVA); LoRA-GA and LoRA-SB use gradients.
    #[allow(dead_code)]
    pub fn linear_inputs(&mut self, modules: &[String], batch: &Batch) -> Result<Vec<Tensor>> {
        linear_inputs(self.model, modules, batch)
    }
}

/// [`Calibration::weight_gradients`] on `model`, whose adapters on `modules` are replaced
/// by probes and then removed.
fn weight_gradients(
    model: &mut LlamaModel,
    modules: &[String],
    batches: &[Batch],
    weights: &[f64],
    checkpointing: Checkpointing,
) -> Result<Vec<Tensor>> {
    if batches.is_empty() || weights.len() != batches.len() {
        return Err(anyhow!(
            "calibration needs at least one batch, and a weight for each"
        ));
    }
    let probes = install_probes(model, modules, true)?;
    let mut sums: Vec<Option<Tensor>> = (0..modules.len()).map(|_| None).collect();
    for (batch, weight) in batches.iter().zip(weights) {
        let pass = model.training_pass(&batch.input_ids, false, checkpointing);
        let loss = summed_loss_of(model, &pass.hidden, &batch.labels)
            * (weight / batch.targets.max(1) as f64);
        loss.backward();
        pass.backward();
        for (records, sum) in probes.iter().zip(sums.iter_mut()) {
            for (x, tap) in records.borrow_mut().drain(..) {
                // A checkpointed pass's first, gradient-free forward leaves taps without a
                // gradient: its backward recomputed the layer and recorded it again.
                let Some(dy) = tap.map(|t| t.grad()).filter(Tensor::defined) else {
                    continue;
                };
                let (dy, x) = (
                    dy.reshape([-1, dy.size()[dy.dim() - 1]]),
                    x.reshape([-1, x.size()[x.dim() - 1]]),
                );
                let g = tch::no_grad(|| weight_gradient(&dy, &x));
                *sum = Some(match sum.take() {
                    Some(s) => s + g,
                    None => g,
                });
            }
        }
    }
    remove_probes(model, modules);
    modules
        .iter()
        .zip(sums)
        .map(|(path, sum)| sum.ok_or_else(|| anyhow!("calibration: no gradient reached {path}")))
        .collect()
}

/// [`Calibration::linear_inputs`] on `model`, whose adapters on `modules` are replaced by
/// probes and then removed.
fn linear_inputs(model: &mut LlamaModel, modules: &[String], batch: &Batch) -> Result<Vec<Tensor>> {
    let probes = install_probes(model, modules, false)?;
    let _ = tch::no_grad(|| model.forward(&batch.input_ids, false));
    remove_probes(model, modules);
    let [rows, seq] = batch.input_ids.size()[..] else {
        return Err(anyhow!("a batch's input ids are (rows, seq)"));
    };
    modules
        .iter()
        .zip(probes)
        .map(|(path, records)| {
            let records = records.borrow();
            match records.len() {
                1 => {
                    let x = &records[0].0;
                    Ok(x.reshape([rows, seq, x.size()[x.dim() - 1]]))
                }
                n => Err(anyhow!("calibration: {path} ran {n} times in one pass")),
            }
        })
        .collect()
}

fn install_probes(
    model: &mut LlamaModel,
    modules: &[String],
    gradient: bool,
) -> Result<Vec<Records>> {
    let mut probes: Vec<Option<Records>> = vec![None; modules.len()];
    for (path, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
        if let Some(i) = modules.iter().position(|m| *m == path) {
            let records = Records::default();
            linear.attach(Box::new(Probe {
                records: records.clone(),
                gradient,
            }));
            probes[i] = Some(records);
        }
    }
    let missing = modules.iter().zip(&probes).find(|(_, p)| p.is_none());
    if let Some((path, _)) = missing {
        remove_probes(model, modules);
        return Err(anyhow!("calibration: the model has no linear layer {path}"));
    }
    Ok(probes.into_iter().flatten().collect())
}

fn remove_probes(model: &mut LlamaModel, modules: &[String]) {
    for (path, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
        if modules.contains(&path) {
            linear.take_adapter();
        }
    }
}

impl Drop for Calibration<'_, '_> {
    /// Puts the method's adapters back where they were.
    fn drop(&mut self) {
        let mut detached = std::mem::take(&mut self.detached);
        for (path, linear) in self.model.linears_mut(LLAMA_TARGET_MODULES) {
            if let Some(i) = detached.iter().position(|(p, _)| *p == path) {
                linear.attach(detached.swap_remove(i).1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Row;
    use crate::methods::testing::{max_abs_diff, FixtureModel};
    use crate::training::seeds::torch_rng_turn;
    use tch::Kind;

    /// Adds `x Zᵀ` with `Z = 0` trainable: `∂L/∂Z` is `∂L/∂W` by autograd, independently of
    /// the probes' `(∂L/∂y)ᵀ x`.
    struct ZeroWeight(Tensor);

    impl LinearAdapter for ZeroWeight {
        fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
            x.linear::<Tensor>(&self.0, None)
        }
    }

    fn batches() -> Vec<Batch> {
        let row = |ids: &[i64], from: usize| Row {
            ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= from { t } else { -100 })
                .collect(),
        };
        vec![
            Batch::from_rows(
                &[row(&[1, 5, 9, 14, 20], 2), row(&[1, 7, 3], 1)],
                0,
                Device::Cpu,
            ),
            Batch::from_rows(&[row(&[1, 33, 41, 2, 8, 9, 10], 3)], 0, Device::Cpu),
        ]
    }

    fn paths(model: &mut LlamaModel, modules: &[&str]) -> Vec<String> {
        model
            .target_linears(modules)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// The probes' per-layer `Σ (∂L/∂y)ᵀ x` is the weight gradient autograd computes, averaged
    /// over batches of per-token mean losses, with and without layer checkpointing.
    #[test]
    fn weight_gradients_are_autograds() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let modules = paths(&mut model, &["q_proj", "v_proj", "down_proj"]);
        let batches = batches();
        let weights = [0.5, 0.5];
        let probed = weight_gradients(
            &mut model,
            &modules,
            &batches,
            &weights,
            Checkpointing::None,
        )
        .unwrap();
        let checkpointed = weight_gradients(
            &mut model,
            &modules,
            &batches,
            &weights,
            Checkpointing::Layers,
        )
        .unwrap();

        let mut zeros = Vec::new();
        for (path, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
            if modules.contains(&path) {
                let z = Tensor::zeros(
                    [linear.out_features(), linear.in_features()],
                    (Kind::Float, Device::Cpu),
                )
                .set_requires_grad(true);
                linear.attach(Box::new(ZeroWeight(z.shallow_clone())));
                zeros.push(z);
            }
        }
        for batch in &batches {
            let hidden = model.final_hidden(&batch.input_ids, false);
            let loss = summed_loss_of(&model, &hidden, &batch.labels)
                / (batch.targets as f64 * batches.len() as f64);
            loss.backward();
        }
        for ((path, z), (g, c)) in modules
            .iter()
            .zip(&zeros)
            .zip(probed.iter().zip(&checkpointed))
        {
            let expected = z.grad();
            let scale = expected.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{path}: no gradient");
            assert!(max_abs_diff(g, &expected) < 1e-5 * scale.max(1.0), "{path}");
            assert!(
                max_abs_diff(c, &expected) < 1e-5 * scale.max(1.0),
                "{path} (checkpointed)"
            );
        }
    }

    /// A layer's recorded input is what it multiplies: its output recomputed from it matches.
    #[test]
    fn linear_inputs_are_what_the_layers_see() {
        let _turn = torch_rng_turn();
        let fixture = FixtureModel::create();
        let mut model = fixture.load();
        let modules = paths(&mut model, &["q_proj", "k_proj", "down_proj"]);
        let batch = &batches()[0];
        let inputs = linear_inputs(&mut model, &modules, batch).unwrap();
        // q and k read the same input; down_proj reads the MLP's intermediate activations.
        assert_eq!(max_abs_diff(&inputs[0], &inputs[1]), 0.0);
        let size = batch.input_ids.size();
        assert_eq!(inputs[0].size()[..2], size[..]);
        assert_ne!(inputs[0].size()[2], inputs[2].size()[2]);
        let before = tch::no_grad(|| model.forward(&batch.input_ids, false));
        // No probe is left behind (a probe left on would record and still add nothing, so
        // check the slots directly).
        for (_, linear) in model.linears_mut(LLAMA_TARGET_MODULES) {
            assert!(linear.take_adapter().is_none());
        }
        let after = tch::no_grad(|| model.forward(&batch.input_ids, false));
        assert_eq!(max_abs_diff(&before, &after), 0.0);
    }
}
