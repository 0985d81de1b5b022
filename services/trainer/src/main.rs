//! `loraforge-trainer`: the loraforge worker. It trains LoRA-family adapters on
//! Llama-family models with libtorch and publishes them in PEFT's layout.

mod data;
mod error;
mod eval;
mod export;
mod fixture;
mod method;
mod methods;
mod model;
mod pipeline;
mod training;
mod worker;

use crate::error::user_error;
use crate::export::PeftAdapter;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use loraforge_spec::{JobSpec, ResolvedJobSpec};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use tch::Device;
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
    /// set, drift on benign prompts, intruder dimensions, the refusal direction, and what it
    /// cost. Without --adapter, the model alone: its refusal rate, perplexity and refusal
    /// direction.
    Evaluate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A validation file (JSONL, as a job's dataset) for perplexity; without one, the
        /// benign prompts are scored.
        #[arg(long)]
        validation: Option<PathBuf>,
        /// Refusal keywords, one per line (default: llm-attacks' 29 `_test_prefixes`).
        #[arg(long)]
        refusal_keywords: Option<PathBuf>,
        #[arg(long, default_value_t = eval::safety::DEFAULT_MAX_NEW_TOKENS)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = eval::safety::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        /// Keep the base model's side of the evaluation in this directory, and reuse it when
        /// the same base model is evaluated again (as workers do in the artifact store).
        #[arg(long)]
        baselines: Option<PathBuf>,
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
        model::device::resolve_device(self.chosen().unwrap_or_default())
    }
}

fn main() -> ExitCode {
    // Colour codes only on a terminal: worker logs end up in files, pod logs and job errors.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        } => {
            return match worker::run_job(job_id, &api, device.chosen()) {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            }
        }
        Command::Train { spec, out, device } => train_locally(&spec, &out, device.chosen()),
        Command::Fixture { out, seed } => fixture::write_fixture(&out, seed),
        Command::Logits {
            model,
            adapter,
            tokens,
            device,
        } => device
            .resolve()
            .and_then(|device| eval::logits::logits(&model, adapter.as_deref(), &tokens, device))
            .map(|rows| println!("{}", serde_json::json!({ "logits": rows }))),
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
            let prompts: Vec<model::generate::Prompt> = chat
                .iter()
                .map(|message| model::generate::Prompt::user(message))
                .chain(prompt.into_iter().map(model::generate::Prompt::Text))
                .collect();
            let sampling = model::generate::Sampling {
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
            model::merge::merge(&model, &adapter, &out, source).and_then(|summary| {
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
            baselines,
            device,
        } => device.resolve().and_then(|device| {
            let judge = match refusal_keywords {
                Some(path) => eval::safety::judge::KeywordJudge::from_file(&path)?,
                None => eval::safety::judge::KeywordJudge::default(),
            };
            let settings = eval::safety::Settings {
                max_new_tokens,
                batch_size,
                judge,
                ..Default::default()
            };
            let cancel = AtomicBool::new(false);
            let cache = baselines.map(|root| eval::safety::baseline::DirectoryCache { root });
            let model_digest = match &cache {
                Some(_) => data::inputs::model_digest(&model)?,
                None => String::new(),
            };
            let context = eval::safety::Context {
                device,
                cancel: &cancel,
                reuse: cache.as_ref().map(|cache| eval::safety::Reuse {
                    cache,
                    model_digest: &model_digest,
                }),
                progress: &mut |p| eprintln!("evaluating {}/{}", p.done, p.total),
            };
            let report = match adapter {
                Some(adapter) => serde_json::to_string(&eval::safety::evaluate(
                    &model,
                    &PeftAdapter::load(&adapter)?,
                    validation.as_deref(),
                    &settings,
                    context,
                )?)?,
                None => serde_json::to_string(&eval::safety::evaluate_model(
                    &model,
                    validation.as_deref(),
                    &settings,
                    context,
                )?)?,
            };
            println!("{report}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a job spec's pipeline without a control plane, the artifact into `out`.
fn train_locally(
    spec_path: &Path,
    out: &Path,
    device_override: Option<loraforge_spec::DeviceChoice>,
) -> Result<()> {
    let bytes =
        std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let spec =
        JobSpec::parse(&bytes).map_err(|e| user_error(format!("{}: {e}", spec_path.display())))?;
    // Without a control plane nothing resolves registered names: inputs must be URIs.
    let spec = ResolvedJobSpec::new(spec).map_err(|e| {
        user_error(format!(
            "{}: {e} (registered names are resolved by the control plane; give a URI here)",
            spec_path.display()
        ))
    })?;
    let device = model::device::resolve_device(device_override.unwrap_or(spec.training.device))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let job = pipeline::Job {
        spec: &spec,
        device,
        runtime: &runtime,
        scratch: scratch.path(),
        cancel: &AtomicBool::new(false),
    };
    let summary = pipeline::run(
        &job,
        &mut pipeline::local::LocalHost::new(out.to_path_buf()),
    )?;
    println!("{summary}");
    Ok(())
}

fn print_generations(
    model_dir: &Path,
    adapter: Option<&Path>,
    prompts: &[model::generate::Prompt],
    sampling: &model::generate::Sampling,
    batch_size: usize,
    device: Device,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(user_error("give at least one --chat or --prompt"));
    }
    let generator = model::generate::Generator::load(model_dir, adapter, device)?;
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
