//! Configuration, read once at start from the environment (`LORAFORGE_*`, `DATABASE_URL`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    /// Address to listen on; port 0 picks a free port (tests).
    pub addr: SocketAddr,
    /// Root of the artifact store (`file:///abs/dir`, `s3://bucket/prefix`, …).
    pub storage_url: String,
    /// Local state: worker logs, the default file store.
    pub data_dir: PathBuf,
    /// URL workers use to reach this control plane; defaults to the bound address.
    pub public_url: Option<String>,
    pub executor: ExecutorSettings,
    /// How long a worker holds a job without a heartbeat before it is requeued.
    pub lease: Duration,
    /// The scheduler looks for work at least this often (NOTIFY wakes it sooner).
    pub poll_interval: Duration,
    /// Attempts a job gets before a system error becomes final.
    pub max_attempts: i32,
    /// Delay before the second attempt; doubles for each further one.
    pub retry_backoff: Duration,
    /// First retry delay of a failed webhook delivery; doubles with each attempt.
    pub webhook_backoff: Duration,
    /// API keys required (the default). Off only by `LORAFORGE_AUTH=disabled`, for local
    /// development: then every request acts as an admin of `default_project`.
    pub auth_enabled: bool,
    /// The project of every request when auth is disabled.
    pub default_project: String,
    /// `file://` inputs must lie under one of these directories (`LORAFORGE_FILE_ROOTS`,
    /// colon-separated; default: `inputs/` in the data directory, created at start).
    pub file_roots: Vec<PathBuf>,
    /// How often the executor's workers are reconciled with the jobs table (stale workers
    /// removed, vanished ones failed).
    pub reconcile_interval: Duration,
    /// A request's headers must arrive within this, or its connection is closed.
    pub header_timeout: Duration,
    /// A request must be answered within this (a streamed answer: must start).
    pub request_timeout: Duration,
    /// Most connections open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// The LoraJob operator, when `LORAFORGE_OPERATOR=enabled`.
    pub operator: Option<crate::operator::OperatorSettings>,
    /// Largest dataset upload accepted (`LORAFORGE_MAX_UPLOAD_BYTES`, default 1 GiB): a
    /// bigger one is refused (413) while it streams, and nothing of it is kept.
    pub max_upload_bytes: u64,
    /// The built web UI (`index.html` and `assets/`), served at `/`; `None` serves none.
    /// `LORAFORGE_WEB_DIR`; default: this checkout's `web/dist` (`npm run build` in `web/`).
    pub web_dir: Option<PathBuf>,
}

/// `LORAFORGE_MAX_UPLOAD_BYTES` when unset: 1 GiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1024 * 1024 * 1024;

/// Where `npm run build` puts the UI in the checkout this binary was built from.
pub const CHECKOUT_WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/dist");

#[derive(Debug, Clone)]
pub enum ExecutorSettings {
    /// Child processes on this machine.
    Local { trainer_bin: PathBuf, slots: usize },
    /// One Kubernetes Job per attempt (`LORAFORGE_EXECUTOR=kubernetes`).
    Kubernetes(KubernetesSettings),
}

/// The `kubernetes` executor's settings (`LORAFORGE_K8S_*`, `LORAFORGE_WORKER_IMAGE`). The
/// cluster itself is found the usual way: the in-cluster service account, else
/// `KUBECONFIG` or `~/.kube/config`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesSettings {
    /// Where worker Jobs go; default: the client's namespace (the service account's, or the
    /// kubeconfig context's).
    pub namespace: Option<String>,
    /// The worker image: `loraforge-trainer` on its PATH (see `docker/`).
    pub worker_image: String,
    /// A Kueue LocalQueue for every job (`resources.queue` overrides it per job).
    pub queue: Option<String>,
    /// The node label `resources.gpu_type` is matched against.
    pub gpu_label: String,
    /// A Secret with the store's credentials, given to workers with `envFrom`.
    pub storage_secret: Option<String>,
    /// A PersistentVolumeClaim mounted read-only in workers at the same path the control
    /// plane sees it: `file://` inputs under that path are allowed on this executor.
    pub shared_volume: Option<SharedVolume>,
    /// Most worker Jobs active at once (all replicas together, as the cluster shows them).
    pub max_workers: usize,
    /// The worker Pods' service account (for workload identity); none mounted when unset.
    pub worker_service_account: Option<String>,
    /// A Secret for pulling the worker image.
    pub image_pull_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SharedVolume {
    pub claim: String,
    pub mount_path: PathBuf,
}

/// Where `file://` inputs may be read from: under one of `roots`, and never under
/// `forbidden`, whatever the roots say: the artifact store (every project's adapters) and
/// the worker logs are not inputs.
#[derive(Debug, Clone, Default)]
pub struct FileInputs {
    pub roots: Vec<PathBuf>,
    pub forbidden: Vec<PathBuf>,
}

impl Settings {
    pub fn file_inputs(&self) -> FileInputs {
        let mut forbidden = vec![self.data_dir.join("logs")];
        if let Some(store) = self.storage_url.strip_prefix("file://") {
            forbidden.push(PathBuf::from(store));
        }
        FileInputs {
            roots: self.file_roots.clone(),
            forbidden,
        }
    }
}

impl ExecutorSettings {
    pub fn name(&self) -> &'static str {
        match self {
            ExecutorSettings::Local { .. } => "local",
            ExecutorSettings::Kubernetes(_) => "kubernetes",
        }
    }

    /// Why this executor cannot use an input at `uri`, if it cannot: a worker in a cluster
    /// cannot read the control plane's disk, only object storage and a shared volume.
    pub fn refuses_input(&self, uri: &str) -> Option<String> {
        let ExecutorSettings::Kubernetes(k) = self else {
            return None;
        };
        let path = uri.strip_prefix("file://")?;
        match &k.shared_volume {
            Some(v) if std::path::Path::new(path).starts_with(&v.mount_path) => None,
            Some(v) => Some(format!(
                "{uri}: workers on the kubernetes executor read files only under the shared volume {} (LORAFORGE_K8S_SHARED_VOLUME); use an object store URI (s3://, gs://, az://) or a path there",
                v.mount_path.display()
            )),
            None => Some(format!(
                "{uri}: workers on the kubernetes executor cannot read the control plane's files; use an object store URI (s3://, gs://, az://), or set LORAFORGE_K8S_SHARED_VOLUME to a volume workers mount"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct SettingsError {
    pub name: &'static str,
    pub reason: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, SettingsError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        Some(v) => v.parse().map_err(|e: T::Err| SettingsError {
            name,
            reason: format!("{v:?}: {e}"),
        }),
        None => Ok(default),
    }
}

impl Settings {
    pub fn from_env() -> Result<Settings, SettingsError> {
        let data_dir = match var("LORAFORGE_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_dir()
                .map_err(|e| SettingsError {
                    name: "LORAFORGE_DATA_DIR",
                    reason: e.to_string(),
                })?
                .join(".data"),
        };
        let storage_url = var("LORAFORGE_STORAGE_URL")
            .unwrap_or_else(|| format!("file://{}/store", data_dir.display()));
        let trainer_bin = match var("LORAFORGE_TRAINER_BIN") {
            Some(p) => PathBuf::from(p),
            None => default_trainer_bin(),
        };
        let file_roots = match var("LORAFORGE_FILE_ROOTS") {
            Some(roots) => std::env::split_paths(&roots).collect(),
            None => vec![data_dir.join("inputs")],
        };
        Ok(Settings {
            database_url: var("DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/loraforge".into()),
            addr: parse("LORAFORGE_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            storage_url,
            data_dir,
            public_url: var("LORAFORGE_PUBLIC_URL"),
            executor: match var("LORAFORGE_EXECUTOR").as_deref() {
                None | Some("local") => ExecutorSettings::Local {
                    trainer_bin,
                    slots: parse("LORAFORGE_LOCAL_SLOTS", 1usize)?,
                },
                Some("kubernetes") => ExecutorSettings::Kubernetes(kubernetes_from_env()?),
                Some(other) => {
                    return Err(SettingsError {
                        name: "LORAFORGE_EXECUTOR",
                        reason: format!("{other:?}: use local or kubernetes"),
                    })
                }
            },
            lease: Duration::from_secs(parse("LORAFORGE_LEASE_SECS", 60u64)?),
            poll_interval: Duration::from_millis(parse("LORAFORGE_POLL_MS", 1000u64)?),
            max_attempts: parse("LORAFORGE_MAX_ATTEMPTS", 3i32)?,
            retry_backoff: Duration::from_millis(parse("LORAFORGE_RETRY_BACKOFF_MS", 10_000u64)?),
            webhook_backoff: Duration::from_millis(parse("LORAFORGE_WEBHOOK_BACKOFF_MS", 2000u64)?),
            auth_enabled: match var("LORAFORGE_AUTH").as_deref() {
                None | Some("enabled") => true,
                Some("disabled") => false,
                Some(other) => {
                    return Err(SettingsError {
                        name: "LORAFORGE_AUTH",
                        reason: format!("{other:?}: use enabled or disabled"),
                    })
                }
            },
            default_project: "default".into(),
            file_roots,
            reconcile_interval: Duration::from_secs(parse("LORAFORGE_RECONCILE_SECS", 120u64)?),
            header_timeout: Duration::from_secs(parse("LORAFORGE_HEADER_TIMEOUT_SECS", 10u64)?),
            request_timeout: Duration::from_secs(parse("LORAFORGE_REQUEST_TIMEOUT_SECS", 300u64)?),
            max_connections: parse("LORAFORGE_MAX_CONNECTIONS", 1024usize)?,
            operator: operator_from_env()?,
            max_upload_bytes: parse("LORAFORGE_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)?,
            web_dir: Some(
                var("LORAFORGE_WEB_DIR").map_or_else(|| CHECKOUT_WEB_DIR.into(), PathBuf::from),
            ),
        })
    }
}

fn operator_from_env() -> Result<Option<crate::operator::OperatorSettings>, SettingsError> {
    use loraforge_spec::resources::dns_label;
    match var("LORAFORGE_OPERATOR").as_deref() {
        None | Some("disabled") => return Ok(None),
        Some("enabled") => {}
        Some(other) => {
            return Err(SettingsError {
                name: "LORAFORGE_OPERATOR",
                reason: format!("{other:?}: use enabled or disabled"),
            })
        }
    }
    let namespace = var("LORAFORGE_OPERATOR_NAMESPACE")
        .map(|n| dns_label(&n).map(|()| n))
        .transpose()
        .map_err(|reason| SettingsError {
            name: "LORAFORGE_OPERATOR_NAMESPACE",
            reason,
        })?;
    let mut projects = std::collections::HashMap::new();
    for pair in var("LORAFORGE_OPERATOR_PROJECTS")
        .iter()
        .flat_map(|v| v.split(','))
    {
        let (ns, project) = pair.split_once('=').ok_or_else(|| SettingsError {
            name: "LORAFORGE_OPERATOR_PROJECTS",
            reason: format!("{pair:?}: expected namespace=project, comma-separated"),
        })?;
        projects.insert(ns.trim().to_string(), project.trim().to_string());
    }
    Ok(Some(crate::operator::OperatorSettings {
        namespace,
        projects,
    }))
}

fn kubernetes_from_env() -> Result<KubernetesSettings, SettingsError> {
    use loraforge_spec::resources::{dns_label, dns_subdomain, qualified_name};
    let checked = |name: &'static str, check: fn(&str) -> Result<(), String>| {
        var(name)
            .map(|v| check(&v).map(|()| v))
            .transpose()
            .map_err(|reason| SettingsError { name, reason })
    };
    let worker_image = var("LORAFORGE_WORKER_IMAGE").ok_or(SettingsError {
        name: "LORAFORGE_WORKER_IMAGE",
        reason: "required with LORAFORGE_EXECUTOR=kubernetes: the image with loraforge-trainer (see docker/)".into(),
    })?;
    let shared_volume = match var("LORAFORGE_K8S_SHARED_VOLUME") {
        None => None,
        Some(v) => {
            let bad = |reason: String| SettingsError {
                name: "LORAFORGE_K8S_SHARED_VOLUME",
                reason,
            };
            let (claim, path) = v.split_once(':').ok_or_else(|| {
                bad(format!(
                    "{v:?}: expected <claim-name>:<absolute mount path>"
                ))
            })?;
            dns_subdomain(claim).map_err(bad)?;
            if !path.starts_with('/') {
                return Err(bad(format!("{path:?}: the mount path must be absolute")));
            }
            Some(SharedVolume {
                claim: claim.into(),
                mount_path: PathBuf::from(path),
            })
        }
    };
    Ok(KubernetesSettings {
        namespace: checked("LORAFORGE_K8S_NAMESPACE", dns_label)?,
        worker_image,
        queue: checked("LORAFORGE_K8S_QUEUE", dns_label)?,
        gpu_label: checked("LORAFORGE_K8S_GPU_LABEL", qualified_name)?
            .unwrap_or_else(|| "nvidia.com/gpu.product".into()),
        storage_secret: checked("LORAFORGE_K8S_STORAGE_SECRET", dns_subdomain)?,
        shared_volume,
        max_workers: parse("LORAFORGE_K8S_MAX_WORKERS", 32usize)?,
        worker_service_account: checked("LORAFORGE_K8S_WORKER_SERVICE_ACCOUNT", dns_subdomain)?,
        image_pull_secret: checked("LORAFORGE_K8S_IMAGE_PULL_SECRET", dns_subdomain)?,
    })
}

/// `loraforge-trainer` beside our own executable (how cargo and the release image lay
/// them out), else whatever `PATH` finds.
fn default_trainer_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("loraforge-trainer")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("loraforge-trainer"))
}
