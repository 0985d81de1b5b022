//! Executors start and stop workers. The scheduler only knows this trait; a new
//! executor is one new module plus one line in [`build`].

use crate::jobs::attempts::Outcome;
use crate::settings::{ExecutorSettings, Settings};
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

pub mod local;

/// How a worker ended, as an executor saw it: which attempt, and why, as the
/// [`Outcome`] the attempt is settled with.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub job_id: Uuid,
    pub attempt: i32,
    pub outcome: Outcome,
}

/// Everything a worker needs to find its job.
pub struct WorkerLaunch {
    pub job_id: Uuid,
    pub attempt: i32,
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
}

/// The executor the settings choose. Worker exits are sent to `exits`.
pub fn build(settings: &Settings, exits: UnboundedSender<WorkerExit>) -> Arc<dyn Executor> {
    match &settings.executor {
        ExecutorSettings::Local { trainer_bin, slots } => Arc::new(local::LocalExecutor::new(
            trainer_bin.clone(),
            *slots,
            settings.data_dir.join("logs"),
            exits,
        )),
    }
}
