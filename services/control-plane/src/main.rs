//! `loraforge`: the control plane binary.

mod models_command;

use anyhow::Context;
use clap::{Parser, Subcommand};
use loraforge::{Application, Settings};

#[derive(Parser)]
#[command(
    name = "loraforge",
    version,
    about = "Train LoRA-family adapters and keep them as versioned artifacts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (API, scheduler, executor) until SIGINT/SIGTERM.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Find objects in the artifact store that no registry entry accounts for; with
    /// --apply, delete them. Prints a JSON report.
    Gc {
        /// Delete the orphans (the default is a dry run that only lists them).
        #[arg(long)]
        apply: bool,
        /// Pending versions younger than this may still be uploading and are kept.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
    /// Print the LoraJob CustomResourceDefinition (YAML), for `kubectl apply -f -`.
    Crd,
    /// Import base models (GGUF) and register model directories.
    Models {
        #[command(subcommand)]
        command: models_command::ModelsCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it once (it is stored only as a hash).
    Create {
        #[arg(long)]
        project: String,
        /// read, submit or admin
        #[arg(long)]
        scope: loraforge::auth::Scope,
    },
    /// Revoke the key with this prefix (the part after `lf_`).
    Revoke {
        #[arg(long)]
        prefix: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    if let Command::Crd = cli.command {
        print!("{}", loraforge::crd::yaml());
        return Ok(());
    }
    let settings = Settings::from_env()?;
    match cli.command {
        Command::Crd => unreachable!("handled above: it needs no settings"),
        Command::Serve => {
            if !settings.auth_enabled {
                tracing::warn!("LORAFORGE_AUTH=disabled: every request acts as an admin of the default project");
            }
            let app = Application::build(settings).await?;
            println!("loraforge listening on http://{}", app.local_addr());
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate => {
            loraforge::connect(&settings).await.context("migrating")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys { command } => {
            let (pool, _) = loraforge::connect(&settings).await?;
            match command {
                KeysCommand::Create { project, scope } => {
                    let key = loraforge::auth::create_key(&pool, &project, scope).await?;
                    println!("{}", serde_json::to_string_pretty(&key)?);
                    eprintln!("store this key now: it cannot be shown again");
                }
                KeysCommand::Revoke { prefix } => {
                    if !loraforge::auth::revoke_key(&pool, &prefix).await? {
                        anyhow::bail!("no active key with prefix {prefix}");
                    }
                    println!("revoked");
                }
            }
            Ok(())
        }
        Command::Gc { apply, grace_secs } => {
            let (pool, store) = loraforge::connect(&settings).await?;
            let grace = std::time::Duration::from_secs(grace_secs);
            let report = loraforge::registry::gc::collect(&pool, &store, grace, !apply).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Models { command } => models_command::run(command).await,
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("LORAFORGE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: no new work is claimed; running workers keep their leases");
}
