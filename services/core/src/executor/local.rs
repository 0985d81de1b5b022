//! The `local` executor: each worker is a `loraforge-trainer` child process in its own
//! process group (so stopping it stops everything it started), with a slot limit. A job's
//! `training.max_duration` is enforced here: the group is stopped when it runs out.

use super::{Executor, ExecutorError, Observed, WorkerLaunch, WorkerReport};
use crate::jobs::attempts::Outcome;
use async_trait::async_trait;
use loraforge_spec::worker::TOKEN_ENV;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

/// A stopped worker gets this long after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How much of a failed worker's log goes into the job's error message.
const LOG_TAIL_BYTES: usize = 2000;

pub struct LocalExecutor {
    trainer_bin: PathBuf,
    slots: usize,
    lease: Duration,
    log_dir: PathBuf,
    /// job id -> process group id of its running worker.
    running: Arc<Mutex<HashMap<Uuid, i32>>>,
    exits: UnboundedSender<WorkerReport>,
}

impl LocalExecutor {
    pub fn new(
        trainer_bin: PathBuf,
        slots: usize,
        lease: Duration,
        log_dir: PathBuf,
        exits: UnboundedSender<WorkerReport>,
    ) -> Self {
        Self {
            trainer_bin,
            slots,
            lease,
            log_dir,
            running: Arc::default(),
            exits,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, i32>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn free_slots(&self) -> usize {
        self.slots.saturating_sub(self.running().len())
    }

    async fn launch(&self, launch: WorkerLaunch) -> Result<(), ExecutorError> {
        if self.free_slots() == 0 {
            return Err(ExecutorError::NoCapacity);
        }
        let err = |e: std::io::Error| ExecutorError::Launch(e.to_string());
        std::fs::create_dir_all(&self.log_dir).map_err(err)?;
        let log_path = self
            .log_dir
            .join(format!("{}-attempt{}.log", launch.job_id, launch.attempt));
        let log = std::fs::File::create(&log_path).map_err(err)?;
        let mut child = tokio::process::Command::new(&self.trainer_bin)
            .arg("run")
            .arg("--job-id")
            .arg(launch.job_id.to_string())
            .arg("--api")
            .arg(&launch.api_url)
            .env(TOKEN_ENV, &launch.token)
            // The worker rides out a control-plane outage for as long as its lease lasts.
            .env(
                "LORAFORGE_WORKER_RETRY_SECS",
                self.lease.as_secs().max(1).to_string(),
            )
            // The worker needs no database; keep its credentials out of the child.
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(err)?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| ExecutorError::Launch(format!("{}: {e}", self.trainer_bin.display())))?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        self.running().insert(launch.job_id, pid);
        tracing::info!(job_id = %launch.job_id, attempt = launch.attempt, pid, log = %log_path.display(), "worker started");

        let running = self.running.clone();
        let exits = self.exits.clone();
        let (job_id, attempt) = (launch.job_id, launch.attempt);
        let limit = launch.spec.training.max_duration.clone();
        let deadline = launch
            .spec
            .training
            .max_duration_secs()
            .map(Duration::from_secs);
        tokio::spawn(async move {
            let out_of_time = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let (status, timed_out) = tokio::select! {
                status = child.wait() => (status, false),
                () = out_of_time => {
                    let _ = signal_group(pid, libc::SIGTERM);
                    let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            let _ = signal_group(pid, libc::SIGKILL);
                            child.wait().await
                        }
                    };
                    (status, true)
                }
            };
            running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job_id);
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let description = format!(
                "{how}; log {}:\n{}",
                log_path.display(),
                log_tail(&log_path)
            );
            tracing::info!(%job_id, attempt, status = how, timed_out, "worker exited");
            let outcome = if timed_out {
                Outcome::DeadlineExceeded {
                    message: format!(
                        "the attempt ran longer than training.max_duration ({}) and was stopped; raise the limit or train fewer steps; log {}:\n{}",
                        limit.unwrap_or_default(),
                        log_path.display(),
                        log_tail(&log_path)
                    ),
                }
            } else {
                Outcome::WorkerExited { description }
            };
            let _ = exits.send(WorkerReport {
                job_id,
                attempt,
                what: Observed::Exited(outcome),
            });
        });
        Ok(())
    }

    async fn stop(&self, job_id: Uuid) -> Result<(), ExecutorError> {
        let Some(pgid) = self.running().get(&job_id).copied() else {
            return Ok(());
        };
        signal_group(pgid, libc::SIGTERM).map_err(ExecutorError::Stop)?;
        let running = self.running.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STOP_GRACE).await;
            if running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&job_id)
                == Some(&pgid)
            {
                let _ = signal_group(pgid, libc::SIGKILL);
            }
        });
        Ok(())
    }
}

fn signal_group(pgid: i32, signal: i32) -> Result<(), String> {
    if pgid <= 0 {
        return Err("unknown process group".into());
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is shared.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&text[start..]).into_owned()
}
