//! Load benchmark of the registry's read path: `resolve` and `versions/{v}` against a
//! registry of 100,000 versions, at 16 and 64 concurrent connections, next to the raw
//! Postgres rate of the same primary-key lookup (pgbench) measured in the same run.
//!
//! Run: `make bench-registry` (= `cargo bench -p loraforge-e2e --bench registry_load`
//! with the environment of .ci/env.sh). Results: bench/registry.md.
//! Knobs: BENCH_SECONDS (per measurement, default 10), BENCH_VERSIONS (default 100000).
//! The registry's read cache is warmed first (one read of every answer), so the rows measure
//! the steady state of engines that re-resolve; the cache-hit column says what it served.

use loraforge::settings::ExecutorSettings;
use loraforge::{Application, Settings};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADAPTERS: i64 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let versions: i64 = std::env::var("BENCH_VERSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let per_adapter = versions / ADAPTERS;
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let server = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(s, _)| s)
        .to_string();
    let db_name = format!("loraforge_bench_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    let database_url = format!("{server}/{db_name}");
    let data_dir = tempfile::tempdir()?;
    let settings = Settings {
        database_url: database_url.clone(),
        addr: "127.0.0.1:0".parse()?,
        storage_url: format!("file://{}/store", data_dir.path().display()),
        data_dir: data_dir.path().to_path_buf(),
        public_url: None,
        executor: ExecutorSettings::Local {
            trainer_bin: "loraforge-trainer".into(),
            slots: 0,
        },
        lease: Duration::from_secs(60),
        poll_interval: Duration::from_secs(1),
        max_attempts: 3,
        retry_backoff: Duration::from_secs(1),
        webhook_backoff: Duration::from_secs(1),
        auth_enabled: false,
        default_project: "default".into(),
        file_roots: vec![],
        reconcile_interval: Duration::from_secs(120),
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(300),
        max_connections: 4096,
        operator: None,
        max_upload_bytes: loraforge::settings::DEFAULT_MAX_UPLOAD_BYTES,
        web_dir: None,
    };
    let app = Application::build(settings).await?;
    let addr = app.local_addr();
    let pool = app.context().pool.clone();
    populate(&pool, per_adapter).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(app.run_until(async move {
        let _ = stop_rx.await;
    }));

    // Serving engines re-read the same answers; the timed rows measure that steady state, so
    // every answer is read once first (the hit-ratio column shows what the cache served).
    let warm = warm_up(addr, per_adapter).await?;
    println!("registry of {} versions ({ADAPTERS} adapters x {per_adapter}); {seconds} s per row; {} cores", ADAPTERS * per_adapter, num_cpus());
    println!("warm-up: every answer read once ({warm:.0} requests/s, all from Postgres)");
    println!();
    println!("| target | connections | requests/s | p50 ms | p99 ms | cache hits | raw Postgres tps (pgbench) | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for connections in [16usize, 64] {
        let raw = pgbench(&database_url, connections, seconds, per_adapter)?;
        for (label, path) in [
            ("resolve?ref=latest", "resolve" as &str),
            ("versions/{v}", "version"),
        ] {
            let url_of = move |a: i64, v: i64| match path {
                "resolve" => format!("http://{addr}/v1/adapters/bench-{a}/resolve?ref=latest"),
                _ => format!("http://{addr}/v1/adapters/bench-{a}/versions/{v}"),
            };
            let hits_before = cache_counts(addr).await?;
            let (rps, p50, p99) = load(
                connections,
                Duration::from_secs(seconds),
                per_adapter,
                url_of,
            )
            .await?;
            let hits_after = cache_counts(addr).await?;
            let (hits, misses) = (hits_after.0 - hits_before.0, hits_after.1 - hits_before.1);
            let hit_ratio = hits as f64 / (hits + misses).max(1) as f64;
            println!(
                "| {label} | {connections} | {rps:.0} | {p50:.2} | {p99:.2} | {:.1}% | {raw:.0} | {:.2} |",
                hit_ratio * 100.0,
                rps / raw
            );
        }
    }
    let _ = stop_tx.send(());
    server_task.await??;
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    Ok(())
}

/// Reads every adapter's `latest` and every version once, 16 at a time; returns requests/s.
async fn warm_up(addr: std::net::SocketAddr, per_adapter: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut done = 0u64;
            for a in (worker..ADAPTERS).step_by(16) {
                let mut urls = vec![format!(
                    "http://{addr}/v1/adapters/bench-{a}/resolve?ref=latest"
                )];
                urls.extend(
                    (1..=per_adapter)
                        .map(|v| format!("http://{addr}/v1/adapters/bench-{a}/versions/{v}")),
                );
                for url in urls {
                    let r = client.get(&url).send().await?;
                    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
                    let _ = r.bytes().await?;
                    done += 1;
                }
            }
            Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The control plane's registry cache (hits, misses) from `/metrics`.
async fn cache_counts(addr: std::net::SocketAddr) -> anyhow::Result<(u64, u64)> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let count = |result: &str| -> anyhow::Result<u64> {
        let prefix = format!("loraforge_registry_cache_requests_total{{result=\"{result}\"}} ");
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .ok_or_else(|| anyhow::anyhow!("no {prefix} in /metrics"))?;
        Ok(line.trim().parse()?)
    };
    Ok((count("hit")?, count("miss")?))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// 1000 adapters with `per_adapter` ready versions each, all made by one job row.
async fn populate(pool: &sqlx::PgPool, per_adapter: i64) -> anyhow::Result<()> {
    let job = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (id, project, adapter_name, spec, status, request_sha256)
         VALUES ($1, 'default', 'bench', '{}'::jsonb, 'succeeded', '\\x00')",
    )
    .bind(job)
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO adapters (project, name, next_version) SELECT 'default', 'bench-' || a, $1 + 1 FROM generate_series(0, $2 - 1) a")
        .bind(per_adapter as i32)
        .bind(ADAPTERS as i32)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO adapter_versions (project, adapter_name, version, status, job_id, storage_prefix, files, method,
                                       hyperparameters, metrics, base_model_uri, base_model_sha256, dataset_uri, dataset_sha256, ready_at)
         SELECT 'default', 'bench-' || a, v, 'ready', $1, 'adapters/default/bench-' || a || '/v' || v,
                '[{\"name\":\"adapter_config.json\",\"sha256\":\"00\",\"size\":800},{\"name\":\"adapter_model.safetensors\",\"sha256\":\"11\",\"size\":9000000},{\"name\":\"manifest.json\",\"sha256\":\"22\",\"size\":2000}]',
                '{\"type\":\"lora\",\"r\":16,\"alpha\":32}', '{\"max_steps\":1000,\"learning_rate\":0.0002}', '{\"steps\":1000,\"tokens\":8192000,\"initial_loss\":2.1,\"final_loss\":1.2,\"train_seconds\":600.0,\"tokens_per_second\":13653.0,\"trainable_parameters\":4194304}',
                'file:///models/base', repeat('a', 64), 'file:///data/train.jsonl', repeat('b', 64), now()
         FROM generate_series(0, $2 - 1) a, generate_series(1, $3) v",
    )
    .bind(job)
    .bind(ADAPTERS as i32)
    .bind(per_adapter as i32)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// `connections` clients, each on its own keep-alive connection, requesting random
/// adapters/versions for `duration`. Returns requests/s, p50 and p99 in ms.
async fn load(
    connections: usize,
    duration: Duration,
    per_adapter: i64,
    url_of: impl Fn(i64, i64) -> String + Send + Sync + Copy + 'static,
) -> anyhow::Result<(f64, f64, f64)> {
    let deadline = Instant::now() + duration;
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("client");
            let mut latencies = Vec::new();
            let mut state = worker as u64 * 7919 + 1;
            while Instant::now() < deadline {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let a = ((state >> 33) % ADAPTERS as u64) as i64;
                let v = ((state >> 17) % per_adapter as u64) as i64 + 1;
                let start = Instant::now();
                match client.get(url_of(a, v)).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(start.elapsed().as_micros() as u32);
                    }
                    _ => {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    anyhow::ensure!(
        failures.load(std::sync::atomic::Ordering::Relaxed) == 0,
        "some requests failed"
    );
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Ok((
        all.len() as f64 / duration.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    ))
}

/// pgbench with the same primary-key lookup, prepared, `connections` clients.
fn pgbench(
    database_url: &str,
    connections: usize,
    seconds: u64,
    per_adapter: i64,
) -> anyhow::Result<f64> {
    let script = tempfile::NamedTempFile::new()?;
    std::fs::write(
        script.path(),
        format!(
            "\\set a random(0, {})\n\\set v random(1, {per_adapter})\n\
             SELECT status, storage_prefix, files, base_model_uri, base_model_sha256 FROM adapter_versions \
             WHERE project = 'default' AND adapter_name = 'bench-' || :a AND version = :v;\n",
            ADAPTERS - 1
        ),
    )?;
    let bin = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pgbench")))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("pgbench not found under /usr/lib/postgresql"))?;
    let out = Command::new(bin)
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &connections.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(script.path())
        .arg(database_url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| {
            l.trim_start_matches("tps = ")
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pgbench said: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(tps)
}
