//! What a worker's Pod and Job say about its attempt. Pure functions over the objects as
//! the API server returns them; the table of cases is in `docs/kubernetes.md`.
//!
//! | seen | becomes |
//! |---|---|
//! | Job suspended (Kueue has not admitted it) | waiting, event "waiting for admission" |
//! | Pod Pending, `PodScheduled=False/Unschedulable` | waiting, event "waiting for capacity: <scheduler message>" |
//! | Pod Pending otherwise (pulling, creating) | waiting (lease kept, no event) |
//! | container waiting `ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`, `CreateContainerConfigError`, `CreateContainerError` | infrastructure (retried) |
//! | container terminated `OOMKilled` | resource exhausted (final), names the memory limit |
//! | `DisruptionTarget` condition, `Evicted`, Pod deleted under a running worker | infrastructure (retried, resumes) |
//! | Job `Failed/DeadlineExceeded` | deadline exceeded (final, naming `training.max_duration`) |
//! | Pod `Failed` otherwise | worker exited (retried unless it reported) |
//! | Pod `Succeeded` | worker exited (a no-op when it reported its result, as it does) |

use crate::jobs::attempts::Outcome;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// Reasons a container cannot start that waiting will not fix.
const CANNOT_START: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

#[derive(Debug, Clone)]
pub enum Seen {
    /// Not started; `event` says why when the user should know.
    Waiting { event: Option<String> },
    /// The worker runs (it heartbeats itself).
    Running,
    /// The worker is over. `with_log`: the outcome is a failure whose message should carry
    /// the end of the worker's log.
    Ended { outcome: Outcome, with_log: bool },
}

fn ended(outcome: Outcome, with_log: bool) -> Seen {
    Seen::Ended { outcome, with_log }
}

/// What a Pod event means. `deleted`: the watch saw the Pod go.
pub fn pod(pod: &Pod, deleted: bool) -> Seen {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let containers: Vec<&ContainerStatus> = status.container_statuses.iter().flatten().collect();

    // Out of memory first: an OOM-killed worker's Pod also ends Failed.
    if let Some(term) = containers.iter().find_map(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .filter(|t| t.reason.as_deref() == Some("OOMKilled"))
    }) {
        let limit = memory_limit(pod).unwrap_or_else(|| "its memory limit".into());
        return ended(
            Outcome::ResourceExhausted {
                message: format!(
                    "the worker ran out of memory: it was killed at its memory limit ({limit}, resources.memory; exit code {}). Give it more memory, or use a smaller training.batch_size or training.seq_len",
                    term.exit_code
                ),
            },
            true,
        );
    }
    if let Some(c) = containers.iter().find(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .is_some_and(|r| CANNOT_START.contains(&r))
    }) {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        let reason = waiting.and_then(|w| w.reason.clone()).unwrap_or_default();
        let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
        return ended(
            Outcome::Infrastructure {
                message: format!("the worker container could not start: {reason}: {message}"),
            },
            false,
        );
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    {
        return ended(
            Outcome::Infrastructure {
                message: format!(
                    "the worker's pod was disrupted ({}: {}); the next attempt resumes from the newest checkpoint",
                    c.reason.as_deref().unwrap_or("unknown"),
                    c.message.as_deref().unwrap_or("")
                ),
            },
            true,
        );
    }
    if status.reason.as_deref() == Some("Evicted") {
        return ended(
            Outcome::Infrastructure {
                message: format!(
                    "the worker's pod was evicted: {}; the next attempt resumes from the newest checkpoint",
                    status.message.as_deref().unwrap_or("")
                ),
            },
            true,
        );
    }
    match phase {
        "Succeeded" => {
            return ended(
                Outcome::WorkerExited {
                    description: "the worker's pod succeeded".into(),
                },
                true,
            )
        }
        "Failed" => {
            let how = containers
                .iter()
                .find_map(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()))
                .map(|t| {
                    format!(
                        "exit code {}{}",
                        t.exit_code,
                        t.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )
                })
                .or_else(|| status.reason.clone())
                .unwrap_or_else(|| "failed".into());
            return ended(
                Outcome::WorkerExited {
                    description: format!("the worker's pod failed: {how}"),
                },
                true,
            );
        }
        _ => {}
    }
    if deleted || pod.metadata.deletion_timestamp.is_some() {
        return ended(
            Outcome::Infrastructure {
                message: "the worker's pod was deleted before it finished (node lost, drained or deleted); the next attempt resumes from the newest checkpoint".into(),
            },
            true,
        );
    }
    if phase == "Pending" {
        let unschedulable = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        return Seen::Waiting {
            event: unschedulable.map(|c| {
                format!(
                    "waiting for capacity: {}",
                    c.message
                        .as_deref()
                        .unwrap_or("no node fits the worker yet")
                )
            }),
        };
    }
    Seen::Running
}

/// What a Job event means, if anything beyond its Pods. `deleted`: the watch saw it go.
pub fn job(job: &Job, deleted: bool) -> Option<Seen> {
    let status = job.status.clone().unwrap_or_default();
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True");
    if let Some(c) = failed {
        if c.reason.as_deref() == Some("DeadlineExceeded") {
            let secs = job.spec.as_ref().and_then(|s| s.active_deadline_seconds);
            return Some(ended(
                Outcome::DeadlineExceeded {
                    message: format!(
                        "the attempt ran longer than training.max_duration ({}) and was stopped; raise the limit or train fewer steps",
                        secs.map(|s| format!("{s}s")).unwrap_or_else(|| "its limit".into())
                    ),
                },
                true,
            ));
        }
    }
    let finished = status
        .conditions
        .iter()
        .flatten()
        .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True");
    if deleted && !finished {
        return Some(ended(
            Outcome::Infrastructure {
                message: "the worker's Kubernetes Job was deleted before it finished".into(),
            },
            false,
        ));
    }
    let suspended = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    if suspended && !finished {
        let queue = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(super::manifests::KUEUE_QUEUE_LABEL).cloned())
            .unwrap_or_default();
        return Some(Seen::Waiting {
            event: Some(format!("waiting for admission by Kueue (queue {queue})")),
        });
    }
    None
}

/// Whether the Job has finished (either way).
pub fn job_finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

fn memory_limit(pod: &Pod) -> Option<String> {
    let c = pod.spec.as_ref()?.containers.first()?;
    let q = c.resources.as_ref()?.limits.as_ref()?.get("memory")?;
    Some(q.0.clone())
}

#[cfg(test)]
#[path = "tests/classify.rs"]
mod tests;
