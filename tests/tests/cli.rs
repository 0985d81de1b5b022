//! The `loraforge` command-line client, as a user runs it: the real binary against the
//! control plane (in-process, real Postgres, the real trainer on the fixture model), with no
//! terminal, so progress comes as plain lines. Each command's exit status is checked.

mod common;

use common::{control_plane_bin, sha256_file, AppOptions, Fixture, TestApp, JOB_TIMEOUT};
use loraforge_spec::MethodConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// How the binary is run: against one control plane, with a key or none, and a home of its
/// own (so no config file of the machine's is read).
struct Cli {
    url: String,
    key: Option<String>,
    home: tempfile::TempDir,
}

impl Cli {
    fn new(app: &TestApp, key: Option<&str>) -> Cli {
        Cli {
            url: app.base_url.clone(),
            key: key.map(str::to_string),
            home: tempfile::tempdir().expect("a temporary home"),
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(control_plane_bin());
        command
            .args(args)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join(".config"))
            .env("LORAFORGE_URL", &self.url)
            .env_remove("LORAFORGE_API_KEY")
            .env_remove("LORAFORGE_PROFILE")
            .env_remove("LORAFORGE_CONFIG")
            .env_remove("LORAFORGE_API")
            .kill_on_drop(true);
        if let Some(key) = &self.key {
            command.env("LORAFORGE_API_KEY", key);
        }
        command
    }

    async fn run(&self, args: &[&str]) -> Run {
        let output = self
            .command(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("loraforge {args:?} did not start: {e}"));
        Run::from(args, output)
    }

    /// Runs a command that must succeed; answers its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args).await;
        assert_eq!(run.code, 0, "{run}");
        run.stdout
    }

    /// Runs a command with `-o json` that must succeed; answers its JSON.
    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }
}

struct Run {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(args: &[&str], output: Output) -> Run {
        Run {
            args: args.iter().map(|s| s.to_string()).collect(),
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loraforge {:?} exited {}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// The fixture's job as a YAML file a user would write.
fn job_yaml(fixture: &Fixture, adapter: &str, steps: u32) -> String {
    format!(
        "# a LoRA on the fixture model\n\
         adapter_name: {adapter}\n\
         base_model: {}\n\
         dataset:\n  train: {}\n\
         method:\n  type: lora\n  r: 8\n  alpha: 16\n  dropout: 0.0\n  target_modules: [q_proj, v_proj]\n\
         training:\n  max_steps: {steps}\n  learning_rate: 1.0e-3\n  batch_size: 4\n  seq_len: 64\n  seed: 0\n",
        fixture.model_uri(),
        fixture.train_uri()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writable temp dir");
    path
}

/// Waits until the job has reported a training step.
async fn until_training(app: &TestApp, id: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let events = app.all_events(id).await?;
        if events.iter().any(|e| e["kind"] == "progress") {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < JOB_TIMEOUT, "job {id} never trained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn jobs_and_the_registry_from_the_command_line() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let cli = Cli::new(&app, None);
    let files = tempfile::tempdir()?;

    // A job file that is not YAML, and one the server refuses: readable errors, exit 2,
    // nothing submitted.
    let broken = write(
        files.path(),
        "broken.yaml",
        "adapter_name: demo\nmethod: [lora\n",
    );
    let run = cli
        .run(&["jobs", "submit", "-f", broken.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("broken.yaml: not valid YAML"), "{run}");
    let wrong = job_yaml(&fixture, "demo", 0).replace("r: 8", "r: 0");
    let wrong = write(files.path(), "wrong.yaml", &wrong);
    let run = cli
        .run(&["jobs", "submit", "-f", wrong.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr
            .starts_with("error: Invalid request (422 validation_failed)"),
        "{run}"
    );
    assert!(run.stderr.contains("  - method.r: "), "{run}");
    assert!(run.stderr.contains("  - training.max_steps: "), "{run}");
    let missing = cli
        .run(&["jobs", "submit", "-f", "/nonexistent/job.yaml"])
        .await;
    assert_eq!(missing.code, 2, "{missing}");
    assert!(
        missing.stderr.contains("cannot read the job file"),
        "{missing}"
    );
    assert_eq!(app.count("jobs").await, 0);

    // Submit and watch: plain progress lines (no terminal) name the steps and the phase;
    // the exit status is the outcome.
    let job_file = write(files.path(), "job.yaml", &job_yaml(&fixture, "demo", 12));
    let run = cli
        .run(&[
            "jobs",
            "submit",
            "-f",
            job_file.to_str().unwrap(),
            "--watch",
        ])
        .await;
    assert_eq!(run.code, 0, "{run}");
    let out = &run.stdout;
    assert!(out.starts_with("submitted job "), "{run}");
    for line in [
        "status queued",
        "status running",
        "training · step 12/12 · loss ",
        "status evaluating",
        // 100 harmful requests and 20 benign prompts, for each model.
        "evaluating 240/240 · step 12/12 · ",
        "safety: refusals ",
        "status publishing",
        "status succeeded",
    ] {
        assert!(out.contains(line), "{line:?} missing: {run}");
    }
    assert!(
        out.contains(": published demo@1 after 12 steps, final loss "),
        "{run}"
    );
    let id = out["submitted job ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // Reads, as tables and as JSON.
    let page = cli.json(&["jobs", "list"]).await;
    assert_eq!(page["jobs"][0]["id"], id.as_str());
    assert_eq!(page["jobs"][0]["progress"]["step"], 12);
    let table = cli
        .ok(&["jobs", "list", "--status", "succeeded", "--adapter", "demo"])
        .await;
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&id) && table.contains("demo@1") && table.contains("12/12"),
        "{table}"
    );
    let none = cli.ok(&["jobs", "list", "--status", "failed"]).await;
    assert_eq!(none, "no jobs\n");
    let job = cli.json(&["jobs", "get", &id]).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["adapter_version"]["version"], 1);
    let shown = cli.ok(&["jobs", "get", &id]).await;
    assert!(
        shown.contains("status      succeeded\n") && shown.contains("published   demo@1\n"),
        "{shown}"
    );
    let missing = cli
        .run(&["jobs", "get", "00000000-0000-0000-0000-000000000000"])
        .await;
    assert_eq!(missing.code, 2, "{missing}");
    assert!(
        missing
            .stderr
            .starts_with("error: Not found (404 not_found)"),
        "{missing}"
    );

    // Events: the list, as JSON, and followed (the job is over: everything, then exit 0).
    let events = cli.ok(&["jobs", "events", &id]).await;
    assert!(events.starts_with("#1 "), "{events}");
    assert!(
        events.contains(" status queued\n") && events.contains(" step 12/12 loss "),
        "{events}"
    );
    let json = cli.json(&["jobs", "events", &id]).await;
    let all = json.as_array().unwrap();
    assert_eq!(all.len(), app.all_events(&id).await?.len());
    assert_eq!(all.iter().filter(|e| e["kind"] == "progress").count(), 12);
    let followed = cli
        .ok(&["jobs", "events", &id, "--follow", "--after", "3"])
        .await;
    assert!(
        !followed.contains("#3 ") && followed.contains(" status succeeded"),
        "{followed}"
    );
    let ndjson = cli
        .ok(&["jobs", "events", &id, "--follow", "-o", "json"])
        .await;
    assert_eq!(ndjson.lines().count(), all.len());
    assert!(ndjson
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));

    // Logs: what the worker printed (the local executor keeps each attempt's log).
    let logs = cli.json(&["jobs", "logs", &id]).await;
    assert_eq!(logs["source"], "worker", "{logs}");
    assert_eq!(logs["attempt"], 1);
    assert!(!logs["log"].as_str().unwrap().is_empty(), "{logs}");

    // The registry.
    let adapters = cli.json(&["adapters", "list"]).await;
    assert_eq!(adapters["adapters"][0]["name"], "demo");
    assert_eq!(adapters["adapters"][0]["latest_ready"], 1);
    let versions = cli.ok(&["adapters", "versions", "demo"]).await;
    assert!(versions.starts_with("VERSION  STATUS"), "{versions}");
    assert!(versions.contains("\n1        ready"), "{versions}");
    let version = cli.json(&["adapters", "get", "demo@latest"]).await;
    assert_eq!(version["version"], 1);
    let shown = cli.ok(&["adapters", "get", "demo@1"]).await;
    assert!(
        shown.contains("version     demo@1\n") && shown.contains("status      ready\n"),
        "{shown}"
    );
    let resolved = cli.json(&["adapters", "resolve", "demo"]).await;
    assert_eq!(resolved["version"], 1);
    assert_eq!(resolved["files"], version["files"]);

    // Aliases and tags.
    let set = cli
        .ok(&["adapters", "alias", "set", "demo@1", "prod"])
        .await;
    assert_eq!(set, "demo@prod -> version 1\n");
    assert_eq!(
        cli.json(&["adapters", "resolve", "demo@prod"]).await["version"],
        1
    );
    let versions = cli.json(&["adapters", "versions", "demo"]).await;
    assert_eq!(versions["aliases"][0]["alias"], "prod");
    let tagged = cli
        .ok(&["adapters", "tag", "add", "demo@prod", "best", "nightly"])
        .await;
    assert_eq!(tagged, "demo@1 tags: best, nightly\n");
    let tagged = cli
        .json(&["adapters", "tag", "rm", "demo@1", "nightly"])
        .await;
    assert_eq!(tagged["tags"], serde_json::json!(["best"]));
    assert_eq!(
        cli.json(&["adapters", "list", "--tag", "best"]).await["adapters"][0]["name"],
        "demo"
    );
    cli.ok(&["adapters", "alias", "rm", "demo", "prod"]).await;
    let gone = cli.run(&["adapters", "resolve", "demo@prod"]).await;
    assert_eq!(gone.code, 2, "{gone}");

    // Lineage, drawn.
    let tree = cli.ok(&["lineage", "demo@1"]).await;
    let expected_start = format!(
        "demo@1 [ready]\n└── job {id}\n    ├── base model {}",
        fixture.model_uri()
    );
    assert!(tree.starts_with(&expected_start), "{tree}");
    assert!(
        tree.contains(&format!("    └── dataset {}", fixture.train_uri())),
        "{tree}"
    );
    let graph = cli.json(&["lineage", "demo@1"]).await;
    assert_eq!(graph["job_id"], id.as_str());

    // Download: every file verified against its recorded sha256; again, nothing to fetch.
    let target = files.path().join("adapter");
    let target_arg = target.to_str().unwrap();
    let done = cli
        .ok(&["adapters", "download", "demo@1", "--to", target_arg])
        .await;
    let listed = version["files"].as_array().unwrap();
    assert!(!listed.is_empty());
    for f in listed {
        let path = target.join(f["name"].as_str().unwrap());
        assert_eq!(sha256_file(&path), f["sha256"].as_str().unwrap());
        assert!(done.contains(&format!("{}  ", path.display())), "{done}");
    }
    assert!(done.contains("verified (downloaded)"), "{done}");
    let again = cli
        .json(&["adapters", "download", "demo@1", "--to", target_arg])
        .await;
    assert!(
        again["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["kept"] == true),
        "{again}"
    );

    // A second job, cancelled while a watcher follows it: the watcher exits 5. Before that,
    // Ctrl-C detaches another watcher without cancelling anything (exit 130).
    let long = write(
        files.path(),
        "long.yaml",
        &job_yaml(&fixture, "long", 100_000),
    );
    let submitted = cli
        .json(&["jobs", "submit", "-f", long.to_str().unwrap()])
        .await;
    let long_id = submitted["id"].as_str().unwrap().to_string();
    until_training(&app, &long_id).await?;
    let detached = cli
        .command(&["jobs", "watch", &long_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = detached.id().expect("running").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()?
        .success());
    let detached = Run::from(&["jobs", "watch"], detached.wait_with_output().await?);
    assert_eq!(detached.code, 130, "{detached}");
    assert!(
        detached
            .stderr
            .contains(&format!("detached: job {long_id} keeps running")),
        "{detached}"
    );
    let (_, still) = app.get_json(&format!("/v1/jobs/{long_id}")).await?;
    assert_eq!(still["status"], "running", "{still}");

    let watcher = cli
        .command(&["jobs", "watch", &long_id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let cancelled = cli.ok(&["jobs", "cancel", &long_id]).await;
    assert!(
        cancelled.starts_with(&format!("cancel requested: job {long_id} is ")),
        "{cancelled}"
    );
    let watched = tokio::time::timeout(JOB_TIMEOUT, watcher.wait_with_output()).await??;
    let watched = Run::from(&["jobs", "watch"], watched);
    assert_eq!(watched.code, 5, "{watched}");
    assert!(
        watched.stdout.contains(&format!("job {long_id} cancelled")),
        "{watched}"
    );
    // Cancelling it again is refused by the server, readably.
    let again = cli.run(&["jobs", "cancel", &long_id]).await;
    assert_eq!(again.code, 2, "{again}");
    assert!(again.stderr.starts_with("error: Conflict (409 "), "{again}");
    // Watching a finished job answers its outcome at once.
    let rewatched = cli.run(&["jobs", "watch", &long_id, "-o", "json"]).await;
    assert_eq!(rewatched.code, 5, "{rewatched}");
    assert_eq!(
        serde_json::from_str::<Value>(&rewatched.stdout)?["status"],
        "cancelled"
    );

    // Logs where the executor kept none (here: removed): the job's own record instead.
    for log in walk(&app.data_dir.path().join("logs")) {
        if log.to_string_lossy().contains(&long_id) {
            std::fs::remove_file(log)?;
        }
    }
    let logs = cli.run(&["jobs", "logs", &long_id]).await;
    assert_eq!(logs.code, 0, "{logs}");
    assert!(
        logs.stderr.contains("the job's log events follow"),
        "{logs}"
    );
    assert!(
        logs.stdout.contains(" status running\n") && logs.stdout.contains(" status cancelled"),
        "{logs}"
    );
    let no_such = cli.run(&["jobs", "logs", &long_id, "--attempt", "7"]).await;
    assert_eq!(no_such.code, 2, "{no_such}");

    // A download the store hands out tampered is detected, and never lands under its name.
    let weights = listed
        .iter()
        .find(|f| f["name"] == "adapter_model.safetensors")
        .expect("the weights are listed");
    let stored = walk(app.store_dir.as_ref().unwrap())
        .into_iter()
        .find(|p| p.ends_with("demo/v1/adapter_model.safetensors"))
        .expect("the stored weights");
    let mut bytes = std::fs::read(&stored)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, &bytes)?;
    let fresh = files.path().join("fresh");
    let run = cli
        .run(&[
            "adapters",
            "download",
            "demo@1",
            "--to",
            fresh.to_str().unwrap(),
        ])
        .await;
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("adapter_model.safetensors: sha256 ")
            && run.stderr.contains(weights["sha256"].as_str().unwrap()),
        "{run}"
    );
    assert!(!fresh.join("adapter_model.safetensors").exists());
    assert!(!fresh.join(".adapter_model.safetensors.partial").exists());

    // Nobody there: exit 1 and a hint.
    let offline = cli
        .run(&["jobs", "list", "--url", "http://127.0.0.1:9"])
        .await;
    assert_eq!(offline.code, 1, "{offline}");
    assert!(
        offline
            .stderr
            .contains("could not reach the control plane at http://127.0.0.1:9"),
        "{offline}"
    );
    assert!(
        offline
            .stderr
            .contains("hint: is `loraforge serve` running there?"),
        "{offline}"
    );

    // Completions for the shells.
    for shell in ["bash", "zsh", "fish"] {
        let script = cli.ok(&["completions", shell]).await;
        assert!(
            script.contains("loraforge") && script.contains("submit"),
            "{shell}"
        );
    }
    app.stop().await
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn keys_through_the_api_with_auth_on() -> anyhow::Result<()> {
    let app = TestApp::spawn_with(AppOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    let anonymous = Cli::new(&app, None);

    // Without a key: refused, with what to do.
    let run = anonymous.run(&["jobs", "list"]).await;
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr
            .starts_with("error: Unauthorized (401 unauthorized)"),
        "{run}"
    );
    assert!(run.stderr.contains("hint: pass an API key"), "{run}");

    // The first key, straight into the database (the bootstrap path, on the server).
    let data = tempfile::tempdir()?;
    let mut bootstrap = anonymous.command(&[
        "keys",
        "create",
        "--project",
        "team",
        "--scope",
        "admin",
        "-o",
        "json",
    ]);
    bootstrap
        .env("DATABASE_URL", &app.database_url)
        .env("LORAFORGE_DATA_DIR", data.path())
        .env("LORAFORGE_STORAGE_URL", &app.storage_url);
    let out = Run::from(&["keys", "create", "--project"], bootstrap.output().await?);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stderr.contains("store this key now"), "{out}");
    let admin_key: Value = serde_json::from_str(&out.stdout)?;
    let admin_key = admin_key["key"].as_str().unwrap().to_string();

    // The admin key from a profile of the config file.
    let admin = Cli::new(&app, None);
    let config_dir = admin.home.path().join(".config/loraforge");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(
        config_dir.join("config.toml"),
        format!(
            "[profiles.default]\nurl = \"{}\"\napi_key = \"{admin_key}\"\n",
            app.base_url
        ),
    )?;
    let mut whoami = admin.command(&["whoami"]);
    whoami.env_remove("LORAFORGE_URL");
    let who = Run::from(&["whoami"], whoami.output().await?);
    assert_eq!(who.code, 0, "{who}");
    assert!(
        who.stdout.contains("project  team\n") && who.stdout.contains("scope    admin\n"),
        "{who}"
    );
    assert!(
        who.stdout.contains("api key  set (from profile default)"),
        "{who}"
    );
    assert!(
        !format!("{}{}", who.stdout, who.stderr).contains(&admin_key),
        "the key is never printed"
    );

    // An admin creates, lists and revokes keys of the project through the API.
    let created = admin.json(&["keys", "create", "--scope", "read"]).await;
    assert_eq!(
        (created["project"].as_str(), created["scope"].as_str()),
        (Some("team"), Some("read"))
    );
    let read_key = created["key"].as_str().unwrap().to_string();
    let prefix = created["prefix"].as_str().unwrap().to_string();
    assert!(read_key.starts_with(&format!("lf_{prefix}_")));
    let shown = admin.run(&["keys", "create", "--scope", "submit"]).await;
    assert_eq!(shown.code, 0, "{shown}");
    assert!(shown.stdout.starts_with("key      lf_"), "{shown}");
    assert!(
        shown
            .stderr
            .contains("store this key now: it cannot be shown again"),
        "{shown}"
    );

    let listed = admin.json(&["keys", "list"]).await;
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3, "{listed}");
    assert!(
        keys.iter()
            .all(|k| k.get("key").is_none() && k["revoked_at"].is_null()),
        "{listed}"
    );
    let table = admin.ok(&["keys", "list"]).await;
    assert!(table.contains(&format!("lf_{prefix}_…  read")), "{table}");
    assert!(
        !table.contains(&read_key) && !table.contains(&admin_key),
        "{table}"
    );

    // The read key reads, and is refused what needs admin.
    let reader = Cli::new(&app, Some(&read_key));
    assert_eq!(
        reader.json(&["jobs", "list"]).await["jobs"],
        serde_json::json!([])
    );
    let refused = reader.run(&["keys", "list"]).await;
    assert_eq!(refused.code, 2, "{refused}");
    assert!(
        refused
            .stderr
            .starts_with("error: Forbidden (403 forbidden)"),
        "{refused}"
    );
    assert!(
        refused.stderr.contains("this needs a key with scope admin"),
        "{refused}"
    );
    assert!(!refused.stderr.contains(&read_key));

    // Revoked by its prefix: the key stops working at once.
    let revoked = admin.ok(&["keys", "revoke", &prefix]).await;
    assert_eq!(
        revoked,
        format!("revoked key {}\n", created["id"].as_str().unwrap())
    );
    let run = reader.run(&["jobs", "list"]).await;
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("401"), "{run}");
    let listed = admin.json(&["keys", "list"]).await;
    let entry = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["prefix"] == prefix.as_str())
        .unwrap()
        .clone();
    assert!(entry["revoked_at"].is_string(), "{entry}");
    // Revoking by id again is fine; a key of another project (or none) is not found.
    admin
        .ok(&["keys", "revoke", entry["id"].as_str().unwrap()])
        .await;
    let other =
        loraforge::auth::create_key(&app.pool, "elsewhere", loraforge::auth::Scope::Admin).await?;
    let run = admin.run(&["keys", "revoke", &other.id.to_string()]).await;
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("404"), "{run}");
    let run = admin.run(&["keys", "revoke", &other.prefix]).await;
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("no active key with prefix"), "{run}");
    app.stop().await
}

/// `POST /v1/datasets/{name}/upload` (the body is the file, streamed): the upload route comes
/// with the dataset-upload work; this passes once both are merged.
#[tokio::test]
async fn datasets_upload_a_file_and_register_it() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    let app = TestApp::spawn().await?;
    let cli = Cli::new(&app, None);
    let file = fixture.train_file();
    let uploaded = cli
        .json(&[
            "datasets",
            "upload",
            file.to_str().unwrap(),
            "--name",
            "chat",
        ])
        .await;
    assert_eq!(uploaded["name"], "chat", "{uploaded}");
    assert_eq!(
        uploaded["sha256"],
        sha256_file(&file).as_str(),
        "{uploaded}"
    );
    assert_eq!(uploaded["size"], std::fs::metadata(&file)?.len());
    let got = cli.json(&["datasets", "get", "chat"]).await;
    assert_eq!(got["sha256"], uploaded["sha256"]);
    let table = cli.ok(&["datasets", "list"]).await;
    assert!(
        table.starts_with("NAME ") && table.contains("\nchat "),
        "{table}"
    );
    let missing = cli
        .run(&["datasets", "upload", "/nonexistent.jsonl", "--name", "x"])
        .await;
    assert_eq!(missing.code, 2, "{missing}");
    app.stop().await
}

/// A knob's value as `jobs get` prints it: strings bare, lists in brackets.
fn knob_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(knob_text).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// The cells of a table's row that starts with `first` (cells split on runs of spaces).
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.split("  ").next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The methods the CLI knows are the server's: read from its API document, every method of
/// the spec's registry (wave 2's too), each method's knobs with the defaults the spec gives a
/// job that leaves them out; `jobs get` shows every knob of a job's method, and `jobs submit`
/// names a knob the method does not have before sending anything.
#[tokio::test]
async fn methods_and_their_knobs_come_from_the_server() -> anyhow::Result<()> {
    let fixture = Fixture::create()?;
    // No worker: a submitted job stays queued; only its spec is read here.
    let app = TestApp::spawn_with(AppOptions {
        slots: 0,
        ..Default::default()
    })
    .await?;
    let cli = Cli::new(&app, None);
    let files = tempfile::tempdir()?;

    // Every method of the registry, in its order, each with a one-line description.
    let listed = cli.json(&["methods", "list"]).await;
    let listed = listed.as_array().expect("a list of methods");
    let tags: Vec<&str> = listed.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(tags, MethodConfig::TAGS);
    for wave_2 in [
        "loraga",
        "eva",
        "lorasb",
        "lorapro",
        "allora",
        "lora_ggpo",
        "miss",
        "randlora",
        "shira",
    ] {
        assert!(tags.contains(&wave_2), "{wave_2} missing from {tags:?}");
    }
    for method in listed {
        let description = method["description"].as_str().unwrap();
        assert!(
            !description.is_empty() && !description.contains('\n'),
            "{method}"
        );
    }
    let table = cli.ok(&["methods", "list"]).await;
    assert!(table.starts_with("METHOD "), "{table}");
    for tag in MethodConfig::TAGS {
        assert_eq!(row(&table, tag)[0], *tag, "{table}");
    }

    // A wave-2 method's knobs: exactly its fields, each default the one the spec declares.
    let spec_miss = serde_json::to_value(serde_json::from_value::<MethodConfig>(
        serde_json::json!({"type": "miss"}),
    )?)?;
    let miss = cli.json(&["methods", "get", "miss"]).await;
    assert_eq!(miss["type"], "miss");
    assert!(miss["description"].as_str().unwrap().starts_with("MiSS"));
    let knobs = miss["knobs"].as_array().unwrap();
    let mut names: Vec<&str> = knobs.iter().map(|k| k["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = spec_miss
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "type")
        .collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "{miss}");
    for knob in knobs {
        let name = knob["name"].as_str().unwrap();
        assert_eq!(knob["default"], spec_miss[name], "{knob}");
        assert_eq!(knob["required"], false, "{knob}");
    }
    let init = knobs.iter().find(|k| k["name"] == "init").unwrap();
    assert_eq!(init["type"], "enum");
    assert_eq!(
        init["options"],
        serde_json::json!(["balance", "bat", "mini"])
    );
    assert!(!init["description"].as_str().unwrap().is_empty(), "{init}");
    let shown = cli.ok(&["methods", "get", "miss"]).await;
    assert!(shown.starts_with("miss: MiSS "), "{shown}");
    assert_eq!(row(&shown, "r")[..3], ["r", "integer", "64"], "{shown}");
    assert_eq!(
        row(&shown, "init")[..4],
        ["init", "enum", "balance", "balance | bat | mini"],
        "{shown}"
    );
    // A required knob has no default: LoRA's r.
    let lora = cli.json(&["methods", "get", "lora"]).await;
    let r = &lora["knobs"][0];
    assert!(
        r["name"] == "r" && r["required"] == true && r.get("default").is_none(),
        "{lora}"
    );
    let unknown = cli.run(&["methods", "get", "bogus"]).await;
    assert_eq!(unknown.code, 2, "{unknown}");
    assert!(
        unknown
            .stderr
            .starts_with("error: the server has no method \"bogus\"; it has lora, "),
        "{unknown}"
    );

    // A knob the method does not have: the server refuses it, the client names the ones it has.
    let typo = job_yaml(&fixture, "typo", 5).replace("alpha: 16", "alhpa: 16");
    let typo = write(files.path(), "typo.yaml", &typo);
    let run = cli
        .run(&["jobs", "submit", "-f", typo.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr
            .contains("  - method.alhpa: lora has no knob \"alhpa\"; its knobs are r, alpha, "),
        "{run}"
    );
    assert!(run.stderr.contains("loraforge methods get lora"), "{run}");
    assert_eq!(app.count("jobs").await, 0);

    // A job with a wave-2 method: `jobs get` shows every knob of its method, defaults too.
    let sharded = job_yaml(&fixture, "sharded", 5).replace(
        "type: lora\n  r: 8\n  alpha: 16\n  dropout: 0.0\n",
        "type: miss\n  r: 16\n  init: mini\n  mini_r: 2\n",
    );
    assert!(sharded.contains("type: miss"), "{sharded}");
    let sharded = write(files.path(), "sharded.yaml", &sharded);
    let submitted = cli
        .json(&["jobs", "submit", "-f", sharded.to_str().unwrap()])
        .await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let job = cli.json(&["jobs", "get", &id]).await;
    let method = job["spec"]["method"].as_object().unwrap().clone();
    assert_eq!(method["type"], "miss", "{job}");
    assert_eq!(method.len(), spec_miss.as_object().unwrap().len(), "{job}");
    let shown = cli.ok(&["jobs", "get", &id]).await;
    assert!(shown.contains("\nmethod      miss "), "{shown}");
    for (name, value) in method.iter().filter(|(k, _)| *k != "type") {
        let knob = format!("{name}={}", knob_text(value));
        assert!(shown.contains(&knob), "{knob} missing:\n{shown}");
    }
    for set in ["r=16", "init=mini", "mini_r=2", "dropout=0.0"] {
        assert!(shown.contains(set), "{set} missing:\n{shown}");
    }
    app.stop().await
}
