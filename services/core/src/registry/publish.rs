//! Publishing is two-phase so a crash never leaves a `ready` version without files: the
//! worker reserves a version (`pending`, job -> `publishing`), uploads, then asks us to
//! complete it. The stored `manifest.json` is the one declaration of what was published:
//! the worker names only its digest, and we verify every file the manifest lists (sha256,
//! size, nothing missing or extra), the lineage it states, and the PEFT layout before the
//! version becomes `ready` (or `quarantined` by the safety gate).

use super::{get_version, VersionStatus};
use crate::error::{Error, Result};
use crate::jobs::attempts::{self, Outcome};
use crate::jobs::{self, JobRow, TransitionEffects};
use crate::{webhooks, Context};
use loraforge_spec::manifest::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE};
use loraforge_spec::peft::{safetensors_shapes, PeftConfig, MAX_SAFETENSORS_HEADER};
use loraforge_spec::safety::SafetyDecision;
use loraforge_spec::worker::{CompleteRequest, ReservedVersion};
use loraforge_spec::{AdapterManifest, DigestRef, ErrorKind, FileDigest, JobStatus};
use loraforge_storage::{layout, Store};
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Reserves the next version number of the job's adapter as `pending` and moves the
/// job to `publishing`. A retried call for the same job returns the same version.
pub async fn reserve_version(pool: &PgPool, job: &JobRow) -> Result<ReservedVersion> {
    let mut tx = pool.begin().await?;
    let moved = jobs::transition(
        &mut tx,
        job.id,
        JobStatus::Publishing,
        None,
        TransitionEffects::default(),
    )
    .await?;
    if !moved && job.status != JobStatus::Publishing {
        return Err(Error::conflict(
            "invalid_state",
            format!(
                "job is {}; a version can only be reserved by a running job",
                job.status
            ),
        ));
    }
    if let Some(version) = job.adapter_version {
        let pending: Option<String> = sqlx::query_scalar!(
            "SELECT storage_prefix FROM adapter_versions
             WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status = 'pending'",
            &job.project,
            &job.adapter_name,
            version,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(prefix) = pending {
            tx.commit().await?;
            return Ok(ReservedVersion { version, prefix });
        }
    }
    let version: i32 = sqlx::query_scalar!(
        r#"INSERT INTO adapters (project, name, next_version) VALUES ($1, $2, 2)
           ON CONFLICT (project, name) DO UPDATE SET next_version = adapters.next_version + 1
           RETURNING next_version - 1 AS "version!""#,
        &job.project,
        &job.adapter_name,
    )
    .fetch_one(&mut *tx)
    .await?;
    let prefix = layout::adapter_version_prefix(&job.project, &job.adapter_name, version);
    let spec = &job.spec.0;
    sqlx::query!(
        "INSERT INTO adapter_versions (project, adapter_name, version, status, job_id, storage_prefix,
                                       method, hyperparameters, base_model_uri, dataset_uri,
                                       base_model_name, dataset_name, parent_adapter, parent_version)
         SELECT $1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9,
                j.base_model_name, j.dataset_name, j.parent_adapter, j.parent_version
         FROM jobs j WHERE j.id = $4",
        &job.project,
        &job.adapter_name,
        version,
        job.id,
        &prefix,
        Json(&spec.method) as _,
        Json(&spec.training) as _,
        spec.base_model_uri(),
        spec.train_uri(),
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE jobs SET adapter_version = $2 WHERE id = $1",
        job.id,
        version
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ReservedVersion { version, prefix })
}

/// Verifies the uploaded files and makes the version `ready` (or `quarantined`) and the
/// job `succeeded` (or `failed{safety_blocked}`). Files that fail verification end the
/// attempt ([`Outcome::PublishRejected`]) and are deleted.
pub async fn complete(ctx: &Context, job: &JobRow, req: &CompleteRequest) -> Result<()> {
    let row = get_version(&ctx.pool, &job.project, &job.adapter_name, req.version)
        .await?
        .filter(|v| v.job_id == job.id && v.status == VersionStatus::Pending)
        .ok_or_else(|| {
            Error::conflict(
                "invalid_state",
                format!(
                    "version {} is not a pending version of this job",
                    req.version
                ),
            )
        })?;
    let (manifest, files) = match verify(&ctx.store, &row.storage_prefix, job, req).await {
        Ok(published) => published,
        Err(reason) => {
            let message = format!("published files failed verification: {reason}");
            let outcome = Outcome::PublishRejected { reason };
            attempts::settle_now(ctx, job.id, job.attempt, outcome).await?;
            return Err(Error::invalid("files", message));
        }
    };
    // The control plane judges the worker's report against the job's policy itself, and
    // against the lineage: a base merged from a version that lost its refusals must not
    // become the new reference (docs/safety.md, "No laundering").
    let verdict = match (&job.safety_policy, &manifest.evaluation) {
        (Some(policy), Some(report)) if policy.0.enabled => {
            let ancestor = crate::safety::nearest_approved_ancestor(&ctx.pool, &row).await?;
            Some(policy.0.judge_against(report, ancestor.as_ref()))
        }
        _ => None,
    };
    let quarantined = verdict
        .as_ref()
        .is_some_and(|v| v.decision == SafetyDecision::Quarantine);
    let status = if quarantined {
        VersionStatus::Quarantined
    } else {
        VersionStatus::Ready
    };
    let mut tx = ctx.pool.begin().await?;
    let updated = sqlx::query!(
        "UPDATE adapter_versions SET status = $9, ready_at = now(),
                files = $4, manifest = $5, metrics = $6, base_model_sha256 = $7, dataset_sha256 = $8,
                evaluation = $10, safety_verdict = $11
         WHERE project = $1 AND adapter_name = $2 AND version = $3 AND status = 'pending'",
        &job.project,
        &job.adapter_name,
        req.version,
        Json(&files) as _,
        Json(&manifest) as _,
        Json(&manifest.metrics) as _,
        &manifest.base_model.sha256,
        &manifest.dataset.sha256,
        status as VersionStatus,
        manifest.evaluation.as_ref().map(Json) as _,
        verdict.as_ref().map(Json) as _,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let (moved, hook) = match &verdict {
        Some(v) if quarantined => {
            let message = format!("quarantined by the safety gate: {}", v.breaches.join("; "));
            let effects = TransitionEffects {
                error: Some((ErrorKind::SafetyBlocked, &message)),
                release_lease: true,
            };
            (
                jobs::transition(&mut tx, job.id, JobStatus::Failed, None, effects).await?,
                webhooks::VERSION_QUARANTINED,
            )
        }
        _ => (
            jobs::transition(
                &mut tx,
                job.id,
                JobStatus::Succeeded,
                None,
                TransitionEffects::default(),
            )
            .await?,
            webhooks::VERSION_READY,
        ),
    };
    if updated != 1 || !moved {
        return Err(Error::conflict(
            "invalid_state",
            "the job is no longer publishing",
        ));
    }
    let payload = serde_json::json!({
        "adapter_name": job.adapter_name, "version": req.version, "job_id": job.id,
        "uri": ctx.store.uri_of(&row.storage_prefix), "files": files, "safety_verdict": verdict,
    });
    webhooks::enqueue(&mut tx, &job.project, hook, payload).await?;
    tx.commit().await?;
    ctx.read_cache.evict(Some(&job.project), &job.adapter_name);
    ctx.metrics.training.forget(job.id);
    if !quarantined {
        ctx.metrics.job_succeeded(job);
    }
    Ok(())
}

/// Marks the job's pending version (if any) `failed`; returns the storage prefixes
/// whose objects should be deleted once the transaction has committed.
pub async fn fail_pending_version(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        "UPDATE adapter_versions SET status = 'failed' WHERE job_id = $1 AND status = 'pending' RETURNING storage_prefix",
        job_id,
    )
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

/// Checks the stored version against its manifest, and the manifest against the job.
/// Returns the manifest and the version's files (the manifest's list plus the manifest).
async fn verify(
    store: &Store,
    prefix: &str,
    job: &JobRow,
    req: &CompleteRequest,
) -> Result<(AdapterManifest, Vec<FileDigest>), String> {
    let path = |name: &str| format!("{prefix}/{name}");
    let raw = store
        .get(&path(MANIFEST_FILE))
        .await
        .map_err(|e| e.to_string())?;
    let manifest_sha256 = hex::encode(Sha256::digest(&raw));
    if manifest_sha256 != req.manifest_sha256 {
        return Err(format!(
            "stored {MANIFEST_FILE} has sha256 {manifest_sha256}, the worker declared {}",
            req.manifest_sha256
        ));
    }
    let manifest: AdapterManifest =
        serde_json::from_slice(&raw).map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
    if manifest.job_id != job.id
        || manifest.version != req.version
        || manifest.adapter_name != job.adapter_name
    {
        return Err(format!(
            "{MANIFEST_FILE} names another job, adapter or version"
        ));
    }
    let mut files = manifest.files.clone();
    files.push(FileDigest {
        name: MANIFEST_FILE.into(),
        sha256: manifest_sha256,
        size: raw.len() as u64,
    });
    let declared: BTreeSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
    if declared.len() != files.len() {
        return Err(format!(
            "{MANIFEST_FILE} lists a file twice, or lists itself"
        ));
    }
    for required in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        if !declared.contains(required) {
            return Err(format!("{required} is missing from {MANIFEST_FILE}"));
        }
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
    let declared: BTreeSet<String> = declared.into_iter().map(str::to_string).collect();
    if stored != declared {
        return Err(format!(
            "stored files {stored:?} differ from the files of {MANIFEST_FILE} {declared:?}"
        ));
    }
    for f in &manifest.files {
        let (sha, size) = store
            .digest(&path(&f.name))
            .await
            .map_err(|e| e.to_string())?;
        if sha != f.sha256 || size != f.size {
            return Err(format!(
                "{}: stored sha256 {sha} size {size}, {MANIFEST_FILE} says {} size {}",
                f.name, f.sha256, f.size
            ));
        }
    }
    if job.safety_policy.as_ref().is_some_and(|p| p.0.enabled) && manifest.evaluation.is_none() {
        return Err("the safety gate is on for this job but the manifest has no evaluation".into());
    }
    let spec = &job.spec.0;
    check_input(&manifest.base_model, spec.base_model_uri(), "base_model")?;
    check_input(&manifest.dataset, spec.train_uri(), "dataset")?;
    let config: PeftConfig = serde_json::from_slice(
        &store
            .get(&path(ADAPTER_CONFIG_FILE))
            .await
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| {
        format!("{ADAPTER_CONFIG_FILE} is not a PEFT adapter config loraforge reads: {e}")
    })?;
    let expected = spec.method.peft_type();
    if config.peft_type() != expected {
        return Err(format!(
            "{ADAPTER_CONFIG_FILE}: peft_type is {:?}, but method {} publishes {expected}",
            config.peft_type(),
            spec.method.name()
        ));
    }
    let tensors = read_safetensors_shapes(store, &path(ADAPTER_WEIGHTS_FILE)).await?;
    config
        .check_tensors(&tensors)
        .map_err(|e| format!("{ADAPTER_WEIGHTS_FILE}: {e}"))?;
    Ok((manifest, files))
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

/// Name -> shape of every tensor in a stored safetensors file, reading its header only.
async fn read_safetensors_shapes(
    store: &Store,
    path: &str,
) -> Result<std::collections::BTreeMap<String, Vec<u64>>, String> {
    let len = store
        .get_range(path, 0..8)
        .await
        .map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(
        len.as_ref()
            .try_into()
            .map_err(|_| "safetensors file is truncated")?,
    );
    if len > MAX_SAFETENSORS_HEADER {
        return Err("safetensors header is implausibly large".into());
    }
    let header = store
        .get_range(path, 8..8 + len)
        .await
        .map_err(|e| e.to_string())?;
    safetensors_shapes(&header)
}
