//! Wiring: database, migrations, store, executor, background loops and the HTTP server.

use anyhow::Context as _;
use loraforge_core::executor::{self, reconcile, WorkerReport};
use loraforge_core::metrics::Metrics;
use loraforge_core::registry::cache::{self, ReadCache};
use loraforge_core::settings::Settings;
use loraforge_core::{db, lease, operator, scheduler, webhooks, Context};
use loraforge_storage::Store;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

pub struct Application {
    listener: tokio::net::TcpListener,
    ctx: Context,
    registry: Registry,
    reports: mpsc::UnboundedReceiver<WorkerReport>,
}

/// The database (created if missing, migrated) and the artifact store.
pub async fn connect(settings: &Settings) -> anyhow::Result<(PgPool, Store)> {
    let pool = db::connect(settings).await?;
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
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let executor = executor::build(&settings, reports_tx)
            .await
            .with_context(|| format!("starting the {} executor", settings.executor.name()))?;
        tracing::info!(%addr, executor = executor.name(), storage = settings.storage_url, "control plane ready");
        // file:// inputs are read from these directories only; make the default one exist.
        for root in &settings.file_roots {
            if let Err(e) = std::fs::create_dir_all(root) {
                tracing::warn!(root = %root.display(), error = %e, "cannot create an input directory");
            }
        }
        let roots: Vec<String> = settings
            .file_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        tracing::info!(
            roots = roots.join(":"),
            "file:// inputs are read from these directories (LORAFORGE_FILE_ROOTS)"
        );
        let read_cache = Arc::new(ReadCache::default());
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry, &read_cache));
        let ctx = Context {
            pool,
            store,
            settings: Arc::new(settings),
            executor,
            worker_api_url,
            read_cache,
            metrics,
        };
        Ok(Application {
            listener,
            ctx,
            registry,
            reports,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Serves until `shutdown` resolves, then stops claiming work and returns.
    /// Running workers keep going; their leases let a restarted control plane pick them up.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = vec![
            tokio::spawn(scheduler::run(ctx.clone(), self.reports, stop_rx.clone())),
            tokio::spawn(reconcile::run(ctx.clone(), stop_rx.clone())),
            tokio::spawn(lease::run(ctx.clone(), stop_rx.clone())),
            tokio::spawn(webhooks::run_dispatcher(
                ctx.pool.clone(),
                ctx.settings.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(cache::listen(
                ctx.pool.clone(),
                ctx.read_cache.clone(),
                stop_rx.clone(),
            )),
        ];
        if let Some(settings) = ctx.settings.operator.clone() {
            loops.push(tokio::spawn(operator::run(ctx.clone(), settings, stop_rx)));
        }
        let limits = crate::serve::Limits {
            header_timeout: ctx.settings.header_timeout,
            max_connections: ctx.settings.max_connections,
        };
        let router = loraforge_api::router(ctx, self.registry);
        crate::serve::serve(self.listener, router, limits, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
        for task in loops {
            let _ = task.await;
        }
        Ok(())
    }
}
