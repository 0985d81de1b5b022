//! Registered inputs: base models and datasets, each with a digest computed once at
//! registration. Jobs may name them instead of giving a URI.

use crate::error::{Error, Result};
use crate::settings::FileInputs;
use chrono::{DateTime, Utc};
use loraforge_spec::merge::{MergeRecord, MergeSource, MERGE_RECORD_FILE};
use loraforge_spec::model::ModelConfigSummary;
use loraforge_spec::{AdapterName, InputRef};
use loraforge_storage::{StorageError, Store};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    BaseModel,
    Dataset,
}

impl InputKind {
    fn noun(self) -> &'static str {
        match self {
            InputKind::BaseModel => "base model",
            InputKind::Dataset => "dataset",
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct InputRow {
    pub name: String,
    pub uri: String,
    pub sha256: String,
    pub size: i64,
    pub format: String,
    /// For a base model made by merging an adapter version: that version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_adapter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_version: Option<i32>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterInput {
    pub name: AdapterName,
    /// `file:///abs/path` (under the server's file roots), `s3://bucket/key`, `gs://…`, `az://…`.
    #[schema(pattern = "^(file|s3|s3a|gs|az|azure|abfs|abfss)://.")]
    pub uri: String,
    /// The adapter version a merged base model came from.
    #[serde(default)]
    pub source: Option<SourceVersion>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceVersion {
    pub adapter: AdapterName,
    pub version: i32,
}

/// A job input after resolution: where to read it, and what we know of it.
#[derive(Debug, Clone)]
pub struct ResolvedInput {
    pub uri: String,
    pub name: Option<String>,
}

/// Registers an input after reading it whole for its digest. Registering the same
/// name again with the same URI and content is a no-op; anything else is a conflict.
pub async fn register(
    pool: &PgPool,
    files: &FileInputs,
    project: &str,
    kind: InputKind,
    req: RegisterInput,
) -> Result<(InputRow, bool)> {
    loraforge_spec::uri::check_data_uri(&req.uri).map_err(|m| Error::invalid("uri", m))?;
    check(&req.uri, files, kind)
        .await
        .map_err(|m| Error::invalid("uri", m))?;
    let (sha256, size, format) = match kind {
        InputKind::BaseModel => {
            let store = Store::open(&req.uri).map_err(|e| Error::invalid("uri", unreadable(e)))?;
            let (sha, size, _) = store
                .tree_digest("")
                .await
                .map_err(|e| Error::invalid("uri", unreadable(e)))?;
            (sha, size, "hf-safetensors")
        }
        InputKind::Dataset => {
            let (store, name) =
                Store::open_object(&req.uri).map_err(|e| Error::invalid("uri", unreadable(e)))?;
            let (sha, size) = store
                .digest(&name)
                .await
                .map_err(|e| Error::invalid("uri", unreadable(e)))?;
            (sha, size, "jsonl")
        }
    };
    let source = match (req.source, kind) {
        (source, InputKind::BaseModel) => {
            let recorded = merge_record_source(&req.uri).await?;
            match (source, recorded) {
                (Some(given), Some(recorded))
                    if given.adapter.as_str() != recorded.adapter
                        || given.version != recorded.version =>
                {
                    return Err(Error::invalid(
                        "source",
                        format!(
                            "the model's {MERGE_RECORD_FILE} says it was merged from {}@{}, not {}@{}",
                            recorded.adapter, recorded.version, given.adapter, given.version
                        ),
                    ));
                }
                (Some(given), _) => Some((given.adapter.to_string(), given.version)),
                // A record naming a version this project does not have (merged elsewhere)
                // gives no lineage; one naming a quarantined version is refused below.
                (None, Some(r)) => super::get_version(pool, project, &r.adapter, r.version)
                    .await?
                    .map(|_| (r.adapter, r.version)),
                (None, None) => None,
            }
        }
        (Some(_), InputKind::Dataset) => {
            return Err(Error::invalid("source", "only base models have a source"))
        }
        (None, InputKind::Dataset) => None,
    };
    if let Some((adapter, version)) = &source {
        check_source(pool, project, adapter, *version).await?;
    }
    let (source_adapter, source_version) = source.unzip();
    let inserted: Option<InputRow> = match kind {
        InputKind::BaseModel => {
            sqlx::query_as!(
                InputRow,
                "INSERT INTO base_models (project, name, uri, sha256, size, format, source_adapter, source_version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (project, name) DO NOTHING
                 RETURNING name, uri, sha256, size, format, source_adapter, source_version, created_at",
                project,
                req.name.as_str(),
                &req.uri,
                &sha256,
                size as i64,
                format,
                source_adapter,
                source_version,
            )
            .fetch_optional(pool)
            .await?
        }
        InputKind::Dataset => {
            insert_dataset(pool, project, req.name.as_str(), &req.uri, &sha256, size, format)
                .await?
        }
    };
    if let Some(row) = inserted {
        return Ok((row, true));
    }
    let existing = get(pool, project, kind, req.name.as_str())
        .await?
        .ok_or(Error::NotFound("input"))?;
    if existing.uri == req.uri && existing.sha256 == sha256 {
        Ok((existing, false))
    } else {
        Err(Error::conflict(
            "name_taken",
            format!(
                "{} {} is already registered with other content",
                kind.noun(),
                req.name
            ),
        ))
    }
}

/// The adapter version a model directory's merge record (`loraforge-trainer merge`) names,
/// so that a merged model registered without `source` still carries its lineage.
async fn merge_record_source(uri: &str) -> Result<Option<MergeSource>> {
    let store = Store::open(uri).map_err(|e| Error::invalid("uri", unreadable(e)))?;
    let bytes = match store.get(MERGE_RECORD_FILE).await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(Error::invalid("uri", unreadable(e))),
    };
    let record: MergeRecord = serde_json::from_slice(&bytes).map_err(|e| {
        Error::invalid(
            "uri",
            format!("{MERGE_RECORD_FILE} is not a merge record: {e}"),
        )
    })?;
    Ok(record.source)
}

/// A merged base's source must exist and must not be quarantined: a model merged from a
/// version the gate held back would launder it into a new, unjudged base.
async fn check_source(pool: &PgPool, project: &str, adapter: &str, version: i32) -> Result<()> {
    let Some(v) = super::get_version(pool, project, adapter, version).await? else {
        return Err(Error::invalid(
            "source",
            format!("no version {version} of adapter {adapter}"),
        ));
    };
    if is_quarantined(&v) {
        return Err(Error::invalid("source", merged_from(adapter, version)));
    }
    Ok(())
}

/// Quarantined now, or once (a deleted version keeps its verdict).
fn is_quarantined(v: &super::VersionRow) -> bool {
    v.status == super::VersionStatus::Quarantined
        || v.safety_verdict
            .as_ref()
            .is_some_and(|s| s.0.decision == loraforge_spec::safety::SafetyDecision::Quarantine)
}

fn merged_from(adapter: &str, version: i32) -> String {
    format!(
        "{adapter}@{version} was quarantined by the safety gate; a base model merged from it is refused"
    )
}

/// For a job's base model given by URI rather than registered: the refusal, if the model's
/// merge record names a quarantined version of this project. A model that cannot be read is
/// left to the input checks, which report it.
pub async fn merged_from_quarantined(
    pool: &PgPool,
    project: &str,
    uri: &str,
) -> Result<Option<String>, sqlx::Error> {
    let Ok(Some(source)) = merge_record_source(uri).await else {
        return Ok(None);
    };
    let v = super::get_version(pool, project, &source.adapter, source.version).await?;
    Ok(v.filter(is_quarantined)
        .map(|_| merged_from(&source.adapter, source.version)))
}

/// Adds a dataset row; `None` if the project has one of that name already.
pub(crate) async fn insert_dataset(
    pool: &PgPool,
    project: &str,
    name: &str,
    uri: &str,
    sha256: &str,
    size: u64,
    format: &str,
) -> Result<Option<InputRow>, sqlx::Error> {
    sqlx::query_as!(
        InputRow,
        r#"INSERT INTO datasets (project, name, uri, sha256, size, format)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (project, name) DO NOTHING
                   RETURNING name, uri, sha256, size, format,
                             NULL::text AS "source_adapter?", NULL::int AS "source_version?", created_at"#,
        project,
        name,
        uri,
        sha256,
        size as i64,
        format,
    )
    .fetch_optional(pool)
    .await
}

pub async fn get(
    pool: &PgPool,
    project: &str,
    kind: InputKind,
    name: &str,
) -> Result<Option<InputRow>, sqlx::Error> {
    // Two statements: each macro call has a type of its own.
    match kind {
        InputKind::BaseModel => {
            sqlx::query_as!(
                InputRow,
                "SELECT name, uri, sha256, size, format, source_adapter, source_version, created_at
                 FROM base_models WHERE project = $1 AND name = $2",
                project,
                name,
            )
            .fetch_optional(pool)
            .await
        }
        InputKind::Dataset => {
            sqlx::query_as!(
                InputRow,
                r#"SELECT name, uri, sha256, size, format, NULL::text AS "source_adapter?", NULL::int AS "source_version?", created_at
                   FROM datasets WHERE project = $1 AND name = $2"#,
                project,
                name,
            )
            .fetch_optional(pool)
            .await
        }
    }
}

pub async fn list(
    pool: &PgPool,
    project: &str,
    kind: InputKind,
) -> Result<Vec<InputRow>, sqlx::Error> {
    match kind {
        InputKind::BaseModel => {
            sqlx::query_as!(
                InputRow,
                "SELECT name, uri, sha256, size, format, source_adapter, source_version, created_at
                 FROM base_models WHERE project = $1 ORDER BY name",
                project,
            )
            .fetch_all(pool)
            .await
        }
        InputKind::Dataset => {
            sqlx::query_as!(
                InputRow,
                r#"SELECT name, uri, sha256, size, format, NULL::text AS "source_adapter?", NULL::int AS "source_version?", created_at
                   FROM datasets WHERE project = $1 ORDER BY name"#,
                project,
            )
            .fetch_all(pool)
            .await
        }
    }
}

/// Turns a job's reference (URI or registered name) into a URI it can be read from.
pub async fn resolve(
    pool: &PgPool,
    project: &str,
    kind: InputKind,
    field: &str,
    reference: &InputRef,
) -> Result<ResolvedInput> {
    let reference = match reference {
        InputRef::Uri(uri) => {
            return Ok(ResolvedInput {
                uri: uri.clone(),
                name: None,
            })
        }
        InputRef::Name(name) => name.as_str(),
    };
    match get(pool, project, kind, reference).await? {
        Some(row) => Ok(ResolvedInput {
            uri: row.uri,
            name: Some(row.name),
        }),
        None => Err(Error::invalid(
            field,
            unknown_name(pool, project, kind, reference).await?,
        )),
    }
}

/// Most registered names an "unknown name" message lists.
const NAMES_LISTED: usize = 20;

/// Why `name` names nothing, with the names that do (or how to register one): the message a
/// newcomer who mistypes a model or dataset name needs.
pub async fn unknown_name(
    pool: &PgPool,
    project: &str,
    kind: InputKind,
    name: &str,
) -> Result<String, sqlx::Error> {
    let names: Vec<String> = list(pool, project, kind)
        .await?
        .into_iter()
        .map(|row| row.name)
        .collect();
    let (noun, route) = match kind {
        InputKind::BaseModel => ("base model", "POST /v1/base-models"),
        InputKind::Dataset => (
            "dataset",
            "POST /v1/datasets, or upload one with POST /v1/datasets/{name}/upload",
        ),
    };
    let known = match names.len() {
        0 => format!("no {noun} is registered in this project yet; register one with {route}"),
        n if n <= NAMES_LISTED => format!("the registered {noun}s are: {}", names.join(", ")),
        n => format!(
            "the registered {noun}s include: {} (and {} more; GET /v1/{}s lists them all)",
            names[..NAMES_LISTED].join(", "),
            n - NAMES_LISTED,
            match kind {
                InputKind::BaseModel => "base-model",
                InputKind::Dataset => "dataset",
            }
        ),
    };
    Ok(format!("no registered {noun} named {name:?}; {known}"))
}

/// What [`confine`] says of a path outside every root.
const OUTSIDE_ROOTS: &str = "outside the directories this server reads inputs from";

/// `file://` inputs must lie under a configured root and outside the store and the logs,
/// so a request cannot make the control plane (or a worker) read arbitrary local files or
/// another project's artifacts. Every path is resolved first, and each file of a directory
/// too, so a symlink cannot lead outside.
pub fn confine(uri: &str, files: &FileInputs) -> Result<(), String> {
    let Ok(url) = url::Url::parse(uri) else {
        return Err(format!("{uri:?} is not a URI"));
    };
    if url.scheme() != "file" {
        return Ok(());
    }
    let path = url
        .to_file_path()
        .map_err(|_| format!("{uri:?} is not an absolute local path"))?;
    let real = path.canonicalize().unwrap_or_else(|_| path.clone());
    let canonical = |dirs: &[PathBuf]| -> Vec<PathBuf> {
        dirs.iter()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
            .collect()
    };
    let (roots, forbidden) = (canonical(&files.roots), canonical(&files.forbidden));
    let verdict = |real: &Path| {
        if forbidden.iter().any(|f| real.starts_with(f)) {
            Err("the artifact store and the worker logs are never read as inputs".to_string())
        } else if roots.iter().any(|r| real.starts_with(r)) {
            Ok(())
        } else {
            let listed: Vec<String> = files
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect();
            Err(format!(
                "{OUTSIDE_ROOTS} ({}); to allow it, add its directory to the server's \
                 LORAFORGE_FILE_ROOTS setting (colon-separated) and restart the server",
                if listed.is_empty() {
                    "none is configured".to_string()
                } else {
                    listed.join(":")
                }
            ))
        }
    };
    verdict(&real).map_err(|why| format!("{uri}: {why}"))?;
    if real.is_dir() {
        for file in files_below(&real, 4, 10_000)? {
            let resolved = file.canonicalize().unwrap_or_else(|_| file.clone());
            if verdict(&resolved).is_err() {
                let name = file.strip_prefix(&real).unwrap_or(&file).display();
                return Err(format!(
                    "{uri}: {name} is a link to a file outside the directories this server reads inputs from"
                ));
            }
        }
    }
    Ok(())
}

/// The entries below `dir` (not following directory links), to `depth` levels and at most
/// `most` of them.
fn files_below(dir: &Path, depth: usize, most: usize) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0)];
    while let Some((at, level)) = pending.pop() {
        let entries =
            std::fs::read_dir(&at).map_err(|e| format!("cannot list {}: {e}", at.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && level + 1 < depth {
                pending.push((path.clone(), level + 1));
            }
            found.push(path);
            if found.len() > most {
                return Err(format!("{} holds more than {most} files", dir.display()));
            }
        }
    }
    Ok(found)
}

/// Checks that an input is one we may read and that it is there (and, for a model,
/// that we can train it).
pub async fn check(uri: &str, files: &FileInputs, kind: InputKind) -> Result<(), String> {
    confine(uri, files).map_err(|m| {
        if kind == InputKind::Dataset && m.contains(OUTSIDE_ROOTS) {
            format!("{m}; or upload the file instead: POST /v1/datasets/{{name}}/upload")
        } else {
            m
        }
    })?;
    match kind {
        InputKind::BaseModel => inspect_model(uri).await,
        InputKind::Dataset => inspect_object(uri).await,
    }
}

/// How long the first look at an input may take. A store that cannot be reached (a cloud URI
/// with no network or credentials: the client retries for minutes) is the user's problem to
/// hear about at once, not a request that hangs. Hashing a reachable model takes longer and
/// is not bounded.
pub const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `look`, or the error saying that `uri` could not be reached within [`REACH_TIMEOUT`].
async fn within_reach(
    uri: &str,
    look: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(REACH_TIMEOUT, look)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{uri} could not be reached within {} s; check that the store is reachable \
                 from the control plane and that its credentials are set",
                REACH_TIMEOUT.as_secs()
            ))
        })
}

/// Checks that a URI names a model directory we can train.
pub async fn inspect_model(uri: &str) -> Result<(), String> {
    within_reach(uri, inspect_model_unbounded(uri)).await
}

async fn inspect_model_unbounded(uri: &str) -> Result<(), String> {
    let store = Store::open(uri).map_err(unreadable)?;
    let config = match store.get("config.json").await {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound(_)) => {
            return Err(format!(
                "{uri} has no config.json; expected a Hugging Face model directory"
            ))
        }
        Err(e) => return Err(unreadable(e)),
    };
    let summary: ModelConfigSummary = serde_json::from_slice(&config)
        .map_err(|e| format!("{uri}/config.json is not valid: {e}"))?;
    summary.check_supported()?;
    if store
        .size("tokenizer.json")
        .await
        .map_err(unreadable)?
        .is_none()
    {
        return Err(format!("{uri} has no tokenizer.json"));
    }
    let single = store.size("model.safetensors").await.map_err(unreadable)?;
    let sharded = store
        .size("model.safetensors.index.json")
        .await
        .map_err(unreadable)?;
    if single.is_none() && sharded.is_none() {
        return Err(format!(
            "{uri} has neither model.safetensors nor model.safetensors.index.json"
        ));
    }
    Ok(())
}

/// Checks that a URI names an existing object.
pub async fn inspect_object(uri: &str) -> Result<(), String> {
    within_reach(uri, async {
        let (store, name) = Store::open_object(uri).map_err(unreadable)?;
        match store.size(&name).await.map_err(unreadable)? {
            Some(_) => Ok(()),
            None => Err(format!("no object at {uri}")),
        }
    })
    .await
}

pub fn unreadable(e: StorageError) -> String {
    match e {
        StorageError::NotFound(uri) => format!("nothing found at {uri}"),
        e => format!("cannot be read: {e}"),
    }
}
