//! `loraforge adapters …` and `loraforge lineage`: the registry. Versions are named
//! `NAME@REF`, where REF is a version number, an alias, or `latest` (the newest ready
//! version; also what a bare `NAME` means).

use crate::client::{view, Client};
use crate::download::{self, FileDigest};
use crate::error::{exit, CliError, Result};
use crate::lineage::{self, Direction, Graph};
use crate::output::{self, Output};
use crate::Common;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AdaptersArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: AdaptersCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// Adapters with at least one version matching every filter.
    List {
        #[arg(long)]
        base_model: Option<String>,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// pending, ready, quarantined, failed
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// An adapter's versions, newest first, and its aliases.
    Versions {
        name: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Versions below this number (the next page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// One version: status, files and digests, method, metrics, safety verdict.
    Get {
        /// NAME@REF: a version number, an alias or `latest`.
        reference: String,
    },
    /// What a serving engine loads for NAME@REF: version, URI, files, base model.
    Resolve { reference: String },
    /// Download a version's files into a directory, verifying every sha256.
    Download {
        reference: String,
        /// The directory (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Point an alias at a version, or remove it (admin).
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Add or remove a version's tags (admin).
    Tag {
        #[command(subcommand)]
        command: TagCommand,
    },
    /// Delete a version and its files (admin; refused while an alias points at it).
    Delete {
        /// NAME@N
        reference: String,
        /// Yes, delete it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Create ALIAS, or move it, to the version NAME@REF names (REF may itself be an alias:
    /// `alias set demo@staging prod` promotes staging's version).
    Set { reference: String, alias: String },
    /// Remove ALIAS of adapter NAME.
    Rm { name: String, alias: String },
}

#[derive(Debug, Subcommand)]
pub enum TagCommand {
    /// Add tags to NAME@REF.
    Add {
        reference: String,
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Remove tags from NAME@REF.
    Rm {
        reference: String,
        #[arg(required = true)]
        tags: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct LineageArgs {
    #[command(flatten)]
    pub common: Common,
    /// NAME@REF: a version number, an alias or `latest`.
    pub reference: String,
    /// How many hops of parents (or children) to follow.
    #[arg(long, default_value_t = 10)]
    pub depth: u32,
    /// Draw what was made from this version instead of what went into it.
    #[arg(long)]
    pub descendants: bool,
}

/// `demo@3` -> (`demo`, `3`); `demo` -> (`demo`, `latest`).
pub fn split_reference(reference: &str) -> Result<(&str, &str)> {
    let (name, reference) = reference.split_once('@').unwrap_or((reference, "latest"));
    if name.is_empty() || reference.is_empty() {
        return Err(CliError::usage(format!(
            "{reference:?}: name a version as NAME@REF (REF: a version number, an alias or latest), e.g. demo@3 or demo@prod"
        )));
    }
    Ok((name, reference))
}

/// The version number NAME@REF names (numbers as they are; aliases and `latest` asked of
/// the server).
async fn version_of(client: &Client, reference: &str) -> Result<(String, i64)> {
    let (name, r) = split_reference(reference)?;
    if let Ok(n) = r.parse::<i64>() {
        return Ok((name.to_string(), n));
    }
    let resolved = client
        .get(
            &["v1", "adapters", name, "resolve"],
            &[("ref", Some(r.to_string()))],
        )
        .await?;
    let version = resolved["version"].as_i64().ok_or_else(|| {
        CliError::usage(format!(
            "the server did not resolve {reference}: {resolved}"
        ))
    })?;
    Ok((name.to_string(), version))
}

pub async fn run(args: AdaptersArgs) -> Result<u8> {
    let client = args.common.client()?;
    let out = args.common.output;
    match args.command {
        AdaptersCommand::List {
            base_model,
            method,
            tag,
            status,
            limit,
            cursor,
        } => {
            let page = client
                .get(
                    &["v1", "adapters"],
                    &[
                        ("base_model", base_model),
                        ("method", method),
                        ("tag", tag),
                        ("status", status),
                        ("limit", Some(limit.to_string())),
                        ("cursor", cursor),
                    ],
                )
                .await?;
            if out == Output::Json {
                output::print_json(&page);
                return Ok(exit::OK);
            }
            let rows: Vec<Vec<String>> = page["adapters"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    vec![
                        output::text(&a["name"]),
                        output::text(&a["versions"]),
                        output::text(&a["latest_ready"]),
                        output::text(&a["quarantined"]),
                        output::age(&a["created_at"]),
                    ]
                })
                .collect();
            if rows.is_empty() {
                output::print_text("no adapters\n");
            } else {
                output::print_text(&output::table(
                    &["NAME", "VERSIONS", "LATEST READY", "QUARANTINED", "AGE"],
                    &rows,
                ));
            }
            if let Some(next) = page["next_cursor"].as_str() {
                eprintln!("more: --cursor {next}");
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Versions {
            name,
            limit,
            before,
        } => {
            let page = client
                .get(
                    &["v1", "adapters", &name, "versions"],
                    &[
                        ("limit", Some(limit.to_string())),
                        ("before", before.map(|b| b.to_string())),
                    ],
                )
                .await?;
            if out == Output::Json {
                output::print_json(&page);
                return Ok(exit::OK);
            }
            output::print_text(&versions_table(&page));
            if let Some(next) = page["next_before"].as_i64() {
                eprintln!("more: --before {next}");
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Get { reference } => {
            let (name, version) = version_of(&client, &reference).await?;
            let v = client
                .get(
                    &["v1", "adapters", &name, "versions", &version.to_string()],
                    &[],
                )
                .await?;
            match out {
                Output::Json => output::print_json(&v),
                Output::Table => output::print_text(&describe_version(&v)),
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Resolve { reference } => {
            let (name, r) = split_reference(&reference)?;
            let resolved = client
                .get(
                    &["v1", "adapters", name, "resolve"],
                    &[("ref", Some(r.to_string()))],
                )
                .await?;
            match out {
                Output::Json => output::print_json(&resolved),
                Output::Table => {
                    let base = &resolved["base_model"];
                    let base = match base["name"].as_str() {
                        Some(n) => format!("{n} ({})", output::text(&base["uri"])),
                        None => output::text(&base["uri"]),
                    };
                    output::print_text(&output::fields(&[
                        (
                            "version",
                            format!("{name}@{}", output::text(&resolved["version"])),
                        ),
                        ("status", output::text(&resolved["status"])),
                        ("uri", output::text(&resolved["uri"])),
                        ("base model", base),
                        ("files", files_text(&resolved["files"])),
                    ]));
                }
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Download { reference, to } => {
            let (name, version) = version_of(&client, &reference).await?;
            let v = client
                .get(
                    &["v1", "adapters", &name, "versions", &version.to_string()],
                    &[],
                )
                .await?;
            let files: Vec<FileDigest> = view(&v["files"])?;
            if files.is_empty() {
                return Err(CliError::usage(format!(
                    "{name}@{version} has no files (status {})",
                    output::text(&v["status"])
                )));
            }
            let done =
                download::version_files(&client, &name, version, &files, &to, out == Output::Table)
                    .await?;
            match out {
                Output::Json => output::print_json(&json!({
                    "adapter_name": name, "version": version, "dir": to, "files": done,
                })),
                Output::Table => {
                    let mut text = String::new();
                    for f in &done {
                        let how = if f.kept {
                            "already there"
                        } else {
                            "downloaded"
                        };
                        text.push_str(&format!(
                            "{}  {} bytes  sha256 {} verified ({how})\n",
                            f.path.display(),
                            f.size,
                            f.sha256
                        ));
                    }
                    text.push_str(&format!(
                        "{name}@{version}: {} files in {}\n",
                        done.len(),
                        to.display()
                    ));
                    output::print_text(&text);
                }
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Alias { command } => match command {
            AliasCommand::Set { reference, alias } => {
                let (name, version) = version_of(&client, &reference).await?;
                let row = client
                    .send_json(
                        Method::PUT,
                        &["v1", "adapters", &name, "aliases", &alias],
                        Some(&json!({ "version": version })),
                    )
                    .await?;
                match out {
                    Output::Json => output::print_json(&row),
                    Output::Table => output::print_text(&format!(
                        "{name}@{alias} -> version {}\n",
                        output::text(&row["version"])
                    )),
                }
                Ok(exit::OK)
            }
            AliasCommand::Rm { name, alias } => {
                let name = name.split_once('@').map_or(name.as_str(), |(n, _)| n);
                client
                    .send_json(
                        Method::DELETE,
                        &["v1", "adapters", name, "aliases", &alias],
                        None,
                    )
                    .await?;
                match out {
                    Output::Json => output::print_json(
                        &json!({"adapter_name": name, "alias": alias, "removed": true}),
                    ),
                    Output::Table => output::print_text(&format!("removed alias {name}@{alias}\n")),
                }
                Ok(exit::OK)
            }
        },
        AdaptersCommand::Tag { command } => {
            let (reference, tags, method) = match command {
                TagCommand::Add { reference, tags } => (reference, tags, Method::PUT),
                TagCommand::Rm { reference, tags } => (reference, tags, Method::DELETE),
            };
            let (name, version) = version_of(&client, &reference).await?;
            let mut now = Value::Null;
            for tag in &tags {
                now = client
                    .send_json(
                        method.clone(),
                        &[
                            "v1",
                            "adapters",
                            &name,
                            "versions",
                            &version.to_string(),
                            "tags",
                            tag,
                        ],
                        None,
                    )
                    .await?;
            }
            match out {
                Output::Json => output::print_json(
                    &json!({"adapter_name": name, "version": version, "tags": now}),
                ),
                Output::Table => {
                    let tags: Vec<String> = now
                        .as_array()
                        .map(|a| a.iter().map(output::text).collect())
                        .unwrap_or_default();
                    output::print_text(&format!(
                        "{name}@{version} tags: {}\n",
                        if tags.is_empty() {
                            "(none)".to_string()
                        } else {
                            tags.join(", ")
                        }
                    ));
                }
            }
            Ok(exit::OK)
        }
        AdaptersCommand::Delete { reference, yes } => {
            let (name, r) = split_reference(&reference)?;
            let Ok(version) = r.parse::<i64>() else {
                return Err(CliError::usage(
                    "delete names a version by its number (NAME@N), never by an alias or latest",
                ));
            };
            if !yes {
                return Err(CliError::usage(format!(
                    "deleting {name}@{version} removes its files for good: pass --yes"
                )));
            }
            client
                .send_json(
                    Method::DELETE,
                    &["v1", "adapters", name, "versions", &version.to_string()],
                    None,
                )
                .await?;
            match out {
                Output::Json => output::print_json(
                    &json!({"adapter_name": name, "version": version, "deleted": true}),
                ),
                Output::Table => output::print_text(&format!("deleted {name}@{version}\n")),
            }
            Ok(exit::OK)
        }
    }
}

pub async fn lineage(args: LineageArgs) -> Result<u8> {
    let client = args.common.client()?;
    let (name, version) = version_of(&client, &args.reference).await?;
    let version_segment = version.to_string();
    let route = if args.descendants {
        "descendants"
    } else {
        "lineage"
    };
    let answer = client
        .get(
            &["v1", "adapters", &name, "versions", &version_segment, route],
            &[("depth", Some(args.depth.to_string()))],
        )
        .await?;
    if args.common.output == Output::Json {
        output::print_json(&answer);
        return Ok(exit::OK);
    }
    let graph: Graph = if args.descendants {
        view(&answer)?
    } else {
        view(&answer["graph"])?
    };
    let direction = if args.descendants {
        Direction::Descendants
    } else {
        Direction::Ancestors
    };
    let root = format!("adapter_version:{name}@{version}");
    output::print_text(&lineage::draw(&graph, &root, direction));
    Ok(exit::OK)
}

fn files_text(files: &Value) -> String {
    files
        .as_array()
        .map(|files| {
            files
                .iter()
                .map(|f| {
                    format!(
                        "{}  {} bytes  sha256 {}",
                        output::text(&f["name"]),
                        output::text(&f["size"]),
                        output::text(&f["sha256"])
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn versions_table(page: &Value) -> String {
    let aliases = page["aliases"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = page["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|v| {
            let number = v["version"].as_i64();
            let pointing: Vec<String> = aliases
                .iter()
                .filter(|a| a["version"].as_i64() == number)
                .map(|a| output::text(&a["alias"]))
                .collect();
            let tags: Vec<String> = v["tags"]
                .as_array()
                .map(|t| t.iter().map(output::text).collect())
                .unwrap_or_default();
            vec![
                output::text(&v["version"]),
                output::text(&v["status"]),
                output::text(&v["method"]["type"]),
                v["metrics"]["final_loss"]
                    .as_f64()
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_default(),
                safety_text(&v["safety_verdict"]),
                pointing.join(","),
                tags.join(","),
                output::age(&v["created_at"]),
            ]
        })
        .collect();
    output::table(
        &[
            "VERSION", "STATUS", "METHOD", "LOSS", "SAFETY", "ALIASES", "TAGS", "AGE",
        ],
        &rows,
    )
}

fn safety_text(verdict: &Value) -> String {
    match verdict {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("decision")
            .or_else(|| o.get("verdict"))
            .map(output::text)
            .unwrap_or_else(|| verdict.to_string()),
        other => other.to_string(),
    }
}

/// A version as `adapters get` prints it.
pub fn describe_version(v: &Value) -> String {
    let metrics = &v["metrics"];
    let metrics_line = match (
        metrics["initial_loss"].as_f64(),
        metrics["final_loss"].as_f64(),
    ) {
        (Some(a), Some(b)) => {
            let mut s = format!("loss {a:.4} -> {b:.4}");
            if let Some(steps) = metrics["steps"].as_u64() {
                s.push_str(&format!(" over {steps} steps"));
            }
            if let Some(eval) = metrics["eval_loss"].as_f64() {
                s.push_str(&format!(", validation {eval:.4}"));
            }
            s
        }
        _ => String::new(),
    };
    let parent = match v["parent"].as_object() {
        Some(p) => format!(
            "{}@{}",
            output::text(&p["adapter_name"]),
            output::text(&p["version"])
        ),
        None => String::new(),
    };
    let tags: Vec<String> = v["tags"]
        .as_array()
        .map(|t| t.iter().map(output::text).collect())
        .unwrap_or_default();
    let e = &v["evaluation"];
    let safety = match e["refusal_rate_base"].as_f64() {
        Some(base) => format!(
            "{}: refusals {:.0}% -> {:.0}%, benign KL {:.4}",
            safety_text(&v["safety_verdict"]),
            base * 100.0,
            e["refusal_rate_adapted"].as_f64().unwrap_or_default() * 100.0,
            e["benign_kl_mean"].as_f64().unwrap_or_default()
        ),
        None => safety_text(&v["safety_verdict"]),
    };
    output::fields(&[
        (
            "version",
            format!(
                "{}@{}",
                output::text(&v["adapter_name"]),
                output::text(&v["version"])
            ),
        ),
        ("status", output::text(&v["status"])),
        ("method", output::text(&v["method"]["type"])),
        ("base model", output::text(&v["base_model"])),
        ("parent", parent),
        ("metrics", metrics_line),
        ("safety", safety),
        ("tags", tags.join(", ")),
        ("job", output::text(&v["job_id"])),
        ("uri", output::text(&v["uri"])),
        ("files", files_text(&v["files"])),
        ("created", output::time(&v["created_at"])),
        ("ready", output::time(&v["ready_at"])),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_at_sign() {
        assert_eq!(split_reference("demo@3").unwrap(), ("demo", "3"));
        assert_eq!(split_reference("demo@prod").unwrap(), ("demo", "prod"));
        assert_eq!(split_reference("demo").unwrap(), ("demo", "latest"));
        assert!(split_reference("@3").is_err());
        assert!(split_reference("demo@").is_err());
    }

    #[test]
    fn versions_list_with_their_aliases() {
        let page = json!({
            "versions": [
                {"version": 2, "status": "ready", "method": {"type": "lora"}, "metrics": {"final_loss": 0.5},
                 "safety_verdict": {"decision": "publish", "breaches": []}, "tags": ["best"], "created_at": null},
                {"version": 1, "status": "quarantined", "method": {"type": "adalora"}, "metrics": null,
                 "safety_verdict": null, "tags": [], "created_at": null}
            ],
            "aliases": [{"alias": "prod", "version": 2, "updated_at": null}],
            "next_before": null
        });
        assert_eq!(
            versions_table(&page),
            "VERSION  STATUS       METHOD   LOSS    SAFETY   ALIASES  TAGS  AGE\n\
             2        ready        lora     0.5000  publish  prod     best\n\
             1        quarantined  adalora\n"
        );
    }
}
