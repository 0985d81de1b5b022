//! The `local` executor: each worker is a `loraforge-trainer` child process in its own
//! process group (so stopping it stops everything it started), with a slot limit. A job's
//! `training.max_duration` is enforced here: the group is stopped when it runs out.
//!
//! Workers outlive a crash of the control plane (their own process group), so each one is
//! recorded durably (`<data dir>/workers/<job>-<attempt>.json`: process group, attempt and
//! the process's start time, which tells it from a later process with the same pid). A
//! restarted executor adopts the recorded workers still alive: they hold their slots, are
//! watched until they exit, and can be stopped; reconciliation stops those whose attempt is
//! no longer current. So the slot count holds across restarts.

use super::{Executor, ExecutorError, Observed, WorkerLaunch, WorkerRef, WorkerReport};
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
    records: PathBuf,
    /// job id -> (process group id, attempt) of its running worker.
    running: Arc<Mutex<HashMap<Uuid, (i32, i32)>>>,
    exits: UnboundedSender<WorkerReport>,
}

/// What survives a restart about one running worker.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    job_id: Uuid,
    attempt: i32,
    pgid: i32,
    /// The process's start time (clock ticks since boot, `/proc/<pid>/stat`).
    started: u64,
    log: PathBuf,
}

impl LocalExecutor {
    pub fn new(
        trainer_bin: PathBuf,
        slots: usize,
        lease: Duration,
        log_dir: PathBuf,
        records: PathBuf,
        exits: UnboundedSender<WorkerReport>,
    ) -> Self {
        Self {
            trainer_bin,
            slots,
            lease,
            log_dir,
            records,
            running: Arc::default(),
            exits,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (i32, i32)>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where an attempt's worker writes its stdout and stderr (kept after it exits).
    fn log_path(&self, job_id: Uuid, attempt: i32) -> PathBuf {
        self.log_dir.join(format!("{job_id}-attempt{attempt}.log"))
    }

    fn record_path(&self, job_id: Uuid, attempt: i32) -> PathBuf {
        self.records.join(format!("{job_id}-{attempt}.json"))
    }

    /// Takes over the workers an earlier run of this executor left running; forgets the
    /// records of those that are gone. Call once, at start.
    pub fn adopt(&self) {
        let Ok(entries) = std::fs::read_dir(&self.records) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let record: Option<Record> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(r) if start_time(r.pgid) == Some(r.started) => {
                    tracing::info!(job_id = %r.job_id, attempt = r.attempt, pgid = r.pgid, "adopted a worker left running by an earlier run");
                    self.running().insert(r.job_id, (r.pgid, r.attempt));
                    tokio::spawn(watch_adopted(
                        r,
                        path,
                        self.running.clone(),
                        self.exits.clone(),
                    ));
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Waits for an adopted worker (not our child: it cannot be waited for) to exit.
async fn watch_adopted(
    record: Record,
    path: PathBuf,
    running: Arc<Mutex<HashMap<Uuid, (i32, i32)>>>,
    exits: UnboundedSender<WorkerReport>,
) {
    while start_time(record.pgid) == Some(record.started) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = std::fs::remove_file(&path);
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&record.job_id);
    let description = format!(
        "the worker (adopted after a restart) exited; log {}:\n{}",
        record.log.display(),
        log_tail(&record.log)
    );
    let _ = exits.send(WorkerReport {
        job_id: record.job_id,
        attempt: record.attempt,
        what: Observed::Exited(Outcome::WorkerExited { description }),
    });
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), or
/// `None` when there is no such process (or it is a zombie).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
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
        let log_path = self.log_path(launch.job_id, launch.attempt);
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
        self.running().insert(launch.job_id, (pid, launch.attempt));
        let record = Record {
            job_id: launch.job_id,
            attempt: launch.attempt,
            pgid: pid,
            started: start_time(pid).unwrap_or_default(),
            log: log_path.clone(),
        };
        let record_path = self.record_path(launch.job_id, launch.attempt);
        let written = std::fs::create_dir_all(&self.records).and_then(|()| {
            std::fs::write(
                &record_path,
                serde_json::to_vec(&record).unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            tracing::warn!(job_id = %launch.job_id, error = %e, "could not record the worker; a restart will not adopt it");
        }
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
            let _ = std::fs::remove_file(&record_path);
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
        let Some((pgid, _)) = self.running().get(&job_id).copied() else {
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
                .is_some_and(|(running, _)| *running == pgid)
            {
                let _ = signal_group(pgid, libc::SIGKILL);
            }
        });
        Ok(())
    }

    fn sees_every_worker(&self) -> bool {
        false
    }

    async fn worker_log(
        &self,
        worker: WorkerRef,
        max_bytes: u64,
    ) -> Result<Option<String>, ExecutorError> {
        let path = self.log_path(worker.job_id, worker.attempt);
        let read = tokio::task::spawn_blocking(move || read_tail(&path, max_bytes))
            .await
            .map_err(|e| ExecutorError::List(e.to_string()))?;
        match read {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ExecutorError::List(format!(
                "reading the worker's log: {e}"
            ))),
        }
    }

    async fn workers(&self) -> Result<Option<Vec<WorkerRef>>, ExecutorError> {
        Ok(Some(self.workers_here()))
    }

    async fn remove(&self, worker: WorkerRef) -> Result<(), ExecutorError> {
        let current = self.running().get(&worker.job_id).map(|(_, a)| *a);
        if current == Some(worker.attempt) {
            self.stop(worker.job_id).await?;
        }
        Ok(())
    }
}

/// The local executor knows only the workers of this machine, so it takes part in
/// reconciliation to stop stale ones, never to call others vanished.
impl LocalExecutor {
    fn workers_here(&self) -> Vec<WorkerRef> {
        self.running()
            .iter()
            .map(|(job_id, (_, attempt))| WorkerRef {
                job_id: *job_id,
                attempt: *attempt,
            })
            .collect()
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

/// The last `max_bytes` of a file, as text (a character cut at the start is dropped).
fn read_tail(path: &std::path::Path, max_bytes: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    // A multi-byte character cut by the seek becomes U+FFFD at the very start: drop it.
    Ok(match start {
        0 => text.into_owned(),
        _ => text.trim_start_matches('\u{FFFD}').to_string(),
    })
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::read_tail;

    #[test]
    fn a_log_tail_is_its_last_bytes_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        std::fs::write(&path, "first line\nsecond é line\n").unwrap();
        assert_eq!(
            read_tail(&path, 1000).unwrap(),
            "first line\nsecond é line\n"
        );
        assert_eq!(read_tail(&path, 5).unwrap(), "line\n");
        // The cut falls inside "é" (2 bytes): the half character is dropped.
        assert_eq!(read_tail(&path, 7).unwrap(), " line\n");
        assert!(read_tail(&dir.path().join("none.log"), 10).is_err());
    }
}
