//! `loraforge models ...`: bringing base models in from outside the Hugging Face layout
//! (GGUF files) and registering model directories with a running control plane.

use anyhow::{Context, Result};
use loraforge_cli::{exit, Common};
use loraforge_spec::AdapterName;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    common: Common,
    /// The control plane's URL: the older name of --url (also as LORAFORGE_API).
    #[arg(long, global = true, hide = true)]
    api: Option<String>,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory
    /// (config.json, model.safetensors in f32, tokenizer.json, tokenizer_config.json); with
    /// --register (or --url), also register it as a base model. Prints a JSON summary.
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
        /// Register the imported directory with the configured control plane.
        #[arg(long)]
        register: bool,
    },
    /// Register a base model: a local model directory (sent as its file:// URI, which the
    /// server must be able to read) or a URI (s3://, gs://, az://, file://). A merged
    /// model's loraforge_merge.json names the adapter version it came from, recorded as its
    /// source.
    Register {
        #[arg(value_name = "DIR|URI")]
        location: String,
        #[arg(long)]
        name: String,
    },
    /// The project's registered base models.
    List,
    /// One registered base model: URI, sha256, size, format, source.
    Get { name: String },
}

pub async fn run(args: ModelsArgs) -> u8 {
    let ModelsArgs {
        mut common,
        api,
        command,
    } = args;
    // `--api` and LORAFORGE_API: what these commands took before `--url`.
    let legacy = api.clone().or_else(|| {
        std::env::var(loraforge_cli::config::URL_ENV)
            .is_err()
            .then(|| std::env::var("LORAFORGE_API").ok())
            .flatten()
    });
    let url_given = common.connection.url.is_some() || api.is_some();
    if common.connection.url.is_none() {
        common.connection.url = legacy;
    }
    match command {
        ModelsCommand::Import {
            file,
            out,
            name,
            register,
        } => match import(&common, file, out, name, register || url_given).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("Error: {e:?}");
                exit::FAILURE
            }
        },
        ModelsCommand::Register { location, name } => {
            let result = match AdapterName::parse(&name) {
                Ok(_) => loraforge_cli::inputs::register_model(&common, &location, &name).await,
                Err(m) => Err(loraforge_cli::CliError::usage(format!("--name: {m}"))),
            };
            loraforge_cli::finish(result)
        }
        ModelsCommand::List => {
            loraforge_cli::finish(loraforge_cli::inputs::list_models(&common).await)
        }
        ModelsCommand::Get { name } => {
            loraforge_cli::finish(loraforge_cli::inputs::get_model(&common, &name).await)
        }
    }
}

async fn import(
    common: &Common,
    file: PathBuf,
    out: PathBuf,
    name: Option<String>,
    register: bool,
) -> Result<()> {
    let name = match name {
        Some(name) => name,
        None => default_name(&file)?,
    };
    let name = AdapterName::parse(&name)
        .map_err(anyhow::Error::msg)
        .context("--name")?;
    let (source, target) = (file.clone(), out.clone());
    let summary =
        tokio::task::spawn_blocking(move || loraforge_models::import_gguf(&source, &target))
            .await?
            .with_context(|| format!("importing {}", file.display()))?;
    let mut report = json!({ "out": out, "model": summary });
    if register {
        let client = common.client().map_err(|e| anyhow::anyhow!(e.render()))?;
        let location = out.to_string_lossy();
        report["registered"] =
            loraforge_cli::inputs::register_model_row(&client, &location, name.as_str())
                .await
                .map_err(|e| anyhow::anyhow!("registering: {}", e.render().trim_end()))?;
    }
    // The import report is JSON whatever -o says: it has no table form.
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
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
