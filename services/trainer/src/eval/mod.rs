//! Measuring a model: the validation loss (`validation`, used by the training loop and the
//! safety evaluation), the safety evaluation behind the publish gate (`safety`), and the
//! logits of a model with an optional adapter (`logits`, what the parity tests compare).

pub mod logits;
pub mod safety;
pub mod validation;
