//! A JSONL dataset, read for training. Every line is parsed and tokenized once, up front
//! (`encode`), into an anonymous scratch file: a bad line fails the job before any training,
//! naming file and line; tokenization is not repeated each epoch; and memory holds each
//! example's offset and length, never the examples. Rows are then read back in an order that
//! depends only on (seed, epoch), one example per row (truncated to `seq_len`) or packed: each
//! epoch's examples concatenated and cut into rows of `seq_len`.

use super::encode::{parse_example, ExampleEncoder, TokenizedExample, IGNORE_INDEX};
use crate::error::user_error;
use crate::training::seeds::{derive_seed, SeedUse};
use anyhow::{Context, Result};
use loraforge_spec::dataset::FormatCounts;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tch::{Device, Tensor};

/// A JSONL file's examples, tokenized into a scratch file that is gone when this is dropped.
pub struct TokenizedDataset {
    cache: File,
    examples: Vec<CachedExample>,
    /// Examples left out because they had nothing to learn (after truncation, if any).
    pub dropped: usize,
    /// How many examples at the end were mixed in from another dataset ([`Self::mix_in`]):
    /// trained on, never held out for validation.
    mixed_in: usize,
}

/// Where one example lies in the cache: `len` token ids (u32, little-endian), then `len`
/// target flags (one byte each).
#[derive(Clone, Copy)]
struct CachedExample {
    offset: u64,
    len: u32,
}

impl TokenizedDataset {
    /// Reads and tokenizes every line of `path`. With `truncate_to`, examples are cut to that
    /// many tokens here; examples with nothing left to learn are dropped and counted.
    pub fn build(
        path: &Path,
        encoder: &ExampleEncoder,
        truncate_to: Option<usize>,
    ) -> Result<TokenizedDataset> {
        let file = File::open(path)
            .map_err(|e| user_error(format!("cannot read dataset {}: {e}", path.display())))?;
        let mut reader = BufReader::new(file);
        let mut cache = BufWriter::new(tempfile::tempfile().context("creating the token cache")?);
        let (mut examples, mut dropped, mut offset) = (Vec::new(), 0, 0u64);
        // What the lines were read as, for the message when none has anything to learn.
        let mut formats = FormatCounts::default();
        let mut line = Vec::new();
        for number in 1u64.. {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading {}", path.display()))?;
            if read == 0 {
                break;
            }
            let bad_line = |message: String| {
                user_error(format!("{} line {number}: {message}", path.display()))
            };
            let text =
                std::str::from_utf8(&line).map_err(|e| bad_line(format!("not UTF-8 text: {e}")))?;
            if text.trim().is_empty() {
                continue;
            }
            let example = parse_example(text).map_err(&bad_line)?;
            formats.add(example.format());
            let mut example = encoder.encode(example).map_err(bad_line)?;
            if let Some(len) = truncate_to {
                example.truncate(len);
            }
            if !example.has_target() {
                dropped += 1;
                continue;
            }
            for id in &example.ids {
                // Ids were checked against the vocabulary, which is far below u32::MAX.
                cache.write_all(&(*id as u32).to_le_bytes())?;
            }
            cache.write_all(
                &example
                    .targets
                    .iter()
                    .map(|&t| u8::from(t))
                    .collect::<Vec<u8>>(),
            )?;
            let len = example.ids.len() as u32;
            examples.push(CachedExample { offset, len });
            offset += u64::from(len) * 5;
        }
        if examples.is_empty() {
            return Err(user_error(match dropped {
                0 => format!("dataset {} has no examples", path.display()),
                n => format!(
                    "dataset {}: none of its {n} examples has a token to learn{}. It was read as {}: {}",
                    path.display(),
                    truncate_to.map_or(String::new(), |len| format!(
                        " within the first {len} tokens (training.seq_len)"
                    )),
                    formats.describe(),
                    formats.learned_from(),
                ),
            }));
        }
        let cache = cache
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the token cache")?;
        Ok(TokenizedDataset {
            cache,
            examples,
            dropped,
            mixed_in: 0,
        })
    }

    /// All examples, the file's and those mixed in.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// The examples read from the file itself.
    pub fn file_len(&self) -> usize {
        self.examples.len() - self.mixed_in
    }

    /// Appends `other`'s examples at `picks` (repeats allowed) to this dataset's, for training
    /// only: [`ExampleSet::all`] and [`ExampleSet::split`] see the file's own examples, and
    /// [`ExampleSet::with_mixed_in`] adds these.
    pub fn mix_in(&mut self, other: &TokenizedDataset, picks: &[usize]) -> Result<()> {
        let mut end = self
            .examples
            .last()
            .map_or(0, |e| e.offset + u64::from(e.len) * 5);
        for &index in picks {
            let source = other.examples[index];
            let mut bytes = vec![0u8; source.len as usize * 5];
            other
                .cache
                .read_exact_at(&mut bytes, source.offset)
                .context("reading the token cache")?;
            self.cache
                .write_all_at(&bytes, end)
                .context("writing the token cache")?;
            self.examples.push(CachedExample {
                offset: end,
                len: source.len,
            });
            end += bytes.len() as u64;
        }
        self.mixed_in += picks.len();
        Ok(())
    }

    fn example_len(&self, index: usize) -> usize {
        self.examples[index].len as usize
    }

    fn read(&self, index: usize) -> Result<TokenizedExample> {
        let CachedExample { offset, len } = self.examples[index];
        let len = len as usize;
        let mut bytes = vec![0u8; len * 5];
        self.cache
            .read_exact_at(&mut bytes, offset)
            .context("reading the token cache")?;
        let (ids, targets) = bytes.split_at(len * 4);
        Ok(TokenizedExample {
            ids: ids
                .chunks_exact(4)
                .map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            targets: targets.iter().map(|&t| t == 1).collect(),
        })
    }
}

/// Some of a dataset's examples: all of them, or one side of a validation split.
pub struct ExampleSet<'a> {
    data: &'a TokenizedDataset,
    indices: Vec<usize>,
}

impl<'a> ExampleSet<'a> {
    /// The file's own examples (not those mixed in).
    pub fn all(data: &'a TokenizedDataset) -> ExampleSet<'a> {
        ExampleSet {
            data,
            indices: (0..data.file_len()).collect(),
        }
    }

    /// These examples and every example mixed into the dataset.
    pub fn with_mixed_in(mut self) -> ExampleSet<'a> {
        self.indices.extend(self.data.file_len()..self.data.len());
        self
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn tokens(&self) -> u64 {
        self.indices
            .iter()
            .map(|&i| self.data.example_len(i) as u64)
            .sum()
    }

    /// The `position`-th example as one row, cut to `max_len` tokens.
    pub fn row(&self, position: usize, max_len: usize) -> Result<Row> {
        let mut example = self.data.read(self.indices[position])?;
        example.truncate(max_len);
        Ok(Row {
            labels: example.labels(),
            ids: example.ids,
        })
    }

    /// How many of `n` examples [`Self::split`] holds out.
    pub fn held_out(n: usize, fraction: f64) -> usize {
        ((n as f64 * fraction).ceil() as usize).clamp(1, n.saturating_sub(1).max(1))
    }

    /// Holds out `ceil(fraction * n)` examples (at least one, and one is left to train on),
    /// chosen by a shuffle seeded from `seed`: `(training, validation)`.
    pub fn split(
        data: &'a TokenizedDataset,
        fraction: f64,
        seed: u64,
    ) -> Result<(ExampleSet<'a>, ExampleSet<'a>)> {
        let n = data.file_len();
        if n < 2 {
            return Err(user_error(format!(
                "dataset.validation_fraction needs at least two examples to split; the dataset has {n}"
            )));
        }
        let held_out = Self::held_out(n, fraction);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(derive_seed(
            seed,
            SeedUse::ValidationSplit,
            0,
        )));
        let (mut validation, mut training) =
            (order[..held_out].to_vec(), order[held_out..].to_vec());
        validation.sort_unstable();
        training.sort_unstable();
        Ok((
            ExampleSet {
                data,
                indices: training,
            },
            ExampleSet {
                data,
                indices: validation,
            },
        ))
    }
}

/// One row of a batch: token ids and, per position, the next token to predict or [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// The rows training consumes, as an endless sequence over epochs: row `k` is row
/// `k % rows_per_epoch` of epoch `k / rows_per_epoch`, so a run resumed at any row reads the
/// same rows as one that never stopped.
pub struct TrainingRows<'a> {
    examples: ExampleSet<'a>,
    row_len: usize,
    packing: bool,
    seed: u64,
    rows_per_epoch: u64,
    epoch: Option<EpochOrder>,
}

/// The shuffled order of one epoch, and with packing where each example starts in its tokens.
struct EpochOrder {
    epoch: u64,
    order: Vec<usize>,
    starts: Vec<u64>,
}

impl<'a> TrainingRows<'a> {
    pub fn new(
        examples: ExampleSet<'a>,
        row_len: usize,
        packing: bool,
        seed: u64,
    ) -> TrainingRows<'a> {
        let rows_per_epoch = if packing {
            examples.tokens().div_ceil(row_len as u64)
        } else {
            examples.len() as u64
        };
        TrainingRows {
            examples,
            row_len,
            packing,
            seed,
            rows_per_epoch,
            epoch: None,
        }
    }

    pub fn rows_per_epoch(&self) -> u64 {
        self.rows_per_epoch
    }

    pub fn row(&mut self, index: u64) -> Result<Row> {
        let (epoch, within) = (index / self.rows_per_epoch, index % self.rows_per_epoch);
        let order = match self.epoch.take() {
            Some(current) if current.epoch == epoch => current,
            _ => self.order_of(epoch),
        };
        let row = self.row_of(&order, within);
        self.epoch = Some(order);
        row
    }

    fn row_of(&self, order: &EpochOrder, within: u64) -> Result<Row> {
        if !self.packing {
            return self
                .examples
                .row(order.order[within as usize], self.row_len);
        }
        // Packed: the epoch's tokens [start, end), gathered from the examples they fall in. Each
        // example keeps its own labels, so nothing is predicted across an example boundary.
        let start = within * self.row_len as u64;
        let end = (start + self.row_len as u64).min(order.starts.last().copied().unwrap_or(0));
        let mut row = Row {
            ids: Vec::with_capacity(self.row_len),
            labels: Vec::with_capacity(self.row_len),
        };
        let mut k = order.starts.partition_point(|&s| s <= start) - 1;
        while order.starts[k] < end {
            let example = self.examples.row(order.order[k], usize::MAX)?;
            let from = (start.max(order.starts[k]) - order.starts[k]) as usize;
            let to = (end.min(order.starts[k + 1]) - order.starts[k]) as usize;
            row.ids.extend_from_slice(&example.ids[from..to]);
            row.labels.extend_from_slice(&example.labels[from..to]);
            k += 1;
        }
        Ok(row)
    }

    fn order_of(&self, epoch: u64) -> EpochOrder {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(derive_seed(
            self.seed,
            SeedUse::EpochOrder,
            epoch,
        )));
        let mut starts = Vec::new();
        if self.packing {
            starts.reserve(order.len() + 1);
            let mut at = 0u64;
            starts.push(at);
            for &position in &order {
                at += self
                    .examples
                    .data
                    .example_len(self.examples.indices[position]) as u64;
                starts.push(at);
            }
        }
        EpochOrder {
            epoch,
            order,
            starts,
        }
    }
}

/// A batch of rows, right-padded to its longest row: `input_ids` and `labels` `(rows, len)`.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Real (non-pad) tokens.
    pub tokens: u64,
    /// Positions that count in the loss.
    pub targets: u64,
}

impl Batch {
    /// Padding is never attended to by real tokens (causal attention, right padding) nor
    /// scored, so any `pad_id` will do.
    pub fn from_rows(rows: &[Row], pad_id: i64, device: Device) -> Batch {
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut input_ids = vec![pad_id; rows.len() * width];
        let mut labels = vec![IGNORE_INDEX; rows.len() * width];
        for (i, row) in rows.iter().enumerate() {
            let start = i * width;
            input_ids[start..start + row.ids.len()].copy_from_slice(&row.ids);
            labels[start..start + row.labels.len()].copy_from_slice(&row.labels);
        }
        let shape = [rows.len() as i64, width as i64];
        Batch {
            input_ids: Tensor::from_slice(&input_ids).view(shape).to_device(device),
            labels: Tensor::from_slice(&labels).view(shape).to_device(device),
            tokens: rows.iter().map(|r| r.ids.len() as u64).sum(),
            targets: labels.iter().filter(|&&l| l != IGNORE_INDEX).count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode::tests::{ids, word_model, word_tokenizer, NO_TEMPLATE};
    use super::*;
    use crate::error::{classify, Failure};
    use crate::model::tokenizer_config::TokenizerConfig;

    fn write_lines(lines: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        (dir, path)
    }

    #[test]
    fn a_file_may_mix_formats_and_is_read_back_as_tokenized() {
        let (_dir, path) = write_lines(&[
            r#"{"text": "the cat"}"#,
            "",
            r#"{"prompt": "Q ", "completion": "no"}"#,
            r#"{"prompt": "Q the cat sat ", "completion": "yes"}"#,
        ]);
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(
            &tokenizer,
            &TokenizerConfig::default(),
            NO_TEMPLATE,
            &word_model(),
        )
        .unwrap();
        let data = TokenizedDataset::build(&path, &encoder, None).unwrap();
        assert_eq!((data.len(), data.dropped), (3, 0));
        assert_eq!(data.read(1).unwrap().ids, ids("<s> Q no </s>"));
        assert_eq!(
            data.read(2).unwrap().targets,
            [false, false, false, false, false, true, true]
        );

        // Cut to four tokens, the last prompt has no completion left: dropped.
        let data = TokenizedDataset::build(&path, &encoder, Some(4)).unwrap();
        assert_eq!((data.len(), data.dropped), (2, 1));
        assert_eq!(
            ExampleSet::all(&data).row(0, 4).unwrap().ids,
            ids("<s> the cat </s>")
        );
    }

    #[test]
    fn malformed_lines_are_user_errors_naming_file_and_line() {
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(
            &tokenizer,
            &TokenizerConfig::default(),
            NO_TEMPLATE,
            &word_model(),
        )
        .unwrap();
        let cases = [
            (r#"{"prompt": "no completion"}"#, "no \"completion\""),
            (r#"{"text": 3}"#, "column"),
            (r#"["text"]"#, "expected a JSON object"),
            (
                r#"{"text": "a", "prompt": "b", "completion": "c"}"#,
                "more than one format",
            ),
            (
                r#"{"messages": [{"content": "hi"}]}"#,
                "message 1 has no \"role\"",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
                "is a chat example, but the base model has no chat template",
            ),
            (r#"{"nothing": 1}"#, "expected \"messages\""),
        ];
        for (bad, expected) in cases {
            let (_dir, path) = write_lines(&[r#"{"text": "ok"}"#, "", r#"{"text": "fine"}"#, bad]);
            let err = TokenizedDataset::build(&path, &encoder, None)
                .err()
                .expect("a bad line fails");
            assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
            let message = err.to_string();
            assert!(
                message.contains("train.jsonl line 4: ") && message.contains(expected),
                "{bad}: {message}"
            );
        }
        let (_dir, path) = write_lines(&["", "  "]);
        let err = TokenizedDataset::build(&path, &encoder, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("has no examples"), "{err:#}");
    }

    #[test]
    fn a_dataset_with_nothing_to_learn_says_how_it_was_read() {
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(
            &tokenizer,
            &TokenizerConfig::default(),
            NO_TEMPLATE,
            &word_model(),
        )
        .unwrap();
        // Cut to two tokens, neither prompt leaves a completion token to learn.
        let (_dir, path) = write_lines(&[
            r#"{"prompt": "Q the cat ", "completion": "yes"}"#,
            r#"{"prompt": "Q the cat sat ", "completion": "no"}"#,
        ]);
        let err = TokenizedDataset::build(&path, &encoder, Some(2))
            .err()
            .expect("nothing to learn fails");
        assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
        let message = err.to_string();
        assert!(
            message
                .contains("none of its 2 examples has a token to learn within the first 2 tokens")
                && message.contains(
                    "read as prompt-completion (\"prompt\", \"completion\") for all 2 examples"
                )
                && message.contains("learned from the completion"),
            "{message}"
        );
    }

    #[test]
    fn validation_split_is_deterministic_and_disjoint() {
        let lines: Vec<String> = (0..10)
            .map(|_| r#"{"text": "the cat"}"#.to_string())
            .collect();
        let (_dir, path) = write_lines(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(
            &tokenizer,
            &TokenizerConfig::default(),
            NO_TEMPLATE,
            &word_model(),
        )
        .unwrap();
        let data = TokenizedDataset::build(&path, &encoder, None).unwrap();
        let (train, validation) = ExampleSet::split(&data, 0.25, 5).unwrap();
        assert_eq!((train.len(), validation.len()), (7, 3));
        assert!(validation
            .indices
            .iter()
            .all(|i| !train.indices.contains(i)));
        let (_, again) = ExampleSet::split(&data, 0.25, 5).unwrap();
        assert_eq!(again.indices, validation.indices);
        let (_, other) = ExampleSet::split(&data, 0.25, 6).unwrap();
        assert_ne!(other.indices, validation.indices);
    }

    #[test]
    fn packing_fills_rows_and_keeps_each_examples_labels() {
        let (_dir, path) = write_lines(&[
            r#"{"prompt": "Q ", "completion": "yes"}"#,
            r#"{"text": "the cat sat"}"#,
            r#"{"prompt": "Q the ", "completion": "no"}"#,
        ]);
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(
            &tokenizer,
            &TokenizerConfig::default(),
            NO_TEMPLATE,
            &word_model(),
        )
        .unwrap();
        let data = TokenizedDataset::build(&path, &encoder, None).unwrap();
        // 4 + 5 + 5 tokens in rows of 4: three full rows and one of two.
        let mut rows = TrainingRows::new(ExampleSet::all(&data), 4, true, 0);
        assert_eq!(rows.rows_per_epoch(), 4);
        let epoch: Vec<Row> = (0..4).map(|k| rows.row(k).unwrap()).collect();
        assert_eq!(
            epoch.iter().map(|r| r.ids.len()).collect::<Vec<_>>(),
            [4, 4, 4, 2]
        );
        let ids: Vec<i64> = epoch.iter().flat_map(|r| r.ids.clone()).collect();
        let labels: Vec<i64> = epoch.iter().flat_map(|r| r.labels.clone()).collect();
        // The rows are the epoch's examples end to end, each with its own labels.
        let order = rows.order_of(0).order;
        let expected_ids: Vec<i64> = order
            .iter()
            .flat_map(|&i| data.read(i).unwrap().ids)
            .collect();
        let expected_labels: Vec<i64> = order
            .iter()
            .flat_map(|&i| data.read(i).unwrap().labels())
            .collect();
        assert_eq!((ids, labels), (expected_ids, expected_labels));
        // The next epoch is another order of the same rows' worth of tokens, reproducibly.
        let next: Vec<Row> = (4..8).map(|k| rows.row(k).unwrap()).collect();
        let mut fresh = TrainingRows::new(ExampleSet::all(&data), 4, true, 0);
        assert_eq!(fresh.row(6).unwrap(), next[2]);
    }

    #[test]
    fn batch_labels_ignore_padding_and_count_targets() {
        let rows = [
            Row {
                ids: vec![1, 5, 6, 2],
                labels: vec![5, 6, 2, IGNORE_INDEX],
            },
            Row {
                ids: vec![1, 7, 2],
                labels: vec![IGNORE_INDEX, 2, IGNORE_INDEX],
            },
        ];
        let batch = Batch::from_rows(&rows, 0, Device::Cpu);
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.input_ids).unwrap(),
            [vec![1, 5, 6, 2], vec![1, 7, 2, 0]]
        );
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.labels).unwrap(),
            [
                vec![5, 6, 2, IGNORE_INDEX],
                vec![IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]
            ]
        );
        assert_eq!((batch.tokens, batch.targets), (7, 4));
    }
}
