//! Registered inputs: `loraforge datasets …` (upload a file, register a URI, list, get) and
//! the API side of `loraforge models …` (register, list, get).

use crate::client::{read_json, Client};
use crate::error::{exit, CliError, Result};
use crate::output::{self, Output};
use crate::Common;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loraforge_spec::merge::{MergeRecord, MERGE_RECORD_FILE};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct DatasetsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: DatasetsCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetsCommand {
    /// Upload a JSONL file into the artifact store and register it under NAME.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Register a dataset the server can already read (file://, s3://, gs://, az://).
    Register { name: String, uri: String },
    /// The project's datasets.
    List,
    /// One dataset: URI, sha256, size, format.
    Get { name: String },
}

pub async fn run_datasets(args: DatasetsArgs) -> Result<u8> {
    let client = args.common.client()?;
    let out = args.common.output;
    match args.command {
        DatasetsCommand::Upload { file, name } => {
            let row = upload(&client, &file, &name, out == Output::Table).await?;
            print_input(out, &row, "dataset");
        }
        DatasetsCommand::Register { name, uri } => {
            let row = client
                .send_json(
                    Method::POST,
                    &["v1", "datasets"],
                    Some(&json!({"name": name, "uri": uri})),
                )
                .await?;
            print_input(out, &row, "dataset");
        }
        DatasetsCommand::List => list(&client, out, "datasets").await?,
        DatasetsCommand::Get { name } => {
            let row = client.get(&["v1", "datasets", &name], &[]).await?;
            print_input(out, &row, "dataset");
        }
    }
    Ok(exit::OK)
}

/// `POST /v1/datasets/{name}/upload` with the file's bytes as the body, streamed.
async fn upload(client: &Client, file: &Path, name: &str, show_progress: bool) -> Result<Value> {
    let handle = tokio::fs::File::open(file)
        .await
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
    let size = handle
        .metadata()
        .await
        .map_err(|e| CliError::io(file.display(), e))?
        .len();
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "uploading [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let counter = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(handle).inspect(move |chunk| {
        if let (Some(bar), Ok(chunk)) = (&counter, chunk) {
            bar.inc(chunk.len() as u64);
        }
    });
    let url = client.url(&["v1", "datasets", name, "upload"], &[]);
    let request = client
        .request(Method::POST, url)
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream));
    let result = client.send(request).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    read_json(result?).await
}

async fn list(client: &Client, out: Output, what: &str) -> Result<()> {
    let rows = client.get(&["v1", what], &[]).await?;
    if out == Output::Json {
        output::print_json(&rows);
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                output::text(&r["name"]),
                output::text(&r["format"]),
                output::text(&r["size"]),
                short_sha(&r["sha256"]),
                output::text(&r["uri"]),
            ]
        })
        .collect();
    if table.is_empty() {
        output::print_text(&format!("no {what}\n"));
    } else {
        output::print_text(&output::table(
            &["NAME", "FORMAT", "SIZE", "SHA256", "URI"],
            &table,
        ));
    }
    Ok(())
}

fn short_sha(v: &Value) -> String {
    let s = output::text(v);
    s.chars().take(12).collect()
}

fn print_input(out: Output, row: &Value, what: &str) {
    match out {
        Output::Json => output::print_json(row),
        Output::Table => {
            let source = match (
                row["source_adapter"].as_str(),
                row["source_version"].as_i64(),
            ) {
                (Some(a), Some(v)) => format!("merged from {a}@{v}"),
                _ => String::new(),
            };
            output::print_text(&output::fields(&[
                (what, output::text(&row["name"])),
                ("uri", output::text(&row["uri"])),
                ("format", output::text(&row["format"])),
                ("size", output::text(&row["size"])),
                ("sha256", output::text(&row["sha256"])),
                ("source", source),
                ("created", output::time(&row["created_at"])),
            ]));
        }
    }
}

/// `loraforge models list`.
pub async fn list_models(common: &Common) -> Result<u8> {
    list(&common.client()?, common.output, "base-models").await?;
    Ok(exit::OK)
}

/// `loraforge models get NAME`.
pub async fn get_model(common: &Common, name: &str) -> Result<u8> {
    let row = common
        .client()?
        .get(&["v1", "base-models", name], &[])
        .await?;
    print_input(common.output, &row, "base model");
    Ok(exit::OK)
}

/// `loraforge models register DIR|URI --name N`: a local directory goes as its `file://`
/// URI (the server must be able to read it); a merged model's `loraforge_merge.json` names
/// the adapter version it came from, sent as its `source`.
pub async fn register_model(common: &Common, location: &str, name: &str) -> Result<u8> {
    let row = register_model_row(&common.client()?, location, name).await?;
    print_input(common.output, &row, "base model");
    Ok(exit::OK)
}

/// Registers a base model; answers the registry's row.
pub async fn register_model_row(client: &Client, location: &str, name: &str) -> Result<Value> {
    let is_uri = location.contains("://");
    let (uri, source) = if is_uri {
        (location.to_string(), None)
    } else {
        let dir = Path::new(location)
            .canonicalize()
            .map_err(|e| CliError::usage(format!("{location}: {e}")))?;
        if !dir.is_dir() {
            return Err(CliError::usage(format!(
                "{location} is not a model directory (config.json, *.safetensors, tokenizer.json)"
            )));
        }
        let uri = url::Url::from_directory_path(&dir)
            .map_err(|_| CliError::usage(format!("{} is not an absolute path", dir.display())))?
            .to_string();
        (uri.trim_end_matches('/').to_string(), merge_source(&dir)?)
    };
    let mut body = json!({ "name": name, "uri": uri });
    if let Some(source) = source {
        body["source"] = source;
    }
    // The server reads the whole model for its digest before it answers: minutes for a large one.
    let request = client
        .request(Method::POST, client.url(&["v1", "base-models"], &[]))
        .timeout(std::time::Duration::from_secs(1800))
        .json(&body);
    client.json_of(request).await
}

fn merge_source(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join(MERGE_RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let record: MergeRecord = serde_json::from_slice(&bytes).map_err(|e| {
                CliError::usage(format!("{} is not a merge record: {e}", path.display()))
            })?;
            Ok(record
                .source
                .map(|s| json!({ "adapter": s.adapter, "version": s.version })))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::io(path.display(), e)),
    }
}
