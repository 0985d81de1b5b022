//! Wiring: database, migrations, store, executor, background loops and the HTTP server.

use crate::executor::{self, Executor};
use crate::registry::cache::{self, ReadCache};
use crate::settings::Settings;
use crate::{api, lease, scheduler, webhooks};
use anyhow::Context;
use loraforge_storage::Store;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// What every request handler and background loop shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub store: Store,
    pub settings: Arc<Settings>,
    pub executor: Arc<dyn Executor>,
    /// The control plane's URL as workers reach it.
    pub worker_api_url: String,
    /// Serialized registry answers, evicted on change (see `registry::cache`).
    pub read_cache: Arc<ReadCache>,
}

pub struct Application {
    listener: tokio::net::TcpListener,
    state: AppState,
    exits: mpsc::UnboundedReceiver<crate::jobs::WorkerExit>,
}

/// The database (created if missing, migrated) and the artifact store.
pub async fn connect(settings: &Settings) -> anyhow::Result<(PgPool, Store)> {
    if !Postgres::database_exists(&settings.database_url)
        .await
        .context("connecting to Postgres")?
    {
        Postgres::create_database(&settings.database_url)
            .await
            .context("creating the database")?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&settings.database_url)
        .await
        .context("connecting to Postgres")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    let store = Store::create(&settings.storage_url).context("opening the artifact store")?;
    Ok((pool, store))
}

impl Application {
    /// Connects (creating the database if missing), migrates, binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let (pool, store) = connect(&settings).await?;
        let listener = tokio::net::TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        let addr = listener.local_addr()?;
        let worker_api_url = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let executor = executor::build(&settings, exits_tx);
        tracing::info!(%addr, executor = executor.name(), storage = settings.storage_url, "control plane ready");
        let state = AppState {
            pool,
            store,
            settings: Arc::new(settings),
            executor,
            worker_api_url,
            read_cache: Arc::default(),
        };
        Ok(Application {
            listener,
            state,
            exits,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops claiming work and returns.
    /// Running workers keep going; their leases let a restarted control plane pick them up.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let scheduler = tokio::spawn(scheduler::run(
            self.state.clone(),
            self.exits,
            stop_rx.clone(),
        ));
        let monitor = tokio::spawn(lease::run(self.state.clone(), stop_rx.clone()));
        let dispatcher = tokio::spawn(webhooks::run_dispatcher(
            self.state.clone(),
            stop_rx.clone(),
        ));
        let cache_listener = tokio::spawn(cache::listen(self.state.clone(), stop_rx));
        let router = api::router(self.state.clone());
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            })
            .await?;
        let _ = scheduler.await;
        let _ = monitor.await;
        let _ = dispatcher.await;
        let _ = cache_listener.await;
        Ok(())
    }
}
