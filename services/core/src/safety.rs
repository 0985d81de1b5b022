//! The safety gate's control-plane side: project policies, the effective policy fixed
//! on a job at submission, and judging the worker's report when a version is completed.

use crate::error::{Error, Result};
use crate::registry::{get_version, lineage, VersionRow, VersionStatus};
use loraforge_spec::safety::{
    EffectivePolicy, RefusalReference, SafetyDecision, SafetyOverrides, SafetyPolicy,
};
use sqlx::types::Json;
use sqlx::PgPool;
use std::collections::{BTreeSet, VecDeque};

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

/// Versions a walk up the lineage visits at most: a lineage is short, a cycle is not.
const MAX_ANCESTORS: usize = 64;

/// Approved: published by the gate with no breach (`ready`, verdict `publish`), so its
/// measured refusal rate is one the project accepted. Versions trained with the gate off,
/// published with warnings, or quarantined are walked through, not stopped at.
fn approved(v: &VersionRow) -> Option<f64> {
    let verdict = v.safety_verdict.as_ref()?;
    (v.status == VersionStatus::Ready && verdict.0.decision == SafetyDecision::Publish)
        .then(|| v.evaluation.as_ref().map(|e| e.0.refusal_rate_adapted))
        .flatten()
}

/// The stricter (highest-refusing) of the nearest approved versions up each line of a new
/// version's lineage: its parent version, and the version its base model was merged from,
/// each followed up to the first approved one. `None` when no line reaches one.
pub async fn nearest_approved_ancestor(
    pool: &PgPool,
    version: &VersionRow,
) -> Result<Option<RefusalReference>, sqlx::Error> {
    let project = version.project.as_str();
    let mut queue: VecDeque<(String, i32)> = lines_up(pool, version).await?.into();
    let mut seen = BTreeSet::new();
    let mut best: Option<RefusalReference> = None;
    while let Some((adapter, number)) = queue.pop_front() {
        if seen.len() >= MAX_ANCESTORS || !seen.insert((adapter.clone(), number)) {
            continue;
        }
        let Some(v) = get_version(pool, project, &adapter, number).await? else {
            continue;
        };
        if let Some(rate) = approved(&v) {
            if best.as_ref().is_none_or(|b| rate > b.refusal_rate) {
                best = Some(RefusalReference {
                    adapter_name: adapter,
                    version: number,
                    refusal_rate: rate,
                });
            }
            continue;
        }
        queue.extend(lines_up(pool, &v).await?);
    }
    Ok(best)
}

/// The versions one step up a version's lineage: its parent, and the version its base model
/// was merged from.
async fn lines_up(pool: &PgPool, version: &VersionRow) -> Result<Vec<(String, i32)>, sqlx::Error> {
    let mut up: Vec<(String, i32)> = version.parent().into_iter().collect();
    up.extend(
        lineage::merged_source_of(
            pool,
            &version.project,
            version.base_model_name.as_deref(),
            &version.base_model_uri,
        )
        .await?,
    );
    Ok(up)
}
