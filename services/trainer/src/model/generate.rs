//! Text generation from a model (optionally with a PEFT adapter): prompts batched with left
//! padding, a key/value cache so each new token costs one position, greedy decoding or
//! temperature + nucleus (top-p) sampling, and a stop per row at end-of-sequence.
//!
//! [`Generator`] is the library half of `loraforge-trainer generate`; the safety evaluation
//! calls it in-process to compare a base model with its adapted version.

use crate::error::user_error;
use crate::export::PeftAdapter;
use crate::model::chat_template::ChatTemplate;
use crate::model::llama::{KvCache, Logits};
use crate::model::tokenizer_config::TokenizerConfig;
use crate::model::LlamaModel;
use crate::model::ModelConfig;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// What to continue: a conversation rendered with the model's chat template (ending with
/// the assistant's turn header), or raw text.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Messages as the chat template takes them: `{"role": ..., "content": ...}`.
    Chat(Vec<Value>),
    Text(String),
}

impl Prompt {
    /// A one-turn conversation: the user says `message`.
    pub fn user(message: &str) -> Prompt {
        Prompt::Chat(vec![
            serde_json::json!({ "role": "user", "content": message }),
        ])
    }
}

/// How tokens are chosen.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 is greedy (argmax); above it, logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only from the most likely tokens whose probabilities sum to at least this.
    pub top_p: f64,
    /// Seeds the sampler, so the same prompts, batch and settings give the same text.
    pub seed: u64,
}

impl Sampling {
    fn check(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(user_error("max_new_tokens must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(user_error(format!(
                "temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(user_error(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Stop,
    /// max_new_tokens ran out first.
    Length,
}

/// One prompt's result.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The prompt as the model saw it (a conversation after its chat template).
    pub prompt: String,
    pub prompt_tokens: usize,
    /// The generated text, without the end-of-sequence token and special tokens.
    pub text: String,
    /// Every generated token, the end-of-sequence token included.
    pub token_ids: Vec<i64>,
    pub finish_reason: FinishReason,
}

/// A model, its tokenizer and chat template, ready to generate.
pub struct Generator {
    model: LlamaModel,
    config: ModelConfig,
    tokenizer: Tokenizer,
    tokens: TokenizerConfig,
    template: Option<ChatTemplate>,
    /// Any of these ends a row (Llama 3 lists several end-of-turn tokens).
    stop_ids: Vec<i64>,
    pad_id: i64,
    device: Device,
}

/// A batch ready for its prefill forward pass ([`Generator::prefill_inputs`]).
struct Prefill {
    cache: KvCache,
    ids: Tensor,
    positions: Tensor,
    key_valid: Tensor,
}

impl Generator {
    /// Loads a Hugging Face model directory onto `device`, with a PEFT adapter if given.
    pub fn load(model_dir: &Path, adapter: Option<&Path>, device: Device) -> Result<Generator> {
        let config = ModelConfig::load(model_dir)?;
        let tokenizer_path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| user_error(format!("cannot load {}: {e}", tokenizer_path.display())))?;
        let tokens = TokenizerConfig::load(model_dir)?;
        let template = match tokens.chat_template.as_deref() {
            Some(source) => Some(
                ChatTemplate::new(source, &tokens, chrono::Utc::now()).map_err(|e| {
                    user_error(format!("the model's chat template does not compile: {e}"))
                })?,
            ),
            None => None,
        };
        let stop_ids = stop_ids(model_dir, &tokenizer, &tokens)?;
        let pad_id = config
            .pad_token_id
            .or(stop_ids.first().copied())
            .unwrap_or(0);
        let mut model = LlamaModel::load(model_dir, config.clone(), device)?;
        if let Some(dir) = adapter {
            crate::families::attach_frozen(&mut model, &PeftAdapter::load(dir)?, device)?;
        }
        Ok(Generator {
            model,
            config,
            tokenizer,
            tokens,
            template,
            stop_ids,
            pad_id,
            device,
        })
    }

    /// Whether the model has a chat template; without one, prompts can only be raw text.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The loaded model, for measurements other than generation (the safety evaluation's
    /// next-token distributions and perplexity).
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The token id that pads a batch.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Attaches an adapter held in memory, frozen: the safety evaluation measures the base
    /// model, then the adapted one, without loading the weights twice.
    pub fn attach_adapter(&mut self, adapter: &PeftAdapter) -> Result<()> {
        crate::families::attach_frozen(&mut self.model, adapter, self.device)
    }

    /// Encodes dataset examples (a validation file) as training does, with this model's
    /// tokenizer and chat template.
    pub fn example_encoder(&self) -> Result<crate::data::ExampleEncoder<'_>> {
        let template = self
            .template
            .as_ref()
            .ok_or("the base model has no chat template");
        crate::data::ExampleEncoder::new(&self.tokenizer, &self.tokens, template, &self.config)
    }

    /// The prompt's text as the model sees it, and its token ids. A conversation is rendered
    /// with the generation prompt and tokenized without added special tokens (the template
    /// writes them), as transformers' `apply_chat_template` does; raw text gets the BOS token
    /// where the tokenizer adds one.
    pub fn encode(&self, prompt: &Prompt) -> Result<(String, Vec<i64>)> {
        let (text, add_special) = match prompt {
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    user_error("the model has no chat template (tokenizer_config.json or chat_template.jinja)")
                })?;
                let messages = messages
                    .iter()
                    .map(|m| serde_json::from_value::<minijinja::Value>(m.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| user_error(format!("a chat message is not valid: {e}")))?;
                let text = template
                    .render(&messages, &minijinja::Value::from(()), true)
                    .map_err(|e| user_error(format!("the chat template failed: {e}")))?;
                (text, false)
            }
            Prompt::Text(text) => (text.clone(), self.tokens.add_bos_token != Some(false)),
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), add_special)
            .map_err(|e| user_error(format!("the tokenizer cannot encode the prompt: {e}")))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        if let (Prompt::Text(_), Some(true)) = (prompt, self.tokens.add_bos_token) {
            let bos = self
                .tokens
                .bos_token
                .as_deref()
                .and_then(|t| self.tokenizer.token_to_id(t))
                .map(i64::from);
            if let Some(bos) = bos
                .or(self.config.bos_token_id)
                .filter(|&b| ids.first() != Some(&b))
            {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(user_error("a prompt encodes to no tokens"));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id >= self.config.vocab_size) {
            return Err(user_error(format!(
                "the tokenizer produced token id {bad}, but the model's vocab_size is {}",
                self.config.vocab_size
            )));
        }
        Ok((text, ids))
    }

    /// Completions of `prompts`, in order, computed `batch_size` prompts at a time.
    pub fn generate(
        &self,
        prompts: &[Prompt],
        sampling: &Sampling,
        batch_size: usize,
    ) -> Result<Vec<Completion>> {
        self.generate_reporting(prompts, sampling, batch_size, &mut |_| Ok(()))
    }

    /// [`Generator::generate`], telling `progress` how many more prompts are done after every
    /// decoding step (a batch's prompts count as done in proportion to the steps it has taken,
    /// all of them once it ends); an error from `progress` stops generation (a cancelled job).
    /// Prompts are batched in order of length, so a batch's rows need little padding;
    /// completions come back in the prompts' order.
    pub fn generate_reporting(
        &self,
        prompts: &[Prompt],
        sampling: &Sampling,
        batch_size: usize,
        progress: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Vec<Completion>> {
        sampling.check()?;
        let encoded = prompts
            .iter()
            .map(|p| self.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].1.len());
        let mut rng = StdRng::seed_from_u64(sampling.seed);
        let mut completions: Vec<Option<Completion>> = vec![None; prompts.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let ids: Vec<&[i64]> = chunk.iter().map(|&i| encoded[i].1.as_slice()).collect();
            let generated =
                tch::no_grad(|| self.generate_batch(&ids, sampling, &mut rng, progress))?;
            for (&i, (token_ids, finish_reason)) in chunk.iter().zip(generated) {
                let (text, prompt_ids) = &encoded[i];
                let shown: Vec<u32> = token_ids
                    .iter()
                    .filter(|id| !self.stop_ids.contains(id))
                    .map(|&id| id as u32)
                    .collect();
                let completion_text = self.tokenizer.decode(&shown, true).map_err(|e| {
                    user_error(format!("the tokenizer cannot decode the completion: {e}"))
                })?;
                completions[i] = Some(Completion {
                    prompt: text.clone(),
                    prompt_tokens: prompt_ids.len(),
                    text: completion_text,
                    token_ids,
                    finish_reason,
                });
            }
        }
        Ok(completions.into_iter().flatten().collect())
    }

    /// The residual stream after every layer at each prompt's last token (where its answer
    /// starts), `(layers, prompts, hidden)` in fp32 on the CPU, `batch_size` prompts at a
    /// time, each batch computed as generation prefills it (the safety evaluation's refusal
    /// direction).
    pub fn last_token_residuals(&self, prompts: &[Vec<i64>], batch_size: usize) -> Result<Tensor> {
        let mut batches = Vec::new();
        for chunk in prompts.chunks(batch_size.max(1)) {
            let rows: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
            let longest = rows.iter().map(|p| p.len()).max().unwrap_or(0);
            let residuals = tch::no_grad(|| {
                let mut prefill = self.prefill_inputs(&rows, longest)?;
                self.model.last_residuals_cached(
                    &prefill.ids,
                    &prefill.positions,
                    &prefill.key_valid,
                    &mut prefill.cache,
                )
            })?;
            batches.push(residuals.to_kind(Kind::Float).to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&batches, 1))
    }

    /// One batch: prefill the prompts, then one position per step for every row until each
    /// has stopped or the budget is spent.
    fn generate_batch(
        &self,
        prompts: &[&[i64]],
        sampling: &Sampling,
        rng: &mut StdRng,
        progress: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Vec<(Vec<i64>, FinishReason)>> {
        let batch = prompts.len();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let total = longest + sampling.max_new_tokens;
        if total as i64 > self.config.max_position_embeddings {
            return Err(user_error(format!(
                "a prompt of {longest} tokens plus {} new ones exceeds the model's {} positions",
                sampling.max_new_tokens, self.config.max_position_embeddings
            )));
        }
        let Prefill {
            mut cache,
            ids,
            positions,
            mut key_valid,
        } = self.prefill_inputs(prompts, total)?;
        let mut next_position: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
        let logits =
            self.model
                .forward_cached(&ids, &positions, &key_valid, &mut cache, Logits::Last)?;
        let mut last = logits.select(1, 0);

        let mut outputs: Vec<(Vec<i64>, Option<FinishReason>)> = vec![(Vec::new(), None); batch];
        let mut reported = 0;
        for step in 0..sampling.max_new_tokens {
            let chosen = self.choose(&last, sampling, rng)?;
            for ((tokens, finished), &token) in outputs.iter_mut().zip(&chosen) {
                if finished.is_none() {
                    tokens.push(token);
                    if self.stop_ids.contains(&token) {
                        *finished = Some(FinishReason::Stop);
                    }
                }
            }
            let done = batch * (step + 1) / sampling.max_new_tokens;
            if step + 1 == sampling.max_new_tokens || outputs.iter().all(|(_, f)| f.is_some()) {
                progress(batch - reported)?;
                break;
            }
            if done > reported {
                progress(done - reported)?;
                reported = done;
            }
            // Finished rows keep stepping (a batch moves together); their tokens are dropped.
            let input = Tensor::from_slice(&chosen)
                .reshape([batch as i64, 1])
                .to_device(self.device);
            let step_positions = Tensor::from_slice(&next_position)
                .reshape([batch as i64, 1])
                .to_device(self.device);
            key_valid = Tensor::cat(
                &[
                    &key_valid,
                    &Tensor::ones([batch as i64, 1], (Kind::Bool, self.device)),
                ],
                1,
            );
            last = self
                .model
                .forward_cached(
                    &input,
                    &step_positions,
                    &key_valid,
                    &mut cache,
                    Logits::Last,
                )?
                .select(1, 0);
            next_position.iter_mut().for_each(|p| *p += 1);
        }
        Ok(outputs
            .into_iter()
            .map(|(tokens, finished)| (tokens, finished.unwrap_or(FinishReason::Length)))
            .collect())
    }

    /// What a batch's prefill runs on: the tokens every prompt starts with (a chat template's
    /// system turn) are prefilled once into a cache of `capacity` positions and shared; the
    /// rest of each prompt follows them left-padded (`ids`, RoPE `positions`), the padding
    /// masked out (`key_valid`), so a row computes what it computes alone.
    fn prefill_inputs(&self, prompts: &[&[i64]], capacity: usize) -> Result<Prefill> {
        let batch = prompts.len();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        // Every row keeps at least one token of its own, whose logits start its answer. Not
        // with a sliding window: the window is measured in cache slots, and the padding after
        // a shared prefix would count in it.
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(1);
        let shared = match self.config.sliding_window {
            Some(_) => 0,
            None => shared_prefix(prompts).min(shortest - 1),
        };
        let cache = if shared > 0 {
            let prefix = &prompts[0][..shared];
            let shape = [1, shared as i64];
            let mut one = self.model.new_cache(1, capacity as i64);
            // Only the keys and values are wanted; the logits of its last position are dropped.
            let _ = self.model.forward_cached(
                &Tensor::from_slice(prefix)
                    .reshape(shape)
                    .to_device(self.device),
                &Tensor::arange(shared as i64, (Kind::Int64, self.device)).reshape(shape),
                &Tensor::ones(shape, (Kind::Bool, self.device)),
                &mut one,
                Logits::Last,
            )?;
            one.repeated(batch as i64)
        } else {
            self.model.new_cache(batch as i64, capacity as i64)
        };
        let rest = longest - shared;
        let (mut ids, mut positions, mut valid) = (Vec::new(), Vec::new(), Vec::new());
        for prompt in prompts {
            let own = &prompt[shared..];
            let padding = rest - own.len();
            ids.extend(std::iter::repeat_n(self.pad_id, padding).chain(own.iter().copied()));
            positions
                .extend(std::iter::repeat_n(0, padding).chain(shared as i64..prompt.len() as i64));
            valid.extend(
                std::iter::repeat_n(true, shared)
                    .chain(std::iter::repeat_n(false, padding))
                    .chain(std::iter::repeat_n(true, own.len())),
            );
        }
        let to_device = |t: Tensor, columns: usize| {
            t.reshape([batch as i64, columns as i64])
                .to_device(self.device)
        };
        Ok(Prefill {
            cache,
            ids: to_device(Tensor::from_slice(&ids), rest),
            positions: to_device(Tensor::from_slice(&positions), rest),
            key_valid: to_device(Tensor::from_slice(&valid), longest),
        })
    }

    /// The next token of every row from its logits `(batch, vocab)`.
    fn choose(&self, logits: &Tensor, sampling: &Sampling, rng: &mut StdRng) -> Result<Vec<i64>> {
        let logits = logits.to_kind(Kind::Float);
        if sampling.temperature == 0.0 {
            return Ok(Vec::<i64>::try_from(
                logits.argmax(-1, false).to_device(Device::Cpu),
            )?);
        }
        // Sampled on the host from f32 probabilities, so a seed gives the same draw on any device.
        let probabilities = (logits / sampling.temperature)
            .softmax(-1, Kind::Float)
            .to_device(Device::Cpu);
        let rows = Vec::<Vec<f32>>::try_from(probabilities)?;
        Ok(rows
            .iter()
            .map(|row| nucleus_sample(row, sampling.top_p, rng))
            .collect())
    }
}

/// How many tokens every prompt starts with.
fn shared_prefix(prompts: &[&[i64]]) -> usize {
    let Some((first, others)) = prompts.split_first() else {
        return 0;
    };
    others.iter().fold(first.len(), |shared, prompt| {
        first[..shared]
            .iter()
            .zip(prompt.iter())
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// Draws from the smallest set of most likely tokens whose probability reaches `top_p`
/// (ties broken by id, so the set is deterministic), renormalised.
fn nucleus_sample(probabilities: &[f32], top_p: f64, rng: &mut StdRng) -> i64 {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_unstable_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &id in &order {
        mass += f64::from(probabilities[id]);
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let mut draw = rng.random::<f64>() * mass;
    for &id in &order[..kept] {
        draw -= f64::from(probabilities[id]);
        if draw < 0.0 {
            return id as i64;
        }
    }
    order[kept - 1] as i64
}

/// Token ids that end generation: config.json's and generation_config.json's `eos_token_id`
/// (a number or a list), and the tokenizer config's `eos_token`.
fn stop_ids(model_dir: &Path, tokenizer: &Tokenizer, tokens: &TokenizerConfig) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for file in ["config.json", "generation_config.json"] {
        let path = model_dir.join(file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(user_error(format!("cannot read {}: {e}", path.display()))),
        };
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| user_error(format!("{} is not valid JSON: {e}", path.display())))?;
        match json.get("eos_token_id") {
            Some(Value::Array(list)) => ids.extend(list.iter().filter_map(Value::as_i64)),
            Some(value) => ids.extend(value.as_i64()),
            None => {}
        }
    }
    ids.extend(
        tokens
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .map(i64::from),
    );
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(max_new_tokens: usize) -> Sampling {
        Sampling {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    fn fixture() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        crate::fixture::write_fixture(dir.path(), 3).unwrap();
        let model = dir.path().join("model");
        (dir, model)
    }

    /// Decoding with the cache must compute what the full forward computes: prefill of a
    /// prefix, then one token at a time, gives the logits of every position.
    #[test]
    fn cached_decoding_matches_the_full_forward() {
        let (_dir, model_dir) = fixture();
        let generator = Generator::load(&model_dir, None, Device::Cpu).unwrap();
        let ids: Vec<i64> = vec![1, 17, 40, 99, 5, 63, 12, 7];
        let input = Tensor::from_slice(&ids).unsqueeze(0);
        let full = tch::no_grad(|| generator.model.forward(&input, false));
        let n = ids.len() as i64;
        let mut cache = generator.model.new_cache(1, n);
        let prefix = 5;
        let valid = |len: i64| Tensor::ones([1, len], (Kind::Bool, Device::Cpu));
        let mut pieces = vec![tch::no_grad(|| {
            let positions = Tensor::arange(prefix, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            generator.model.forward_cached(
                &input.narrow(1, 0, prefix),
                &positions,
                &valid(prefix),
                &mut cache,
                Logits::All,
            )
        })
        .unwrap()];
        for i in prefix..n {
            let positions = Tensor::from_slice(&[i]).unsqueeze(0);
            let step = tch::no_grad(|| {
                generator.model.forward_cached(
                    &input.narrow(1, i, 1),
                    &positions,
                    &valid(i + 1),
                    &mut cache,
                    Logits::Last,
                )
            });
            pieces.push(step.unwrap());
        }
        let cached = Tensor::cat(&pieces, 1);
        let diff = (cached - full).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }

    /// Left padding must not change a row: a prompt generates the same tokens alone and in a
    /// batch with a longer one, greedy and sampled alike.
    #[test]
    fn batched_rows_generate_what_they_generate_alone() {
        let (_dir, model_dir) = fixture();
        let generator = Generator::load(&model_dir, None, Device::Cpu).unwrap();
        let short = Prompt::Text("the red cat".into());
        let long = Prompt::Text("count: one two three four five six".into());
        let settings = greedy(12);
        let alone = generator
            .generate(std::slice::from_ref(&short), &settings, 1)
            .unwrap();
        let together = generator
            .generate(&[long.clone(), short.clone()], &settings, 2)
            .unwrap();
        assert_eq!(alone[0].token_ids, together[1].token_ids);
        assert!(alone[0].prompt_tokens < together[0].prompt_tokens);
        assert_eq!(alone[0].token_ids.len(), 12, "{:?}", alone[0]);
        assert_eq!(alone[0].finish_reason, FinishReason::Length);

        let sampled = Sampling {
            max_new_tokens: 12,
            temperature: 1.0,
            top_p: 0.9,
            seed: 5,
        };
        let once = generator
            .generate(&[long.clone(), short.clone()], &sampled, 2)
            .unwrap();
        let again = generator.generate(&[long, short], &sampled, 2).unwrap();
        assert_eq!(once[1].token_ids, again[1].token_ids);
    }

    /// A prefix the prompts share is prefilled once: each row still generates what it
    /// generates alone, and prompts come back in their order though batched by length.
    #[test]
    fn a_shared_prefix_changes_no_row() {
        let (_dir, model_dir) = fixture();
        let generator = Generator::load(&model_dir, None, Device::Cpu).unwrap();
        let prompts: Vec<Prompt> = [
            "the rules: answer briefly. count one two three four",
            "the rules: answer briefly. red",
            "the rules: answer briefly. the blue dog runs",
        ]
        .iter()
        .map(|t| Prompt::Text(t.to_string()))
        .collect();
        let ids: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| generator.encode(p).unwrap().1)
            .collect();
        let slices: Vec<&[i64]> = ids.iter().map(Vec::as_slice).collect();
        assert!(shared_prefix(&slices) >= 4, "{ids:?}");
        let together = generator.generate(&prompts, &greedy(10), 3).unwrap();
        for (prompt, batched) in prompts.iter().zip(&together) {
            let alone = generator
                .generate(std::slice::from_ref(prompt), &greedy(10), 1)
                .unwrap();
            assert_eq!(alone[0].token_ids, batched.token_ids);
            assert_eq!(alone[0].prompt, batched.prompt);
        }
    }

    #[test]
    fn nucleus_keeps_only_the_likely_tokens() {
        let mut rng = StdRng::seed_from_u64(0);
        let probabilities = [0.05, 0.6, 0.3, 0.05];
        let draws: Vec<i64> = (0..200)
            .map(|_| nucleus_sample(&probabilities, 0.85, &mut rng))
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2), "{draws:?}");
        assert!(draws.contains(&1) && draws.contains(&2));
        assert_eq!(nucleus_sample(&probabilities, 0.1, &mut rng), 1);
    }

    #[test]
    fn bad_settings_are_user_errors() {
        for sampling in [
            greedy(0),
            Sampling {
                temperature: -1.0,
                ..greedy(4)
            },
            Sampling {
                top_p: 0.0,
                ..greedy(4)
            },
        ] {
            let err = sampling.check().unwrap_err();
            assert!(crate::error::classify(&err).is_some(), "{err}");
        }
    }
}
