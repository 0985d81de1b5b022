//! The base model: a Hugging Face model directory read into a Llama-family decoder
//! (`architecture` from config.json, `weights` from safetensors, the tokenizer's config and
//! chat template), its forward pass with an optional KV cache (`llama`), text generation
//! (`generate`), the device and precision it runs in (`device`), the GPU memory a run takes
//! (`gpu_memory`), fused CUDA kernels of our own (`cuda_kernels`), the loss computed without the full logits (`lm_loss`), and a LoRA adapter
//! folded into its weights (`merge`).

pub mod architecture;
pub mod backward_with_grad;
pub mod chat_template;
pub mod cuda_kernels;
pub mod device;
pub mod generate;
pub mod gpu_memory;
pub mod llama;
pub mod lm_loss;
pub mod merge;
pub mod timeline;
pub mod tokenizer_config;
pub mod weights;

pub use architecture::ModelConfig;
pub use device::device_label;
pub use llama::{LinearAdapter, LlamaModel};
