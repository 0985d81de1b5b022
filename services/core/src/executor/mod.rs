//! Executors start and stop workers. The scheduler only knows this trait; a new
//! executor is one new module plus one line in [`build`].

use crate::jobs::attempts::Outcome;
use crate::settings::{ExecutorSettings, Settings};
use async_trait::async_trait;
use loraforge_spec::ResolvedJobSpec;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

pub mod kubernetes;
pub mod local;
pub mod reconcile;

/// What an executor saw happen to one attempt's worker; the scheduler acts on it.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub job_id: Uuid,
    pub attempt: i32,
    pub what: Observed,
}

#[derive(Debug, Clone)]
pub enum Observed {
    /// The worker ended; the attempt is settled with this outcome (a no-op if the worker
    /// already reported its result, or the attempt is no longer current).
    Exited(Outcome),
    /// The worker has not started and is waiting (for capacity, for admission, for its
    /// image). It cannot heartbeat yet, so its attempt's lease is extended; `event` is
    /// recorded on the job once (not again while it stays the newest event).
    Waiting { event: Option<String> },
}

/// One attempt's worker, as an executor lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerRef {
    pub job_id: Uuid,
    pub attempt: i32,
}

/// Everything a worker needs to find its job, and what it asks of the machine.
pub struct WorkerLaunch {
    pub job_id: Uuid,
    pub attempt: i32,
    pub project: String,
    pub spec: ResolvedJobSpec,
    /// Base URL of the control plane as the worker reaches it.
    pub api_url: String,
    /// Valid for this job's current attempt only; passed by environment, never argv.
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("no free worker slot")]
    NoCapacity,
    #[error("could not start the worker: {0}")]
    Launch(String),
    #[error("could not stop the worker: {0}")]
    Stop(String),
    #[error("could not list the workers: {0}")]
    List(String),
    #[error("could not connect to the cluster: {0}")]
    Connect(String),
}

#[async_trait]
pub trait Executor: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// How many more workers could start now.
    fn free_slots(&self) -> usize;
    /// Starts a worker; its end is reported later as a [`WorkerExit`] (if it ends without
    /// having reported a result itself, that decides what happens to the attempt).
    async fn launch(&self, launch: WorkerLaunch) -> Result<(), ExecutorError>;
    /// Stops the job's worker if it runs here; a no-op otherwise.
    async fn stop(&self, job_id: Uuid) -> Result<(), ExecutorError>;
    /// Every worker this executor can see, for [`reconcile`]; `None` when it cannot see
    /// them all (the local executor knows only the workers it started itself).
    async fn workers(&self) -> Result<Option<Vec<WorkerRef>>, ExecutorError> {
        Ok(None)
    }
    /// Whether [`workers`](Self::workers) lists every worker of every replica, so that an
    /// attempt without one has lost it (a cluster's executor), or only this machine's.
    fn sees_every_worker(&self) -> bool {
        true
    }
    /// The end (at most `max_bytes`) of what one attempt's worker printed, where this
    /// executor keeps it; `None` where it does not (a worker of another machine, or one
    /// whose Pod is gone).
    async fn worker_log(
        &self,
        worker: WorkerRef,
        max_bytes: u64,
    ) -> Result<Option<String>, ExecutorError> {
        let _ = (worker, max_bytes);
        Ok(None)
    }
    /// Removes one attempt's worker and everything made for it; a no-op when it is gone.
    async fn remove(&self, worker: WorkerRef) -> Result<(), ExecutorError> {
        let _ = worker;
        Ok(())
    }
}

/// The last `max_bytes` of `text`, starting at a character boundary.
pub fn tail_of(text: &str, max_bytes: u64) -> &str {
    let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The executor the settings choose; what it observes is sent to `reports`.
pub async fn build(
    settings: &Settings,
    reports: UnboundedSender<WorkerReport>,
) -> Result<Arc<dyn Executor>, ExecutorError> {
    Ok(match &settings.executor {
        ExecutorSettings::Local { trainer_bin, slots } => {
            let local = local::LocalExecutor::new(
                trainer_bin.clone(),
                *slots,
                settings.lease,
                settings.data_dir.join("logs"),
                settings.data_dir.join("workers"),
                reports,
            );
            local.adopt();
            Arc::new(local)
        }
        ExecutorSettings::Kubernetes(k) => {
            kubernetes::KubernetesExecutor::connect(k.clone(), settings.lease, reports).await?
        }
    })
}
