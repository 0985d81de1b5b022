//! `loraforge-trainer`: the loraforge worker. It trains LoRA-family adapters on
//! Llama-family models with libtorch and publishes them in PEFT's layout.

mod config;
mod data;
mod error;
mod export;
mod fixture;
mod inputs;
mod lora;
mod method;
mod model;
mod train;
mod weights;
mod worker;

use crate::error::{exit_code, user_error};
use crate::export::{write_artifact, PeftAdapter, Provenance};
use crate::model::{device_label, LlamaModel};
use crate::train::Reporter;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use loraforge_spec::worker::EventPayload;
use loraforge_spec::JobSpec;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use tch::{Device, Kind};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "loraforge-trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job for the control plane: train, publish, register (token in LORAFORGE_WORKER_TOKEN).
    Run {
        #[arg(long)]
        job_id: Uuid,
        /// Base URL of the control plane, e.g. http://127.0.0.1:8080
        #[arg(long)]
        api: String,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Train a job spec without a control plane and write the artifact (version 0) into --out.
    Train {
        /// A job spec as submitted to the API (JSON).
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Write a tiny random Llama (model/) and a learnable dataset (data/) for tests.
    Fixture {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print {"logits": [[f32; vocab]; tokens]} of a model, optionally with a PEFT adapter.
    Logits {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<i64>,
        #[command(flatten)]
        device: DeviceArg,
    },
}

#[derive(clap::Args)]
struct DeviceArg {
    /// Where to run: CUDA when available (auto), or force one.
    #[arg(long = "device", env = "LORAFORGE_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    choice: DeviceChoice,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    fn resolve(&self) -> Result<Device> {
        let device = match self.choice {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Cuda => bail!("--device cuda: no CUDA device is available"),
        };
        tracing::info!(device = device_label(device), "device chosen");
        Ok(device)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { job_id, api, device } => match device.resolve() {
            Ok(device) => return exit_status(worker::run_job(job_id, &api, device)),
            Err(err) => Err(err),
        },
        Command::Train { spec, out, device } => device.resolve().and_then(|device| train_locally(&spec, &out, device)),
        Command::Fixture { out, seed } => fixture::write_fixture(&out, seed),
        Command::Logits { model, adapter, tokens, device } => {
            device.resolve().and_then(|device| print_logits(&model, adapter.as_deref(), &tokens, device))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            exit_status(exit_code(&err))
        }
    }
}

fn exit_status(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Prints progress as log lines; the `train` command's reporter.
struct LogReporter;

impl Reporter for LogReporter {
    fn report(&mut self, event: EventPayload) {
        match event {
            EventPayload::Progress { step, total_steps, loss, lr, tokens_per_second, .. } => {
                tracing::info!(step, total_steps, loss, lr, tokens_per_second, "progress");
            }
            EventPayload::Eval { step, loss, tokens } => tracing::info!(step, loss, tokens, "validation"),
            EventPayload::Checkpoint { step, prefix, resumed } => tracing::info!(step, prefix, resumed, "checkpoint"),
            EventPayload::Log { message } => tracing::info!("{message}"),
            EventPayload::Status { status, .. } => tracing::info!(%status, "status"),
        }
    }
}

fn train_locally(spec_path: &Path, out: &Path, device: Device) -> Result<()> {
    let bytes = std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec = JobSpec::parse(&bytes).map_err(|e| user_error(format!("{}: {e}", spec_path.display())))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let inputs = inputs::fetch_inputs(&runtime, &spec, scratch.path())?;
    let outcome =
        train::train(&spec, &inputs.model_dir, &inputs.dataset, device, &mut LogReporter, &AtomicBool::new(false))?;
    let provenance = Provenance {
        project: "local".into(),
        job_id: Uuid::nil(),
        version: 0,
        base_model: inputs.base_model,
        dataset: inputs.dataset_ref,
        device: device_label(device),
    };
    let (manifest, files) = write_artifact(out, &spec, provenance, outcome.metrics, &outcome.adapter)?;
    let summary = serde_json::json!({ "out": out, "metrics": manifest.metrics, "files": files });
    println!("{summary}");
    Ok(())
}

fn print_logits(model_dir: &Path, adapter: Option<&Path>, tokens: &[i64], device: Device) -> Result<()> {
    let config = config::ModelConfig::load(model_dir)?;
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= config.vocab_size) {
        return Err(user_error(format!("token {bad} is outside the vocabulary (size {})", config.vocab_size)));
    }
    let mut model = LlamaModel::load(model_dir, config, device)?;
    if let Some(dir) = adapter {
        lora::attach_frozen(&mut model, &PeftAdapter::load(dir)?, device)?;
    }
    let input = tch::Tensor::from_slice(tokens).unsqueeze(0).to_device(device);
    let logits = tch::no_grad(|| model.forward(&input, false));
    let logits = logits.squeeze_dim(0).to_kind(Kind::Float).to_device(Device::Cpu);
    let rows = Vec::<Vec<f32>>::try_from(&logits)?;
    println!("{}", serde_json::json!({ "logits": rows }));
    Ok(())
}
