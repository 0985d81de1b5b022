//! A trainer SIGKILLed after a checkpoint: the control plane retries the job (a worker that
//! dies is a system error), the new attempt resumes from the newest complete checkpoint, and
//! the published adapter is the one an identical, uninterrupted job publishes.

mod common;

use common::{Fixture, TestApp};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_killed_trainer_resumes_from_its_checkpoint_and_publishes_the_same_adapter(
) -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let fixture = Fixture::create()?;
    let store = app.store_dir.clone().expect("a local store");
    // Dropout, shuffling, warmup and decay, accumulation: everything a resume must continue.
    let job = |name: &str| {
        let mut job = fixture.job(name);
        job["method"]["dropout"] = json!(0.1);
        job["training"] = json!({
            "max_steps": 100, "learning_rate": 0.001, "batch_size": 4, "gradient_accumulation_steps": 2,
            "seq_len": 64, "seed": 3, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.01,
            "checkpoint_every": 10, "device": "cpu"
        });
        job
    };

    let straight = app.run_job(&job("straight")).await?;
    assert_eq!(straight["attempt"], 1, "{straight}");

    let (code, submitted) = app.submit(&job("resumed")).await?;
    assert_eq!(code, 201, "{submitted}");
    let id = submitted["id"].as_str().unwrap().to_string();
    let checkpoints = store.join("checkpoints").join(&id);
    let started = Instant::now();
    let killed_after = loop {
        if let Some(step) = newest_complete_checkpoint(&checkpoints) {
            let pid = trainer_pid(&id).expect("the trainer of the job is running");
            assert!(Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()?
                .success());
            break step;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint after two minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    let done = app.wait_for_job(&id).await?;
    assert_eq!(
        (done["status"].as_str(), done["attempt"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{done}"
    );

    // The second attempt announced where it resumed: the newest checkpoint the first one saved.
    // (Events come oldest first.)
    let events = app.all_events(&id).await?;
    let is_checkpoint =
        |e: &Value, resumed: bool| e["kind"] == "checkpoint" && e["resumed"] == resumed;
    let resumes: Vec<usize> = (0..events.len())
        .filter(|&i| is_checkpoint(&events[i], true))
        .collect();
    assert_eq!(resumes.len(), 1, "{events:?}");
    let (before, after) = events.split_at(resumes[0]);
    let resumed_at = after[0]["step"].as_u64().unwrap();
    let newest_saved = before
        .iter()
        .filter(|e| is_checkpoint(e, false))
        .filter_map(|e| e["step"].as_u64())
        .max();
    assert_eq!(newest_saved, Some(resumed_at));
    assert!(
        resumed_at >= killed_after && resumed_at < 100,
        "resumed at {resumed_at}"
    );
    let next_step = after
        .iter()
        .find(|e| e["kind"] == "progress")
        .and_then(|e| e["step"].as_u64());
    assert_eq!(
        next_step,
        Some(resumed_at + 1),
        "training went on from the checkpoint"
    );

    // The same adapter as the uninterrupted job's, and the checkpoints are gone.
    let adapter = |name: &str| {
        store.join(format!(
            "adapters/default/{name}/v1/adapter_model.safetensors"
        ))
    };
    let (expected, actual) = (
        read_safetensors(&adapter("straight"))?,
        read_safetensors(&adapter("resumed"))?,
    );
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>()
    );
    let mut max_diff = 0f32;
    for (key, values) in &expected {
        assert_eq!(values.len(), actual[key].len(), "{key}");
        for (a, b) in values.iter().zip(&actual[key]) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    assert!(
        max_diff <= 1e-6,
        "the resumed adapter differs by {max_diff}"
    );
    assert!(
        newest_complete_checkpoint(&checkpoints).is_none(),
        "checkpoints are deleted once published"
    );
    app.stop().await
}

/// The step of the newest checkpoint in a local store's job folder whose `state.json` (written
/// last) is there.
fn newest_complete_checkpoint(job_folder: &Path) -> Option<u64> {
    std::fs::read_dir(job_folder)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("state.json").is_file())
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .max()
}

/// The pid of the `loraforge-trainer run --job-id <id>` process.
fn trainer_pid(job_id: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok())
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--job-id" && w[1] == job_id.as_bytes())
                .then_some(pid)
        })
}

/// The F32 tensors of a safetensors file, by name: an 8-byte header length, a JSON header of
/// `{name: {dtype, shape, data_offsets}}`, then the data.
fn read_safetensors(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    let bytes = std::fs::read(path)?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + header_len])?;
    let data = &bytes[8 + header_len..];
    let mut tensors = BTreeMap::new();
    for (name, info) in header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
    {
        anyhow::ensure!(info["dtype"] == "F32", "{name} is {}", info["dtype"]);
        let (start, end) = (
            info["data_offsets"][0].as_u64().unwrap() as usize,
            info["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let values = data[start..end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(name, values);
    }
    Ok(tensors)
}
