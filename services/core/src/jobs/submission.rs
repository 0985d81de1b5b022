//! Submitting a job: everything is checked before anything is stored (the spec, each
//! input's existence and shape, the parent version, the safety overrides), every problem
//! is reported at once, and the job is inserted as `queued` with its first event and a
//! queue wake-up in one transaction. An `Idempotency-Key` makes a retry return the same job.

use super::{get, query_jobs, record_event, wake_scheduler, JobRow};
use crate::error::{Error, Result};
use crate::registry::inputs::{self, InputKind};
use crate::registry::uploads;
use crate::registry::{self, aliases, VersionStatus};
use crate::{safety, Context};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::{
    FieldError, InputRef, JobSpec, JobStatus, ParentRef, ResolvedJobSpec, SpecError,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub enum Submitted {
    Created(JobRow),
    /// Same Idempotency-Key, same job: the one created the first time.
    Replayed(JobRow),
}

/// What resolving a spec's references found, besides the URIs.
#[derive(Default)]
struct Resolution {
    base_model_name: Option<String>,
    dataset_name: Option<String>,
    parent: Option<(String, i32)>,
}

/// Validates, resolves and queues `spec` for `project`.
pub async fn submit(
    ctx: &Context,
    project: &str,
    spec: JobSpec,
    idempotency_key: Option<&str>,
) -> Result<Submitted> {
    spec.validate()?;
    let (spec, found) = resolve(ctx, project, spec).await?;
    let safety = safety::effective_policy(&ctx.pool, project, &spec.safety).await?;
    // Hash the resolved spec, not the bytes: the same job with other whitespace is the same job.
    let spec_json = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
    let request_sha256 = Sha256::digest(spec_json).to_vec();
    let mut tx = ctx.pool.begin().await?;
    let id = Uuid::new_v4();
    let inserted: Option<JobRow> = query_jobs!(
        "INSERT INTO jobs (id, project, adapter_name, spec, status, idempotency_key, request_sha256, max_attempts,
                           base_model_name, dataset_name, parent_adapter, parent_version, safety_policy)
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (project, idempotency_key) DO NOTHING
         RETURNING ",
        "",
        id,
        project,
        spec.adapter_name.as_str(),
        Json(&spec) as _,
        idempotency_key,
        &request_sha256,
        ctx.settings.max_attempts,
        found.base_model_name.as_deref(),
        found.dataset_name.as_deref(),
        found.parent.as_ref().map(|p| p.0.as_str()),
        found.parent.as_ref().map(|p| p.1),
        Json(&safety) as _,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = inserted else {
        tx.rollback().await?;
        let first = sqlx::query!(
            "SELECT id, request_sha256 FROM jobs WHERE project = $1 AND idempotency_key = $2",
            project,
            idempotency_key,
        )
        .fetch_one(&ctx.pool)
        .await?;
        let (existing, sha) = (first.id, first.request_sha256);
        if sha != request_sha256 {
            return Err(Error::conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different job",
            ));
        }
        let row = get(&ctx.pool, project, existing)
            .await?
            .ok_or(Error::NotFound("job"))?;
        return Ok(Submitted::Replayed(row));
    };
    let queued = EventPayload::Status {
        status: JobStatus::Queued,
        message: None,
    };
    record_event(&mut tx, id, &queued).await?;
    wake_scheduler(&mut tx, id).await?;
    tx.commit().await?;
    ctx.metrics.jobs_submitted.inc();
    Ok(Submitted::Created(job))
}

/// Resolves registered names to URIs and the parent reference to a version, and checks
/// that every input exists and fits. All problems are reported together.
async fn resolve(
    ctx: &Context,
    project: &str,
    mut spec: JobSpec,
) -> Result<(ResolvedJobSpec, Resolution)> {
    let mut errors = Vec::new();
    let mut found = Resolution::default();
    let base = resolve_input(
        ctx,
        project,
        InputKind::BaseModel,
        "base_model",
        &spec.base_model,
        &mut errors,
    );
    if let Some(r) = base.await? {
        // A registered base passed this check at registration; one given by URI did not.
        if r.name.is_none() {
            if let Some(m) = inputs::merged_from_quarantined(&ctx.pool, project, &r.uri).await? {
                errors.push(FieldError::new("base_model", m));
            }
        }
        spec.base_model = InputRef::Uri(r.uri);
        found.base_model_name = r.name;
    }
    let train = resolve_input(
        ctx,
        project,
        InputKind::Dataset,
        "dataset.train",
        &spec.dataset.train,
        &mut errors,
    );
    if let Some(r) = train.await? {
        spec.dataset.train = InputRef::Uri(r.uri);
        found.dataset_name = r.name;
    }
    if let Some(validation) = spec.dataset.validation.clone() {
        let checked = resolve_input(
            ctx,
            project,
            InputKind::Dataset,
            "dataset.validation",
            &validation,
            &mut errors,
        );
        if let Some(r) = checked.await? {
            spec.dataset.validation = Some(InputRef::Uri(r.uri));
        }
    }
    // The refusal dataset of `safety.replay` resolves as the training data does.
    if let Some(replay) = spec.safety.replay.as_mut() {
        if let Some(dataset) = replay.dataset.clone() {
            let checked = resolve_input(
                ctx,
                project,
                InputKind::Dataset,
                "safety.replay.dataset",
                &dataset,
                &mut errors,
            );
            if let Some(r) = checked.await? {
                replay.dataset = Some(InputRef::Uri(r.uri));
            }
        }
    }
    if let Some(parent) = &spec.parent {
        match resolve_parent(ctx, project, &spec, parent).await? {
            Ok(p) => found.parent = Some(p),
            Err(m) => errors.push(FieldError::new("parent", m)),
        }
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(SpecError {
            errors,
            malformed: false,
        }));
    }
    let spec = ResolvedJobSpec::new(spec).map_err(|e| Error::Internal(e.to_string()))?;
    Ok((spec, found))
}

/// One input, resolved to a URI and checked to exist; the user's problems with it are added
/// to `errors` (and give `None`), ours are returned.
async fn resolve_input(
    ctx: &Context,
    project: &str,
    kind: InputKind,
    field: &str,
    reference: &InputRef,
    errors: &mut Vec<FieldError>,
) -> Result<Option<inputs::ResolvedInput>> {
    let resolved = match inputs::resolve(&ctx.pool, project, kind, field, reference).await {
        Ok(resolved) => resolved,
        Err(Error::Invalid(e)) => {
            errors.extend(e.errors);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // An uploaded dataset lies in the artifact store, which a `file://` input may never name:
    // registered by upload (and only by upload: the name was looked up), it is read there.
    let uploaded = resolved.name.is_some()
        && kind == InputKind::Dataset
        && uploads::is_upload_of(&ctx.store, project, &resolved.uri);
    if let Some(m) = ctx.settings.executor.refuses_input(&resolved.uri) {
        errors.push(FieldError::new(field, m));
    } else if uploaded {
        if let Err(m) = inputs::inspect_object(&resolved.uri).await {
            errors.push(FieldError::new(field, m));
        }
    } else if let Err(m) = inputs::check(&resolved.uri, &ctx.settings.file_inputs(), kind).await {
        errors.push(FieldError::new(field, m));
    }
    Ok(Some(resolved))
}

/// The parent must be a ready version whose adapter has the job's shape; the inner error
/// is the user's problem, the outer one ours.
async fn resolve_parent(
    ctx: &Context,
    project: &str,
    spec: &JobSpec,
    parent: &ParentRef,
) -> Result<Result<(String, i32), String>> {
    let adapter = parent.adapter.as_str();
    let found =
        match aliases::resolve(&ctx.pool, &ctx.store, project, adapter, &parent.reference).await {
            Ok(found) => found,
            Err(e @ (Error::NotFound(_) | Error::Gone(_) | Error::Conflict { .. })) => {
                return Ok(Err(format!("{adapter}@{}: {e}", parent.reference)))
            }
            Err(e) => return Err(e),
        };
    if found.status != VersionStatus::Ready {
        return Ok(Err(format!(
            "{adapter} version {} is {}, not ready",
            found.version, found.status
        )));
    }
    let Some(row) = registry::get_version(&ctx.pool, project, adapter, found.version).await? else {
        return Ok(Err(format!("{adapter} version {} vanished", found.version)));
    };
    if !row.method.0.same_shape(&spec.method) {
        return Ok(Err(format!(
            "{adapter} version {} has another method shape (rank or target modules)",
            found.version
        )));
    }
    Ok(Ok((adapter.to_string(), found.version)))
}
