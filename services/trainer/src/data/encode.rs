//! Examples and their tokens. A dataset line is one of three formats (`loraforge_spec::dataset`
//! reads them; a file may mix them):
//! - chat `{"messages": [{"role", "content"}, ...], "tools": [...]?}`, rendered with the model's
//!   chat template; loss on the assistant turns only (see `chat_template` for how they are found);
//! - `{"prompt", "completion"}`, the two texts concatenated; loss on the completion only;
//! - `{"text"}`, loss on all of it.
//!
//! Prompt-completion and text examples start with what the tokenizer puts before a text (the BOS
//! token, where the model has one) and end with EOS, so the model learns to stop; a chat
//! template's output already holds its special tokens as text and is tokenized as it is.

use crate::error::user_error;
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer_config::TokenizerConfig;
use crate::model::ModelConfig;
use anyhow::Result;
use minijinja::Value;
use std::ops::Range;
use tokenizers::{Encoding, Tokenizer};

/// Label value that cross-entropy skips: padding, prompts, and positions with nothing to predict.
pub const IGNORE_INDEX: i64 = -100;

/// One example, its chat messages held as template values.
pub(super) type Example = loraforge_spec::dataset::Example<Value>;

/// Parses one JSONL line by the formats `loraforge_spec::dataset` defines (the control plane
/// checks uploads with the same reader).
pub(super) fn parse_example(line: &str) -> Result<Example, String> {
    loraforge_spec::dataset::parse_example(line, |message: &Value| {
        message
            .get_attr("role")
            .ok()
            .as_ref()
            .and_then(Value::as_str)
            .is_some()
    })
}

/// Token ids of one example and which of them the model learns to predict.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<i64>,
    /// `targets[i]`: token `i` counts in the loss (assistant or completion text, EOS).
    pub targets: Vec<bool>,
}

impl TokenizedExample {
    pub(super) fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.targets.truncate(len);
    }

    /// The first token is never predicted, so an example needs a target after it.
    pub(super) fn has_target(&self) -> bool {
        self.targets.iter().skip(1).any(|&t| t)
    }

    /// `labels[i]` is the token to predict after position `i`, where it is a target.
    pub(super) fn labels(&self) -> Vec<i64> {
        (0..self.ids.len())
            .map(|i| match self.targets.get(i + 1) {
                Some(true) => self.ids[i + 1],
                _ => IGNORE_INDEX,
            })
            .collect()
    }
}

/// Turns examples into tokens, the way the model's tokenizer and chat template define.
pub struct ExampleEncoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The model's chat template, or why it has none usable (said to chat examples only, so a
    /// text dataset trains on a model whatever its template).
    chat_template: Result<&'a ChatTemplate, &'a str>,
    /// What the tokenizer puts before a text: the BOS token for Llama-style tokenizers, nothing
    /// for Qwen2 or GPT-2-style ones.
    text_prefix: Vec<i64>,
    eos: Option<i64>,
    vocab_size: i64,
}

impl<'a> ExampleEncoder<'a> {
    /// BOS as `tokenizer(text)` in transformers adds it: per `add_bos_token` where
    /// `tokenizer_config.json` sets it, else whatever the tokenizer's post-processor prepends.
    /// EOS is the tokenizer config's `eos_token`, else config.json's `eos_token_id`.
    pub fn new(
        tokenizer: &'a Tokenizer,
        tokens: &TokenizerConfig,
        chat_template: Result<&'a ChatTemplate, &'a str>,
        model: &ModelConfig,
    ) -> Result<ExampleEncoder<'a>> {
        let id_of = |token: &Option<String>| {
            token
                .as_deref()
                .and_then(|t| tokenizer.token_to_id(t))
                .map(i64::from)
        };
        let text_prefix = match tokens.add_bos_token {
            Some(true) => id_of(&tokens.bos_token)
                .or(model.bos_token_id)
                .into_iter()
                .collect(),
            Some(false) => Vec::new(),
            None => {
                let probe = tokenizer
                    .encode("a", true)
                    .map_err(|e| user_error(format!("the tokenizer cannot encode text: {e}")))?;
                probe
                    .get_ids()
                    .iter()
                    .zip(probe.get_special_tokens_mask())
                    .take_while(|(_, &special)| special == 1)
                    .map(|(&id, _)| i64::from(id))
                    .collect()
            }
        };
        Ok(ExampleEncoder {
            tokenizer,
            chat_template,
            text_prefix,
            eos: id_of(&tokens.eos_token).or(model.eos_token_id),
            vocab_size: model.vocab_size,
        })
    }

    pub(super) fn encode(&self, example: Example) -> Result<TokenizedExample, String> {
        let (ids, targets) = match example {
            Example::Chat { messages, tools } => {
                let template = self
                    .chat_template
                    .map_err(|why| format!("is a chat example, but {why}"))?;
                let tools = tools.unwrap_or(Value::from(()));
                let (text, spans) = template.render_with_assistant_spans(&messages, &tools)?;
                let encoding = self.tokenize(&text)?;
                let offsets = encoding.get_offsets();
                let targets = offsets
                    .iter()
                    .map(|&token| spans.iter().any(|span| overlaps(token, span)))
                    .collect();
                (token_ids(&encoding), targets)
            }
            Example::PromptCompletion { prompt, completion } => {
                // Tokenized together, so the completion's first token is the one the model would
                // produce after this prompt; a token reaching into the completion is learned.
                let boundary = prompt.len();
                let encoding = self.tokenize(&(prompt + &completion))?;
                let targets = encoding
                    .get_offsets()
                    .iter()
                    .map(|&(_, end)| end > boundary)
                    .collect();
                self.framed(token_ids(&encoding), targets)
            }
            Example::Text(text) => {
                let encoding = self.tokenize(&text)?;
                self.framed(token_ids(&encoding), vec![true; encoding.len()])
            }
        };
        if let Some(&bad) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(format!(
                "the tokenizer produced token id {bad}, but the model's vocab_size is {}",
                self.vocab_size
            ));
        }
        Ok(TokenizedExample { ids, targets })
    }

    /// A text's tokens with their byte offsets, without the tokenizer's special tokens.
    fn tokenize(&self, text: &str) -> Result<Encoding, String> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizing failed: {e}"))
    }

    /// The prefix (not learned) before and EOS (learned) after a text's tokens.
    fn framed(&self, ids: Vec<i64>, targets: Vec<bool>) -> (Vec<i64>, Vec<bool>) {
        let prefix = self.text_prefix.iter().map(|&id| (id, false));
        let eos = self.eos.map(|id| (id, true));
        prefix
            .chain(ids.into_iter().zip(targets))
            .chain(eos)
            .unzip()
    }
}

fn token_ids(encoding: &Encoding) -> Vec<i64> {
    encoding.get_ids().iter().map(|&id| i64::from(id)).collect()
}

/// Whether a token's byte range falls in a span (a zero-width token: whether it sits inside).
fn overlaps((start, end): (usize, usize), span: &Range<usize>) -> bool {
    if start == end {
        span.contains(&start)
    } else {
        start < span.end && end > span.start
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::chat_template::tests::{tokens, SMOLLM2};
    use chrono::Utc;

    const WORDS: [&str; 19] = [
        "[UNK]",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
        "system",
        "user",
        "assistant",
        "hi",
        "hello",
        "bye",
        "ciao",
        "Q",
        "A",
        "yes",
        "no",
        "the",
        "cat",
        "sat",
    ];

    fn id(word: &str) -> i64 {
        WORDS.iter().position(|w| *w == word).unwrap() as i64
    }

    pub fn ids(text: &str) -> Vec<i64> {
        text.split(' ').map(id).collect()
    }

    /// A word-level tokenizer over [`WORDS`] whose post-processor prepends `<s>`, as Llama's does;
    /// whitespace separates words and makes no tokens, so expected ids can be written by hand.
    pub fn word_tokenizer() -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
        let added: Vec<_> = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .map(|w| {
                serde_json::json!({"id": id(w), "content": w, "single_word": false, "lstrip": false,
                                         "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        });
        json.to_string().parse().unwrap()
    }

    pub fn word_model() -> ModelConfig {
        let json = serde_json::json!({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": WORDS.len(), "eos_token_id": 2});
        ModelConfig::from_json(&json).unwrap()
    }

    /// What the encoder is told when a model has no chat template.
    pub const NO_TEMPLATE: Result<&ChatTemplate, &str> = Err("the base model has no chat template");

    fn encode(
        line: &str,
        template: Result<&ChatTemplate, &str>,
        config: &TokenizerConfig,
    ) -> TokenizedExample {
        let tokenizer = word_tokenizer();
        let encoder = ExampleEncoder::new(&tokenizer, config, template, &word_model()).unwrap();
        parse_example(line).and_then(|e| encoder.encode(e)).unwrap()
    }

    /// Pairs each token with whether it is learned, for readable assertions.
    fn marked(example: &TokenizedExample) -> Vec<(String, bool)> {
        example
            .ids
            .iter()
            .zip(&example.targets)
            .map(|(&i, &t)| (WORDS[i as usize].to_string(), t))
            .collect()
    }

    fn expect(pairs: &[(&str, bool)]) -> Vec<(String, bool)> {
        pairs.iter().map(|&(w, t)| (w.to_string(), t)).collect()
    }

    #[test]
    fn text_is_learned_whole_between_bos_and_eos() {
        let example = encode(
            r#"{"text": "the cat sat", "id": 7}"#,
            NO_TEMPLATE,
            &TokenizerConfig::default(),
        );
        let want = [
            ("<s>", false),
            ("the", true),
            ("cat", true),
            ("sat", true),
            ("</s>", true),
        ];
        assert_eq!(marked(&example), expect(&want));
        assert_eq!(
            example.labels(),
            [id("the"), id("cat"), id("sat"), id("</s>"), IGNORE_INDEX]
        );
        // add_bos_token = false overrides the post-processor.
        let config = TokenizerConfig {
            add_bos_token: Some(false),
            ..Default::default()
        };
        assert_eq!(
            encode(r#"{"text": "the cat"}"#, NO_TEMPLATE, &config).ids,
            ids("the cat </s>")
        );
    }

    #[test]
    fn prompt_completion_learns_the_completion_and_eos_only() {
        let example = encode(
            r#"{"prompt": "Q the cat ", "completion": "A yes"}"#,
            NO_TEMPLATE,
            &TokenizerConfig::default(),
        );
        let want = [
            ("<s>", false),
            ("Q", false),
            ("the", false),
            ("cat", false),
            ("A", true),
            ("yes", true),
            ("</s>", true),
        ];
        assert_eq!(marked(&example), expect(&want));
        let labels = example.labels();
        assert_eq!(labels[..3], [IGNORE_INDEX; 3]);
        assert_eq!(labels[3..], [id("A"), id("yes"), id("</s>"), IGNORE_INDEX]);
    }

    #[test]
    fn chat_learns_assistant_turns_with_their_end_markers() {
        let config = tokens("<s>", "</s>");
        let template = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            &config,
            Utc::now(),
        )
        .unwrap();
        let line = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}"#;
        let example = encode(line, Ok(&template), &config);
        let want = [
            ("<|im_start|>", false),
            ("user", false),
            ("hi", false),
            ("<|im_end|>", false),
            ("<|im_start|>", false),
            ("assistant", false),
            ("hello", true),
            ("<|im_end|>", true),
            ("<|im_start|>", false),
            ("user", false),
            ("bye", false),
            ("<|im_end|>", false),
            ("<|im_start|>", false),
            ("assistant", false),
            ("ciao", true),
            ("<|im_end|>", true),
        ];
        // No BOS or EOS added: the template's text is tokenized as it is.
        assert_eq!(marked(&example), expect(&want));

        // A real template (SmolLM2's default system prompt is made of unknown words here).
        let smol = ChatTemplate::new(SMOLLM2, &config, Utc::now()).unwrap();
        let example = encode(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}"#,
            Ok(&smol),
            &config,
        );
        let learned: Vec<_> = marked(&example)
            .into_iter()
            .filter(|(_, t)| *t)
            .map(|(w, _)| w)
            .collect();
        assert_eq!(learned, ["yes", "<|im_end|>"]);
    }
}
