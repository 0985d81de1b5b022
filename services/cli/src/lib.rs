//! The `loraforge` command-line client: the subcommands that talk to a control plane over
//! its HTTP API (`jobs`, `adapters`, `lineage`, `datasets`, `methods`, `models list|get|register`,
//! `keys` without `--project`, `whoami`). It is a client of the API only, so it works the
//! same against a local `loraforge serve` and a cluster. docs/cli.md is its manual.
//!
//! Connection: flags > environment (`LORAFORGE_URL`, `LORAFORGE_API_KEY`) > a profile of
//! `~/.config/loraforge/config.toml` ([`config`]). Every read takes `-o json` (the API's
//! answer as is). Exit statuses tell outcomes apart ([`error::exit`]).

pub mod adapters;
pub mod client;
pub mod config;
pub mod download;
pub mod error;
pub mod inputs;
pub mod jobs;
pub mod keys;
pub mod lineage;
pub mod methods;
pub mod output;
pub mod progress;
pub mod watch;

use clap::{Args, Subcommand};
pub use client::Client;
pub use config::{Config, ConnectionArgs};
pub use error::{exit, CliError};
pub use output::Output;

/// What every client command takes: where to connect, and how to print.
#[derive(Debug, Clone, Default, Args)]
pub struct Common {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// How to print answers: `table` for people, `json` (the API's answer) for scripts.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Common {
    pub fn client(&self) -> error::Result<Client> {
        Client::new(Config::load(&self.connection)?)
    }
}

/// The client subcommands, flattened into the `loraforge` binary's own.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit training jobs and follow them: submit, list, get, watch, cancel, events, logs.
    Jobs(jobs::JobsArgs),
    /// The adapter registry: list, versions, get, resolve, download, alias, tag, delete.
    Adapters(adapters::AdaptersArgs),
    /// A version's lineage drawn as a tree: its job, base model, dataset and parents.
    Lineage(adapters::LineageArgs),
    /// Datasets: upload a file, register a URI, list, get.
    Datasets(inputs::DatasetsArgs),
    /// The adapter methods the server offers and their knobs (from its API document): list, get.
    Methods(methods::MethodsArgs),
    /// Who the configured key is (project, scope) and where the settings came from.
    Whoami {
        #[command(flatten)]
        common: Common,
    },
}

/// Runs a client command; prints its error, if any, and answers the exit status.
pub async fn run(command: ClientCommand) -> u8 {
    let result = match command {
        ClientCommand::Jobs(args) => jobs::run(args).await,
        ClientCommand::Adapters(args) => adapters::run(args).await,
        ClientCommand::Lineage(args) => adapters::lineage(args).await,
        ClientCommand::Datasets(args) => inputs::run_datasets(args).await,
        ClientCommand::Methods(args) => methods::run(args).await,
        ClientCommand::Whoami { common } => whoami(common).await,
    };
    finish(result)
}

/// The exit status of a command's result, its error printed on stderr.
pub fn finish(result: error::Result<u8>) -> u8 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprint!("{}", e.render());
            e.exit_code()
        }
    }
}

async fn whoami(common: Common) -> error::Result<u8> {
    let client = common.client()?;
    let me = client.get(&["v1", "me"], &[]).await?;
    let config = client.config();
    match common.output {
        Output::Json => output::print_json(&serde_json::json!({
            "url": config.url,
            "url_source": config.url_source.to_string(),
            "api_key_source": config.key_source.as_ref().map(ToString::to_string),
            "project": me["project"],
            "scope": me["scope"],
            "auth_enabled": me["auth_enabled"],
        })),
        Output::Table => {
            let key = match &config.key_source {
                Some(source) => format!("set (from {source})"),
                None => "none".to_string(),
            };
            let auth = match me["auth_enabled"].as_bool() {
                Some(false) => "disabled on the server (dev mode: every caller is its admin)",
                _ => "",
            };
            output::print_text(&output::fields(&[
                (
                    "url",
                    format!("{} (from {})", config.url, config.url_source),
                ),
                ("api key", key),
                ("project", output::text(&me["project"])),
                ("scope", output::text(&me["scope"])),
                ("auth", auth.to_string()),
            ]));
        }
    }
    Ok(exit::OK)
}
