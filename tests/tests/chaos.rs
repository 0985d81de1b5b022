//! Chaos: many jobs through the local executor while the control plane and the
//! trainers are SIGKILLed at random moments. Afterwards every job is in exactly one
//! final state, no job published twice, no ready version lacks its files, gc leaves no
//! orphans, and every retried attempt resumed from its predecessor's newest checkpoint.
//!
//! Small in CI; larger by hand: `CHAOS_JOBS=40 CHAOS_KILLS=60 make test -- --test chaos`
//! (prints a one-line report either way; `CHAOS_SEED` replays a run).

mod common;

use common::{target_dir, Fixture};
use loraforge_storage::Store;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct ControlPlane {
    child: Option<Child>,
    envs: Vec<(String, String)>,
    log: std::path::PathBuf,
    base: String,
}

impl ControlPlane {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(target_dir().join("loraforge"))
            .arg("serve")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    async fn wait_ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "the control plane did not come up; see {}",
            self.log.display()
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pids of running `loraforge-trainer run` processes of this test's database's jobs.
fn trainer_pids(job_ids: &[String]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).into_owned();
        (cmdline.contains("loraforge-trainer")
            && job_ids.iter().any(|id| cmdline.contains(id.as_str())))
        .then_some(pid)
    })
    .collect()
}

#[tokio::test]
async fn jobs_survive_random_kills_of_control_plane_and_trainers() -> anyhow::Result<()> {
    let jobs_n = env_or("CHAOS_JOBS", 6) as usize;
    let kills_n = env_or("CHAOS_KILLS", 6);
    let seed = env_or("CHAOS_SEED", rand::random::<u32>() as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fixture = Fixture::create()?;
    let database_url = common::fresh_database().await?;
    let data_dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let store_url = format!("file://{}/store", data_dir.path().display());
    let mut cp = ControlPlane {
        child: None,
        envs: [
            ("DATABASE_URL", database_url.as_str()),
            ("LORAFORGE_ADDR", &format!("127.0.0.1:{port}")),
            ("LORAFORGE_DATA_DIR", &data_dir.path().display().to_string()),
            ("LORAFORGE_STORAGE_URL", &store_url),
            ("LORAFORGE_AUTH", "disabled"),
            (
                "LORAFORGE_FILE_ROOTS",
                &std::env::temp_dir().display().to_string(),
            ),
            ("LORAFORGE_LEASE_SECS", "3"),
            ("LORAFORGE_RETRY_BACKOFF_MS", "200"),
            ("LORAFORGE_MAX_ATTEMPTS", "25"),
            ("LORAFORGE_LOCAL_SLOTS", "2"),
            ("LORAFORGE_POLL_MS", "200"),
            ("LORAFORGE_HEARTBEAT_SECS", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        log: data_dir.path().join("control-plane.log"),
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    cp.start()?;
    cp.wait_ready(&client).await?;

    let mut ids = Vec::new();
    for i in 0..jobs_n {
        let mut job = fixture.job(&format!("chaos-{}", i % 3));
        job["training"]["max_steps"] = json!(40);
        job["training"]["checkpoint_every"] = json!(5);
        job["training"]["seed"] = json!(i);
        let created: Value = client
            .post(format!("{}/v1/jobs", cp.base))
            .json(&job)
            .send()
            .await?
            .json()
            .await?;
        ids.push(created["id"].as_str().expect("job id").to_string());
    }

    // Chaos: kill something every 0.5-2.5 s until the kill budget is spent.
    let (mut cp_kills, mut trainer_kills) = (0u64, 0u64);
    while cp_kills + trainer_kills < kills_n {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        if rng.random_bool(0.4) {
            cp.kill();
            cp_kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            cp.start()?;
            cp.wait_ready(&client).await?;
        } else {
            let pids = trainer_pids(&ids);
            if pids.is_empty() {
                continue;
            }
            let pid = pids[rng.random_range(0..pids.len())];
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()?;
            trainer_kills += 1;
        }
    }

    // Calm: everything must settle by itself.
    let start = Instant::now();
    let mut finals: BTreeMap<String, Value> = BTreeMap::new();
    while finals.len() < ids.len() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "jobs still unfinished: {:?}",
            ids.iter()
                .filter(|i| !finals.contains_key(*i))
                .collect::<Vec<_>>()
        );
        for id in &ids {
            if finals.contains_key(id) {
                continue;
            }
            if let Ok(r) = client.get(format!("{}/v1/jobs/{id}", cp.base)).send().await {
                let job: Value = r.json().await?;
                if ["succeeded", "failed", "cancelled"]
                    .contains(&job["status"].as_str().unwrap_or(""))
                {
                    finals.insert(id.clone(), job);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let pool = sqlx::PgPool::connect(&database_url).await?;
    let store = Store::open(&store_url)?;
    let mut outcome: BTreeMap<String, usize> = BTreeMap::new();
    let mut resumed_jobs = 0;
    for (id, job) in &finals {
        *outcome
            .entry(job["status"].as_str().unwrap().to_string())
            .or_default() += 1;
        assert_eq!(
            job["status"], "succeeded",
            "no user errors here, and attempts were plenty: {job}"
        );
        // Exactly one ready version per succeeded job.
        let ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM adapter_versions WHERE job_id = $1::uuid AND status = 'ready'",
        )
        .bind(id)
        .fetch_one(&pool)
        .await?;
        assert_eq!(ready, 1, "job {id} has {ready} ready versions");
        // Resumes come from the newest complete checkpoint, and the attempt that finished
        // resumed if any earlier attempt had saved a checkpoint before it was scheduled. A
        // checkpoint is announced just before its completing write (training/checkpoint.rs), so
        // the newest one announced may be incomplete when its trainer was killed in between:
        // the one before it (complete, since a trainer announces the next only after that) is
        // then the newest a retry can use.
        let events = events_of(&client, &cp.base, id).await?;
        let (mut newest_saved, mut before_newest): (Option<u64>, Option<u64>) = (None, None);
        let mut saved_before_last_attempt = false;
        let mut last_attempt_resumed = false;
        for e in &events {
            match (e["kind"].as_str(), e["resumed"].as_bool()) {
                (Some("checkpoint"), Some(false)) if e["step"].as_u64() > newest_saved => {
                    before_newest = newest_saved;
                    newest_saved = e["step"].as_u64();
                }
                (Some("checkpoint"), Some(true)) => {
                    assert!(
                        e["step"].as_u64() == newest_saved || e["step"].as_u64() == before_newest,
                        "job {id} resumed from an older checkpoint than the newest complete \
                         one (newest announced {newest_saved:?}, the one before \
                         {before_newest:?}): {e}"
                    );
                    last_attempt_resumed = true;
                }
                _ if e["kind"] == "status" && e["status"] == "scheduled" => {
                    // Two announced: at least the older one is complete.
                    saved_before_last_attempt = before_newest.is_some();
                    last_attempt_resumed = false;
                }
                _ => {}
            }
        }
        if saved_before_last_attempt {
            assert!(
                last_attempt_resumed,
                "job {id}: the final attempt started over despite a checkpoint"
            );
            resumed_jobs += 1;
        }
    }
    // Every ready version's files are in the store with the registry's digests.
    let files: Vec<(String, sqlx::types::Json<Vec<loraforge_spec::FileDigest>>)> =
        sqlx::query_as("SELECT storage_prefix, files FROM adapter_versions WHERE status = 'ready'")
            .fetch_all(&pool)
            .await?;
    assert_eq!(files.len(), ids.len());
    for (prefix, digests) in &files {
        for f in digests.0.iter() {
            let bytes = store.get(&format!("{prefix}/{}", f.name)).await?;
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                f.sha256,
                "{prefix}/{}",
                f.name
            );
        }
    }
    // gc removes whatever the kills left behind, and then finds nothing more.
    let swept = loraforge::registry::gc::collect(&pool, &store, Duration::ZERO, false).await?;
    let after = loraforge::registry::gc::collect(&pool, &store, Duration::ZERO, true).await?;
    assert!(after.orphans.is_empty(), "{:?}", after.orphans);
    for (prefix, digests) in &files {
        assert_eq!(
            store.list(prefix).await?.len(),
            digests.0.len(),
            "gc must not touch ready versions"
        );
    }
    println!(
        "chaos report: seed={seed} jobs={} kills={{control_plane: {cp_kills}, trainer: {trainer_kills}}} outcome={outcome:?} \
         resumed_from_checkpoint={resumed_jobs} gc_swept={}",
        ids.len(),
        swept.orphans.len()
    );
    Ok(())
}

async fn events_of(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = client
            .get(format!(
                "{base}/v1/jobs/{id}/events?after={after}&limit=1000"
            ))
            .send()
            .await?
            .json()
            .await?;
        out.extend(page["events"].as_array().cloned().unwrap_or_default());
        match page["next_after"].as_i64() {
            Some(n) => after = n,
            None => return Ok(out),
        }
    }
}

impl ControlPlane {
    /// A control plane process on a fresh database and data dir (kept in `data_dir`), with
    /// the local executor, dev auth, fast polling and `settings` on top; started and ready.
    async fn started(
        data_dir: &tempfile::TempDir,
        client: &reqwest::Client,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<ControlPlane> {
        let database_url = common::fresh_database().await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let base = [
            ("DATABASE_URL", database_url.as_str()),
            ("LORAFORGE_ADDR", &format!("127.0.0.1:{port}")),
            ("LORAFORGE_DATA_DIR", &data_dir.path().display().to_string()),
            ("LORAFORGE_AUTH", "disabled"),
            (
                "LORAFORGE_FILE_ROOTS",
                &std::env::temp_dir().display().to_string(),
            ),
            ("LORAFORGE_HEARTBEAT_SECS", "1"),
            ("LORAFORGE_POLL_MS", "200"),
        ]
        .iter()
        .chain(settings)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut cp = ControlPlane {
            child: None,
            envs: base,
            log: data_dir.path().join("control-plane.log"),
            base: format!("http://127.0.0.1:{port}"),
        };
        cp.start()?;
        cp.wait_ready(client).await?;
        Ok(cp)
    }
}

/// The status of a job, or `None` while the control plane does not answer.
async fn status_of(client: &reqwest::Client, base: &str, id: &str) -> Option<Value> {
    let r = client
        .get(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// A control plane that is SIGKILLed and back within two seconds costs a job nothing: its
/// worker retries every call (stage, events, heartbeats, the version reservation and the
/// completion) until the control plane answers again, within the lease. Killed once while
/// the job trains and once when it reaches evaluation (just before it publishes), the job
/// still succeeds on its first attempt.
#[tokio::test]
async fn a_short_outage_of_the_control_plane_costs_no_attempt() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let data_dir = tempfile::tempdir()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut cp =
        ControlPlane::started(&data_dir, &client, &[("LORAFORGE_LEASE_SECS", "20")]).await?;
    let mut job = fixture.job("outage");
    job["training"]["max_steps"] = json!(300);
    let created: Value = client
        .post(format!("{}/v1/jobs", cp.base))
        .json(&job)
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"].as_str().expect("job id").to_string();

    // Each outage starts when the job first shows the stage, and lasts two seconds.
    for stage in ["running", "evaluating"] {
        let start = Instant::now();
        loop {
            let job = status_of(&client, &cp.base, &id).await;
            let status = job
                .as_ref()
                .and_then(|j| j["status"].as_str())
                .unwrap_or("");
            if status == stage {
                break;
            }
            assert!(
                !["succeeded", "failed", "cancelled"].contains(&status),
                "the job ended before its {stage} outage: {job:?}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "never {stage}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stage == "running" {
            // Let it train a little first.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        cp.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cp.start()?;
        cp.wait_ready(&client).await?;
    }

    let start = Instant::now();
    let done = loop {
        if let Some(job) = status_of(&client, &cp.base, &id).await {
            if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
            {
                break job;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the job never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (done["status"].as_str(), done["attempt"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{done}"
    );
    Ok(())
}

/// Workers outlive a SIGKILLed control plane; the restarted one adopts them, so the slot
/// count holds: with one slot, a second job waits while the first one's worker (started by
/// the killed control plane) still runs, and cancelling the first stops the adopted worker.
#[tokio::test]
async fn a_restarted_control_plane_adopts_its_workers_and_keeps_the_slot_count(
) -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let data_dir = tempfile::tempdir()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut cp = ControlPlane::started(
        &data_dir,
        &client,
        &[
            ("LORAFORGE_LOCAL_SLOTS", "1"),
            ("LORAFORGE_LEASE_SECS", "30"),
        ],
    )
    .await?;
    let base = cp.base.clone();
    let submit = |name: &str, steps: u64| {
        let mut job = fixture.job(name);
        job["training"]["max_steps"] = json!(steps);
        let (client, base) = (client.clone(), base.clone());
        async move {
            let created: Value = client
                .post(format!("{base}/v1/jobs"))
                .json(&job)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(created["id"].as_str().expect("job id").to_string())
        }
    };
    let long = submit("long", 1_000_000).await?;
    let start = Instant::now();
    while status_of(&client, &cp.base, &long)
        .await
        .and_then(|j| j["status"].as_str().map(String::from))
        .as_deref()
        != Some("running")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the long job never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cp.kill();
    cp.start()?;
    cp.wait_ready(&client).await?;
    let short = submit("short", 20).await?;

    // For a few seconds: the adopted worker holds the one slot, so the short job waits.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(4) {
        let ids = [long.clone(), short.clone()];
        assert!(
            trainer_pids(&ids).len() <= 1,
            "two workers ran with one slot"
        );
        let job = status_of(&client, &cp.base, &short)
            .await
            .expect("the short job");
        assert_eq!(job["status"], "queued", "{job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        trainer_pids(std::slice::from_ref(&long)).len(),
        1,
        "the long job's worker survived the kill"
    );

    // Cancelling the long job stops the adopted worker; then the short one runs.
    client
        .post(format!("{}/v1/jobs/{long}/cancel", cp.base))
        .send()
        .await?;
    let start = Instant::now();
    let (long_done, short_done) = loop {
        let l = status_of(&client, &cp.base, &long)
            .await
            .unwrap_or_default();
        let s = status_of(&client, &cp.base, &short)
            .await
            .unwrap_or_default();
        let finished = |j: &Value| {
            ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
        };
        if finished(&l) && finished(&s) {
            break (l, s);
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{l} {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(long_done["status"], "cancelled", "{long_done}");
    assert_eq!(short_done["status"], "succeeded", "{short_done}");
    assert!(trainer_pids(&[long]).is_empty());
    Ok(())
}
