//! `loraforge-trainer`: the loraforge worker. It trains LoRA-family adapters on
//! Llama-family models with libtorch and publishes them in PEFT's layout.

mod chat_template;
mod checkpoint;
mod config;
mod data;
mod device;
mod error;
mod export;
mod fixture;
mod generate;
mod inputs;
mod merge;
mod method;
mod methods;
mod model;
mod optimizer;
mod safety;
mod seeds;
mod tokenizer_config;
mod trace;
mod train;
mod weights;
mod worker;

use crate::error::{exit_code, user_error};
use crate::export::{write_artifact, PeftAdapter, Provenance};
use crate::model::{device_label, LlamaModel};
use crate::train::Reporter;
use anyhow::{Context, Result};
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
    /// Generate completions, greedy unless --temperature is set; prints one JSON line per
    /// prompt ({"index", "prompt", "text", "token_ids", "finish_reason", ...}), the --chat
    /// prompts first, then the --prompt ones, each in the order given.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A user message, rendered with the model's chat template (repeatable).
        #[arg(long)]
        chat: Vec<String>,
        /// Raw text to continue (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 decodes greedily; above 0, sample from the softened distribution.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: only the most likely tokens whose probabilities reach this.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Prompts decoded together.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Merge a LoRA adapter into its base model (W + scaling B A) and write the result as a new
    /// model directory, with loraforge_merge.json naming the adapter (version) it came from.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The registered adapter the files are (default: from the adapter's manifest.json).
        #[arg(long, requires = "source_version")]
        source_adapter: Option<String>,
        #[arg(long, requires = "source_adapter")]
        source_version: Option<i32>,
    },
    /// Run the safety evaluation (the publish gate's measurements) of an adapter against its
    /// base model and print the report as JSON: refusal rates on the built-in harmful-request
    /// set, drift on benign prompts, intruder dimensions, and what it cost.
    Evaluate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        /// A validation file (JSONL, as a job's dataset) for perplexity; without one, the
        /// benign prompts are scored.
        #[arg(long)]
        validation: Option<PathBuf>,
        /// Refusal keywords, one per line (default: llm-attacks' 29 `_test_prefixes`).
        #[arg(long)]
        refusal_keywords: Option<PathBuf>,
        #[arg(long, default_value_t = safety::DEFAULT_MAX_NEW_TOKENS)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = safety::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArg,
    },
}

#[derive(clap::Args)]
struct DeviceArg {
    /// Where to run: CUDA when available (auto), or force one. Overrides a job's training.device;
    /// without it, a job runs where its spec says, and anything else on auto.
    #[arg(long = "device", env = "LORAFORGE_DEVICE", value_enum)]
    choice: Option<DeviceChoice>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The command line's choice, which overrides a job's `training.device`.
    fn chosen(&self) -> Option<loraforge_spec::DeviceChoice> {
        self.choice.map(|choice| match choice {
            DeviceChoice::Auto => loraforge_spec::DeviceChoice::Auto,
            DeviceChoice::Cpu => loraforge_spec::DeviceChoice::Cpu,
            DeviceChoice::Cuda => loraforge_spec::DeviceChoice::Cuda,
        })
    }

    /// The device for commands without a job: the command line's choice, else auto.
    fn resolve(&self) -> Result<Device> {
        device::resolve_device(self.chosen().unwrap_or_default())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            job_id,
            api,
            device,
        } => return exit_status(worker::run_job(job_id, &api, device.chosen())),
        Command::Train { spec, out, device } => train_locally(&spec, &out, device.chosen()),
        Command::Fixture { out, seed } => fixture::write_fixture(&out, seed),
        Command::Logits {
            model,
            adapter,
            tokens,
            device,
        } => device
            .resolve()
            .and_then(|device| print_logits(&model, adapter.as_deref(), &tokens, device)),
        Command::Generate {
            model,
            adapter,
            chat,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            batch_size,
            device,
        } => {
            let prompts: Vec<generate::Prompt> = chat
                .iter()
                .map(|message| generate::Prompt::user(message))
                .chain(prompt.into_iter().map(generate::Prompt::Text))
                .collect();
            let sampling = generate::Sampling {
                max_new_tokens,
                temperature,
                top_p,
                seed,
            };
            device.resolve().and_then(|device| {
                print_generations(
                    &model,
                    adapter.as_deref(),
                    &prompts,
                    &sampling,
                    batch_size,
                    device,
                )
            })
        }
        Command::Merge {
            model,
            adapter,
            out,
            source_adapter,
            source_version,
        } => {
            let source = source_adapter
                .zip(source_version)
                .map(|(adapter, version)| loraforge_spec::merge::MergeSource { adapter, version });
            merge::merge(&model, &adapter, &out, source).and_then(|summary| {
                println!("{}", serde_json::to_string(&summary)?);
                Ok(())
            })
        }
        Command::Evaluate {
            model,
            adapter,
            validation,
            refusal_keywords,
            max_new_tokens,
            batch_size,
            device,
        } => device.resolve().and_then(|device| {
            let judge = match refusal_keywords {
                Some(path) => safety::judge::KeywordJudge::from_file(&path)?,
                None => safety::judge::KeywordJudge::default(),
            };
            let settings = safety::Settings {
                max_new_tokens,
                batch_size,
                judge,
                ..Default::default()
            };
            let adapter = PeftAdapter::load(&adapter)?;
            let cancel = AtomicBool::new(false);
            let report = safety::evaluate(
                &model,
                &adapter,
                validation.as_deref(),
                &settings,
                device,
                &cancel,
            )?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }),
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
            EventPayload::Progress {
                step,
                total_steps,
                loss,
                lr,
                tokens_per_second,
                ..
            } => {
                tracing::info!(step, total_steps, loss, lr, tokens_per_second, "progress");
            }
            EventPayload::Eval { step, loss, tokens } => {
                tracing::info!(step, loss, tokens, "validation")
            }
            EventPayload::Safety { report } => tracing::info!(?report, "safety evaluation"),
            EventPayload::Checkpoint {
                step,
                prefix,
                resumed,
            } => tracing::info!(step, prefix, resumed, "checkpoint"),
            EventPayload::Log { message } => tracing::info!("{message}"),
            EventPayload::Ranks {
                step,
                total,
                budget,
                per_module,
                sparsity,
            } => {
                tracing::info!(
                    step,
                    total,
                    ?budget,
                    ?per_module,
                    ?sparsity,
                    "rank allocation"
                )
            }
            EventPayload::Status { status, .. } => tracing::info!(%status, "status"),
        }
    }
}

fn train_locally(
    spec_path: &Path,
    out: &Path,
    device_override: Option<loraforge_spec::DeviceChoice>,
) -> Result<()> {
    let bytes =
        std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec =
        JobSpec::parse(&bytes).map_err(|e| user_error(format!("{}: {e}", spec_path.display())))?;
    let device = device::resolve_device(device_override.unwrap_or(spec.training.device))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let inputs = inputs::fetch_inputs(&runtime, &spec, scratch.path())?;
    let training_inputs = train::TrainingInputs {
        model_dir: &inputs.model_dir,
        train_data: &inputs.dataset,
        validation_data: inputs.validation.as_deref(),
        parent: None,
        resume: None,
    };
    let outcome = train::train(
        &spec,
        training_inputs,
        device,
        None,
        &mut LogReporter,
        &AtomicBool::new(false),
    )?;
    let provenance = Provenance {
        project: "local".into(),
        job_id: Uuid::nil(),
        version: 0,
        base_model: inputs.base_model,
        dataset: inputs.dataset_ref,
        parent: None,
        device: device_label(device),
    };
    let (manifest, files) = write_artifact(
        out,
        &spec,
        provenance,
        outcome.metrics,
        &outcome.adapter,
        None,
    )?;
    let summary = serde_json::json!({ "out": out, "metrics": manifest.metrics, "files": files });
    println!("{summary}");
    Ok(())
}

fn print_logits(
    model_dir: &Path,
    adapter: Option<&Path>,
    tokens: &[i64],
    device: Device,
) -> Result<()> {
    let config = config::ModelConfig::load(model_dir)?;
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= config.vocab_size) {
        return Err(user_error(format!(
            "token {bad} is outside the vocabulary (size {})",
            config.vocab_size
        )));
    }
    let mut model = LlamaModel::load(model_dir, config, device)?;
    if let Some(dir) = adapter {
        methods::lora::attach_frozen(&mut model, &PeftAdapter::load(dir)?, device)?;
    }
    let input = tch::Tensor::from_slice(tokens)
        .unsqueeze(0)
        .to_device(device);
    let logits = tch::no_grad(|| model.forward(&input, false));
    let logits = logits
        .squeeze_dim(0)
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    let rows = Vec::<Vec<f32>>::try_from(&logits)?;
    println!("{}", serde_json::json!({ "logits": rows }));
    Ok(())
}

fn print_generations(
    model_dir: &Path,
    adapter: Option<&Path>,
    prompts: &[generate::Prompt],
    sampling: &generate::Sampling,
    batch_size: usize,
    device: Device,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(user_error("give at least one --chat or --prompt"));
    }
    let generator = generate::Generator::load(model_dir, adapter, device)?;
    for (index, completion) in generator
        .generate(prompts, sampling, batch_size)?
        .into_iter()
        .enumerate()
    {
        let mut line = serde_json::to_value(&completion)?;
        line["index"] = index.into();
        println!("{line}");
    }
    Ok(())
}
