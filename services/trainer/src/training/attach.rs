//! The second step of a run: the base model loaded and the job's adapter method attached to
//! it (from the parent adapter's factors where the job has a parent), with the optimizer over
//! what the method trains.

use super::trace::Trace;
use super::{log, Reporter};
use crate::export::PeftAdapter;
use crate::method::{attach_method, AdapterMethod};
use crate::model::{device_label, LlamaModel, ModelConfig};
use crate::training::optimizer::AdamW;
use anyhow::Result;
use loraforge_spec::JobSpec;
use std::path::Path;
use tch::{Device, Tensor};

/// The frozen base with the trainable adapter attached, and what updates the adapter.
pub struct AdaptedModel {
    pub model: LlamaModel,
    pub method: Box<dyn AdapterMethod>,
    pub optimizer: AdamW,
    /// Every trainable variable: gradients are cleared and clipped over all of them, including
    /// what the method steps itself (SoRA's gates), as the references' Trainer clips
    /// `model.parameters()`.
    pub trained: Vec<Tensor>,
    pub trainable_parameters: u64,
    /// The test-only record of the run, when `LORAFORGE_TRACE_DIR` asks for one.
    pub trace: Option<Trace>,
    /// The token id that pads batches.
    pub pad_id: i64,
    pub device: Device,
    /// Whether the adapter started from a parent's factors (then nothing is calibrated).
    pub from_parent: bool,
}

impl AdaptedModel {
    /// Loads the model in `model_dir` onto `device` and attaches the job's method. The adapter's
    /// initialisation draws from libtorch's generator, seeded from the job's seed first.
    pub fn load(
        spec: &JobSpec,
        model_dir: &Path,
        config: ModelConfig,
        parent: Option<&PeftAdapter>,
        device: Device,
        reporter: &mut dyn Reporter,
    ) -> Result<AdaptedModel> {
        // Padding is never attended to (causal attention, right padding) nor scored, so any id will do.
        let pad_id = config.pad_token_id.or(config.eos_token_id).unwrap_or(0);

        tch::manual_seed(spec.training.seed as i64);
        let mut model = LlamaModel::load(model_dir, config, device)?;
        let mut method = attach_method(&mut model, spec, device)?;
        if let Some(parent) = parent {
            method.start_from(parent)?;
            reporter.report(log("starting from the parent adapter's factors".into()));
        }
        let trainable_parameters = trainable_count(method.as_ref());
        reporter.report(log(format!(
            "training {} on {}, adapter fp32: {trainable_parameters} trainable parameters",
            spec.method.name(),
            device_label(device)
        )));
        let optimizer = AdamW::new(method.optimized_parameters(), spec.training.weight_decay)
            .with_betas(method.adam_betas());
        let trained = method.var_store().trainable_variables();
        let trace = Trace::from_env(method.var_store())?;
        Ok(AdaptedModel {
            model,
            method,
            optimizer,
            trained,
            trainable_parameters,
            trace,
            pad_id,
            device,
            from_parent: parent.is_some(),
        })
    }

    /// After calibration, which may have replaced the method's variables: AdamW (no state
    /// yet) over what it trains now, the trainable list and count, and the trace's initial
    /// variables.
    pub fn calibrated(&mut self, weight_decay: f64) -> Result<()> {
        self.optimizer = AdamW::new(self.method.optimized_parameters(), weight_decay)
            .with_betas(self.method.adam_betas());
        self.trained = self.method.var_store().trainable_variables();
        self.trainable_parameters = trainable_count(self.method.as_ref());
        if let Some(trace) = &self.trace {
            trace.record_initial(self.method.var_store())?;
        }
        Ok(())
    }
}

fn trainable_count(method: &dyn AdapterMethod) -> u64 {
    method
        .var_store()
        .variables()
        .into_values()
        .filter(Tensor::requires_grad)
        .map(|t| t.numel() as u64)
        .sum()
}
