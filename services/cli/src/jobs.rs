//! `loraforge jobs …`: submit a job file, follow it, list, read, cancel, events, logs.

use crate::client::{view, Client, FieldError, Problem};
use crate::error::{exit, job_exit_code, CliError, Result};
use crate::methods;
use crate::output::{self, Output};
use crate::progress::{Envelope, Event};
use crate::watch::{self, Followed, Stream, Style};
use crate::Common;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Submit a job from a YAML or JSON file (the body of POST /v1/jobs; `-` reads stdin).
    Submit {
        /// The job file: .yaml, .yml or .json.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Follow the job until it ends, with a progress bar; the exit status is its outcome.
        #[arg(long)]
        watch: bool,
        /// Retries with the same key return the same job (default: a new key per run).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// The project's jobs, newest first.
    List {
        /// Only these statuses, comma-separated (queued,running,…).
        #[arg(long)]
        status: Option<String>,
        /// Only this adapter's jobs.
        #[arg(long)]
        adapter: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The next page: the cursor the previous page printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One job: status, error, attempts, published version, spec.
    Get { id: String },
    /// Follow a job until it ends, with a progress bar; the exit status is its outcome.
    Watch { id: String },
    /// Cancel a job (a running one is asked to stop).
    Cancel {
        id: String,
        /// Wait until it has stopped; the exit status is its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// The job's events (status changes, progress, checkpoints, evals, logs, …).
    Events {
        id: String,
        /// Keep printing new events until the job ends; the exit status is its outcome.
        #[arg(long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// What the job's worker printed (its newest attempt, or --attempt N); where the executor
    /// keeps no log, the job's log events and error instead.
    Logs {
        id: String,
        #[arg(long)]
        attempt: Option<u32>,
    },
}

pub async fn run(args: JobsArgs) -> Result<u8> {
    let client = args.common.client()?;
    let out = args.common.output;
    match args.command {
        JobsCommand::Submit {
            file,
            watch,
            idempotency_key,
        } => submit(&client, out, &file, watch, idempotency_key).await,
        JobsCommand::List {
            status,
            adapter,
            limit,
            cursor,
        } => list(&client, out, status, adapter, limit, cursor).await,
        JobsCommand::Get { id } => {
            let job = client.get(&["v1", "jobs", &id], &[]).await?;
            match out {
                Output::Json => output::print_json(&job),
                Output::Table => output::print_text(&describe_job(&job)),
            }
            Ok(exit::OK)
        }
        JobsCommand::Watch { id } => follow_to_end(&client, out, &id, 0, Style::Watch).await,
        JobsCommand::Cancel { id, wait } => {
            let job = client
                .send_json(Method::POST, &["v1", "jobs", &id, "cancel"], None)
                .await?;
            if wait {
                if out == Output::Table {
                    eprintln!("cancel requested; waiting for job {id} to stop");
                }
                return follow_to_end(&client, out, &id, 0, Style::Watch).await;
            }
            match out {
                Output::Json => output::print_json(&job),
                Output::Table => output::print_text(&format!(
                    "cancel requested: job {id} is {}\n",
                    output::text(&job["status"])
                )),
            }
            Ok(exit::OK)
        }
        JobsCommand::Events { id, follow, after } => {
            if follow {
                let style = match out {
                    Output::Json => Style::Json,
                    Output::Table => Style::Events,
                };
                return follow_to_end(&client, out, &id, after, style).await;
            }
            let events = all_events(&client, &id, after).await?;
            match out {
                Output::Json => {
                    output::print_json(&Value::Array(events.into_iter().map(|e| e.raw).collect()))
                }
                Output::Table => {
                    let text: String = events.iter().map(|e| watch::event_line(e) + "\n").collect();
                    output::print_text(&text);
                }
            }
            Ok(exit::OK)
        }
        JobsCommand::Logs { id, attempt } => logs(&client, out, &id, attempt).await,
    }
}

/// A job file as the JSON body of `POST /v1/jobs`.
pub fn read_job_file(path: &Path) -> Result<Value> {
    let (name, text) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| CliError::io("reading the job from stdin", e))?;
        ("stdin".to_string(), text)
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::usage(format!("cannot read the job file {}: {e}", path.display()))
        })?;
        (path.display().to_string(), text)
    };
    parse_job(&name, &text)
}

/// JSON for `.json`, YAML for `.yaml`/`.yml`; otherwise whichever parses (JSON first).
pub fn parse_job(name: &str, text: &str) -> Result<Value> {
    let extension = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let as_json = |text: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| {
            format!(
                "{name}: not valid JSON (line {} column {}): {e}",
                e.line(),
                e.column()
            )
        })
    };
    let as_yaml = |text: &str| {
        serde_saphyr::from_str::<Value>(text).map_err(|e| format!("{name}: not valid YAML: {e}"))
    };
    let parsed = match extension.as_deref() {
        Some("json") => as_json(text),
        Some("yaml" | "yml") => as_yaml(text),
        _ => as_json(text).or_else(|json_error| {
            as_yaml(text).map_err(|yaml_error| {
                if text.trim_start().starts_with('{') {
                    json_error
                } else {
                    yaml_error
                }
            })
        }),
    };
    let value = parsed.map_err(CliError::Usage)?;
    if !value.is_object() {
        return Err(CliError::usage(format!(
            "{name}: a job file is a mapping of the job's fields (adapter_name, base_model, dataset, method, training); \
             see examples/ and docs/cli.md"
        )));
    }
    Ok(value)
}

async fn submit(
    client: &Client,
    out: Output,
    file: &Path,
    watch: bool,
    idempotency_key: Option<String>,
) -> Result<u8> {
    let body = read_job_file(file)?;
    let key = idempotency_key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4()));
    let request = client
        .request(Method::POST, client.url(&["v1", "jobs"], &[]))
        .header("idempotency-key", key)
        .json(&body);
    let job = match client.json_of(request).await {
        Err(CliError::Api(mut failure)) => {
            name_method_knobs(client, &body["method"], &mut failure.problem).await;
            return Err(CliError::Api(failure));
        }
        job => job?,
    };
    let id = output::text(&job["id"]);
    if !watch {
        match out {
            Output::Json => output::print_json(&job),
            Output::Table => output::print_text(&format!(
                "submitted job {id} ({}): {}\nfollow it: loraforge jobs watch {id}\n",
                output::text(&job["adapter_name"]),
                output::text(&job["status"]),
            )),
        }
        return Ok(exit::OK);
    }
    if out == Output::Table {
        output::print_text(&format!(
            "submitted job {id} ({})\n",
            output::text(&job["adapter_name"])
        ));
    }
    follow_to_end(client, out, &id, 0, Style::Watch).await
}

/// Where the server refused fields of the job's `method` as unknown, says which knobs the
/// method has instead, from the server's API document (fetched only then), and how to read
/// about them; where the document cannot be read, the server's answer stands as it is.
async fn name_method_knobs(client: &Client, method: &Value, problem: &mut Problem) {
    let refused_unknown =
        |e: &FieldError| e.field.starts_with("method.") && e.message == "unknown field";
    if !problem.errors.iter().any(refused_unknown) {
        return;
    }
    let Ok(known) = methods::fetch(client).await else {
        return;
    };
    for error in problem.errors.iter_mut().filter(|e| refused_unknown(e)) {
        let knob = error.field.trim_start_matches("method.");
        if let Some(message) = methods::unknown_knob(&known, method, knob) {
            error.message = message;
        }
    }
    let tag = output::text(&method["type"]);
    problem.hint = Some(format!("`loraforge methods get {tag}` describes each knob"));
}

/// Follows a job until it ends (or Ctrl-C) and reports how it ended; the exit status is
/// its outcome.
async fn follow_to_end(
    client: &Client,
    out: Output,
    id: &str,
    after: i64,
    style: Style,
) -> Result<u8> {
    let stream = match (out, style) {
        (_, Style::Json) | (Output::Table, _) => Stream::Stdout,
        (Output::Json, _) => Stream::Stderr,
    };
    match watch::follow(client, id, after, style, stream).await? {
        Followed::Detached => {
            eprintln!(
                "detached: job {id} keeps running. Follow it again with `loraforge jobs watch {id}`; stop it with `loraforge jobs cancel {id}`"
            );
            Ok(exit::DETACHED)
        }
        Followed::Finished { job, state } => {
            let status = output::text(&job["status"]);
            let kind = job["error"]["kind"].as_str();
            match (out, style) {
                (Output::Json, Style::Watch) => output::print_json(&job),
                (Output::Json, _) => {}
                (Output::Table, _) => {
                    let mut line = format!("job {id} {status}");
                    if let Some(v) = job["adapter_version"].as_object() {
                        line.push_str(&format!(
                            ": published {}@{}",
                            output::text(&v["name"]),
                            output::text(&v["version"])
                        ));
                    }
                    if let (Some(loss), true) = (state.loss, state.has_steps()) {
                        line.push_str(&format!(
                            " after {} steps, final loss {loss:.4}",
                            state.step
                        ));
                    }
                    output::print_text(&format!("{line}\n"));
                    if let Some(kind) = kind {
                        eprintln!(
                            "{kind}: {}",
                            output::text(&job["error"]["message"]).trim_end()
                        );
                        if let Some(hint) = failure_hint(kind, id) {
                            eprintln!("hint: {hint}");
                        }
                    }
                }
            }
            Ok(job_exit_code(&status, kind))
        }
    }
}

fn failure_hint(kind: &str, id: &str) -> Option<String> {
    match kind {
        "user_error" => Some(format!(
            "the job's data or settings are at fault: fix the job file and submit again; `loraforge jobs logs {id}` shows what the worker printed"
        )),
        "system_error" => Some(format!(
            "the attempts ran out on an infrastructure failure; `loraforge jobs logs {id}` and `loraforge jobs events {id}` show what happened"
        )),
        "safety_blocked" => Some(
            "the safety gate quarantined the version: its refusal rate or drift broke the project's policy (docs/safety.md)".into(),
        ),
        "deadline_exceeded" => Some("raise training.max_duration or train fewer steps".into()),
        "resource_exhausted" => Some("give the worker more memory (resources.memory) or lower training.batch_size / seq_len".into()),
        _ => None,
    }
}

async fn list(
    client: &Client,
    out: Output,
    status: Option<String>,
    adapter: Option<String>,
    limit: u32,
    cursor: Option<String>,
) -> Result<u8> {
    let page = client
        .get(
            &["v1", "jobs"],
            &[
                ("status", status),
                ("adapter", adapter),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
            ],
        )
        .await?;
    if out == Output::Json {
        output::print_json(&page);
        return Ok(exit::OK);
    }
    let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let progress = &j["progress"];
            let step = match (progress["step"].as_u64(), progress["total_steps"].as_u64()) {
                (Some(s), Some(t)) => format!("{s}/{t}"),
                _ => String::new(),
            };
            let loss = progress["loss"]
                .as_f64()
                .map(|l| format!("{l:.4}"))
                .unwrap_or_default();
            let mut status = output::text(&j["status"]);
            if let Some(kind) = j["error"]["kind"].as_str() {
                status = format!("{status} ({kind})");
            }
            let version = j["adapter_version"]["version"]
                .as_i64()
                .map(|v| format!("@{v}"))
                .unwrap_or_default();
            vec![
                output::text(&j["id"]),
                status,
                format!("{}{version}", output::text(&j["adapter_name"])),
                output::text(&j["spec"]["method"]["type"]),
                step,
                loss,
                output::age(&j["created_at"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        output::print_text("no jobs\n");
    } else {
        output::print_text(&output::table(
            &["ID", "STATUS", "ADAPTER", "METHOD", "STEP", "LOSS", "AGE"],
            &rows,
        ));
    }
    if let Some(next) = page["next_cursor"].as_str() {
        eprintln!("more: --cursor {next}");
    }
    Ok(exit::OK)
}

#[derive(Deserialize)]
struct JobView {
    id: String,
    adapter_name: String,
    status: String,
    error: Option<JobError>,
    attempt: i64,
    max_attempts: i64,
    adapter_version: Option<VersionRef>,
    spec: Value,
    created_at: Value,
    #[serde(default)]
    started_at: Value,
    #[serde(default)]
    finished_at: Value,
}

#[derive(Deserialize)]
struct JobError {
    kind: String,
    message: String,
}

#[derive(Deserialize)]
struct VersionRef {
    name: String,
    version: i64,
}

/// A job as `jobs get` prints it.
pub fn describe_job(job: &Value) -> String {
    let Ok(j) = view::<JobView>(job) else {
        return serde_json::to_string_pretty(job).unwrap_or_default() + "\n";
    };
    let spec = &j.spec;
    let method_line = describe_method_knobs(&spec["method"]);
    let training = &spec["training"];
    let training_line = ["max_steps", "learning_rate", "batch_size", "seq_len"]
        .iter()
        .filter_map(|k| {
            training
                .get(*k)
                .filter(|v| !v.is_null())
                .map(|v| format!("{k}={v}"))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let dataset = match &spec["dataset"] {
        Value::Object(d) => output::text(d.get("train").unwrap_or(&Value::Null)),
        other => output::text(other),
    };
    let published = j
        .adapter_version
        .map(|v| format!("{}@{}", v.name, v.version))
        .unwrap_or_default();
    let error = j
        .error
        .map(|e| format!("{}: {}", e.kind, e.message.trim_end()))
        .unwrap_or_default();
    output::fields(&[
        ("job", j.id),
        ("adapter", j.adapter_name),
        ("status", j.status),
        ("published", published),
        ("error", error),
        ("attempt", format!("{} of {}", j.attempt, j.max_attempts)),
        ("method", method_line),
        ("training", training_line),
        ("base model", output::text(&spec["base_model"])),
        ("dataset", dataset),
        ("created", output::time(&j.created_at)),
        ("started", output::time(&j.started_at)),
        ("finished", output::time(&j.finished_at)),
    ])
}

/// A job's method: its `type`, then every other field of its `method` object as `knob=value`
/// (whatever the method, so a method added on the server shows without a client change),
/// wrapped to lines of about 80 columns.
pub fn describe_method_knobs(method: &Value) -> String {
    const WIDTH: usize = 80;
    let mut text = output::text(&method["type"]);
    let Some(fields) = method.as_object() else {
        return text;
    };
    let mut line_len = text.chars().count();
    for (name, value) in fields.iter().filter(|(k, _)| *k != "type") {
        let knob = format!("{name}={}", methods::value_text(value));
        let len = knob.chars().count();
        if line_len > 0 && line_len + 1 + len > WIDTH {
            text.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            text.push(' ');
            line_len += 1;
        }
        text.push_str(&knob);
        line_len += len;
    }
    text
}

/// Every event after `after`, following the pages.
pub async fn all_events(client: &Client, id: &str, mut after: i64) -> Result<Vec<Envelope>> {
    let mut events = Vec::new();
    loop {
        let page = client
            .get(
                &["v1", "jobs", id, "events"],
                &[
                    ("after", Some(after.to_string())),
                    ("limit", Some("1000".into())),
                ],
            )
            .await?;
        events.extend(
            page["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(Envelope::parse),
        );
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => return Ok(events),
        }
    }
}

async fn logs(client: &Client, out: Output, id: &str, attempt: Option<u32>) -> Result<u8> {
    let job = client.get(&["v1", "jobs", id], &[]).await?;
    let attempts = job["attempt"].as_u64().unwrap_or_default();
    if let Some(a) = attempt.filter(|a| u64::from(*a) > attempts || *a == 0) {
        return Err(CliError::usage(format!(
            "job {id} has had {attempts} attempt(s); there is no attempt {a}"
        )));
    }
    let url = client.url(
        &["v1", "jobs", id, "logs"],
        &[("attempt", attempt.map(|a| a.to_string()))],
    );
    match client.send(client.request(Method::GET, url)).await {
        Ok(response) => {
            let shown_attempt = response
                .headers()
                .get("x-loraforge-attempt")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let text = response.text().await.map_err(|e| CliError::Connection {
                message: format!("reading the log: {e}"),
                hint: None,
            })?;
            match out {
                Output::Json => output::print_json(&serde_json::json!({
                    "job_id": id, "source": "worker", "attempt": shown_attempt, "log": text,
                })),
                Output::Table => output::print_text(&text),
            }
            Ok(exit::OK)
        }
        Err(e) if e.api_status() == Some(404) => {
            // This executor keeps no log for the attempt (or the server predates the route):
            // the job's own record of what happened.
            let events = all_events(client, id, 0).await?;
            let text = log_from_events(&events, &job);
            match out {
                Output::Json => output::print_json(&serde_json::json!({
                    "job_id": id, "source": "events", "attempt": job["attempt"], "log": text,
                })),
                Output::Table => {
                    eprintln!("(the worker's own output is not available here; the job's log events follow)");
                    output::print_text(&text);
                }
            }
            Ok(exit::OK)
        }
        Err(e) => Err(e),
    }
}

/// The job's story from its events: status changes with their messages and the worker's
/// log lines, then the error (which carries the end of a failed worker's output).
pub fn log_from_events(events: &[Envelope], job: &Value) -> String {
    let mut text = String::new();
    for e in events {
        let keep = matches!(
            e.event,
            Event::Log { .. } | Event::Status { .. } | Event::Checkpoint { .. }
        );
        if keep {
            text.push_str(&watch::event_line(e));
            text.push('\n');
        }
    }
    if let Some(kind) = job["error"]["kind"].as_str() {
        text.push_str(&format!(
            "error ({kind}):\n{}\n",
            output::text(&job["error"]["message"]).trim_end()
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_files_in_yaml_and_json() {
        let yaml = "adapter_name: demo\nmethod:\n  type: lora\n  r: 8\ntraining:\n  learning_rate: 1.0e-3\n";
        let v = parse_job("job.yaml", yaml).unwrap();
        assert_eq!(v["method"]["r"], 8);
        assert_eq!(v["training"]["learning_rate"], 0.001);
        let v = parse_job("job.json", r#"{"adapter_name": "demo"}"#).unwrap();
        assert_eq!(v["adapter_name"], "demo");
        // Without a telling extension, either.
        assert_eq!(
            parse_job("stdin", "adapter_name: x").unwrap()["adapter_name"],
            "x"
        );
        assert_eq!(parse_job("stdin", r#"{"a": 1}"#).unwrap()["a"], 1);
    }

    #[test]
    fn the_example_job_file_parses() {
        let text = include_str!("../../../examples/job.yaml");
        let job = parse_job("examples/job.yaml", text).unwrap();
        assert_eq!(job["adapter_name"], "demo");
        assert_eq!(job["method"]["target_modules"][1], "v_proj");
    }

    #[test]
    fn bad_job_files_say_where() {
        let err =
            parse_job("job.json", "{\"adapter_name\": \"demo\",\n  \"method\": }").unwrap_err();
        assert_eq!(err.exit_code(), exit::REFUSED);
        assert!(
            err.to_string()
                .starts_with("job.json: not valid JSON (line 2 column"),
            "{err}"
        );
        let err = parse_job("job.yaml", "adapter_name: demo\nmethod: [lora\n").unwrap_err();
        assert!(
            err.to_string().starts_with("job.yaml: not valid YAML"),
            "{err}"
        );
        let err = parse_job("job.yaml", "- just\n- a list\n").unwrap_err();
        assert!(err.to_string().contains("a job file is a mapping"), "{err}");
    }

    #[test]
    fn jobs_print_as_fields() {
        let job = json!({
            "id": "j1", "project": "default", "adapter_name": "demo", "status": "failed",
            "error": {"kind": "user_error", "message": "bad data\nline 2"},
            "attempt": 1, "max_attempts": 3, "adapter_version": null,
            "spec": {"base_model": "file:///m", "dataset": {"train": "file:///d.jsonl"},
                     "method": {"type": "lora", "r": 8, "alpha": 16}, "training": {"max_steps": 30}},
            "created_at": "2026-12-06T09:00:00Z", "updated_at": "2026-12-06T09:00:00Z",
            "started_at": null, "finished_at": null
        });
        let text = describe_job(&job);
        assert!(text.contains("status      failed\n"), "{text}");
        assert!(
            text.contains("error       user_error: bad data\n            line 2\n"),
            "{text}"
        );
        assert!(text.contains("method      lora alpha=16 r=8\n"), "{text}");
        assert!(text.contains("dataset     file:///d.jsonl\n"), "{text}");
        assert!(!text.contains("published"), "{text}");
    }

    #[test]
    fn a_jobs_method_shows_every_knob_wrapped() {
        let miss = json!({"type": "miss", "r": 64, "dropout": 0.0, "init": "balance",
                          "mini_r": 1, "target_modules": ["q_proj", "v_proj"]});
        assert_eq!(
            describe_method_knobs(&miss),
            "miss dropout=0.0 init=balance mini_r=1 r=64 target_modules=[q_proj, v_proj]"
        );
        let many: serde_json::Map<String, Value> = (0..12)
            .map(|i| (format!("knob_{i:02}"), json!(i)))
            .chain([("type".to_string(), json!("future"))])
            .collect();
        let text = describe_method_knobs(&Value::Object(many));
        assert!(text.starts_with("future knob_00=0 knob_01=1 "), "{text}");
        assert!(text.lines().count() > 1, "{text}");
        assert!(text.lines().all(|l| l.len() <= 80), "{text}");
        assert!(text.ends_with(" knob_11=11"), "{text}");
    }

    #[test]
    fn logs_from_events_keep_the_story_and_the_error() {
        let events: Vec<Envelope> = [
            json!({"seq": 1, "kind": "status", "status": "queued", "message": null}),
            json!({"seq": 2, "kind": "progress", "step": 1, "total_steps": 2, "loss": 1.0}),
            json!({"seq": 3, "kind": "log", "message": "loaded 10 examples"}),
        ]
        .into_iter()
        .map(Envelope::parse)
        .collect();
        let job =
            json!({"error": {"kind": "system_error", "message": "worker exited; log:\ntail"}});
        let text = log_from_events(&events, &job);
        assert_eq!(
            text,
            "#1  status queued\n#3  log: loaded 10 examples\nerror (system_error):\nworker exited; log:\ntail\n"
        );
    }
}
