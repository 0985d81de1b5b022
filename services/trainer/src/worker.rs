//! `loraforge-trainer run`: one attempt of one job for the control plane. It fetches its
//! assignment and inputs (the parent adapter's files too), keeps the lease alive, streams
//! progress, trains (checkpointing into the artifact store, and resuming from the newest
//! checkpoint when it is a retry), publishes the artifact to object storage and registers the
//! version (protocol: `loraforge_spec::worker`).
//!
//! Training runs synchronously on the main thread; HTTP and storage run on a tokio runtime,
//! with heartbeats and event batches on background tasks so neither waits for the other.

use crate::checkpoint::StoredCheckpoints;
use crate::device::resolve_device;
use crate::error::{classify, error_kind, exit_code, Failure, EXIT_SYSTEM_ERROR};
use crate::export::{write_artifact, PeftAdapter, Provenance};
use crate::inputs::fetch_inputs;
use crate::model::device_label;
use crate::safety;
use crate::train::{train, Reporter, TrainingInputs};
use anyhow::{anyhow, Context, Result};
use loraforge_spec::manifest::{
    ParentVersion, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE,
};
use loraforge_spec::worker::{
    CompleteRequest, EventBatch, EventPayload, FailRequest, HeartbeatResponse, ParentArtifact,
    ReservedVersion, StageRequest, WorkerAssignment, TOKEN_ENV,
};
use loraforge_spec::{DeviceChoice, JobStatus};
use loraforge_storage::Store;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// Seconds between heartbeats unless `LORAFORGE_HEARTBEAT_SECS` says otherwise.
const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// Events are sent at most this often, so a fast loop does not flood the control plane.
const EVENT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// The control plane's limit on events per batch.
const MAX_EVENTS_PER_BATCH: usize = 1000;
/// Events that could not be delivered because the control plane was unreachable or failing
/// (a restart, a database outage) are sent again after this delay, doubling up to
/// `RETRY_MAX_DELAY`, for at most `RETRY_LIMIT`.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
const RETRY_LIMIT: Duration = Duration::from_secs(120);

/// Runs the job and returns the process exit code (0, or see `crate::error`). The job's
/// `training.device` decides where it trains, unless `device_override` (the command line) does.
pub fn run_job(job_id: Uuid, api: &str, device_override: Option<DeviceChoice>) -> i32 {
    let setup = || -> Result<(Runtime, Arc<ControlPlane>)> {
        let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok((runtime, Arc::new(ControlPlane::new(api, job_id, token)?)))
    };
    let (runtime, control_plane) = match setup() {
        Ok(ready) => ready,
        Err(err) => {
            tracing::error!("cannot start the worker: {err:#}");
            return EXIT_SYSTEM_ERROR;
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let lease_lost = Arc::new(AtomicBool::new(false));
    let heartbeat = runtime.spawn(send_heartbeats(
        control_plane.clone(),
        cancel.clone(),
        lease_lost.clone(),
        heartbeat_interval(),
    ));
    let result = execute(&runtime, &control_plane, device_override, &cancel);
    let code = match &result {
        Ok(version) => {
            tracing::info!(version, "published");
            0
        }
        // Another attempt owns the job now; it reports for it.
        Err(err) if lease_lost.load(Ordering::Relaxed) => {
            tracing::warn!("stopped: this attempt lost its lease to another ({err:#})");
            EXIT_SYSTEM_ERROR
        }
        Err(err) if matches!(classify(err), Some(Failure::Cancelled)) => {
            tracing::info!("job cancelled; nothing published");
            exit_code(err)
        }
        Err(err) => {
            tracing::error!("job failed: {err:#}");
            let report = FailRequest {
                kind: error_kind(err),
                message: format!("{err:#}"),
            };
            if let Err(post_err) =
                runtime.block_on(control_plane.post::<_, ()>("fail", Some(&report)))
            {
                tracing::error!("could not report the failure: {post_err:#}");
            }
            exit_code(err)
        }
    };
    heartbeat.abort();
    code
}

/// Everything between getting the assignment and registering the version; returns the version.
fn execute(
    runtime: &Runtime,
    control_plane: &Arc<ControlPlane>,
    device_override: Option<DeviceChoice>,
    cancel: &AtomicBool,
) -> Result<i32> {
    let assignment: WorkerAssignment = runtime.block_on(control_plane.get())?;
    let spec = &assignment.spec;
    tracing::info!(job = %assignment.job_id, attempt = assignment.attempt, "assignment received");
    let device = resolve_device(device_override.unwrap_or(spec.training.device))?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let inputs = fetch_inputs(runtime, spec, scratch.path())?;
    let store = Store::create(&assignment.storage_url)?;
    let parent = match &assignment.parent {
        Some(artifact) => Some(fetch_parent(
            runtime,
            &store,
            artifact,
            &scratch.path().join("parent"),
        )?),
        None => None,
    };
    let mut checkpoints = StoredCheckpoints::new(runtime, store.clone(), assignment.job_id);
    // A retried attempt continues from the newest checkpoint an earlier attempt completed.
    let resume = if assignment.attempt > 1 {
        checkpoints.latest()?
    } else {
        None
    };
    runtime.block_on(control_plane.post::<_, ()>(
        "stage",
        Some(&StageRequest {
            status: JobStatus::Running,
        }),
    ))?;

    let mut events = EventForwarder::start(runtime, control_plane.clone());
    let training_inputs = TrainingInputs {
        model_dir: &inputs.model_dir,
        train_data: &inputs.dataset,
        validation_data: inputs.validation.as_deref(),
        parent: parent.as_ref(),
        resume,
    };
    let trained = train(
        spec,
        training_inputs,
        device,
        Some(&mut checkpoints),
        &mut events,
        cancel,
    );
    // The gate's measurements, when the job's policy asks for them; the control plane judges them.
    let evaluated = trained.and_then(|outcome| {
        if !assignment.safety.enabled {
            return Ok((outcome, None));
        }
        runtime.block_on(control_plane.post::<_, ()>(
            "stage",
            Some(&StageRequest {
                status: JobStatus::Evaluating,
            }),
        ))?;
        let settings = safety::Settings {
            seq_len: spec.training.seq_len as usize,
            ..Default::default()
        };
        let validation = inputs.validation.as_deref();
        let report = safety::evaluate(
            &inputs.model_dir,
            &outcome.adapter,
            validation,
            &settings,
            device,
            cancel,
        )?;
        events.report(EventPayload::Safety {
            report: report.clone(),
        });
        Ok((outcome, Some(report)))
    });
    runtime.block_on(events.finish());
    let (outcome, evaluation) = evaluated?;

    let reserved: ReservedVersion =
        runtime.block_on(control_plane.post("versions", None::<&()>))?;
    let artifact_dir = scratch.path().join("artifact");
    let provenance = Provenance {
        project: assignment.project.clone(),
        job_id: assignment.job_id,
        version: reserved.version,
        base_model: inputs.base_model,
        dataset: inputs.dataset_ref,
        parent: assignment.parent.as_ref().map(|p| ParentVersion {
            adapter_name: p.adapter_name.clone(),
            version: p.version,
        }),
        device: device_label(device),
    };
    let (_manifest, files) = write_artifact(
        &artifact_dir,
        spec,
        provenance,
        outcome.metrics,
        &outcome.adapter,
        evaluation,
    )?;
    runtime.block_on(async {
        // The manifest goes last: its presence says the other files are complete.
        let mut names: Vec<&str> = files
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| *n != MANIFEST_FILE)
            .collect();
        names.push(MANIFEST_FILE);
        for name in names {
            let bytes = tokio::fs::read(artifact_dir.join(name)).await?;
            store
                .put(&format!("{}/{name}", reserved.prefix), bytes.into())
                .await?;
        }
        anyhow::Ok(())
    })?;
    let manifest_sha256 = files
        .iter()
        .find(|f| f.name == MANIFEST_FILE)
        .map(|f| f.sha256.clone())
        .context("the artifact has no manifest")?;
    let complete = CompleteRequest {
        version: reserved.version,
        manifest_sha256,
    };
    runtime.block_on(control_plane.post::<_, ()>("complete", Some(&complete)))?;
    // Published: the checkpoints have served. Any left behind are gc's to remove.
    if let Err(err) = checkpoints.delete_all() {
        tracing::warn!("could not delete the job's checkpoints: {err:#}");
    }
    Ok(reserved.version)
}

/// Downloads the parent version's adapter files into `dir` and reads them.
fn fetch_parent(
    runtime: &Runtime,
    store: &Store,
    parent: &ParentArtifact,
    dir: &Path,
) -> Result<PeftAdapter> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    runtime
        .block_on(async {
            for name in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
                store
                    .download(&format!("{}/{name}", parent.prefix), &dir.join(name))
                    .await?;
            }
            anyhow::Ok(())
        })
        .with_context(|| {
            format!(
                "fetching the parent adapter {} v{}",
                parent.adapter_name, parent.version
            )
        })?;
    PeftAdapter::load(dir)
}

fn heartbeat_interval() -> Duration {
    let secs = std::env::var("LORAFORGE_HEARTBEAT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s: &u64| s > 0);
    Duration::from_secs(secs.unwrap_or(DEFAULT_HEARTBEAT_SECS))
}

/// Keeps the lease alive and turns a user's cancel request into the training loop's flag.
/// A failed heartbeat is only logged: the lease outlives a few of them. A refused one means
/// the lease already expired and the job went to another attempt: this one stops (`lease_lost`),
/// so that it writes no more checkpoints beside its successor's.
async fn send_heartbeats(
    control_plane: Arc<ControlPlane>,
    cancel: Arc<AtomicBool>,
    lease_lost: Arc<AtomicBool>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match control_plane
            .post::<(), HeartbeatResponse>("heartbeat", None)
            .await
        {
            Ok(response) if response.cancel_requested => {
                if !cancel.swap(true, Ordering::Relaxed) {
                    tracing::info!("cancel requested; stopping");
                }
            }
            Ok(_) => {}
            Err(err) if refused(&err) => {
                tracing::warn!("heartbeat refused, the lease is lost; stopping: {err:#}");
                lease_lost.store(true, Ordering::Relaxed);
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(err) => tracing::warn!("heartbeat failed: {err:#}"),
        }
    }
}

/// What the training thread hands the forwarding task.
enum Forwarded {
    Event(EventPayload),
    /// Answered once every event handed over before it is recorded, or could not be.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// A [`Reporter`] that hands events to a background task, which posts them in batches.
struct EventForwarder {
    sender: mpsc::UnboundedSender<Forwarded>,
    task: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

impl EventForwarder {
    fn start(runtime: &Runtime, control_plane: Arc<ControlPlane>) -> EventForwarder {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = runtime.spawn(forward_events(control_plane, receiver));
        EventForwarder {
            sender,
            task,
            runtime: runtime.handle().clone(),
        }
    }

    /// Sends what is still queued and stops.
    async fn finish(self) {
        drop(self.sender);
        if let Err(err) = self.task.await {
            tracing::warn!("event forwarder stopped: {err}");
        }
    }
}

impl Reporter for EventForwarder {
    fn report(&mut self, event: EventPayload) {
        if let EventPayload::Log { message } = &event {
            tracing::info!("{message}");
        }
        // The receiver lives until `finish`, so a send cannot fail before then.
        let _ = self.sender.send(Forwarded::Event(event));
    }

    fn flush(&mut self) -> Result<()> {
        let (answer, answered) = oneshot::channel();
        let stopped = || anyhow!("the event forwarder stopped");
        self.sender
            .send(Forwarded::Flush(answer))
            .map_err(|_| stopped())?;
        match self.runtime.block_on(answered) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(anyhow!(
                "the control plane did not record the job's events: {message}"
            )),
            Err(_) => Err(stopped()),
        }
    }
}

/// Posts events in batches of what arrived within [`EVENT_FLUSH_INTERVAL`] (at once when a
/// flush is asked for), in order, retrying while the control plane is unreachable or failing.
async fn forward_events(
    control_plane: Arc<ControlPlane>,
    mut receiver: mpsc::UnboundedReceiver<Forwarded>,
) {
    while let Some(first) = receiver.recv().await {
        let (mut events, mut flushes) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        let deadline = Instant::now() + EVENT_FLUSH_INTERVAL;
        while let Some(item) = next.take() {
            match item {
                Forwarded::Event(event) => events.push(event),
                Forwarded::Flush(answer) => flushes.push(answer),
            }
            if flushes.is_empty() {
                next = tokio::time::timeout_at(deadline, receiver.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        let delivered = deliver_events(&control_plane, events).await;
        if let Err(message) = &delivered {
            tracing::warn!("events were lost: {message}");
        }
        for answer in flushes {
            let _ = answer.send(delivered.clone());
        }
    }
}

async fn deliver_events(
    control_plane: &ControlPlane,
    events: Vec<EventPayload>,
) -> Result<(), String> {
    for chunk in events.chunks(MAX_EVENTS_PER_BATCH) {
        let batch = EventBatch {
            events: chunk.to_vec(),
        };
        let (started, mut delay) = (Instant::now(), RETRY_FIRST_DELAY);
        loop {
            match control_plane.post::<_, ()>("events", Some(&batch)).await {
                Ok(()) => break,
                Err(err) if !refused(&err) && started.elapsed() < RETRY_LIMIT => {
                    tracing::warn!("could not send {} events, retrying: {err:#}", chunk.len());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                }
                Err(err) => return Err(format!("{} events not sent: {err:#}", chunk.len())),
            }
        }
    }
    Ok(())
}

/// The worker routes of the control plane for one job, authenticated with its token.
struct ControlPlane {
    http: reqwest::Client,
    job_url: String,
    token: String,
}

impl ControlPlane {
    fn new(api: &str, job_id: Uuid, token: String) -> Result<ControlPlane> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(ControlPlane {
            http,
            job_url: format!("{}/v1/worker/jobs/{job_id}", api.trim_end_matches('/')),
            token,
        })
    }

    async fn get<R: DeserializeOwned>(&self) -> Result<R> {
        let request = self.http.get(&self.job_url).bearer_auth(&self.token);
        parse(&self.job_url, send(request, &self.job_url).await?)
    }

    /// POSTs `body` (if any) to `{job}/{path}`; `R = ()` for routes that answer 204.
    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let url = format!("{}/{path}", self.job_url);
        let mut request = self.http.post(&url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        parse(&url, send(request, &url).await?)
    }
}

/// An answer of the control plane other than success.
#[derive(Debug, thiserror::Error)]
#[error("{url} answered {status}: {body}")]
struct Unsuccessful {
    url: String,
    status: reqwest::StatusCode,
    body: String,
}

/// Whether the control plane refused a request (4xx: a stale token, a request it will never
/// take), as opposed to failing to answer it, which is worth another try.
fn refused(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Unsuccessful>()
        .is_some_and(|e| e.status.is_client_error())
}

async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<bytes::Bytes> {
    let response = request
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let body: String = String::from_utf8_lossy(&body).chars().take(500).collect();
        return Err(Unsuccessful {
            url: url.to_string(),
            status,
            body,
        }
        .into());
    }
    Ok(body)
}

/// Parses an answer; an empty body reads as JSON `null`, which is what `()` expects.
fn parse<R: DeserializeOwned>(url: &str, body: bytes::Bytes) -> Result<R> {
    let body: &[u8] = if body.is_empty() { b"null" } else { &body };
    serde_json::from_slice(body).with_context(|| format!("unexpected answer from {url}"))
}
