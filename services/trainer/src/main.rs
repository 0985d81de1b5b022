//! `loraforge-trainer`: the loraforge worker. It trains LoRA-family adapters on
//! Llama-family models with libtorch and publishes them in PEFT's layout.

mod calibration;
mod data;
mod error;
mod eval;
mod export;
mod families;
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
        /// Refusal keywords, one per line: the keyword judge's list (default: llm-attacks' 29
        /// `_test_prefixes`); with the semantic judge, any of them makes a refusal too.
        #[arg(long)]
        refusal_keywords: Option<PathBuf>,
        /// Which refusal judge: semantic where LORAFORGE_JUDGE_MODEL names its encoder (auto).
        #[arg(long, value_enum, default_value_t = JudgeChoice::Auto)]
        judge: JudgeChoice,
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
    /// Judge answers on their own: reads JSONL lines `{"prompt": ..., "answer": ...}` and prints
    /// each answer's verdict and score as a JSON line (the refusal rate on stderr). With
    /// --labelled, calibrates the semantic judge on the file's calibration split and prints a
    /// table of both judges' precision and recall on its held-out split (bench/safety.md).
    Judge {
        #[arg(
            long,
            required_unless_present = "labelled",
            conflicts_with = "labelled"
        )]
        answers: Option<PathBuf>,
        #[arg(long)]
        labelled: Option<PathBuf>,
        /// Exemplars (JSONL `{"label": "refusal"|"compliance", "text": ...}`) replacing the
        /// built-in ones.
        #[arg(long)]
        exemplars: Option<PathBuf>,
        /// Keywords, one per line, that make an answer a refusal (as a policy's
        /// `refusal_keywords`); with the keyword judge, added to its default list.
        #[arg(long)]
        keywords: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = JudgeChoice::Auto)]
        judge: JudgeChoice,
    },
}

/// Which refusal judge to use.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum JudgeChoice {
    /// Semantic where LORAFORGE_JUDGE_MODEL names the encoder, else keywords.
    Auto,
    Semantic,
    Keywords,
}

impl JudgeChoice {
    fn config(self) -> Result<eval::safety::judge::JudgeConfig> {
        let config = match self {
            JudgeChoice::Keywords => eval::safety::judge::JudgeConfig::default(),
            _ => eval::safety::judge::JudgeConfig::from_env(),
        };
        if self == JudgeChoice::Semantic && config.semantic.is_none() {
            return Err(user_error(format!(
                "the semantic judge needs its encoder: set {} to its folder (docs/safety.md)",
                eval::safety::embedder::MODEL_ENV
            )));
        }
        Ok(config)
    }
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
    // libtorch's CUDA caching allocator with expandable segments, unless the user chose a
    // configuration: blocks grow in place instead of new ones being reserved beside the
    // fragments of old ones. Measured on an H100 (Llama-3-8B shape, batch 2 x seq 2048):
    // 0.8 GiB less device memory at the same speed (bench/gpu.md). Read when CUDA first
    // allocates, so set before anything runs.
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none()
        && std::env::var_os("PYTORCH_ALLOC_CONF").is_none()
    {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
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
            judge,
            max_new_tokens,
            batch_size,
            baselines,
            device,
        } => device.resolve().and_then(|device| {
            let mut judge = judge.config()?;
            if let Some(path) = refusal_keywords {
                let keywords = eval::safety::judge::KeywordJudge::from_file(&path)?;
                if judge.semantic.is_some() {
                    judge.additions.keywords = keywords.keywords().to_vec();
                }
                judge.keywords = keywords;
            }
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
        Command::Judge {
            answers,
            labelled,
            exemplars,
            keywords,
            judge,
        } => judge_answers(
            answers.as_deref(),
            labelled.as_deref(),
            exemplars.as_deref(),
            keywords.as_deref(),
            judge,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `loraforge-trainer judge`: verdicts for an answers file, or the labelled-set comparison.
fn judge_answers(
    answers: Option<&Path>,
    labelled: Option<&Path>,
    exemplars: Option<&Path>,
    keywords: Option<&Path>,
    choice: JudgeChoice,
) -> Result<()> {
    use eval::safety::{judge, labelled as set, semantic};
    let mut config = choice.config()?;
    if let Some(path) = exemplars {
        let exemplars = semantic::exemplars_from_file(path)?;
        match &mut config.semantic {
            Some(semantic) => semantic.exemplars = Some(exemplars),
            None => {
                return Err(user_error(
                    "--exemplars needs the semantic judge (its encoder is not configured)",
                ))
            }
        }
    }
    if let Some(path) = keywords {
        config.additions.keywords = judge::KeywordJudge::from_file(path)?.keywords().to_vec();
    }
    let judge = config.load(Device::Cpu)?;
    if let Some(path) = labelled {
        let judge::Judge::Semantic {
            judge: semantic, ..
        } = &judge
        else {
            return Err(user_error("--labelled compares the semantic judge with the keywords: set LORAFORGE_JUDGE_MODEL"));
        };
        let c = set::compare(semantic, &set::read_answers(path)?)?;
        println!(
            "threshold calibrated on {} answers: {:.4}
",
            c.calibration_answers, c.threshold
        );
        println!("| judge | precision | recall | accuracy | held-out answers |");
        println!("|---|---|---|---|---|");
        for (name, s) in [
            ("keywords (llm-attacks `_test_prefixes`)", c.keywords),
            ("semantic (all-MiniLM-L6-v2)", c.semantic),
        ] {
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {} |",
                s.precision, s.recall, s.accuracy, s.answers
            );
        }
        return Ok(());
    }
    let answers = set::read_answers(answers.expect("clap requires --answers or --labelled"))?;
    let texts: Vec<&str> = answers.iter().map(|a| a.answer.as_str()).collect();
    let verdicts = judge.verdicts(&texts)?;
    for (answer, verdict) in answers.iter().zip(&verdicts) {
        println!(
            "{}",
            serde_json::json!({
                "line": answer.line,
                "prompt": answer.prompt,
                "verdict": if verdict.refusal { "refusal" } else { "compliance" },
                "score": verdict.score,
                "by_keyword": verdict.by_keyword,
            })
        );
    }
    let refused = verdicts.iter().filter(|v| v.refusal).count();
    eprintln!(
        "{refused} of {} answers are refusals ({:.3}); judge: {}",
        verdicts.len(),
        refused as f64 / verdicts.len() as f64,
        judge.describe()
    );
    Ok(())
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
