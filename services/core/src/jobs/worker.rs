//! What the control plane tells a worker about its job.

use super::JobRow;
use crate::error::{Error, Result};
use crate::{registry, safety, Context};
use loraforge_spec::worker::{ParentArtifact, WorkerAssignment};

/// The assignment of the job's current attempt: its resolved spec, where to publish, the
/// parent version to start from, and the safety policy fixed at submission.
pub async fn assignment(ctx: &Context, job: JobRow) -> Result<WorkerAssignment> {
    let parent = match job.parent() {
        Some((adapter, version)) => {
            let row = registry::get_version(&ctx.pool, &job.project, &adapter, version)
                .await?
                .ok_or(Error::NotFound("parent adapter version"))?;
            Some(ParentArtifact {
                adapter_name: adapter,
                version,
                prefix: row.storage_prefix,
            })
        }
        None => None,
    };
    let safety = match job.safety_policy {
        Some(policy) => policy.0,
        None => safety::effective_policy(&ctx.pool, &job.project, &job.spec.0.safety).await?,
    };
    Ok(WorkerAssignment {
        parent,
        safety,
        job_id: job.id,
        attempt: job.attempt,
        project: job.project,
        spec: job.spec.0,
        storage_url: ctx.store.url().to_string(),
    })
}
