//! `loraforge`: the control plane binary.

mod models_command;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use loraforge::{Application, Settings};
use loraforge_cli::keys::{KeysArgs, KeysCommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "loraforge",
    version,
    about = "Train LoRA-family adapters and keep them as versioned artifacts",
    after_help = "Server: serve, migrate, gc, crd, models import, keys create --project / revoke --prefix.\n\
                  Client (over the HTTP API; LORAFORGE_URL, LORAFORGE_API_KEY or ~/.config/loraforge/config.toml): \
                  jobs, adapters, lineage, datasets, methods, models register|list|get, keys, whoami. docs/cli.md has the details."
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
    /// API keys: create, list, revoke (through the API; with --project or --prefix, directly
    /// in the database, the bootstrap path for a project's first key).
    Keys(KeysArgs),
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
    /// Base models: import a GGUF file; register, list and get registered ones.
    Models(models_command::ModelsArgs),
    /// Print a shell completion script: `loraforge completions bash > /etc/bash_completion.d/loraforge`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    #[command(flatten)]
    Client(loraforge_cli::ClientCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Client(command) => loraforge_cli::run(command).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "loraforge",
                &mut std::io::stdout(),
            );
            0
        }
        Command::Models(args) => models_command::run(args).await,
        Command::Keys(args) => match args.command {
            KeysCommand::Create {
                project: Some(project),
                scope,
            } => {
                server(keys_in_database(
                    KeysInDatabase::Create(project, scope),
                    args.common.output,
                ))
                .await
            }
            KeysCommand::Revoke {
                prefix: Some(prefix),
                ..
            } => {
                server(keys_in_database(
                    KeysInDatabase::Revoke(prefix),
                    args.common.output,
                ))
                .await
            }
            _ => loraforge_cli::finish(loraforge_cli::keys::run(args).await),
        },
        Command::Serve => server(serve()).await,
        Command::Migrate => {
            server(async {
                let settings = Settings::from_env()?;
                loraforge::connect(&settings).await.context("migrating")?;
                println!("migrations applied");
                Ok(())
            })
            .await
        }
        Command::Gc { apply, grace_secs } => {
            server(async move {
                let settings = Settings::from_env()?;
                let (pool, store) = loraforge::connect(&settings).await?;
                let grace = std::time::Duration::from_secs(grace_secs);
                let report = loraforge::registry::gc::collect(&pool, &store, grace, !apply).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            })
            .await
        }
        Command::Crd => {
            print!("{}", loraforge::crd::yaml());
            0
        }
    };
    ExitCode::from(code)
}

/// A server-side command: logs through tracing; an error is printed and exits 1.
async fn server(command: impl std::future::Future<Output = anyhow::Result<()>>) -> u8 {
    init_tracing();
    match command.await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    if !settings.auth_enabled {
        tracing::warn!(
            "LORAFORGE_AUTH=disabled: every request acts as an admin of the default project"
        );
    }
    let app = Application::build(settings).await?;
    println!("loraforge listening on http://{}", app.local_addr());
    app.run_until(shutdown_signal()).await
}

enum KeysInDatabase {
    Create(String, loraforge_cli::keys::Scope),
    Revoke(String),
}

/// `keys create --project` and `keys revoke --prefix`: straight to the database, for the
/// first key of a project (no key exists yet to call the API with).
async fn keys_in_database(
    what: KeysInDatabase,
    output: loraforge_cli::Output,
) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let (pool, _) = loraforge::connect(&settings).await?;
    match what {
        KeysInDatabase::Create(project, scope) => {
            let scope = scope.as_str().parse().map_err(anyhow::Error::msg)?;
            let key = loraforge::auth::create_key(&pool, &project, scope).await?;
            loraforge_cli::keys::print_created(output, &serde_json::to_value(&key)?);
        }
        KeysInDatabase::Revoke(prefix) => {
            let prefix = loraforge_cli::keys::prefix_of(&prefix);
            if !loraforge::auth::revoke_key(&pool, prefix).await? {
                anyhow::bail!("no active key with prefix {prefix}");
            }
            println!("revoked");
        }
    }
    Ok(())
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
