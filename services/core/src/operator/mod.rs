//! The `LoraJob` operator (`LORAFORGE_OPERATOR=enabled`): a `kube::runtime::Controller` that
//! turns each LoraJob object into a job and reports the job back into the object's status.
//!
//! - Idempotent by the object's uid: the job is submitted with the Idempotency-Key
//!   `lorajob-<uid>`, so re-applying, a restart or a second replica never makes a second job.
//! - The spec is parsed and validated by the same code as `POST /v1/jobs`; a refused spec
//!   becomes `phase: rejected` with a `Failed` condition naming the fields.
//! - The spec is immutable once accepted: a changed spec hashes differently, the submission
//!   is refused, and the object gets a `SpecImmutable` condition while its job goes on.
//! - A finalizer holds the object while its job may run; deleting the object cancels the
//!   job, and the finalizer goes once the job is over.
//! - The namespace names the project (`LORAFORGE_OPERATOR_PROJECTS` maps others), so a
//!   LoraJob only ever reaches its own project's inputs and adapters.
//! - Only the replica holding the `loraforge-operator` Lease reconciles ([`leader`]).

pub mod leader;
pub mod rbac;
pub mod resource;

use crate::error::Error;
use crate::jobs::{self, submission, JobRow};
use crate::Context;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use loraforge_spec::{JobSpec, JobStatus};
use resource::{AdapterVersionStatus, Condition, LoraJob, LoraJobStatus, FINALIZER};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often a LoraJob whose job runs is refreshed (progress flows into its status).
const REFRESH: Duration = Duration::from_secs(3);
const LEASE_NAME: &str = "loraforge-operator";
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// The operator's settings (`LORAFORGE_OPERATOR*`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OperatorSettings {
    /// Where LoraJobs are watched (and the leader Lease lives); default: the client's.
    pub namespace: Option<String>,
    /// Namespace -> project, for namespaces whose project is not their own name.
    pub projects: HashMap<String, String>,
}

impl OperatorSettings {
    pub fn project_of<'a>(&'a self, namespace: &'a str) -> &'a str {
        self.projects
            .get(namespace)
            .map_or(namespace, String::as_str)
    }
}

struct Operator {
    ctx: Context,
    settings: OperatorSettings,
    client: Client,
    recorder: Recorder,
}

#[derive(Debug, thiserror::Error)]
enum OperatorError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Core(#[from] Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Runs the operator until `stop`, reconciling only while this replica leads.
pub async fn run(ctx: Context, settings: OperatorSettings, mut stop: watch::Receiver<bool>) {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the operator cannot reach the cluster; LoraJobs are not reconciled");
            return;
        }
    };
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = format!(
        "{}-{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "loraforge".into()),
        rand::random::<u32>()
    );
    let leader = leader::LeaderElection::new(
        Api::<Lease>::namespaced(client.clone(), &namespace),
        LEASE_NAME,
        identity.clone(),
        LEASE_DURATION,
    );
    let reporter = Reporter {
        controller: "loraforge-operator".into(),
        instance: Some(identity.clone()),
    };
    let operator = Arc::new(Operator {
        ctx,
        settings,
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
    });
    loop {
        match leader.try_lead().await {
            Ok(true) => {
                tracing::info!(%identity, namespace, "leading the operator");
                let api = Api::<LoraJob>::namespaced(client.clone(), &namespace);
                let controller = Controller::new(api, watcher::Config::default())
                    .shutdown_on_signal()
                    .run(reconcile, error_policy, operator.clone())
                    .for_each(|_| async {});
                tokio::pin!(controller);
                // Lead until the Lease is lost or we are told to stop.
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = &mut controller => return,
                        () = tokio::time::sleep(LEASE_DURATION / 3) => {
                            if !matches!(leader.try_lead().await, Ok(true)) {
                                tracing::warn!(%identity, "lost the operator lease; another replica leads");
                                break;
                            }
                        }
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "operator leader election failed; retrying"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(LEASE_DURATION / 3) => {}
        }
    }
}

fn error_policy(_obj: Arc<LoraJob>, error: &OperatorError, _op: Arc<Operator>) -> Action {
    tracing::warn!(%error, "reconciling a LoraJob failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The Idempotency-Key that ties an object to its one job.
fn job_key(obj: &LoraJob) -> String {
    format!("lorajob-{}", obj.uid().unwrap_or_default())
}

async fn reconcile(obj: Arc<LoraJob>, op: Arc<Operator>) -> Result<Action, OperatorError> {
    let namespace = obj.namespace().unwrap_or_default();
    let project = op.settings.project_of(&namespace).to_string();
    let api = Api::<LoraJob>::namespaced(op.client.clone(), &namespace);
    let name = obj.name_any();
    let existing = jobs::by_idempotency_key(&op.ctx.pool, &project, &job_key(&obj)).await?;

    if obj.meta().deletion_timestamp.is_some() {
        return finish_deletion(&op, &api, &obj, &project, existing).await;
    }
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = obj.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let patch = json!({"metadata": {"finalizers": finalizers}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    let body = serde_json::to_vec(&obj.spec.fields).unwrap_or_default();
    let mut notes = Vec::new();
    let job = match JobSpec::parse(&body).map_err(Error::Invalid) {
        Err(e) if existing.is_none() => return reject(&op, &api, &obj, &e).await,
        Err(_) => {
            notes.push(spec_changed());
            existing
        }
        Ok(spec) => match submission::submit(&op.ctx, &project, spec, Some(&job_key(&obj))).await {
            Ok(submission::Submitted::Created(job)) => {
                publish(
                    &op,
                    &obj,
                    EventType::Normal,
                    "Submitted",
                    format!("job {} queued in project {project}", job.id),
                )
                .await;
                Some(job)
            }
            Ok(submission::Submitted::Replayed(job)) => Some(job),
            Err(Error::Conflict {
                code: "idempotency_key_reused",
                ..
            }) => {
                notes.push(spec_changed());
                existing
            }
            Err(e @ Error::Invalid(_)) if existing.is_none() => {
                return reject(&op, &api, &obj, &e).await
            }
            Err(e) => return Err(e.into()),
        },
    };
    let Some(job) = job else {
        return Ok(Action::requeue(REFRESH));
    };
    let status = status_of(&op, &obj, &job, notes).await?;
    let before = obj.status.clone().unwrap_or_default();
    if before.phase != status.phase {
        if let Some(phase) = &status.phase {
            // One reason per state: the recorder folds repeats of a reason into one Event.
            let (kind, reason) = match job.status {
                JobStatus::Failed => (EventType::Warning, "Failed".to_string()),
                JobStatus::Succeeded => (EventType::Normal, "Published".to_string()),
                other => (EventType::Normal, reason_word(other.as_str())),
            };
            let note = match (&job.error_message, &status.adapter_version) {
                (Some(m), _) => format!("job {}: {phase}: {}", job.id, truncate(m, 900)),
                (None, Some(v)) => format!(
                    "job {} published {}@{} at {}",
                    job.id, v.name, v.version, v.uri
                ),
                _ => format!("job {} is {phase}", job.id),
            };
            publish(&op, &obj, kind, &reason, note).await;
        }
    }
    if Some(&status) != obj.status.as_ref() {
        api.patch_status(&name, &PatchParams::default(), &status_patch(&status))
            .await?;
    }
    Ok(if job.status.is_final() {
        Action::await_change()
    } else {
        Action::requeue(REFRESH)
    })
}

/// A merge patch that sets the whole status: fields it lacks are cleared (`null`), so a
/// rejected object keeps nothing from an earlier report.
fn status_patch(status: &LoraJobStatus) -> Patch<serde_json::Value> {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    let full = serde_json::to_value(LoraJobStatus::full()).unwrap_or_default();
    if let (Some(set), Some(all)) = (value.as_object_mut(), full.as_object()) {
        for key in all.keys() {
            set.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    Patch::Merge(json!({ "status": value }))
}

fn spec_changed() -> (String, String) {
    (
        "SpecImmutable".into(),
        "the spec changed after its job was accepted; the change is ignored. Delete the object and create a new one to train again".into(),
    )
}

/// The object is going away: its job is cancelled, and the finalizer removed once it is over.
async fn finish_deletion(
    op: &Operator,
    api: &Api<LoraJob>,
    obj: &LoraJob,
    project: &str,
    job: Option<JobRow>,
) -> Result<Action, OperatorError> {
    if let Some(job) = &job {
        if !job.status.is_final() {
            if job.status != JobStatus::CancelRequested {
                match jobs::cancel(&op.ctx, project, job.id).await {
                    Ok(_) | Err(Error::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                publish(
                    op,
                    obj,
                    EventType::Normal,
                    "Cancelling",
                    format!("the object was deleted: cancelling job {}", job.id),
                )
                .await;
            }
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    }
    let finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// A spec the submission refused: `phase: rejected`, the reasons in a condition and an Event.
async fn reject(
    op: &Operator,
    api: &Api<LoraJob>,
    obj: &LoraJob,
    error: &Error,
) -> Result<Action, OperatorError> {
    let message = match error {
        Error::Invalid(e) => e
            .errors
            .iter()
            .map(|f| format!("spec.{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    let before = obj.status.clone().unwrap_or_default();
    let conditions = vec![condition(
        &before,
        obj,
        "Failed",
        true,
        "InvalidSpec",
        &message,
    )];
    let status = LoraJobStatus {
        phase: Some("rejected".into()),
        conditions,
        observed_generation: obj.meta().generation,
        ..LoraJobStatus::default()
    };
    if before != status {
        publish(op, obj, EventType::Warning, "InvalidSpec", message).await;
        api.patch_status(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await?;
    }
    Ok(Action::await_change())
}

async fn status_of(
    op: &Operator,
    obj: &LoraJob,
    job: &JobRow,
    notes: Vec<(String, String)>,
) -> Result<LoraJobStatus, OperatorError> {
    let before = obj.status.clone().unwrap_or_default();
    let progress = jobs::latest_progress(&op.ctx.pool, job.id).await?;
    let max_steps = job.spec.training.max_steps;
    let version = match (&job.adapter_name, job.adapter_version) {
        (name, Some(v)) => {
            crate::registry::get_version(&op.ctx.pool, &job.project, name, v).await?
        }
        _ => None,
    };
    let s = job.status;
    let failed_reason = job
        .error_kind
        .map(|k| k.as_str().to_string())
        .unwrap_or_default();
    let mut conditions = vec![
        condition(
            &before,
            obj,
            "Submitted",
            true,
            "Accepted",
            &format!("job {}", job.id),
        ),
        condition(
            &before,
            obj,
            "Running",
            matches!(
                s,
                JobStatus::Running | JobStatus::Evaluating | JobStatus::Publishing
            ),
            s.as_str(),
            &format!("the job is {s}"),
        ),
        condition(
            &before,
            obj,
            "Published",
            s == JobStatus::Succeeded,
            if s == JobStatus::Succeeded {
                "Published"
            } else {
                "NotPublished"
            },
            &version
                .as_ref()
                .map(|v| format!("{}@{}", v.adapter_name, v.version))
                .unwrap_or_default(),
        ),
        condition(
            &before,
            obj,
            "Failed",
            s == JobStatus::Failed,
            if s == JobStatus::Failed {
                &failed_reason
            } else {
                "NotFailed"
            },
            &job.error_message
                .as_deref()
                .map(|m| truncate(m, 900))
                .unwrap_or_default(),
        ),
    ];
    for (kind, message) in notes {
        conditions.push(condition(&before, obj, &kind, true, &kind, &message));
    }
    Ok(LoraJobStatus {
        phase: Some(s.as_str().to_string()),
        conditions,
        job_id: Some(job.id.to_string()),
        attempt: Some(job.attempt),
        step: Some(format!("{}/{max_steps}", progress.map_or(0, |p| p.0))),
        max_steps: Some(max_steps),
        loss: progress.map(|p| p.2),
        adapter_version: version.as_ref().map(|v| AdapterVersionStatus {
            name: v.adapter_name.clone(),
            version: v.version,
            uri: op.ctx.store.uri_of(&v.storage_prefix),
        }),
        safety_decision: version
            .as_ref()
            .and_then(|v| v.safety_verdict.as_ref())
            .map(|v| format!("{:?}", v.0.decision).to_lowercase()),
        observed_generation: obj.meta().generation,
    })
}

/// A condition, keeping its transition time while its status does not change.
fn condition(
    before: &LoraJobStatus,
    obj: &LoraJob,
    kind: &str,
    on: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = before
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
    Condition {
        type_: kind.into(),
        status: status.into(),
        reason: reason_word(reason),
        message: message.into(),
        last_transition_time: since,
        observed_generation: obj.meta().generation,
    }
}

/// Condition reasons are CamelCase words: `user_error` -> `UserError`.
fn reason_word(s: &str) -> String {
    s.split(['_', ' ', '-'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

async fn publish(op: &Operator, obj: &LoraJob, kind: EventType, reason: &str, note: String) {
    let event = Event {
        type_: kind,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = op.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record a Kubernetes Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(reason_word("user_error"), "UserError");
        assert_eq!(reason_word("running"), "Running");
        assert_eq!(reason_word("resource_exhausted"), "ResourceExhausted");
    }

    #[test]
    fn namespaces_map_to_projects() {
        let mut s = OperatorSettings::default();
        s.projects.insert("ml-prod".into(), "ml".into());
        assert_eq!(s.project_of("ml-prod"), "ml");
        assert_eq!(s.project_of("research"), "research");
    }
}
