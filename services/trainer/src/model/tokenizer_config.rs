//! What a Hugging Face model directory says about its tokenizer beyond `tokenizer.json`:
//! the special tokens, whether a BOS token is added, and the chat template
//! (`tokenizer_config.json`, or `chat_template.jinja` beside it in the newer layout).

use crate::error::user_error;
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// The parts of `tokenizer_config.json` that tokenization and chat templates need.
/// A model without the file has none of them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// `add_bos_token` where the config states it (Llama 2 and Mistral tokenizers); otherwise
    /// the tokenizer's post-processor decides, as in transformers' fast tokenizers.
    pub add_bos_token: Option<bool>,
    /// The Jinja source of the chat template.
    pub chat_template: Option<String>,
}

const CONFIG_FILE: &str = "tokenizer_config.json";
const TEMPLATE_FILE: &str = "chat_template.jinja";

impl TokenizerConfig {
    pub fn load(model_dir: &Path) -> Result<TokenizerConfig> {
        let path = model_dir.join(CONFIG_FILE);
        let mut config = match std::fs::read(&path) {
            Ok(bytes) => {
                let json: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    user_error(format!("{} is not valid JSON: {e}", path.display()))
                })?;
                Self::from_json(&json)
                    .map_err(|message| user_error(format!("{}: {message}", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(e) => return Err(user_error(format!("cannot read {}: {e}", path.display()))),
        };
        // transformers saves the template as its own file since 4.43, and prefers it.
        let template_path = model_dir.join(TEMPLATE_FILE);
        match std::fs::read_to_string(&template_path) {
            Ok(source) => config.chat_template = Some(source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(user_error(format!(
                    "cannot read {}: {e}",
                    template_path.display()
                )))
            }
        }
        Ok(config)
    }

    pub fn from_json(json: &Value) -> Result<TokenizerConfig, String> {
        let add_bos_token = match json.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(format!(
                    "\"add_bos_token\" must be true or false, got {other}"
                ))
            }
        };
        Ok(TokenizerConfig {
            bos_token: special_token(json, "bos_token")?,
            eos_token: special_token(json, "eos_token")?,
            pad_token: special_token(json, "pad_token")?,
            unk_token: special_token(json, "unk_token")?,
            add_bos_token,
            chat_template: chat_template(json)?,
        })
    }
}

/// A special token is saved as its text, or as an `AddedToken` object with a `content`.
fn special_token(json: &Value, key: &str) -> Result<Option<String>, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Object(token)) => match token.get("content") {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            _ => Err(format!("{key:?} is an object without a \"content\" string")),
        },
        Some(other) => Err(format!("{key:?} must be a token string, got {other}")),
    }
}

/// The template is a string, or (older multi-template configs) a list of `{name, template}`
/// of which `default` is the one `apply_chat_template` uses for conversations.
fn chat_template(json: &Value) -> Result<Option<String>, String> {
    match json.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => Ok(named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|entry| entry.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string)),
        Some(other) => Err(format!(
            "\"chat_template\" must be a string or a list of named templates, got {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_tokens_as_strings_or_added_token_objects() {
        let config = TokenizerConfig::from_json(&json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
            "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        }))
        .unwrap();
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        assert_eq!((config.pad_token, config.add_bos_token), (None, Some(true)));
        assert_eq!(config.chat_template.as_deref(), Some("D"));
        let err = TokenizerConfig::from_json(&json!({"eos_token": 2})).unwrap_err();
        assert!(err.contains("eos_token"), "{err}");
    }

    #[test]
    fn chat_template_file_wins_over_the_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            TokenizerConfig::load(dir.path()).unwrap(),
            TokenizerConfig::default()
        );
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"chat_template": "old"}"#).unwrap();
        assert_eq!(
            TokenizerConfig::load(dir.path())
                .unwrap()
                .chat_template
                .as_deref(),
            Some("old")
        );
        std::fs::write(dir.path().join(TEMPLATE_FILE), "new").unwrap();
        assert_eq!(
            TokenizerConfig::load(dir.path())
                .unwrap()
                .chat_template
                .as_deref(),
            Some("new")
        );
    }
}
