//! Adapter methods: what the training loop sees of one, [`AdapterMethod`]. The methods
//! themselves are in `methods/`, one module each, registered in [`attach_method`].
//!
//! The training loop stays generic: per step it calls [`AdapterMethod::before_step`], adds
//! [`AdapterMethod::extra_loss`] to the task loss, runs its AdamW over
//! [`AdapterMethod::optimized_parameters`], then calls [`AdapterMethod::after_step`] (gradients
//! still in place, as PEFT's `update_and_allocate` wants them) and reports
//! [`AdapterMethod::rank_allocation`] whenever it changes. State a method keeps between steps
//! (importance averages, masks, its own optimizer's moments) lives in its [`VarStore`] as
//! non-trainable variables, so checkpoints save and restore it with the factors.
//!
//! Before step 1 of a fresh run (not on resume, not from a parent adapter) the loop calls
//! [`AdapterMethod::calibrate`] once: a data-driven initialisation (LoRA-GA, LoRA-SB, EVA)
//! measures the base model on the first training batches there ([`crate::calibration`]).

use crate::calibration::Calibration;
use crate::export::PeftAdapter;
pub use crate::methods::attach_method;
use anyhow::Result;
use loraforge_spec::worker::EventPayload;
use std::collections::BTreeMap;
use tch::nn::VarStore;
use tch::Tensor;

/// Where the loop is when a per-step hook runs.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// The optimizer step, 1-based.
    pub index: u32,
    /// The run's planned number of steps.
    pub total: u32,
    /// The step's learning rate (after warmup and schedule).
    pub lr: f64,
}

/// How an adaptive-rank method has distributed its ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct RankAllocation {
    /// Every adapted module by full path, 0 where pruned.
    pub per_module: BTreeMap<String, u32>,
    /// The total rank the method is steering toward now, where it has one.
    pub budget: Option<u32>,
    /// The fraction of gates at exactly zero, for gated methods.
    pub sparsity: Option<f64>,
}

impl RankAllocation {
    pub fn event(&self, step: u32) -> EventPayload {
        EventPayload::Ranks {
            step,
            total: self.per_module.values().sum(),
            budget: self.budget,
            per_module: self.per_module.clone(),
            sparsity: self.sparsity,
        }
    }
}

/// An adapter method attached to a model: what it trains and what it publishes.
pub trait AdapterMethod {
    /// The adapter's parameters, in their own store, apart from the frozen base,
    /// so the optimizer and the export see only what is trained.
    fn var_store(&self) -> &VarStore;

    /// The parameters the loop's AdamW updates: every trainable variable, unless the method
    /// steps some of them itself in [`AdapterMethod::after_step`] (SoRA's gates). The loop
    /// clears and clips the gradients of every trainable variable in the store either way.
    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        self.var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// The betas of the loop's AdamW (PyTorch's defaults unless the method's reference differs).
    fn adam_betas(&self) -> (f64, f64) {
        (
            crate::training::optimizer::BETA1,
            crate::training::optimizer::BETA2,
        )
    }

    /// A data-driven initialisation, run once before step 1 of a fresh run (not when resuming
    /// from a checkpoint, whose store already holds the calibrated state, nor when starting
    /// from a parent adapter). `calibration` draws the run's training rows in training order
    /// ([`Calibration::next_batch`]) and measures the base model on them, every adapter branch
    /// off: weight gradients of chosen linear layers ([`Calibration::weight_gradients`]) or
    /// their inputs ([`Calibration::linear_inputs`]). The method writes its initial values into
    /// its variables (in place, or new variables in its store: the loop rebuilds the optimizer
    /// afterwards). Anything calibration-derived that later steps or the export need must be
    /// in the store (non-trainable variables), so a resumed run has it. The default does
    /// nothing. See [`crate::calibration`] for which rows, the loss, and memory.
    fn calibrate(&mut self, _calibration: &mut Calibration) -> Result<()> {
        Ok(())
    }

    /// Runs before step `step`'s forward passes (DyLoRA draws the step's rank here).
    fn before_step(&mut self, _step: u32) {}

    /// A term added to the loss of the step (a regulariser), if the method has one.
    fn extra_loss(&self) -> Option<Tensor> {
        None
    }

    /// Runs after the optimizer step, before gradients are cleared: proximal steps,
    /// importance updates, rank reallocation.
    fn after_step(&mut self, _step: StepInfo) {}

    /// The current rank allocation, for methods whose ranks change.
    fn rank_allocation(&self) -> Option<RankAllocation> {
        None
    }

    /// The trained adapter in PEFT's LoRA layout, for `base_model_uri`.
    fn export(&self, base_model_uri: &str) -> PeftAdapter;

    /// Continues from a published adapter (the job's parent version): its factors replace the
    /// fresh ones. A factor it lacks, has in another shape, or has for a layer this method does
    /// not adapt is the user's error.
    fn start_from(&mut self, parent: &PeftAdapter) -> Result<()>;
}
