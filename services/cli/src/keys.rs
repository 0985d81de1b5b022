//! `loraforge keys …` through the API (`/v1/keys`, admin scope, in the caller's project).
//! The same command with `--project` (create) or `--prefix` (revoke) works on the database
//! directly instead: the bootstrap path for a project's first key, run where the control
//! plane runs (the `loraforge` binary handles those two itself).

use crate::client::Client;
use crate::error::{exit, CliError, Result};
use crate::output::{self, Output};
use crate::Common;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    Read,
    Submit,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once (only its hash is stored). Through the API, in your
    /// key's project (needs admin); with --project, directly in the database (DATABASE_URL):
    /// the way to a project's first key.
    Create {
        /// read < submit < admin
        #[arg(long, value_enum)]
        scope: Scope,
        /// Create it in the database directly, for this project (run on the server).
        #[arg(long)]
        project: Option<String>,
    },
    /// The project's keys: id, prefix, scope, created, revoked (never the keys themselves).
    List,
    /// Revoke a key by its id or prefix (the part after `lf_`). With --prefix instead,
    /// directly in the database (run on the server).
    Revoke {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Revoke in the database directly: the key with this prefix, in any project.
        #[arg(long)]
        prefix: Option<String>,
    },
}

pub async fn run(args: KeysArgs) -> Result<u8> {
    let client = args.common.client()?;
    let out = args.common.output;
    match args.command {
        KeysCommand::Create {
            scope,
            project: None,
        } => {
            let key = client
                .send_json(
                    Method::POST,
                    &["v1", "keys"],
                    Some(&json!({ "scope": scope.as_str() })),
                )
                .await?;
            print_created(out, &key);
        }
        KeysCommand::List => {
            let page = client.get(&["v1", "keys"], &[]).await?;
            if out == Output::Json {
                output::print_json(&page);
                return Ok(exit::OK);
            }
            let rows: Vec<Vec<String>> = page["keys"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|k| {
                    vec![
                        output::text(&k["id"]),
                        format!("lf_{}_…", output::text(&k["prefix"])),
                        output::text(&k["scope"]),
                        output::age(&k["created_at"]),
                        match k["revoked_at"].is_null() {
                            true => "active".into(),
                            false => format!("revoked {} ago", output::age(&k["revoked_at"])),
                        },
                    ]
                })
                .collect();
            output::print_text(&output::table(
                &["ID", "KEY", "SCOPE", "AGE", "STATE"],
                &rows,
            ));
        }
        KeysCommand::Revoke { key: Some(key), .. } => {
            let id = key_id(&client, &key).await?;
            client
                .send_json(Method::DELETE, &["v1", "keys", &id], None)
                .await?;
            match out {
                Output::Json => output::print_json(&json!({"id": id, "revoked": true})),
                Output::Table => output::print_text(&format!("revoked key {id}\n")),
            }
        }
        KeysCommand::Create {
            project: Some(_), ..
        }
        | KeysCommand::Revoke { key: None, .. } => {
            return Err(CliError::usage(
                "--project and --prefix work on the database directly: run them with the `loraforge` binary on the server",
            ))
        }
    }
    Ok(exit::OK)
}

/// A key is printed once, at creation: on stdout, with the warning on stderr.
pub fn print_created(out: Output, key: &Value) {
    match out {
        Output::Json => output::print_json(key),
        Output::Table => output::print_text(&output::fields(&[
            ("key", output::text(&key["key"])),
            ("id", output::text(&key["id"])),
            ("project", output::text(&key["project"])),
            ("scope", output::text(&key["scope"])),
        ])),
    }
    eprintln!("store this key now: it cannot be shown again");
}

/// The id of the key `given` names: an id as it is, else the active key with that prefix
/// (`3fa2b1c0`, `lf_3fa2b1c0` or the whole key).
async fn key_id(client: &Client, given: &str) -> Result<String> {
    if uuid::Uuid::parse_str(given).is_ok() {
        return Ok(given.to_string());
    }
    let prefix = prefix_of(given);
    let page = client.get(&["v1", "keys"], &[]).await?;
    let matching: Vec<String> = page["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|k| k["prefix"].as_str() == Some(prefix) && k["revoked_at"].is_null())
        .map(|k| output::text(&k["id"]))
        .collect();
    match matching.as_slice() {
        [id] => Ok(id.clone()),
        [] => Err(CliError::usage(format!(
            "no active key with prefix {prefix} in this project (`loraforge keys list`)"
        ))),
        _ => Err(CliError::usage(format!(
            "several active keys have prefix {prefix}: revoke by id (`loraforge keys list`)"
        ))),
    }
}

/// `lf_<prefix>_<secret>` or `lf_<prefix>` -> `<prefix>`.
pub fn prefix_of(given: &str) -> &str {
    let rest = given.strip_prefix("lf_").unwrap_or(given);
    rest.split('_').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_by_their_prefix_in_any_form() {
        assert_eq!(prefix_of("3fa2b1c0"), "3fa2b1c0");
        assert_eq!(prefix_of("lf_3fa2b1c0"), "3fa2b1c0");
        assert_eq!(prefix_of("lf_3fa2b1c0_00112233"), "3fa2b1c0");
    }
}
