//! The adapter registry: numbered, immutable versions with their files and lineage.
//!
//! Publishing is two-phase so a crash never leaves a `ready` version without files:
//! the worker reserves a version (`pending`), uploads, then asks us to complete it;
//! we verify every file in the store (sha256, size, PEFT layout) before `ready`.

use crate::app::AppState;
use crate::error::ApiError;
use crate::jobs::{self, JobRow, TransitionEffects};
use crate::webhooks;
use chrono::{DateTime, Utc};
use loraforge_spec::manifest::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE};
use loraforge_spec::peft::PeftLoraConfig;
use loraforge_spec::safety::SafetyDecision;
use loraforge_spec::worker::{CompleteRequest, ReservedVersion};
use loraforge_spec::{AdapterManifest, DigestRef, ErrorKind, FileDigest, JobStatus};
use loraforge_storage::{layout, Store};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The columns of [`VersionRow`], as a literal so queries stay static strings.
macro_rules! version_columns {
    () => {
        "project, adapter_name, version, status, job_id, storage_prefix, files, method, hyperparameters, \
         metrics, base_model_uri, base_model_sha256, dataset_uri, dataset_sha256, parent_adapter, \
         parent_version, created_at, ready_at, tags, base_model_name, dataset_name, evaluation, safety_verdict"
    };
}

pub mod aliases;
pub mod cache;
pub mod gc;
pub mod inputs;
pub mod lineage;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    pub project: String,
    pub adapter_name: String,
    pub version: i32,
    pub status: String,
    pub job_id: Uuid,
    pub storage_prefix: String,
    pub files: Json<Vec<FileDigest>>,
    pub method: Json<serde_json::Value>,
    pub hyperparameters: Json<serde_json::Value>,
    pub metrics: Option<Json<serde_json::Value>>,
    pub base_model_uri: String,
    pub base_model_sha256: Option<String>,
    pub dataset_uri: String,
    pub dataset_sha256: Option<String>,
    pub parent_adapter: Option<String>,
    pub parent_version: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub base_model_name: Option<String>,
    pub dataset_name: Option<String>,
    pub evaluation: Option<Json<serde_json::Value>>,
    pub safety_verdict: Option<Json<serde_json::Value>>,
}

/// A version as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionView {
    pub adapter_name: String,
    pub version: i32,
    pub status: String,
    /// Where the files are: the version's folder in the artifact store.
    pub uri: String,
    pub files: Vec<FileDigest>,
    #[schema(value_type = Object)]
    pub method: serde_json::Value,
    #[schema(value_type = Object)]
    pub hyperparameters: serde_json::Value,
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
    pub tags: Vec<String>,
    pub base_model: String,
    pub parent: Option<ParentView>,
    /// The safety evaluation (base vs adapted) and the gate's verdict, when it ran.
    #[schema(value_type = Option<loraforge_spec::safety::SafetyReport>)]
    pub evaluation: Option<serde_json::Value>,
    #[schema(value_type = Option<loraforge_spec::safety::SafetyVerdict>)]
    pub safety_verdict: Option<serde_json::Value>,
    pub job_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageView {
    pub adapter_name: String,
    pub version: i32,
    pub job_id: Uuid,
    pub base_model: LineageInput,
    pub dataset: LineageInput,
    pub parent: Option<ParentView>,
    /// Ancestors and their inputs up to the requested depth, as a graph.
    pub graph: lineage::Graph,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineageInput {
    pub uri: String,
    /// Known once the worker has read the input; `null` before.
    pub sha256: Option<String>,
    /// The registered name, when the job named it so.
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ParentView {
    pub adapter_name: String,
    pub version: i32,
}

impl VersionRow {
    pub fn parent(&self) -> Option<ParentView> {
        match (&self.parent_adapter, self.parent_version) {
            (Some(adapter_name), Some(version)) => Some(ParentView {
                adapter_name: adapter_name.clone(),
                version,
            }),
            _ => None,
        }
    }

    pub fn view(self, store: &Store) -> VersionView {
        VersionView {
            parent: self.parent(),
            base_model: self.base_model_uri.clone(),
            tags: self.tags.clone(),
            evaluation: self.evaluation.clone().map(|e| e.0),
            safety_verdict: self.safety_verdict.clone().map(|v| v.0),
            uri: store.uri_of(&self.storage_prefix),
            adapter_name: self.adapter_name,
            version: self.version,
            status: self.status,
            files: self.files.0,
            method: self.method.0,
            hyperparameters: self.hyperparameters.0,
            metrics: self.metrics.map(|m| m.0),
            job_id: self.job_id,
            created_at: self.created_at,
            ready_at: self.ready_at,
        }
    }

    pub fn lineage(self, graph: lineage::Graph) -> LineageView {
        LineageView {
            parent: self.parent(),
            adapter_name: self.adapter_name,
            version: self.version,
            job_id: self.job_id,
            base_model: LineageInput {
                uri: self.base_model_uri,
                sha256: self.base_model_sha256,
                name: self.base_model_name,
            },
            dataset: LineageInput {
                uri: self.dataset_uri,
                sha256: self.dataset_sha256,
                name: self.dataset_name,
            },
            graph,
        }
    }
}

pub async fn get_version(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    version: i32,
) -> Result<Option<VersionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        version_columns!(),
        " FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version = $3"
    ))
    .bind(project)
    .bind(adapter)
    .bind(version)
    .fetch_optional(pool)
    .await
}

/// Reserves the next version number of the job's adapter as `pending` and moves the
/// job to `publishing`. A retried call for the same job returns the same version.
pub async fn reserve_version(pool: &PgPool, job: &JobRow) -> Result<ReservedVersion, ApiError> {
    let mut tx = pool.begin().await?;
    let moved = jobs::transition(
        &mut tx,
        job.id,
        JobStatus::Publishing,
        None,
        TransitionEffects::default(),
    )
    .await?;
    if !moved && job.status() != JobStatus::Publishing {
        return Err(ApiError::Conflict {
            code: "invalid_state",
            detail: format!(
                "job is {}; a version can only be reserved by a running job",
                job.status
            ),
        });
    }
    if let Some(version) = job.adapter_version {
        let pending: Option<String> = sqlx::query_scalar(
            "SELECT storage_prefix FROM adapter_versions
             WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status = 'pending'",
        )
        .bind(&job.project)
        .bind(&job.adapter_name)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(prefix) = pending {
            tx.commit().await?;
            return Ok(ReservedVersion { version, prefix });
        }
    }
    let version: i32 = sqlx::query_scalar(
        "INSERT INTO adapters (project, name, next_version) VALUES ($1, $2, 2)
         ON CONFLICT (project, name) DO UPDATE SET next_version = adapters.next_version + 1
         RETURNING next_version - 1",
    )
    .bind(&job.project)
    .bind(&job.adapter_name)
    .fetch_one(&mut *tx)
    .await?;
    let prefix = layout::adapter_version_prefix(&job.project, &job.adapter_name, version);
    let spec = &job.spec.0;
    sqlx::query(
        "INSERT INTO adapter_versions (project, adapter_name, version, status, job_id, storage_prefix,
                                       method, hyperparameters, base_model_uri, dataset_uri,
                                       base_model_name, dataset_name, parent_adapter, parent_version)
         SELECT $1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9,
                j.base_model_name, j.dataset_name, j.parent_adapter, j.parent_version
         FROM jobs j WHERE j.id = $4",
    )
    .bind(&job.project)
    .bind(&job.adapter_name)
    .bind(version)
    .bind(job.id)
    .bind(&prefix)
    .bind(Json(&spec.method))
    .bind(Json(&spec.training))
    .bind(&spec.base_model)
    .bind(&spec.dataset.train)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE jobs SET adapter_version = $2 WHERE id = $1")
        .bind(job.id)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ReservedVersion { version, prefix })
}

/// Verifies the uploaded files and makes the version `ready` and the job `succeeded`.
/// Files that fail verification fail the job (a system error: the worker broke the
/// protocol or the store lost data) and are deleted.
pub async fn complete(
    state: &AppState,
    job: &JobRow,
    req: &CompleteRequest,
) -> Result<(), ApiError> {
    let row = get_version(&state.pool, &job.project, &job.adapter_name, req.version)
        .await?
        .filter(|v| v.job_id == job.id && v.status == "pending")
        .ok_or_else(|| ApiError::Conflict {
            code: "invalid_state",
            detail: format!(
                "version {} is not a pending version of this job",
                req.version
            ),
        })?;
    if let Err(reason) = verify_upload(&state.store, &row.storage_prefix, job, req).await {
        let message = format!("published files failed verification: {reason}");
        let mut tx = state.pool.begin().await?;
        let effects = TransitionEffects {
            error: Some((ErrorKind::SystemError, &message)),
            release_lease: false,
        };
        jobs::transition(&mut tx, job.id, JobStatus::Failed, None, effects).await?;
        let prefixes = fail_pending_version(&mut tx, job.id).await?;
        tx.commit().await?;
        delete_objects(&state.store, &prefixes).await;
        return Err(ApiError::validation("files", message));
    }
    let m = &req.manifest;
    // The control plane judges the worker's report against the job's policy itself.
    let verdict = match (&job.safety_policy, &m.evaluation) {
        (Some(policy), Some(report)) if policy.0.enabled => Some(policy.0.judge(report)),
        _ => None,
    };
    let quarantined = verdict
        .as_ref()
        .is_some_and(|v| v.decision == SafetyDecision::Quarantine);
    let mut tx = state.pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE adapter_versions SET status = CASE WHEN $9 THEN 'quarantined' ELSE 'ready' END, ready_at = now(),
                files = $4, manifest = $5, metrics = $6, base_model_sha256 = $7, dataset_sha256 = $8,
                evaluation = $10, safety_verdict = $11
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status = 'pending'",
    )
    .bind(&job.project)
    .bind(&job.adapter_name)
    .bind(req.version)
    .bind(Json(&req.files))
    .bind(Json(m))
    .bind(Json(&m.metrics))
    .bind(&m.base_model.sha256)
    .bind(&m.dataset.sha256)
    .bind(quarantined)
    .bind(m.evaluation.as_ref().map(Json))
    .bind(verdict.as_ref().map(Json))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let (moved, hook) = if let (true, Some(v)) = (quarantined, &verdict) {
        let message = format!("quarantined by the safety gate: {}", v.breaches.join("; "));
        let effects = TransitionEffects {
            error: Some((ErrorKind::SafetyBlocked, &message)),
            release_lease: true,
        };
        (
            jobs::transition(&mut tx, job.id, JobStatus::Failed, None, effects).await?,
            webhooks::VERSION_QUARANTINED,
        )
    } else {
        (
            jobs::transition(
                &mut tx,
                job.id,
                JobStatus::Succeeded,
                None,
                TransitionEffects::default(),
            )
            .await?,
            webhooks::VERSION_READY,
        )
    };
    if updated != 1 || !moved {
        return Err(ApiError::Conflict {
            code: "invalid_state",
            detail: "the job is no longer publishing".into(),
        });
    }
    let payload = serde_json::json!({
        "adapter_name": job.adapter_name, "version": req.version, "job_id": job.id,
        "uri": state.store.uri_of(&row.storage_prefix), "files": req.files, "safety_verdict": verdict,
    });
    webhooks::enqueue(&mut tx, &job.project, hook, payload).await?;
    tx.commit().await?;
    Ok(())
}

/// Marks the job's pending version (if any) `failed`; returns the storage prefixes
/// whose objects should be deleted once the transaction has committed.
pub async fn fail_pending_version(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE adapter_versions SET status = 'failed' WHERE job_id = $1 AND status = 'pending' RETURNING storage_prefix",
    )
    .bind(job_id)
    .fetch_all(conn)
    .await
}

/// Best effort: whatever is left behind is found by garbage collection.
pub async fn delete_objects(store: &Store, prefixes: &[String]) {
    for prefix in prefixes {
        if let Err(e) = store.delete_prefix(prefix).await {
            tracing::warn!(prefix, error = %e, "could not delete the objects of a failed version");
        }
    }
}

/// Checks what the worker uploaded against what it declared, and the PEFT layout.
async fn verify_upload(
    store: &Store,
    prefix: &str,
    job: &JobRow,
    req: &CompleteRequest,
) -> Result<(), String> {
    let declared: BTreeMap<&str, &FileDigest> =
        req.files.iter().map(|f| (f.name.as_str(), f)).collect();
    for required in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE] {
        if !declared.contains_key(required) {
            return Err(format!("{required} is missing"));
        }
    }
    if declared.len() != req.files.len() {
        return Err("a file is declared twice".into());
    }
    let stored: BTreeSet<String> = store
        .list(prefix)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|l| {
            l.path
                .trim_start_matches(prefix)
                .trim_start_matches('/')
                .to_string()
        })
        .collect();
    let declared_names: BTreeSet<String> = declared.keys().map(|s| s.to_string()).collect();
    if stored != declared_names {
        return Err(format!(
            "stored files {stored:?} differ from declared files {declared_names:?}"
        ));
    }
    for f in &req.files {
        let (sha, size) = store
            .digest(&format!("{prefix}/{}", f.name))
            .await
            .map_err(|e| e.to_string())?;
        if sha != f.sha256 || size != f.size {
            return Err(format!(
                "{}: stored sha256 {sha} size {size}, declared {} size {}",
                f.name, f.sha256, f.size
            ));
        }
    }
    let manifest: AdapterManifest = serde_json::from_slice(
        &store
            .get(&format!("{prefix}/{MANIFEST_FILE}"))
            .await
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
    if manifest != req.manifest {
        return Err(format!(
            "stored {MANIFEST_FILE} differs from the declared manifest"
        ));
    }
    if manifest.job_id != job.id
        || manifest.version != req.version
        || manifest.adapter_name != job.adapter_name
    {
        return Err(format!(
            "{MANIFEST_FILE} names another job, adapter or version"
        ));
    }
    if job.safety_policy.as_ref().is_some_and(|p| p.0.enabled) && manifest.evaluation.is_none() {
        return Err("the safety gate is on for this job but the manifest has no evaluation".into());
    }
    check_input(&manifest.base_model, &job.spec.base_model, "base_model")?;
    check_input(&manifest.dataset, &job.spec.dataset.train, "dataset")?;
    for f in &manifest.files {
        if declared.get(f.name.as_str()) != Some(&f) || f.name == MANIFEST_FILE {
            return Err(format!(
                "{MANIFEST_FILE} lists {} with another digest",
                f.name
            ));
        }
    }
    let config: PeftLoraConfig = serde_json::from_slice(
        &store
            .get(&format!("{prefix}/{ADAPTER_CONFIG_FILE}"))
            .await
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{ADAPTER_CONFIG_FILE} is not a PEFT LoRA config: {e}"))?;
    if config.peft_type != "LORA" {
        return Err(format!(
            "{ADAPTER_CONFIG_FILE}: peft_type is {:?}, not LORA",
            config.peft_type
        ));
    }
    let tensors =
        read_safetensors_header(store, &format!("{prefix}/{ADAPTER_WEIGHTS_FILE}")).await?;
    check_lora_tensors(&tensors, &config)
}

fn check_input(input: &DigestRef, expected_uri: &str, what: &str) -> Result<(), String> {
    let is_hex = input.sha256.len() == 64 && input.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    if input.uri != expected_uri || !is_hex {
        return Err(format!(
            "{MANIFEST_FILE}: {what} must be {expected_uri} with a sha256 digest"
        ));
    }
    Ok(())
}

/// Name -> shape of every tensor in a safetensors file, read from its header only.
async fn read_safetensors_header(
    store: &Store,
    path: &str,
) -> Result<BTreeMap<String, Vec<u64>>, String> {
    let len = store
        .get_range(path, 0..8)
        .await
        .map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(
        len.as_ref()
            .try_into()
            .map_err(|_| "safetensors file is truncated")?,
    );
    if len > 100 * 1024 * 1024 {
        return Err("safetensors header is implausibly large".into());
    }
    let header = store
        .get_range(path, 8..8 + len)
        .await
        .map_err(|e| e.to_string())?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("safetensors header: {e}"))?;
    let mut shapes = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| serde_json::from_value::<Vec<u64>>(s.clone()).ok())
            .ok_or_else(|| format!("safetensors: tensor {name} has no shape"))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// Every tensor must be a PEFT LoRA factor, in pairs, with matching ranks.
fn check_lora_tensors(
    tensors: &BTreeMap<String, Vec<u64>>,
    config: &PeftLoraConfig,
) -> Result<(), String> {
    if tensors.is_empty() {
        return Err(format!("{ADAPTER_WEIGHTS_FILE} holds no tensors"));
    }
    for (name, shape) in tensors {
        let module = name
            .strip_prefix("base_model.model.")
            .and_then(|n| {
                n.strip_suffix(".lora_A.weight")
                    .or_else(|| n.strip_suffix(".lora_B.weight"))
            })
            .ok_or_else(|| format!("{name} is not a PEFT LoRA key"))?;
        let leaf = module.rsplit('.').next().unwrap_or(module);
        if !config.target_modules.iter().any(|t| t == leaf) {
            return Err(format!("{name}: {leaf} is not among target_modules"));
        }
        let a = tensors.get(&format!("base_model.model.{module}.lora_A.weight"));
        let b = tensors.get(&format!("base_model.model.{module}.lora_B.weight"));
        let (Some(a), Some(b)) = (a, b) else {
            return Err(format!("{module}: lora_A and lora_B must come in pairs"));
        };
        // PEFT matches rank_pattern keys as module-path suffixes on a dot boundary.
        let matches = |k: &String| module == k.as_str() || module.ends_with(&format!(".{k}"));
        let rank = config
            .rank_pattern
            .iter()
            .find(|(k, _)| matches(k))
            .map_or(config.r, |(_, r)| *r);
        if a.len() != 2
            || b.len() != 2
            || a[0] != rank as u64
            || b[1] != rank as u64
            || shape.len() != 2
        {
            return Err(format!(
                "{module}: lora_A {a:?} / lora_B {b:?} do not match rank {rank}"
            ));
        }
    }
    Ok(())
}

/// Filters and paging of the adapter list.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdapterFilter {
    pub base_model: Option<String>,
    pub method: Option<String>,
    pub tag: Option<String>,
    pub status: Option<String>,
    /// The last adapter name of the previous page.
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AdapterSummary {
    pub name: String,
    pub versions: i64,
    /// Newest version with status `ready`, if any.
    pub latest_ready: Option<i32>,
    pub created_at: DateTime<Utc>,
}

/// Adapters that have at least one version matching every given filter, by name.
pub async fn list_adapters(
    pool: &PgPool,
    project: &str,
    f: &AdapterFilter,
    limit: i64,
) -> Result<Vec<AdapterSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.name, count(v.version) AS versions,
                max(v.version) FILTER (WHERE v.status = 'ready') AS latest_ready, a.created_at
         FROM adapters a JOIN adapter_versions v ON v.project = a.project AND v.adapter_name = a.name
         WHERE a.project = $1 AND a.name > COALESCE($2, '')
           AND EXISTS (SELECT 1 FROM adapter_versions m
                       WHERE m.project = a.project AND m.adapter_name = a.name
                         AND ($3::text IS NULL OR m.base_model_uri = $3 OR m.base_model_name = $3)
                         AND ($4::text IS NULL OR m.method->>'type' = $4)
                         AND ($5::text IS NULL OR m.tags @> ARRAY[$5])
                         AND ($6::text IS NULL OR m.status = $6))
         GROUP BY a.project, a.name, a.created_at
         ORDER BY a.name LIMIT $7",
    )
    .bind(project)
    .bind(&f.cursor)
    .bind(&f.base_model)
    .bind(&f.method)
    .bind(&f.tag)
    .bind(&f.status)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Versions of one adapter, newest first, after `before` (exclusive) when paging.
pub async fn list_versions(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    before: Option<i32>,
    limit: i64,
) -> Result<Vec<VersionRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        version_columns!(),
        " FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version < COALESCE($3, 2147483647)
          ORDER BY version DESC LIMIT $4"
    ))
    .bind(project)
    .bind(adapter)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks a version `deleted` and removes its objects. A version an alias points to
/// is refused: move or delete the alias first, so serving never resolves to nothing.
pub async fn delete_version(
    state: &AppState,
    project: &str,
    adapter: &str,
    version: i32,
) -> Result<(), ApiError> {
    let mut tx = state.pool.begin().await?;
    let aliased: Vec<String> = sqlx::query_scalar(
        "SELECT alias FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 AND version = $3",
    )
    .bind(project)
    .bind(adapter)
    .bind(version)
    .fetch_all(&mut *tx)
    .await?;
    if !aliased.is_empty() {
        return Err(ApiError::Conflict {
            code: "version_aliased",
            detail: format!("aliases {aliased:?} point at version {version}; move them first"),
        });
    }
    let prefix: Option<String> = sqlx::query_scalar(
        "UPDATE adapter_versions SET status = 'deleted', deleted_at = now()
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status IN ('ready', 'quarantined', 'failed')
         RETURNING storage_prefix",
    )
    .bind(project)
    .bind(adapter)
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(prefix) = prefix else {
        let exists = get_version(&state.pool, project, adapter, version).await?;
        return Err(match exists {
            None => ApiError::NotFound("adapter version"),
            Some(v) => ApiError::Conflict {
                code: "invalid_state",
                detail: format!("version {version} is {}", v.status),
            },
        });
    };
    tx.commit().await?;
    // After the commit: if this fails, the objects are orphans that `loraforge gc` removes.
    state
        .store
        .delete_prefix(&prefix)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(())
}

pub async fn set_tag(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    version: i32,
    tag: &str,
    present: bool,
) -> Result<Vec<String>, ApiError> {
    loraforge_spec::AdapterName::parse(tag).map_err(|m| ApiError::validation("tag", m))?;
    let tags: Option<Vec<String>> = sqlx::query_scalar(
        "UPDATE adapter_versions
         SET tags = CASE WHEN $5 THEN (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(array_append(tags, $4)) t)
                         ELSE array_remove(tags, $4) END
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status <> 'deleted'
         RETURNING tags",
    )
    .bind(project)
    .bind(adapter)
    .bind(version)
    .bind(tag)
    .bind(present)
    .fetch_optional(pool)
    .await?;
    tags.ok_or(ApiError::NotFound("adapter version"))
}
