//! A Kubernetes API server for the kubernetes executor's tests, and the test playing what
//! the cluster would do with the Jobs the executor makes: the Job controller (a Pod from
//! the Job's template), the scheduler and the kubelet (status, running the worker with the
//! Pod's command and environment, its log).
//!
//! By default the API server is `tests/python/fake_kube.py` (kmock). With
//! `LORAFORGE_TEST_KUBECONFIG` set, the same tests run against that real cluster instead
//! (its own Job controller makes the Pods; docs/kubernetes.md records such a run).
#![allow(dead_code)]

use crate::common::{python, trainer_bin};
use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "loraforge";

pub struct Cluster {
    fake: Option<Child>,
    pub client: kube::Client,
    pub logs: tempfile::TempDir,
    /// A real API server: its Job controller makes Pods and finishes Jobs.
    pub real: bool,
}

impl Cluster {
    /// Starts the fake (or uses the real cluster) and points `KUBECONFIG` at it, so the
    /// control plane finds it the usual way.
    pub async fn start() -> Result<Cluster> {
        let logs = tempfile::tempdir()?;
        if let Some(real) = std::env::var_os("LORAFORGE_TEST_KUBECONFIG") {
            // SAFETY (edition 2021: safe fn): each test runs in its own process under
            // nextest, and this runs before the app starts any thread that reads it.
            std::env::set_var("KUBECONFIG", &real);
            let client = kube::Client::try_default().await?;
            return Ok(Cluster {
                fake: None,
                client,
                logs,
                real: true,
            });
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fake_kube.py");
        let mut fake = Command::new(python())
            .arg(&script)
            .arg(logs.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting tests/python/fake_kube.py")?;
        let stdout = fake.stdout.take().context("fake_kube stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("fake_kube.py said {line:?}"))?;
        let kubeconfig = logs.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NAMESPACE}\n\
                 current-context: fake\n"
            ),
        )?;
        std::env::set_var("KUBECONFIG", &kubeconfig);
        let client = kube::Client::try_default().await?;
        Ok(Cluster {
            fake: Some(fake),
            client,
            logs,
            real: false,
        })
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }
    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// Waits for the Job of one attempt of a job.
    pub async fn job_of(&self, job_id: &str, attempt: i32) -> Result<Job> {
        let name = format!("lf-{job_id}-{attempt}");
        let start = Instant::now();
        loop {
            if let Some(job) = self.jobs().get_opt(&name).await? {
                return Ok(job);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("no Job {name} after a minute");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until an object is gone.
    pub async fn gone<K>(&self, api: &Api<K>, name: &str) -> Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let start = Instant::now();
        while api.get_opt(name).await?.is_some() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{name} still exists after a minute");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The Job's Pod: made from its template here (the Job controller's part), or on a
    /// real cluster found once its controller made it.
    pub async fn pod_of(&self, job: &Job) -> Result<Pod> {
        let name = job.name_any();
        if self.real {
            let start = Instant::now();
            loop {
                let pods = self
                    .pods()
                    .list(&ListParams::default().labels(&format!("job-name={name}")))
                    .await?;
                if let Some(pod) = pods.items.into_iter().next() {
                    return Ok(pod);
                }
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("the Job controller made no Pod for {name}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let template = serde_json::to_value(&job.spec.as_ref().context("job spec")?.template)?;
        let mut labels = template["metadata"]["labels"].clone();
        labels["job-name"] = json!(name);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("{name}-pod"), "namespace": NAMESPACE, "labels": labels,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                    "uid": job.metadata.uid.clone().unwrap_or_default(), "controller": true}],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }))?;
        Ok(self.pods().create(&PostParams::default(), &pod).await?)
    }

    /// Sets a Pod's status as the scheduler or kubelet would.
    pub async fn set_pod_status(&self, pod: &Pod, status: Value) -> Result<()> {
        self.pods()
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await?;
        Ok(())
    }

    /// Finishes a Job as its controller would once its Pod ended (a real one does it itself).
    /// The control plane may have settled the attempt from the Pod alone and deleted the Job
    /// already: a Job that is gone needs no finishing.
    pub async fn finish_job(&self, job: &Job, condition: &str, reason: &str) -> Result<()> {
        if self.real {
            return Ok(());
        }
        let status = json!({"status": {"conditions": [{"type": condition, "status": "True", "reason": reason}]}});
        let patched = self
            .jobs()
            .patch_status(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await;
        match patched {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other.map(drop).map_err(Into::into),
        }
    }

    /// Starts the worker the way the kubelet would: the Pod's command (its
    /// `loraforge-trainer` is the one built here) and environment, each `secretKeyRef`
    /// read from its Secret; output to the Pod's log.
    pub async fn start_worker(&self, pod: &Pod) -> Result<Child> {
        let container = &pod.spec.as_ref().context("pod spec")?.containers[0];
        let command = container.command.clone().context("worker command")?;
        assert_eq!(command[0], "loraforge-trainer");
        let mut worker = Command::new(trainer_bin());
        worker.args(&command[1..]).env_remove("DATABASE_URL");
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let key = from.secret_key_ref.as_ref().context("only secretKeyRef")?;
                    self.secret_value(&key.name, &key.key).await?
                }
                (None, None) => String::new(),
            };
            worker.env(&var.name, value);
        }
        // The Pod's scratch volume: a directory of this test.
        let scratch = self.logs.path().join(format!("{}-scratch", pod.name_any()));
        std::fs::create_dir_all(&scratch)?;
        worker.env("TMPDIR", &scratch).env("HOME", &scratch);
        let log = std::fs::File::create(self.log_path(pod))?;
        worker
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the worker")
    }

    pub fn log_path(&self, pod: &Pod) -> PathBuf {
        self.logs.path().join(format!("{}.log", pod.name_any()))
    }

    pub async fn secret_value(&self, name: &str, key: &str) -> Result<String> {
        let secret = self.secrets().get(name).await?;
        if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
            return Ok(v.clone());
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .with_context(|| format!("secret {name} has no {key}"))?;
        Ok(String::from_utf8(bytes.0.clone())?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(fake) = &mut self.fake {
            let _ = fake.kill();
            let _ = fake.wait();
        }
    }
}

/// A container status as the kubelet writes it.
pub fn container(state: Value) -> Value {
    json!([{"name": "worker", "image": "loraforge-worker:test", "imageID": "", "ready": false,
        "restartCount": 0, "state": state}])
}
