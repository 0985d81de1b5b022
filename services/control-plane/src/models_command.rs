//! `loraforge models ...`: bringing base models in from outside the Hugging Face layout
//! (GGUF files) and registering model directories with a running control plane.

use anyhow::{bail, Context, Result};
use loraforge_spec::merge::{MergeRecord, MERGE_RECORD_FILE};
use loraforge_spec::AdapterName;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory
    /// (config.json, model.safetensors in f32, tokenizer.json, tokenizer_config.json); with
    /// --api, also register it as a base model. Prints a JSON summary.
    Import {
        /// The .gguf file.
        file: PathBuf,
        /// The model directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Base-model name to register under; default: the file's name without .gguf,
        /// lower-cased (SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct.q4_1).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register a local model directory as a base model. A merged model's
    /// loraforge_merge.json names the adapter version it came from, recorded as its source.
    Register {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
pub struct ApiArgs {
    /// The control plane to register with, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "LORAFORGE_API")]
    api: Option<String>,
    /// An API key with the submit scope (not needed when the server runs without auth).
    #[arg(long, env = "LORAFORGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

pub async fn run(command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::Import {
            file,
            out,
            name,
            api,
        } => {
            let name = match name {
                Some(name) => name,
                None => default_name(&file)?,
            };
            let name = AdapterName::parse(&name)
                .map_err(anyhow::Error::msg)
                .context("--name")?;
            let (source, target) = (file.clone(), out.clone());
            let summary = tokio::task::spawn_blocking(move || {
                loraforge_models::import_gguf(&source, &target)
            })
            .await?
            .with_context(|| format!("importing {}", file.display()))?;
            let mut report = json!({ "out": out, "model": summary });
            if let Some(url) = &api.api {
                report["registered"] =
                    register(url, api.api_key.as_deref(), &name, &out, None).await?;
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        ModelsCommand::Register { dir, name, api } => {
            let Some(url) = &api.api else {
                bail!("--api (or LORAFORGE_API) is required to register")
            };
            let name = AdapterName::parse(&name)
                .map_err(anyhow::Error::msg)
                .context("--name")?;
            let record_path = dir.join(MERGE_RECORD_FILE);
            let source = match std::fs::read(&record_path) {
                Ok(bytes) => {
                    let record: MergeRecord =
                        serde_json::from_slice(&bytes).with_context(|| {
                            format!("{} is not a merge record", record_path.display())
                        })?;
                    record.source
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", record_path.display()))
                }
            };
            let source = source.map(|s| json!({ "adapter": s.adapter, "version": s.version }));
            let row = register(url, api.api_key.as_deref(), &name, &dir, source).await?;
            println!("{}", serde_json::to_string_pretty(&row)?);
            Ok(())
        }
    }
}

/// A registrable name from the file name: lower-cased, other characters as `-`.
fn default_name(file: &Path) -> Result<String> {
    let stem = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".gguf").unwrap_or(stem).to_lowercase();
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .replace("..", ".");
    let name: String = trimmed.chars().take(63).collect();
    AdapterName::parse(&name)
        .map(|n| n.to_string())
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot derive a model name from {}; pass --name",
                file.display()
            )
        })
}

/// `POST /v1/base-models` with the directory as a `file://` URI; returns the registry's row.
async fn register(
    api: &str,
    key: Option<&str>,
    name: &AdapterName,
    dir: &Path,
    source: Option<Value>,
) -> Result<Value> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let uri = url::Url::from_directory_path(&dir)
        .map_err(|_| anyhow::anyhow!("{} is not an absolute path", dir.display()))?
        .to_string();
    let uri = uri.trim_end_matches('/').to_string();
    let mut body = json!({ "name": name.as_str(), "uri": uri });
    if let Some(source) = source {
        body["source"] = source;
    }
    let endpoint = format!("{}/v1/base-models", api.trim_end_matches('/'));
    // The server reads the whole model for its digest before it answers: minutes for a large one.
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(1800))
        .build()?;
    let mut request = client.post(&endpoint).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {endpoint}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("registering {name} at {endpoint} answered {status}: {text}");
    }
    serde_json::from_str(&text)
        .with_context(|| format!("{endpoint} answered {status} with {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_file() {
        let name = |f: &str| default_name(Path::new(f)).unwrap();
        assert_eq!(
            name("/x/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(name("_Qwen 2 (7B).gguf"), "qwen-2--7b-");
        assert!(default_name(Path::new("__.gguf")).is_err());
    }
}
