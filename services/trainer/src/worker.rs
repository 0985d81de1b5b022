//! `loraforge-trainer run`: one attempt of one job for the control plane. It fetches its
//! assignment, keeps the lease alive, streams progress, trains, publishes the artifact to
//! object storage and registers the version (protocol: `loraforge_spec::worker`).
//!
//! Training runs synchronously on the main thread; HTTP and storage run on a tokio runtime,
//! with heartbeats and event batches on background tasks so neither waits for the other.

use crate::error::{classify, error_kind, exit_code, Failure, EXIT_SYSTEM_ERROR};
use crate::export::{write_artifact, Provenance};
use crate::inputs::fetch_inputs;
use crate::model::device_label;
use crate::train::{train, Reporter};
use anyhow::{anyhow, Context, Result};
use loraforge_spec::manifest::MANIFEST_FILE;
use loraforge_spec::worker::{
    CompleteRequest, EventBatch, EventPayload, FailRequest, HeartbeatResponse, ReservedVersion, StageRequest,
    WorkerAssignment, TOKEN_ENV,
};
use loraforge_spec::JobStatus;
use loraforge_storage::Store;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Seconds between heartbeats unless `LORAFORGE_HEARTBEAT_SECS` says otherwise.
const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// Events are sent at most this often, so a fast loop does not flood the control plane.
const EVENT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// The control plane's limit on events per batch.
const MAX_EVENTS_PER_BATCH: usize = 1000;

/// Runs the job and returns the process exit code (0, or see `crate::error`).
pub fn run_job(job_id: Uuid, api: &str, device: Device) -> i32 {
    let setup = || -> Result<(Runtime, Arc<ControlPlane>)> {
        let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
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
    let heartbeat = runtime.spawn(send_heartbeats(control_plane.clone(), cancel.clone(), heartbeat_interval()));
    let result = execute(&runtime, &control_plane, device, &cancel);
    let code = match &result {
        Ok(version) => {
            tracing::info!(version, "published");
            0
        }
        Err(err) if matches!(classify(err), Some(Failure::Cancelled)) => {
            tracing::info!("job cancelled; nothing published");
            exit_code(err)
        }
        Err(err) => {
            tracing::error!("job failed: {err:#}");
            let report = FailRequest { kind: error_kind(err), message: format!("{err:#}") };
            if let Err(post_err) = runtime.block_on(control_plane.post::<_, ()>("fail", Some(&report))) {
                tracing::error!("could not report the failure: {post_err:#}");
            }
            exit_code(err)
        }
    };
    heartbeat.abort();
    code
}

/// Everything between getting the assignment and registering the version; returns the version.
fn execute(runtime: &Runtime, control_plane: &Arc<ControlPlane>, device: Device, cancel: &AtomicBool) -> Result<i32> {
    let assignment: WorkerAssignment = runtime.block_on(control_plane.get())?;
    let spec = &assignment.spec;
    tracing::info!(job = %assignment.job_id, attempt = assignment.attempt, "assignment received");
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let inputs = fetch_inputs(runtime, spec, scratch.path())?;
    runtime.block_on(control_plane.post::<_, ()>("stage", Some(&StageRequest { status: JobStatus::Running })))?;

    let mut events = EventForwarder::start(runtime, control_plane.clone());
    let trained = train(spec, &inputs.model_dir, &inputs.dataset, device, &mut events, cancel);
    runtime.block_on(events.finish());
    let outcome = trained?;

    let reserved: ReservedVersion = runtime.block_on(control_plane.post("versions", None::<&()>))?;
    let artifact_dir = scratch.path().join("artifact");
    let provenance = Provenance {
        project: assignment.project.clone(),
        job_id: assignment.job_id,
        version: reserved.version,
        base_model: inputs.base_model,
        dataset: inputs.dataset_ref,
        device: device_label(device),
    };
    let (manifest, files) = write_artifact(&artifact_dir, spec, provenance, outcome.metrics, &outcome.adapter)?;
    runtime.block_on(async {
        let store = Store::create(&assignment.storage_url)?;
        // The manifest goes last: its presence says the other files are complete.
        let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).filter(|n| *n != MANIFEST_FILE).collect();
        names.push(MANIFEST_FILE);
        for name in names {
            let bytes = tokio::fs::read(artifact_dir.join(name)).await?;
            store.put(&format!("{}/{name}", reserved.prefix), bytes.into()).await?;
        }
        anyhow::Ok(())
    })?;
    let complete = CompleteRequest { version: reserved.version, manifest, files };
    runtime.block_on(control_plane.post::<_, ()>("complete", Some(&complete)))?;
    Ok(reserved.version)
}

fn heartbeat_interval() -> Duration {
    let secs = std::env::var("LORAFORGE_HEARTBEAT_SECS").ok().and_then(|s| s.parse().ok()).filter(|&s: &u64| s > 0);
    Duration::from_secs(secs.unwrap_or(DEFAULT_HEARTBEAT_SECS))
}

/// Keeps the lease alive and turns a user's cancel request into the training loop's flag.
/// A failed heartbeat is only logged: the lease outlives a few of them.
async fn send_heartbeats(control_plane: Arc<ControlPlane>, cancel: Arc<AtomicBool>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match control_plane.post::<(), HeartbeatResponse>("heartbeat", None).await {
            Ok(response) if response.cancel_requested => {
                if !cancel.swap(true, Ordering::Relaxed) {
                    tracing::info!("cancel requested; stopping");
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!("heartbeat failed: {err:#}"),
        }
    }
}

/// A [`Reporter`] that hands events to a background task, which posts them in batches.
struct EventForwarder {
    sender: mpsc::UnboundedSender<EventPayload>,
    task: JoinHandle<()>,
}

impl EventForwarder {
    fn start(runtime: &Runtime, control_plane: Arc<ControlPlane>) -> EventForwarder {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = runtime.spawn(forward_events(control_plane, receiver));
        EventForwarder { sender, task }
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
        let _ = self.sender.send(event);
    }
}

async fn forward_events(control_plane: Arc<ControlPlane>, mut receiver: mpsc::UnboundedReceiver<EventPayload>) {
    while let Some(first) = receiver.recv().await {
        tokio::time::sleep(EVENT_FLUSH_INTERVAL).await;
        let mut events = vec![first];
        while let Ok(event) = receiver.try_recv() {
            events.push(event);
        }
        for chunk in events.chunks(MAX_EVENTS_PER_BATCH) {
            let batch = EventBatch { events: chunk.to_vec() };
            if let Err(err) = control_plane.post::<_, ()>("events", Some(&batch)).await {
                tracing::warn!("could not send {} events: {err:#}", chunk.len());
            }
        }
    }
}

/// The worker routes of the control plane for one job, authenticated with its token.
struct ControlPlane {
    http: reqwest::Client,
    job_url: String,
    token: String,
}

impl ControlPlane {
    fn new(api: &str, job_id: Uuid, token: String) -> Result<ControlPlane> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        Ok(ControlPlane { http, job_url: format!("{}/v1/worker/jobs/{job_id}", api.trim_end_matches('/')), token })
    }

    async fn get<R: DeserializeOwned>(&self) -> Result<R> {
        let request = self.http.get(&self.job_url).bearer_auth(&self.token);
        parse(&self.job_url, send(request, &self.job_url).await?)
    }

    /// POSTs `body` (if any) to `{job}/{path}`; `R = ()` for routes that answer 204.
    async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: Option<&B>) -> Result<R> {
        let url = format!("{}/{path}", self.job_url);
        let mut request = self.http.post(&url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        parse(&url, send(request, &url).await?)
    }
}

async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<bytes::Bytes> {
    let response = request.send().await.with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let body = response.bytes().await.with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(&body).chars().take(500).collect();
        return Err(anyhow!("{url} answered {status}: {text}"));
    }
    Ok(body)
}

/// Parses an answer; an empty body reads as JSON `null`, which is what `()` expects.
fn parse<R: DeserializeOwned>(url: &str, body: bytes::Bytes) -> Result<R> {
    let body: &[u8] = if body.is_empty() { b"null" } else { &body };
    serde_json::from_slice(body).with_context(|| format!("unexpected answer from {url}"))
}
