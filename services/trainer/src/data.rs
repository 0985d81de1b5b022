//! Training data: JSONL with one `{"text": ...}` per line, tokenized once, then served
//! as right-padded batches in a seeded shuffle that cycles through epochs.

use crate::error::user_error;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Tensor};
use tokenizers::Tokenizer;

/// Label value that cross-entropy skips: padding and the position after a sequence's last token.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Deserialize)]
struct TextRecord {
    text: String,
}

/// The texts of a JSONL file; blank lines are skipped, anything else must be `{"text": "..."}`.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| user_error(format!("cannot read dataset {}: {e}", path.display())))?;
    let mut texts = Vec::new();
    for (index, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: TextRecord = serde_json::from_str(line).map_err(|e| {
            // serde's own position counts within the line; ours says which line.
            let detail = e.to_string();
            let detail = detail.rsplit_once(" at line ").map_or(detail.as_str(), |(text, _)| text);
            user_error(format!(
                "{} line {}, column {}: expected a JSON object with a \"text\" string: {detail}",
                path.display(),
                index + 1,
                e.column()
            ))
        })?;
        texts.push(record.text);
    }
    if texts.is_empty() {
        return Err(user_error(format!("dataset {} has no examples", path.display())));
    }
    Ok(texts)
}

/// How texts become training sequences.
pub struct SequenceFormat {
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub max_len: usize,
    pub vocab_size: i64,
}

/// Token ids of every text: BOS, the text, EOS, truncated to `max_len`. Sequences of fewer than
/// two tokens are dropped: they have nothing to predict.
pub fn tokenize(tokenizer: &Tokenizer, texts: Vec<String>, format: &SequenceFormat) -> Result<Vec<Vec<i64>>> {
    let encodings =
        tokenizer.encode_batch(texts, false).map_err(|e| user_error(format!("tokenizing the dataset failed: {e}")))?;
    let mut sequences = Vec::with_capacity(encodings.len());
    for encoding in encodings {
        let text_ids = encoding.get_ids().iter().map(|&id| i64::from(id));
        let mut ids: Vec<i64> = format.bos.into_iter().chain(text_ids).chain(format.eos).collect();
        ids.truncate(format.max_len);
        if let Some(&bad) = ids.iter().find(|&&id| id >= format.vocab_size) {
            return Err(user_error(format!(
                "the tokenizer produced token id {bad}, but the model's vocab_size is {}",
                format.vocab_size
            )));
        }
        if ids.len() >= 2 {
            sequences.push(ids);
        }
    }
    if sequences.is_empty() {
        return Err(user_error("no example of the dataset has at least two tokens"));
    }
    Ok(sequences)
}

/// One step's input: `input_ids (batch, len)` and `labels` = the next token, or
/// [`IGNORE_INDEX`] where there is none, so loss counts real tokens only.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Real (non-pad) tokens in the batch.
    pub tokens: u64,
}

/// Serves batches forever, reshuffling (seeded) at the start of every epoch. A batch that
/// straddles an epoch boundary is completed from the next epoch, so every batch is full.
pub struct Batches {
    sequences: Vec<Vec<i64>>,
    batch_size: usize,
    pad_id: i64,
    rng: StdRng,
    order: Vec<usize>,
    position: usize,
}

impl Batches {
    pub fn new(sequences: Vec<Vec<i64>>, batch_size: usize, pad_id: i64, seed: u64) -> Batches {
        let order = (0..sequences.len()).collect();
        let position = sequences.len(); // forces a shuffle before the first batch
        Batches { sequences, batch_size, pad_id, rng: StdRng::seed_from_u64(seed), order, position }
    }

    pub fn next_batch(&mut self, device: Device) -> Batch {
        let mut picked = Vec::with_capacity(self.batch_size);
        while picked.len() < self.batch_size {
            if self.position == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.position = 0;
            }
            picked.push(&self.sequences[self.order[self.position]]);
            self.position += 1;
        }
        let width = picked.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut input_ids = vec![self.pad_id; picked.len() * width];
        let mut labels = vec![IGNORE_INDEX; picked.len() * width];
        for (row, sequence) in picked.iter().enumerate() {
            let start = row * width;
            input_ids[start..start + sequence.len()].copy_from_slice(sequence);
            labels[start..start + sequence.len() - 1].copy_from_slice(&sequence[1..]);
        }
        let shape = [picked.len() as i64, width as i64];
        Batch {
            input_ids: Tensor::from_slice(&input_ids).view(shape).to_device(device),
            labels: Tensor::from_slice(&labels).view(shape).to_device(device),
            tokens: picked.iter().map(|s| s.len() as u64).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{classify, Failure};

    #[test]
    fn malformed_line_is_a_user_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, "{\"text\": \"ok\"}\n\n{\"text\": \"fine\"}\n{\"prompt\": \"no text\"}\n").unwrap();
        let err = read_texts(&path).unwrap_err();
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        let message = err.to_string();
        assert!(message.contains("train.jsonl line 4"), "{message}");

        std::fs::write(&path, "\n  \n").unwrap();
        let err = read_texts(&path).unwrap_err();
        assert!(err.to_string().contains("has no examples"), "{err:#}");
    }

    #[test]
    fn labels_are_next_tokens_and_ignore_padding() {
        let mut batches = Batches::new(vec![vec![1, 5, 6, 2], vec![1, 7, 2]], 2, 0, 3);
        let batch = batches.next_batch(Device::Cpu);
        let inputs = Vec::<Vec<i64>>::try_from(&batch.input_ids).unwrap();
        let labels = Vec::<Vec<i64>>::try_from(&batch.labels).unwrap();
        let short = inputs.iter().position(|row| row[1] == 7).unwrap();
        assert_eq!(inputs[short], [1, 7, 2, 0]);
        assert_eq!(labels[short], [7, 2, IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(labels[1 - short], [5, 6, 2, IGNORE_INDEX]);
        assert_eq!(batch.tokens, 7);
    }
}
