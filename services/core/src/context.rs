//! What every operation and background loop of the core shares.

use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::registry::cache::ReadCache;
use crate::settings::Settings;
use loraforge_storage::Store;
use sqlx::PgPool;
use std::sync::Arc;

#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub store: Store,
    pub settings: Arc<Settings>,
    pub executor: Arc<dyn Executor>,
    /// The control plane's URL as workers reach it.
    pub worker_api_url: String,
    /// Serialized registry answers, evicted on change (see `registry::cache`).
    pub read_cache: Arc<ReadCache>,
    pub metrics: Arc<Metrics>,
}
