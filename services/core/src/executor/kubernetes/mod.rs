//! The `kubernetes` executor: each attempt is one `batch/v1` Job (`backoffLimit: 0`: the
//! control plane owns retries, with backoff and resume from checkpoints) plus a Secret
//! with its worker token. One watch on Jobs and one on Pods, both selected by the
//! executor's labels, turn what the cluster does into [`WorkerReport`]s (see [`classify`]);
//! every reaction is idempotent, so several control-plane replicas may watch at once.
//! `docs/kubernetes.md` describes the objects, the failure classes and what was verified
//! against a real API server.

pub mod classify;
pub mod manifests;

use super::{Executor, ExecutorError, Observed, WorkerLaunch, WorkerRef, WorkerReport};
use crate::jobs::attempts::Outcome;
use crate::settings::KubernetesSettings;
use async_trait::async_trait;
use classify::Seen;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

/// Lines of a failed worker's log that go into the job's error.
const LOG_TAIL_LINES: i64 = 200;
/// Lines of a worker's log `GET /v1/jobs/{id}/logs` asks the API server for (then cut to
/// the bytes asked for).
const WORKER_LOG_LINES: i64 = 20_000;

pub struct KubernetesExecutor {
    jobs: Api<Job>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    namespace: String,
    settings: KubernetesSettings,
    lease: Duration,
    reports: UnboundedSender<WorkerReport>,
    /// The Jobs the watch sees (every replica's): what `free_slots` counts.
    store: Option<Store<Job>>,
    /// Attempts whose end this replica already reported, so a Pod's later updates (and its
    /// deletion as the Job is cleaned up) are not reported again.
    ended: Mutex<HashSet<WorkerRef>>,
}

fn api_error(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}, HTTP {})", s.message, s.reason, s.code),
        other => other.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl KubernetesExecutor {
    /// Connects to the cluster the usual way, checks that the namespace's Jobs can be
    /// listed, and starts watching. Fails with what is wrong, so a bad setting stops the
    /// control plane at start.
    pub async fn connect(
        settings: KubernetesSettings,
        lease: Duration,
        reports: UnboundedSender<WorkerReport>,
    ) -> Result<Arc<dyn Executor>, ExecutorError> {
        let client = Client::try_default().await.map_err(|e| {
            ExecutorError::Connect(format!(
                "{e} (the cluster is found from the in-cluster service account, else KUBECONFIG or ~/.kube/config)"
            ))
        })?;
        let mut executor = Self::new(client, settings, lease, reports);
        executor
            .jobs
            .list(&ListParams::default().labels(manifests::SELECTOR).limit(1))
            .await
            .map_err(|e| {
                ExecutorError::Connect(format!(
                    "listing Jobs in namespace {:?} (LORAFORGE_K8S_NAMESPACE): {}",
                    executor.namespace,
                    api_error(e)
                ))
            })?;
        let (store, writer) = reflector::store();
        executor.store = Some(store.clone());
        let executor = Arc::new(executor);
        tokio::spawn(executor.clone().watch_jobs(writer));
        tokio::spawn(executor.clone().watch_pods());
        tokio::spawn(executor.clone().keep_waiting_leases());
        if tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready())
            .await
            .is_err()
        {
            return Err(ExecutorError::Connect(
                "the watch on Jobs did not complete its first listing within 30 s".into(),
            ));
        }
        tracing::info!(
            namespace = executor.namespace,
            image = executor.settings.worker_image,
            "kubernetes executor watching"
        );
        Ok(executor)
    }

    /// An executor over `client` that does not watch (tests drive it call by call).
    pub fn new(
        client: Client,
        settings: KubernetesSettings,
        lease: Duration,
        reports: UnboundedSender<WorkerReport>,
    ) -> Self {
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        KubernetesExecutor {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client, &namespace),
            namespace,
            settings,
            lease,
            reports,
            store: None,
            ended: Mutex::default(),
        }
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, HashSet<WorkerRef>> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes an attempt's Job (foreground: its Pods go first) and its Secret; what is
    /// already gone is fine.
    async fn delete_attempt(&self, worker: WorkerRef) -> Result<(), String> {
        let name = manifests::job_name(worker);
        match self.jobs.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("deleting Job {name}: {}", api_error(e))),
        }
        let secret = manifests::secret_name(worker);
        match self.secrets.delete(&secret, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(format!("deleting Secret {secret}: {}", api_error(e))),
        }
    }

    /// The last lines of the worker's log, or why there are none.
    async fn log_tail(&self, pod: &str) -> String {
        let params = LogParams {
            container: Some(manifests::CONTAINER.into()),
            tail_lines: Some(LOG_TAIL_LINES),
            ..LogParams::default()
        };
        match self.pods.logs(pod, &params).await {
            Ok(log) => log,
            Err(e) => format!("(no log: {})", api_error(e)),
        }
    }

    /// Acts on what one object says: reports it, and once an attempt is over, removes
    /// its Job and Secret.
    async fn react(&self, worker: WorkerRef, seen: Seen, pod: Option<&str>) {
        match seen {
            Seen::Running => {}
            Seen::Waiting { event } => {
                if !self.ended().contains(&worker) {
                    self.report(worker, Observed::Waiting { event });
                }
            }
            Seen::Ended { outcome, with_log } => {
                if !self.ended().insert(worker) {
                    return;
                }
                let outcome = match (with_log, pod) {
                    (true, Some(pod)) => with_log_tail(outcome, &self.log_tail(pod).await),
                    _ => outcome,
                };
                tracing::info!(job_id = %worker.job_id, attempt = worker.attempt, outcome = outcome.label(), "worker ended");
                self.report(worker, Observed::Exited(outcome));
                if let Err(e) = self.delete_attempt(worker).await {
                    tracing::warn!(job_id = %worker.job_id, error = e, "could not clean up a finished attempt (reconciliation retries)");
                }
            }
        }
    }

    fn report(&self, worker: WorkerRef, what: Observed) {
        let _ = self.reports.send(WorkerReport {
            job_id: worker.job_id,
            attempt: worker.attempt,
            what,
        });
    }

    async fn watch_jobs(self: Arc<Self>, writer: reflector::store::Writer<Job>) {
        let config = watcher::Config::default().labels(manifests::SELECTOR);
        let mut events = watcher(self.jobs.clone(), config)
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(event) = events.next().await {
            let Some((job, worker, deleted)) = observed(event, "Jobs") else {
                continue;
            };
            if let Some(seen) = classify::job(&job, deleted) {
                self.react(worker, seen, None).await;
            }
            if deleted {
                self.ended().remove(&worker);
            }
        }
    }

    async fn watch_pods(self: Arc<Self>) {
        let config = watcher::Config::default().labels(manifests::SELECTOR);
        let mut events = watcher(self.pods.clone(), config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let Some((pod, worker, deleted)) = observed(event, "Pods") else {
                continue;
            };
            let seen = classify::pod(&pod, deleted);
            self.react(worker, seen, Some(&pod.name_any())).await;
        }
    }

    /// A worker waiting to start cannot heartbeat: while its Job is suspended or its Pod
    /// pending, the lease is kept here, a few times per lease period.
    async fn keep_waiting_leases(self: Arc<Self>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(self.lease / 3).await;
            for job in store.state() {
                let Some(worker) = manifests::worker_of(job.metadata.labels.as_ref()) else {
                    continue;
                };
                // Not finished and no Pod ready yet: suspended, pending or starting.
                let ready = job.status.as_ref().and_then(|s| s.ready).unwrap_or(0);
                if !classify::job_finished(&job) && ready == 0 && !self.ended().contains(&worker) {
                    self.report(worker, Observed::Waiting { event: None });
                }
            }
        }
    }
}

/// A watch event on one of the executor's objects: the object, its attempt, and whether it
/// is gone. Restarts of the watch and objects without our labels give `None`.
fn observed<K: kube::Resource>(
    event: Result<watcher::Event<K>, watcher::Error>,
    what: &str,
) -> Option<(K, WorkerRef, bool)> {
    let (object, deleted) = match event {
        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
        Ok(watcher::Event::Delete(o)) => (o, true),
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "watch on worker {what} failed; retrying");
            return None;
        }
    };
    let worker = manifests::worker_of(object.meta().labels.as_ref())?;
    Some((object, worker, deleted))
}

fn with_log_tail(outcome: Outcome, log: &str) -> Outcome {
    let add = |m: String| format!("{m}; last lines of the worker's log:\n{log}");
    match outcome {
        Outcome::WorkerExited { description } => Outcome::WorkerExited {
            description: add(description),
        },
        Outcome::Infrastructure { message } => Outcome::Infrastructure {
            message: add(message),
        },
        Outcome::ResourceExhausted { message } => Outcome::ResourceExhausted {
            message: add(message),
        },
        Outcome::DeadlineExceeded { message } => Outcome::DeadlineExceeded {
            message: add(message),
        },
        other => other,
    }
}

#[async_trait]
impl Executor for KubernetesExecutor {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn free_slots(&self) -> usize {
        let active = self.store.as_ref().map_or(0, |s| {
            s.state()
                .iter()
                .filter(|j| !classify::job_finished(j))
                .count()
        });
        self.settings.max_workers.saturating_sub(active)
    }

    async fn launch(&self, launch: WorkerLaunch) -> Result<(), ExecutorError> {
        let worker = WorkerRef {
            job_id: launch.job_id,
            attempt: launch.attempt,
        };
        let err =
            |what: &str, e: kube::Error| ExecutorError::Launch(format!("{what}: {}", api_error(e)));
        // The Secret first: a Pod that starts before its Secret exists fails to start.
        let secret = manifests::secret(&launch, &self.namespace);
        self.secrets
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|e| err("creating the worker token Secret", e))?;
        let job = manifests::job(&launch, &self.namespace, &self.settings);
        let created = match self.jobs.create(&PostParams::default(), &job).await {
            Ok(j) => j,
            Err(e) => {
                let _ = self
                    .secrets
                    .delete(&manifests::secret_name(worker), &DeleteParams::default())
                    .await;
                return Err(err("creating the worker Job", e));
            }
        };
        // Owned by the Job, the Secret goes when the Job does (garbage collection).
        if let Some(uid) = created.metadata.uid.as_deref() {
            let owner = serde_json::json!({"metadata": {"ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": created.name_any(), "uid": uid,
            }]}});
            if let Err(e) = self
                .secrets
                .patch(
                    &manifests::secret_name(worker),
                    &PatchParams::default(),
                    &Patch::Merge(&owner),
                )
                .await
            {
                tracing::warn!(job_id = %launch.job_id, error = api_error(e), "could not make the Job own its Secret; it is deleted with the attempt anyway");
            }
        }
        tracing::info!(job_id = %launch.job_id, attempt = launch.attempt, name = created.name_any(), namespace = self.namespace, "worker Job created");
        Ok(())
    }

    async fn stop(&self, job_id: Uuid) -> Result<(), ExecutorError> {
        let selector = format!(
            "{},{}={job_id}",
            manifests::SELECTOR,
            manifests::JOB_ID_LABEL
        );
        let listed = self
            .jobs
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| ExecutorError::Stop(api_error(e)))?;
        for job in listed {
            if let Some(worker) = manifests::worker_of(job.metadata.labels.as_ref()) {
                self.delete_attempt(worker)
                    .await
                    .map_err(ExecutorError::Stop)?;
            }
        }
        Ok(())
    }

    async fn workers(&self) -> Result<Option<Vec<WorkerRef>>, ExecutorError> {
        let listed = self
            .jobs
            .list(&ListParams::default().labels(manifests::SELECTOR))
            .await
            .map_err(|e| ExecutorError::List(api_error(e)))?;
        Ok(Some(
            listed
                .iter()
                .filter_map(|j| manifests::worker_of(j.metadata.labels.as_ref()))
                .collect(),
        ))
    }

    /// The newest Pod of the attempt's Job, while it exists (finished attempts are cleaned
    /// up, and with them their Pods and logs).
    async fn worker_log(
        &self,
        worker: WorkerRef,
        max_bytes: u64,
    ) -> Result<Option<String>, ExecutorError> {
        let selector = format!(
            "{}={},{}={}",
            manifests::JOB_ID_LABEL,
            worker.job_id,
            manifests::ATTEMPT_LABEL,
            worker.attempt
        );
        let pods = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| ExecutorError::List(api_error(e)))?;
        let newest = pods
            .items
            .iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let Some(pod) = newest else {
            return Ok(None);
        };
        let params = LogParams {
            container: Some(manifests::CONTAINER.into()),
            tail_lines: Some(WORKER_LOG_LINES),
            ..LogParams::default()
        };
        match self.pods.logs(&pod.name_any(), &params).await {
            Ok(log) => Ok(Some(super::tail_of(&log, max_bytes).to_string())),
            // Gone meanwhile, or its container has not started yet: no log (yet).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 400 => Ok(None),
            Err(e) => Err(ExecutorError::List(api_error(e))),
        }
    }

    async fn remove(&self, worker: WorkerRef) -> Result<(), ExecutorError> {
        self.delete_attempt(worker)
            .await
            .map_err(ExecutorError::Stop)
    }
}

#[cfg(test)]
#[path = "tests/common.rs"]
mod test_support;
#[cfg(test)]
#[path = "tests/executor.rs"]
mod tests;
