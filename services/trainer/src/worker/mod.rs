//! `loraforge-trainer run`: one attempt of one job for the control plane. It fetches its
//! assignment, keeps the lease alive (`heartbeat`), and runs the job's [`pipeline`] with the
//! control plane as its host: the parent adapter's files fetched, progress streamed
//! (`events`), checkpoints saved into the artifact store (and resumed from, on a retry), the
//! artifact published to object storage and the version registered (protocol:
//! `loraforge_spec::worker`, over `client`).
//!
//! Training runs synchronously on the main thread; HTTP and storage run on a tokio runtime,
//! with heartbeats and event batches on background tasks so neither waits for the other.

mod baselines;
mod client;
mod events;
mod heartbeat;

use crate::data::inputs::LocalInputs;
use crate::error::{classify, error_kind, Failure};
use crate::export::{PeftAdapter, Provenance};
use crate::model::device::resolve_device;
use crate::model::device_label;
use crate::pipeline::{self, Host, Job, StartingPoint};
use crate::training::checkpoint::{CheckpointStore, StoredCheckpoints};
use crate::training::Reporter;
use anyhow::{Context, Result};
use client::ControlPlane;
use events::EventForwarder;
use loraforge_spec::manifest::{
    ParentVersion, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE,
};
use loraforge_spec::worker::{
    CompleteRequest, FailRequest, ParentArtifact, ReservedVersion, StageRequest, WorkerAssignment,
    TOKEN_ENV,
};
use loraforge_spec::{AdapterManifest, DeviceChoice, FileDigest, JobStatus};
use loraforge_storage::Store;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::Device;
use tokio::runtime::Runtime;
use uuid::Uuid;

/// Runs the job; whether it was published. A failure is reported to the control plane (as the
/// user's or the system's), except where there is nobody to report it to: the lease went to
/// another attempt, or the job was cancelled. The job's `training.device` decides where it
/// trains, unless `device_override` (the command line) does.
pub fn run_job(job_id: Uuid, api: &str, device_override: Option<DeviceChoice>) -> bool {
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
            return false;
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let lease_lost = Arc::new(AtomicBool::new(false));
    let heartbeat = runtime.spawn(heartbeat::send_heartbeats(
        control_plane.clone(),
        cancel.clone(),
        lease_lost.clone(),
        heartbeat::heartbeat_interval(),
    ));
    let result = execute(&runtime, &control_plane, device_override, &cancel);
    let published = match &result {
        Ok(version) => {
            tracing::info!(version, "published");
            true
        }
        // Another attempt owns the job now; it reports for it.
        Err(err) if lease_lost.load(Ordering::Relaxed) => {
            tracing::warn!("stopped: this attempt lost its lease to another ({err:#})");
            false
        }
        Err(err) if matches!(classify(err), Some(Failure::Cancelled)) => {
            tracing::info!("job cancelled; nothing published");
            false
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
            false
        }
    };
    heartbeat.abort();
    published
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
    let store = Store::create(&assignment.storage_url)?;
    let mut host = ControlPlaneHost {
        runtime,
        control_plane,
        checkpoints: StoredCheckpoints::new(runtime, store.clone(), assignment.job_id),
        store,
        events: EventForwarder::start(runtime, control_plane.clone()),
        assignment: &assignment,
        scratch: scratch.path(),
        reserved: None,
    };
    let job = Job {
        spec,
        device,
        runtime,
        scratch: scratch.path(),
        cancel,
    };
    pipeline::run(&job, &mut host)
}

/// The control plane as a job's [`Host`]: events go to its event stream, checkpoints and the
/// artifact to the job's object store, and the version is registered with it.
struct ControlPlaneHost<'a> {
    runtime: &'a Runtime,
    control_plane: &'a Arc<ControlPlane>,
    store: Store,
    checkpoints: StoredCheckpoints<'a>,
    events: EventForwarder,
    assignment: &'a WorkerAssignment,
    scratch: &'a Path,
    /// The version the artifact will be, once reserved.
    reserved: Option<ReservedVersion>,
}

impl ControlPlaneHost<'_> {
    fn post_stage(&self, status: JobStatus) -> Result<()> {
        self.runtime.block_on(
            self.control_plane
                .post::<_, ()>("stage", Some(&StageRequest { status })),
        )
    }
}

impl Host for ControlPlaneHost<'_> {
    type Published = i32;

    fn starting_point(&mut self, scratch: &Path) -> Result<StartingPoint> {
        let parent = match &self.assignment.parent {
            Some(artifact) => Some(fetch_parent(
                self.runtime,
                &self.store,
                artifact,
                &scratch.join("parent"),
            )?),
            None => None,
        };
        // A retried attempt continues from the newest checkpoint an earlier attempt completed.
        let resume = if self.assignment.attempt > 1 {
            self.checkpoints.latest()?
        } else {
            None
        };
        Ok(StartingPoint { parent, resume })
    }

    fn stage(&mut self, status: JobStatus) -> Result<()> {
        // Events reported before the stage change come before it in the job's event log (the
        // forwarder batches them), so followers see the last steps before "evaluating".
        if let Err(e) = crate::training::Reporter::flush(&mut self.events) {
            tracing::warn!("{e:#}");
        }
        self.post_stage(status)
    }

    fn training_sinks(&mut self) -> (Option<&mut dyn CheckpointStore>, &mut dyn Reporter) {
        (Some(&mut self.checkpoints), &mut self.events)
    }

    fn evaluates(&self) -> bool {
        self.assignment.safety.enabled
    }

    fn judge_additions(&self) -> crate::eval::safety::judge::JudgeAdditions {
        crate::eval::safety::judge::JudgeAdditions::of_policy(&self.assignment.safety)
    }

    fn baselines(&self) -> Option<Box<dyn crate::eval::safety::baseline::BaselineCache>> {
        Some(Box::new(baselines::StoredBaselines {
            store: self.store.clone(),
            runtime: self.runtime.handle().clone(),
        }))
    }

    fn events_done(&mut self) {
        self.runtime.block_on(self.events.finish());
    }

    fn destination(
        &mut self,
        inputs: &LocalInputs,
        device: Device,
    ) -> Result<(PathBuf, Provenance)> {
        let reserved: ReservedVersion = self
            .runtime
            .block_on(self.control_plane.post("versions", None::<&()>))?;
        let assignment = self.assignment;
        let provenance = Provenance {
            project: assignment.project.clone(),
            job_id: assignment.job_id,
            version: reserved.version,
            base_model: inputs.base_model.clone(),
            dataset: inputs.dataset_ref.clone(),
            parent: assignment.parent.as_ref().map(|p| ParentVersion {
                adapter_name: p.adapter_name.clone(),
                version: p.version,
            }),
            device: device_label(device),
            // Known once training ran: `pipeline::run` fills it in.
            replay: None,
        };
        self.reserved = Some(reserved);
        Ok((self.scratch.join("artifact"), provenance))
    }

    fn publish(
        &mut self,
        dir: &Path,
        _manifest: AdapterManifest,
        files: Vec<FileDigest>,
    ) -> Result<i32> {
        let reserved = self
            .reserved
            .take()
            .context("publishing before a version was reserved")?;
        self.runtime.block_on(async {
            // The manifest goes last: its presence says the other files are complete.
            let mut names: Vec<&str> = files
                .iter()
                .map(|f| f.name.as_str())
                .filter(|n| *n != MANIFEST_FILE)
                .collect();
            names.push(MANIFEST_FILE);
            for name in names {
                let bytes = tokio::fs::read(dir.join(name)).await?;
                self.store
                    .put(&format!("{}/{name}", reserved.prefix), bytes.into())
                    .await?;
            }
            anyhow::Ok(())
        })?;
        // The stored manifest is the one declaration of the version: its digest pins the rest.
        let manifest_sha256 = files
            .iter()
            .find(|f| f.name == MANIFEST_FILE)
            .map(|f| f.sha256.clone())
            .context("the artifact has no manifest")?;
        let complete = CompleteRequest {
            version: reserved.version,
            manifest_sha256,
        };
        self.runtime.block_on(
            self.control_plane
                .post::<_, ()>("complete", Some(&complete)),
        )?;
        // Published: the checkpoints have served. Any left behind are gc's to remove.
        if let Err(err) = self.checkpoints.delete_all() {
            tracing::warn!("could not delete the job's checkpoints: {err:#}");
        }
        Ok(reserved.version)
    }
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
