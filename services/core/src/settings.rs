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
    /// colon-separated; default: the data directory).
    pub file_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum ExecutorSettings {
    /// Child processes on this machine.
    Local { trainer_bin: PathBuf, slots: usize },
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
            None => vec![data_dir.clone()],
        };
        Ok(Settings {
            database_url: var("DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/loraforge".into()),
            addr: parse("LORAFORGE_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            storage_url,
            data_dir,
            public_url: var("LORAFORGE_PUBLIC_URL"),
            executor: ExecutorSettings::Local {
                trainer_bin,
                slots: parse("LORAFORGE_LOCAL_SLOTS", 1usize)?,
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
        })
    }
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
