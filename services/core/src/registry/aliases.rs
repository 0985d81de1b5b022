//! Aliases (`prod`, `staging`) name one version of an adapter; moving one is atomic.
//! `resolve` turns `latest`, an alias or a number into what a serving engine loads.

use super::{find_version, VersionRow, VersionStatus};
use crate::error::{Error, Result};
use crate::{webhooks, Context};
use loraforge_spec::{AdapterName, FileDigest};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AliasRow {
    pub alias: String,
    pub version: i32,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Points `alias` at `version` (a `ready` one), creating or moving it in one statement.
pub async fn set(
    ctx: &Context,
    project: &str,
    adapter: &str,
    alias: &str,
    version: i32,
) -> Result<AliasRow> {
    AdapterName::parse(alias).map_err(|m| Error::invalid("alias", m))?;
    if alias == "latest" || alias.parse::<i64>().is_ok() {
        return Err(Error::invalid(
            "alias",
            "latest and numbers are reserved for resolve",
        ));
    }
    let target = find_version(&ctx.pool, project, adapter, version).await?;
    if target.status != VersionStatus::Ready {
        return Err(Error::conflict(
            "version_not_ready",
            format!(
                "version {version} is {}; only ready versions can be aliased",
                target.status
            ),
        ));
    }
    let mut tx = ctx.pool.begin().await?;
    let previous: Option<i32> = sqlx::query_scalar!(
        "SELECT version FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 AND alias = $3 FOR UPDATE",
        project,
        adapter,
        alias,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let row: AliasRow = sqlx::query_as!(
        AliasRow,
        "INSERT INTO adapter_aliases (project, adapter_name, alias, version) VALUES ($1, $2, $3, $4)
         ON CONFLICT (project, adapter_name, alias) DO UPDATE SET version = EXCLUDED.version, updated_at = now()
         RETURNING alias, version, updated_at",
        project,
        adapter,
        alias,
        version,
    )
    .fetch_one(&mut *tx)
    .await?;
    if previous != Some(version) {
        let payload = serde_json::json!({"adapter_name": adapter, "alias": alias, "version": version, "previous_version": previous});
        webhooks::enqueue(&mut tx, project, webhooks::ALIAS_MOVED, payload).await?;
    }
    tx.commit().await?;
    ctx.read_cache.evict(Some(project), adapter);
    Ok(row)
}

pub async fn delete(ctx: &Context, project: &str, adapter: &str, alias: &str) -> Result<()> {
    let deleted = sqlx::query!(
        "DELETE FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 AND alias = $3",
        project,
        adapter,
        alias,
    )
    .execute(&ctx.pool)
    .await?
    .rows_affected();
    ctx.read_cache.evict(Some(project), adapter);
    if deleted == 0 {
        return Err(Error::NotFound("alias"));
    }
    Ok(())
}

pub async fn list(
    pool: &PgPool,
    project: &str,
    adapter: &str,
) -> Result<Vec<AliasRow>, sqlx::Error> {
    sqlx::query_as!(
        AliasRow,
        "SELECT alias, version, updated_at FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 ORDER BY alias",
        project,
        adapter,
    )
    .fetch_all(pool)
    .await
}

/// What a serving engine needs to load a version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Resolved {
    pub status: VersionStatus,
    pub version: i32,
    pub uri: String,
    pub files: Vec<FileDigest>,
    pub base_model: ResolvedBase,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResolvedBase {
    pub uri: String,
    pub sha256: Option<String>,
    pub name: Option<String>,
}

/// `latest` is the newest `ready` version; an alias or a number names one directly.
pub async fn resolve(
    pool: &PgPool,
    store: &loraforge_storage::Store,
    project: &str,
    adapter: &str,
    reference: &str,
) -> Result<Resolved> {
    // One round trip: serving engines call this on every adapter load.
    let number = reference.parse::<i32>().ok();
    let row: VersionRow = query_versions!(
        "SELECT ",
        " FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version = (CASE
             WHEN $4::int IS NOT NULL THEN $4
             WHEN $3 = 'latest' THEN (SELECT max(version) FROM adapter_versions
                                      WHERE project = $1 AND adapter_name = $2 AND status = 'ready')
             ELSE (SELECT version FROM adapter_aliases WHERE project = $1 AND adapter_name = $2 AND alias = $3) END)",
        project,
        adapter,
        reference,
        number,
    )
    .fetch_optional(pool)
    .await?
    .ok_or(Error::NotFound("adapter version"))?;
    if row.status == VersionStatus::Deleted {
        return Err(Error::Gone(format!(
            "version {} of {adapter} was deleted",
            row.version
        )));
    }
    // Quarantine means not served: a serving engine pinning a number must not load it.
    if row.status == VersionStatus::Quarantined {
        return Err(quarantined(adapter, &row));
    }
    Ok(Resolved {
        status: row.status,
        version: row.version,
        uri: store.uri_of(&row.storage_prefix),
        files: row.files.0,
        base_model: ResolvedBase {
            uri: row.base_model_uri,
            sha256: row.base_model_sha256,
            name: row.base_model_name,
        },
    })
}

/// The refusal of a quarantined version, with the gate's reasons.
pub fn quarantined(adapter: &str, row: &VersionRow) -> Error {
    let why = row
        .safety_verdict
        .as_ref()
        .map(|v| format!(" ({})", v.0.breaches.join("; ")))
        .unwrap_or_default();
    Error::conflict(
        "version_quarantined",
        format!(
            "version {} of {adapter} is quarantined by the safety gate{why}; it is not served",
            row.version
        ),
    )
}
