//! `tokenizer.json` rebuilt from a GGUF's vocabulary (`tokenizer.ggml.*`), for byte-level BPE
//! vocabularies (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM, Llama 3, Qwen2, ...).
//!
//! The file keeps tokens, merges, token types and special token ids, but not the
//! pre-tokenizer: that is named by `tokenizer.ggml.pre`, and we map the names to the splits
//! llama.cpp applies for them (`llama-vocab.cpp`), so text is cut the way the merges were learned.

use crate::gguf::{GgufFile, MetaValue};
use crate::ModelsError;
use ahash::AHashMap;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`enum llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama 3's split (`LLAMA_VOCAB_PRE_TYPE_LLAMA3`): numbers in runs of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (`LLAMA_VOCAB_PRE_TYPE_QWEN2`): single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a vocabulary's text is cut before BPE.
enum PreTokenizer {
    /// GPT-2's regex, as the byte-level pre-tokenizer applies it.
    Gpt2,
    /// Every digit alone, then GPT-2's regex (StarCoder and SmolLM vocabularies).
    Gpt2SingleDigits,
    /// A regex of its own, then the byte-level mapping; `ignore_merges` as llama.cpp sets it.
    Split {
        regex: &'static str,
        ignore_merges: bool,
    },
}

impl PreTokenizer {
    fn for_name(name: &str) -> Result<PreTokenizer, ModelsError> {
        Ok(match name {
            "default" | "gpt2" | "gpt-2" => PreTokenizer::Gpt2,
            "smollm" | "starcoder" | "refact" => PreTokenizer::Gpt2SingleDigits,
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
                PreTokenizer::Split { regex: LLAMA3_SPLIT, ignore_merges: true }
            }
            "qwen2" | "deepseek-r1-qwen" => PreTokenizer::Split { regex: QWEN2_SPLIT, ignore_merges: false },
            other => {
                return Err(ModelsError::Unsupported(format!(
                    "tokenizer.ggml.pre {other:?}; supported: default, gpt2, smollm, starcoder, refact, llama-bpe, \
                     llama3, smaug-bpe, qwen2, deepseek-r1-qwen"
                )))
            }
        })
    }

    fn build(&self) -> Result<PreTokenizerWrapper, ModelsError> {
        let gpt2 = || ByteLevel::default().add_prefix_space(false).use_regex(true);
        Ok(match self {
            PreTokenizer::Gpt2 => gpt2().into(),
            PreTokenizer::Gpt2SingleDigits => {
                Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into()
            }
            PreTokenizer::Split { regex, .. } => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| ModelsError::Tokenizer(format!("split regex: {e}")))?;
                let bytes = ByteLevel::default()
                    .add_prefix_space(false)
                    .use_regex(false);
                Sequence::new(vec![split.into(), bytes.into()]).into()
            }
        })
    }
}

/// The special tokens a tokenizer config names, by text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The tokenizer and its special tokens.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub vocab_size: usize,
}

fn strings<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, ModelsError> {
    let items = gguf
        .get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| ModelsError::Format(format!("no {key} array in the metadata")))?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ModelsError::Format(format!("{key} holds a non-string")))
        })
        .collect()
}

/// Builds the tokenizer a GGUF describes and checks it against the file: every token maps
/// back to its own id, and the special ids are the file's.
pub fn build(gguf: &GgufFile) -> Result<GgufTokenizer, ModelsError> {
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(ModelsError::Unsupported(format!(
            "tokenizer.ggml.model {model:?}: only byte-level BPE vocabularies (\"gpt2\") are supported; \
             SentencePiece (\"llama\") ones are not yet"
        )));
    }
    let pre_name = gguf
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let pre = PreTokenizer::for_name(pre_name)?;
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let merges = strings(gguf, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match gguf
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
    {
        Some(items) => items.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };

    // A token listed twice keeps its first id, so that every id below is reachable once.
    let mut vocab: AHashMap<String, u32> = AHashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id as u32);
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelsError::Format(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ignore_merges = matches!(
        pre,
        PreTokenizer::Split {
            ignore_merges: true,
            ..
        }
    );
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| ModelsError::Tokenizer(format!("building the BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.build()?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole, skipped when
    // decoding with skip_special_tokens. User-defined ones (<think>) are matched whole too,
    // as llama.cpp does, but are ordinary text otherwise.
    let byte_alphabet = ByteLevel::alphabet();
    let typed = |wanted: i64| {
        tokens
            .iter()
            .zip(&types)
            .filter(move |(_, &t)| t == wanted)
            .map(|(token, _)| *token)
    };
    // A "control" token outside the byte alphabet is a mislabelled ordinary token in a
    // byte-level vocabulary; treating it as special would make it unreachable (as transformers notes).
    let control: Vec<AddedToken> = typed(CONTROL)
        .filter(|t| t.chars().all(|c| byte_alphabet.contains(&c)))
        .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    let user_defined: Vec<AddedToken> = typed(USER_DEFINED)
        .map(|t| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user_defined);

    let special_id = |key: &str| -> Result<Option<String>, ModelsError> {
        let Some(value) = gguf.get(&format!("tokenizer.ggml.{key}")) else {
            return Ok(None);
        };
        let id = value
            .as_i64()
            .ok_or_else(|| ModelsError::Format(format!("tokenizer.ggml.{key} is not an id")))?;
        let token = usize::try_from(id).ok().and_then(|i| tokens.get(i));
        token.map(|t| Some(t.to_string())).ok_or_else(|| {
            ModelsError::Format(format!(
                "tokenizer.ggml.{key} {id} is outside the vocabulary"
            ))
        })
    };
    let flag = |key: &str, default: bool| {
        gguf.get(key)
            .and_then(MetaValue::as_bool)
            .unwrap_or(default)
    };
    let special = SpecialTokens {
        bos: special_id("bos_token_id")?,
        eos: special_id("eos_token_id")?,
        pad: special_id("padding_token_id")?,
        unk: special_id("unknown_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token", false),
        add_eos: flag("tokenizer.ggml.add_eos_token", false),
    };
    let processor = post_processor(&special, &tokenizer)?;
    tokenizer.with_post_processor(Some(processor));

    verify(&tokenizer, &tokens)?;
    Ok(GgufTokenizer {
        tokenizer,
        special,
        vocab_size: tokens.len(),
    })
}

/// BOS/EOS added around every encoding where the file asks for them (llama.cpp's
/// `add_bos_token`), else the byte-level post-processor that adds nothing.
fn post_processor(
    special: &SpecialTokens,
    tokenizer: &Tokenizer,
) -> Result<PostProcessorWrapper, ModelsError> {
    let bos = special.bos.as_deref().filter(|_| special.add_bos);
    let eos = special.eos.as_deref().filter(|_| special.add_eos);
    if bos.is_none() && eos.is_none() {
        return Ok(ByteLevel::default().trim_offsets(false).into());
    }
    let specials = [bos, eos]
        .into_iter()
        .flatten()
        .map(|token| {
            let id = tokenizer.token_to_id(token);
            id.map(|id| (token.to_string(), id)).ok_or_else(|| {
                ModelsError::Tokenizer(format!("special token {token:?} is not in the vocabulary"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let around = |sequence: &str, type_id: u32| -> Vec<String> {
        let piece = |token: &str| format!("{token}:{type_id}");
        bos.map(piece)
            .into_iter()
            .chain([piece(sequence)])
            .chain(eos.map(piece))
            .collect()
    };
    let failed = |e: String| ModelsError::Tokenizer(format!("post-processor template: {e}"));
    let mut builder = TemplateProcessing::builder();
    builder.try_single(around("$A", 0)).map_err(failed)?;
    builder
        .try_pair([around("$A", 0), around("$B", 1)].concat())
        .map_err(failed)?;
    builder.special_tokens(specials);
    let template = builder.build().map_err(|e| failed(e.to_string()))?;
    Ok(template.into())
}

/// Every token of the file must come back as its own id, or encodings would not be the
/// model's: catches merges that reference unknown tokens and special tokens that shadow others.
fn verify(tokenizer: &Tokenizer, tokens: &[&str]) -> Result<(), ModelsError> {
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (id, token) in tokens.iter().enumerate() {
        let expected = *first_seen.entry(token).or_insert(id);
        if tokenizer.token_to_id(token) != Some(expected as u32) {
            return Err(ModelsError::Tokenizer(format!(
                "token {id} ({token:?}) maps to {:?} in the rebuilt tokenizer",
                tokenizer.token_to_id(token)
            )));
        }
    }
    if tokenizer.get_vocab_size(true) != tokens.len() {
        return Err(ModelsError::Tokenizer(format!(
            "the rebuilt tokenizer has {} tokens, the file {}",
            tokenizer.get_vocab_size(true),
            tokens.len()
        )));
    }
    Ok(())
}
