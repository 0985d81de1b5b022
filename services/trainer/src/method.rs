//! Adapter methods: one trait, one module per method (`lora`, and later the adaptive ones),
//! one registration line in [`attach_method`].

use crate::export::PeftAdapter;
use crate::lora::Lora;
use crate::model::LlamaModel;
use anyhow::Result;
use loraforge_spec::MethodConfig;
use tch::nn::VarStore;
use tch::Device;

/// An adapter method attached to a model: what it trains and what it publishes.
pub trait AdapterMethod {
    /// The adapter's parameters, in their own store, apart from the frozen base,
    /// so the optimizer and the export see only what is trained.
    fn var_store(&self) -> &VarStore;

    /// The trained adapter in PEFT's LoRA layout, for `base_model_uri`.
    fn export(&self, base_model_uri: &str) -> PeftAdapter;
}

/// Attaches the method a job asks for to the model's target layers.
pub fn attach_method(model: &mut LlamaModel, method: &MethodConfig, device: Device) -> Result<Box<dyn AdapterMethod>> {
    Ok(match method {
        MethodConfig::Lora(config) => Box::new(Lora::attach(model, config, device)?),
    })
}
