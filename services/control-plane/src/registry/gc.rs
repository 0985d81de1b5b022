//! Garbage collection of the artifact store: objects no registry row accounts for.
//! A version folder is kept while its version is `ready` or `quarantined`, or `pending`
//! and younger than the grace period (a worker may be uploading); a checkpoint folder
//! while its job is unfinished. Everything else under `adapters/` and `checkpoints/` goes.

use loraforge_storage::Store;
use serde::Serialize;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Orphan {
    /// Path relative to the store root.
    pub path: String,
    pub size: u64,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct GcReport {
    pub orphans: Vec<Orphan>,
    pub deleted: usize,
    pub dry_run: bool,
}

/// Finds orphans; deletes them unless `dry_run`.
pub async fn collect(
    pool: &PgPool,
    store: &Store,
    grace: Duration,
    dry_run: bool,
) -> anyhow::Result<GcReport> {
    let mut orphans = Vec::new();
    let mut verdicts: BTreeMap<String, Option<String>> = BTreeMap::new();
    for object in store.list("adapters").await? {
        // adapters/<project>/<adapter>/v<N>/<file>
        let parts: Vec<&str> = object.path.splitn(5, '/').collect();
        let folder = parts[..parts.len().min(4)].join("/");
        if !verdicts.contains_key(&folder) {
            let verdict = version_verdict(pool, &parts, grace).await?;
            verdicts.insert(folder.clone(), verdict);
        }
        if let Some(reason) = &verdicts[&folder] {
            orphans.push(Orphan {
                path: object.path,
                size: object.size,
                reason: reason.clone(),
            });
        }
    }
    for object in store.list("checkpoints").await? {
        let job = object.path.split('/').nth(1).unwrap_or("");
        let status: Option<String> = match uuid::Uuid::parse_str(job) {
            Ok(id) => {
                sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
            Err(_) => None,
        };
        let reason = match status.as_deref() {
            None => Some("checkpoint of an unknown job".to_string()),
            Some(s @ ("succeeded" | "failed" | "cancelled")) => {
                Some(format!("checkpoint of a {s} job"))
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            orphans.push(Orphan {
                path: object.path,
                size: object.size,
                reason,
            });
        }
    }
    let mut deleted = 0;
    if !dry_run {
        for o in &orphans {
            store.delete(&o.path).await?;
            deleted += 1;
        }
    }
    Ok(GcReport {
        orphans,
        deleted,
        dry_run,
    })
}

/// Why a version folder is an orphan, or `None` if it is kept.
async fn version_verdict(
    pool: &PgPool,
    parts: &[&str],
    grace: Duration,
) -> anyhow::Result<Option<String>> {
    let parsed = match parts {
        [_, project, adapter, v, _] => v
            .strip_prefix('v')
            .and_then(|n| n.parse::<i32>().ok())
            .map(|n| (*project, *adapter, n)),
        _ => None,
    };
    let Some((project, adapter, version)) = parsed else {
        return Ok(Some("not in the adapter layout".into()));
    };
    let row: Option<(String, bool)> = sqlx::query_as(
        "SELECT status, created_at < now() - make_interval(secs => $4) FROM adapter_versions
         WHERE project = $1 AND adapter_name = $2 AND version = $3",
    )
    .bind(project)
    .bind(adapter)
    .bind(version)
    .bind(grace.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        None => Some("no such version in the registry".into()),
        Some((status, _)) if status == "ready" || status == "quarantined" => None,
        Some((status, stale)) if status == "pending" => {
            stale.then(|| "pending past the grace period".into())
        }
        Some((status, _)) => Some(format!("version is {status}")),
    })
}
