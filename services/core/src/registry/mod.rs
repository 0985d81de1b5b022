//! The adapter registry: numbered, immutable versions with their files and lineage.
//!
//! - [`publish`]: the two-phase publish protocol (reserve `pending`, verify, `ready`).
//! - [`aliases`]: aliases and `resolve`; [`lineage`]: the ancestor and descendant graph.
//! - [`inputs`]: registered base models and datasets; [`gc`]: objects nothing accounts for.
//! - [`cache`]: the read cache of `resolve` and `versions/{v}`, evicted by NOTIFY.

use crate::error::{Error, Result};
use crate::Context;
use chrono::{DateTime, Utc};
use loraforge_spec::safety::{SafetyReport, SafetyVerdict};
use loraforge_spec::{AdapterName, FileDigest, MethodConfig, TrainingConfig, TrainingMetrics};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgPool;
use std::fmt;
use uuid::Uuid;

/// `sqlx::query_as!` of [`VersionRow`]s: `$head`, the columns of [`VersionRow`] with their
/// Rust types, then `$tail`. The macros take string literals only, so the one column list
/// lives here and every query that reads whole versions goes through it.
macro_rules! query_versions {
    ($head:literal, $tail:literal $(, $arg:expr)* $(,)?) => {{
        // The column types below, in scope wherever this expands.
        use $crate::registry::VersionStatus;
        use loraforge_spec::safety::{SafetyReport, SafetyVerdict};
        use loraforge_spec::{FileDigest, MethodConfig, TrainingConfig, TrainingMetrics};
        use sqlx::types::Json;
        sqlx::query_as!(
            $crate::registry::VersionRow,
            $head
                + r#"project, adapter_name, version, status AS "status: VersionStatus", job_id,
                     storage_prefix, files AS "files: Json<Vec<FileDigest>>",
                     method AS "method: Json<MethodConfig>",
                     hyperparameters AS "hyperparameters: Json<TrainingConfig>",
                     metrics AS "metrics: Json<TrainingMetrics>",
                     base_model_uri, base_model_sha256, dataset_uri, dataset_sha256, parent_adapter,
                     parent_version, created_at, ready_at, tags, base_model_name, dataset_name,
                     evaluation AS "evaluation: Json<SafetyReport>",
                     safety_verdict AS "safety_verdict: Json<SafetyVerdict>""#
                + $tail
            $(, $arg)*
        )
    }};
}

pub mod aliases;
pub mod cache;
pub mod gc;
pub mod inputs;
pub mod lineage;
pub mod publish;
pub mod uploads;

pub use publish::delete_objects;

/// Where a version is in its life: `pending` while its worker uploads, then `ready` (or
/// `quarantined` by the safety gate, or `failed`), and `deleted` at the end.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    Pending,
    Ready,
    Quarantined,
    Failed,
    Deleted,
}

impl VersionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Pending => "pending",
            VersionStatus::Ready => "ready",
            VersionStatus::Quarantined => "quarantined",
            VersionStatus::Failed => "failed",
            VersionStatus::Deleted => "deleted",
        }
    }
}

impl fmt::Display for VersionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VersionRow {
    pub project: String,
    pub adapter_name: String,
    pub version: i32,
    pub status: VersionStatus,
    pub job_id: Uuid,
    pub storage_prefix: String,
    pub files: Json<Vec<FileDigest>>,
    pub method: Json<MethodConfig>,
    pub hyperparameters: Json<TrainingConfig>,
    pub metrics: Option<Json<TrainingMetrics>>,
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
    pub evaluation: Option<Json<SafetyReport>>,
    pub safety_verdict: Option<Json<SafetyVerdict>>,
}

impl VersionRow {
    /// The parent version it was trained from, if any.
    pub fn parent(&self) -> Option<(String, i32)> {
        match (&self.parent_adapter, self.parent_version) {
            (Some(adapter_name), Some(version)) => Some((adapter_name.clone(), version)),
            _ => None,
        }
    }
}

pub async fn get_version(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    version: i32,
) -> Result<Option<VersionRow>, sqlx::Error> {
    query_versions!(
        "SELECT ",
        " FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version = $3",
        project,
        adapter,
        version,
    )
    .fetch_optional(pool)
    .await
}

/// The version, or `NotFound`.
pub async fn find_version(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    version: i32,
) -> Result<VersionRow> {
    get_version(pool, project, adapter, version)
        .await?
        .ok_or(Error::NotFound("adapter version"))
}

/// A file the registry lists for a version that still has its files.
pub async fn listed_file(
    pool: &PgPool,
    project: &str,
    adapter: &str,
    version: i32,
    file: &str,
) -> Result<(VersionRow, FileDigest)> {
    let row = find_version(pool, project, adapter, version).await?;
    if row.status == VersionStatus::Deleted {
        return Err(Error::Gone(format!(
            "version {version} of {adapter} was deleted"
        )));
    }
    let digest = row
        .files
        .0
        .iter()
        .find(|f| f.name == file)
        .cloned()
        .ok_or(Error::NotFound("file"))?;
    Ok((row, digest))
}

/// Filters and paging of the adapter list.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdapterFilter {
    pub base_model: Option<String>,
    pub method: Option<String>,
    pub tag: Option<String>,
    pub status: Option<VersionStatus>,
    /// The last adapter name of the previous page.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AdapterSummary {
    pub name: String,
    pub versions: i64,
    /// Newest version with status `ready`, if any.
    pub latest_ready: Option<i32>,
    /// How many versions the safety gate quarantined (never resolved, files for review only).
    pub quarantined: i64,
    pub created_at: DateTime<Utc>,
}

/// Adapters that have at least one version matching every given filter, by name.
pub async fn list_adapters(
    pool: &PgPool,
    project: &str,
    f: &AdapterFilter,
    limit: i64,
) -> Result<Vec<AdapterSummary>, sqlx::Error> {
    sqlx::query_as!(
        AdapterSummary,
        r#"SELECT a.name, count(v.version) AS "versions!",
                max(v.version) FILTER (WHERE v.status = 'ready') AS latest_ready,
                count(v.version) FILTER (WHERE v.status = 'quarantined') AS "quarantined!", a.created_at
         FROM adapters a JOIN adapter_versions v ON v.project = a.project AND v.adapter_name = a.name
         WHERE a.project = $1 AND a.name > COALESCE($2, '')
           AND EXISTS (SELECT 1 FROM adapter_versions m
                       WHERE m.project = a.project AND m.adapter_name = a.name
                         AND ($3::text IS NULL OR m.base_model_uri = $3 OR m.base_model_name = $3)
                         AND ($4::text IS NULL OR m.method->>'type' = $4)
                         AND ($5::text IS NULL OR m.tags @> ARRAY[$5])
                         AND ($6::text IS NULL OR m.status = $6))
         GROUP BY a.project, a.name, a.created_at
         ORDER BY a.name LIMIT $7"#,
        project,
        f.cursor.as_deref(),
        f.base_model.as_deref(),
        f.method.as_deref(),
        f.tag.as_deref(),
        f.status as Option<VersionStatus>,
        limit,
    )
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
    query_versions!(
        "SELECT ",
        " FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version < COALESCE($3, 2147483647)
          ORDER BY version DESC LIMIT $4",
        project,
        adapter,
        before,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// Marks a version `deleted` and removes its objects. A version an alias points to
/// is refused: move or delete the alias first, so serving never resolves to nothing.
pub async fn delete_version(
    ctx: &Context,
    project: &str,
    adapter: &str,
    version: i32,
) -> Result<()> {
    let mut tx = ctx.pool.begin().await?;
    let aliased: Vec<String> = sqlx::query_scalar!(
        "SELECT alias FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 AND version = $3",
        project,
        adapter,
        version,
    )
    .fetch_all(&mut *tx)
    .await?;
    if !aliased.is_empty() {
        return Err(Error::conflict(
            "version_aliased",
            format!("aliases {aliased:?} point at version {version}; move them first"),
        ));
    }
    let prefix: Option<String> = sqlx::query_scalar!(
        "UPDATE adapter_versions SET status = 'deleted', deleted_at = now()
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status IN ('ready', 'quarantined', 'failed')
         RETURNING storage_prefix",
        project,
        adapter,
        version,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(prefix) = prefix else {
        let row = find_version(&ctx.pool, project, adapter, version).await?;
        return Err(Error::conflict(
            "invalid_state",
            format!("version {version} is {}", row.status),
        ));
    };
    tx.commit().await?;
    ctx.read_cache.evict(Some(project), adapter);
    // After the commit: if this fails, the objects are orphans that `loraforge gc` removes.
    ctx.store.delete_prefix(&prefix).await?;
    Ok(())
}

/// Adds (`present`) or removes a tag; returns the version's tags after.
pub async fn set_tag(
    ctx: &Context,
    project: &str,
    adapter: &str,
    version: i32,
    tag: &str,
    present: bool,
) -> Result<Vec<String>> {
    AdapterName::parse(tag).map_err(|m| Error::invalid("tag", m))?;
    let tags: Option<Vec<String>> = sqlx::query_scalar!(
        "UPDATE adapter_versions
         SET tags = CASE WHEN $5 THEN (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(array_append(tags, $4)) t)
                         ELSE array_remove(tags, $4) END
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status <> 'deleted'
         RETURNING tags",
        project,
        adapter,
        version,
        tag,
        present,
    )
    .fetch_optional(&ctx.pool)
    .await?;
    ctx.read_cache.evict(Some(project), adapter);
    tags.ok_or(Error::NotFound("adapter version"))
}
