//! The safety gate's control-plane side: project policies, the effective policy fixed
//! on a job at submission, and judging the worker's report when a version is completed.

use crate::error::{Error, Result};
use loraforge_spec::safety::{EffectivePolicy, SafetyOverrides, SafetyPolicy};
use sqlx::types::Json;
use sqlx::PgPool;

/// The project's policy, or the default one when it has none.
pub async fn project_policy(pool: &PgPool, project: &str) -> Result<SafetyPolicy, sqlx::Error> {
    let stored: Option<Json<SafetyPolicy>> = sqlx::query_scalar!(
        r#"SELECT policy AS "policy: Json<SafetyPolicy>" FROM safety_policies WHERE project = $1"#,
        project,
    )
    .fetch_optional(pool)
    .await?;
    Ok(stored.map(|p| p.0).unwrap_or_default())
}

pub async fn set_project_policy(pool: &PgPool, project: &str, policy: &SafetyPolicy) -> Result<()> {
    policy.validate()?;
    sqlx::query!(
        "INSERT INTO safety_policies (project, policy) VALUES ($1, $2)
         ON CONFLICT (project) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()",
        project,
        Json(policy) as _,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The policy a new job will run under, or the field error that refuses its overrides.
pub async fn effective_policy(
    pool: &PgPool,
    project: &str,
    overrides: &SafetyOverrides,
) -> Result<EffectivePolicy> {
    let policy = project_policy(pool, project).await?;
    EffectivePolicy::resolve(&policy, overrides).map_err(|e| Error::Invalid(e.into()))
}
