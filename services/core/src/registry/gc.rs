//! Garbage collection of the artifact store: objects no registry row accounts for.
//! A version folder is kept while its version is `ready` or `quarantined`, or `pending`
//! and younger than the grace period (a worker may be uploading); a checkpoint folder
//! while its job is unfinished. Everything else under `adapters/` and `checkpoints/` goes.
//! Paths are read by `loraforge_storage::layout`, the one place that knows the layout.

use super::VersionStatus;
use crate::error::Result;
use loraforge_spec::JobStatus;
use loraforge_storage::layout::{self, Located};
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
) -> Result<GcReport> {
    let mut orphans = Vec::new();
    // One verdict per folder: `None` keeps it, `Some(reason)` condemns it.
    let mut verdicts: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut objects = store.list(layout::ADAPTERS).await?;
    objects.extend(store.list(layout::CHECKPOINTS).await?);
    for object in objects {
        let located = layout::locate(&object.path);
        // An object outside the layout is its own folder.
        let folder = located.folder().unwrap_or_else(|| object.path.clone());
        let verdict = match verdicts.get(&folder) {
            Some(v) => v.clone(),
            None => {
                let v = verdict(pool, &located, grace).await?;
                verdicts.insert(folder, v.clone());
                v
            }
        };
        if let Some(reason) = verdict {
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

/// Why an artifact's folder is an orphan, or `None` if it is kept.
async fn verdict(pool: &PgPool, located: &Located<'_>, grace: Duration) -> Result<Option<String>> {
    match *located {
        Located::AdapterVersion {
            project,
            adapter,
            version,
        } => {
            let row = sqlx::query!(
                r#"SELECT status AS "status: VersionStatus", created_at < now() - make_interval(secs => $4) AS "stale!"
                   FROM adapter_versions WHERE project = $1 AND adapter_name = $2 AND version = $3"#,
                project,
                adapter,
                version,
                grace.as_secs_f64(),
            )
            .fetch_optional(pool)
            .await?
            .map(|r| (r.status, r.stale));
            Ok(match row {
                None => Some("no such version in the registry".into()),
                Some((VersionStatus::Ready | VersionStatus::Quarantined, _)) => None,
                Some((VersionStatus::Pending, stale)) => {
                    stale.then(|| "pending past the grace period".into())
                }
                Some((status, _)) => Some(format!("version is {status}")),
            })
        }
        Located::Checkpoint { job_id } => {
            let status: Option<JobStatus> = match uuid::Uuid::parse_str(job_id) {
                Ok(id) => {
                    sqlx::query_scalar!(
                        r#"SELECT status AS "status: JobStatus" FROM jobs WHERE id = $1"#,
                        id
                    )
                    .fetch_optional(pool)
                    .await?
                }
                Err(_) => None,
            };
            Ok(match status {
                None => Some("checkpoint of an unknown job".into()),
                Some(s) if s.is_final() => Some(format!("checkpoint of a {s} job")),
                Some(_) => None,
            })
        }
        Located::Unknown => Ok(Some("not in the storage layout".into())),
    }
}
