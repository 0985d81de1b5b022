//! A job's data: its inputs made local (`inputs`: the base model directory and the dataset
//! files, with the digests the manifest records), and the dataset read, tokenized through the
//! model's tokenizer and chat template (`encode`), split, and cut into training rows and
//! batches (`dataset`), with refusal examples mixed in where the job asks for them (`replay`).

mod dataset;
mod encode;
pub mod inputs;
pub mod replay;

#[cfg(test)]
pub use dataset::Row;
pub use dataset::{Batch, ExampleSet, TokenizedDataset, TrainingRows};
pub use encode::{ExampleEncoder, IGNORE_INDEX};
