//! Prometheus metrics (`prometheus-client`). Each family is kept by the code that changes
//! what it counts:
//! - submissions (`jobs::submission`) and settled attempts by outcome (`jobs::attempts`);
//! - the queue depth, active leases and free executor slots: set by the scheduler after
//!   every pass of claims, and by the lease monitor after every pass;
//! - the training progress of running jobs (step, loss, tokens/s) from the progress events
//!   their workers report, dropped when the attempt ends;
//! - job durations, observed when a job succeeds; the registry read cache's hits;
//! - jobs and adapter versions by status, and undelivered webhooks: read from Postgres when
//!   scraped ([`Metrics::refresh_totals`]), because these are totals over every replica's
//!   work and one replica does not see every change.
//!
//! The HTTP face registers its request counters and latency histograms in the same
//! [`Registry`] (`loraforge_api::metrics`).

use crate::jobs::attempts::{Outcome, Settled};
use crate::jobs::JobRow;
use crate::registry::cache::ReadCache;
use loraforge_spec::worker::EventPayload;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use uuid::Uuid;

/// Label sets: a few fixed keys with their values.
pub type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    pub jobs_submitted: Counter,
    attempts_settled: Family<Labels, Counter>,
    queue_depth: Gauge,
    leases_active: Gauge,
    pub executor_free_slots: Family<Labels, Gauge>,
    job_duration: Histogram,
    jobs: Family<Labels, Gauge>,
    versions: Family<Labels, Gauge>,
    webhooks_pending: Gauge,
    pub training: TrainingProgress,
}

impl Metrics {
    /// Registers every family of the core in `registry`; the read cache's counters too.
    pub fn new(registry: &mut Registry, cache: &ReadCache) -> Metrics {
        let m = Metrics {
            jobs_submitted: Counter::default(),
            attempts_settled: Family::default(),
            queue_depth: Gauge::default(),
            leases_active: Gauge::default(),
            executor_free_slots: Family::default(),
            // 10 s to about 2 days.
            job_duration: Histogram::new(exponential_buckets(10.0, 2.0, 15)),
            jobs: Family::default(),
            versions: Family::default(),
            webhooks_pending: Gauge::default(),
            training: TrainingProgress::default(),
        };
        let r = registry.sub_registry_with_prefix("loraforge");
        r.register(
            "jobs_submitted",
            "Jobs accepted by this replica.",
            m.jobs_submitted.clone(),
        );
        r.register(
            "attempts_settled",
            "Attempts this replica ended, by outcome and by what followed (requeued, failed, cancelled).",
            m.attempts_settled.clone(),
        );
        r.register(
            "queue_depth",
            "Queued jobs claimable now.",
            m.queue_depth.clone(),
        );
        r.register(
            "leases_active",
            "Jobs whose worker holds a lease.",
            m.leases_active.clone(),
        );
        r.register(
            "executor_free_slots",
            "Workers this replica could still start.",
            m.executor_free_slots.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Submission to success of jobs that succeeded.",
            m.job_duration.clone(),
        );
        r.register("jobs", "Jobs by status.", m.jobs.clone());
        r.register(
            "adapter_versions",
            "Adapter versions by status.",
            m.versions.clone(),
        );
        r.register(
            "webhook_deliveries_pending",
            "Webhook deliveries not yet delivered.",
            m.webhooks_pending.clone(),
        );
        r.register(
            "registry_cache_requests",
            "This replica's resolve and version reads, by whether the read cache answered.",
            cache.requests.clone(),
        );
        m.training.register(r);
        m
    }

    /// Recounts the queue and the leases (after the code that changes them has run).
    pub async fn observe_queue(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let (queued, leased) = crate::jobs::queue_and_leases(pool).await?;
        self.queue_depth.set(queued);
        self.leases_active.set(leased);
        Ok(())
    }

    pub fn attempt_settled(&self, outcome: &Outcome, settled: &Settled) {
        let result = match settled {
            Settled::Stale => return,
            Settled::Cancelled => "cancelled",
            Settled::Requeued { .. } => "requeued",
            Settled::Failed(_) => "failed",
        };
        self.attempts_settled
            .get_or_create(&vec![
                ("outcome", outcome.label().to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }

    pub fn job_succeeded(&self, job: &JobRow) {
        let seconds = (chrono::Utc::now() - job.created_at).num_milliseconds() as f64 / 1000.0;
        self.job_duration.observe(seconds.max(0.0));
    }

    /// Reads the totals over all replicas from Postgres (see the module docs).
    pub async fn refresh_totals(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let jobs: Vec<(String, i64)> =
            sqlx::query!(r#"SELECT status, count(*) AS "count!" FROM jobs GROUP BY status"#)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| (r.status, r.count))
                .collect();
        let versions: Vec<(String, i64)> = sqlx::query!(
            r#"SELECT status, count(*) AS "count!" FROM adapter_versions GROUP BY status"#
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.status, r.count))
        .collect();
        let pending: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM webhook_deliveries WHERE status = 'pending'"#,
        )
        .fetch_one(pool)
        .await?;
        for (family, rows) in [(&self.jobs, jobs), (&self.versions, versions)] {
            family.clear();
            for (status, n) in rows {
                family.get_or_create(&vec![("status", status)]).set(n);
            }
        }
        self.webhooks_pending.set(pending);
        Ok(())
    }
}

/// The progress of running jobs, as their workers report it.
#[derive(Default)]
pub struct TrainingProgress {
    step: Family<Labels, Gauge>,
    loss: Family<Labels, FloatGauge>,
    tokens_per_second: Family<Labels, FloatGauge>,
    /// job -> its label set, to drop its series when it ends.
    running: Mutex<HashMap<Uuid, Labels>>,
}

impl TrainingProgress {
    fn register(&self, r: &mut Registry) {
        r.register(
            "training_step",
            "Last optimizer step of each running job.",
            self.step.clone(),
        );
        r.register(
            "training_loss",
            "Last training loss of each running job.",
            self.loss.clone(),
        );
        r.register(
            "training_tokens_per_second",
            "Training throughput of each running job.",
            self.tokens_per_second.clone(),
        );
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Labels>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what a progress event says.
    pub fn observe(&self, job: &JobRow, event: &EventPayload) {
        let EventPayload::Progress {
            step,
            loss,
            tokens_per_second,
            ..
        } = event
        else {
            return;
        };
        let labels = self
            .running()
            .entry(job.id)
            .or_insert_with(|| {
                vec![
                    ("job_id", job.id.to_string()),
                    ("adapter", job.adapter_name.clone()),
                ]
            })
            .clone();
        self.step.get_or_create(&labels).set(i64::from(*step));
        self.loss.get_or_create(&labels).set(*loss);
        self.tokens_per_second
            .get_or_create(&labels)
            .set(*tokens_per_second);
    }

    /// The job is no longer training here: drop its series.
    pub fn forget(&self, job_id: Uuid) {
        if let Some(labels) = self.running().remove(&job_id) {
            self.step.remove(&labels);
            self.loss.remove(&labels);
            self.tokens_per_second.remove(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn families_encode_with_the_names_dashboards_use() {
        let cache = ReadCache::default();
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry, &cache);
        m.queue_depth.set(3);
        m.jobs
            .get_or_create(&vec![("status", "succeeded".into())])
            .set(1);
        cache.requests.get_or_create(&vec![("result", "hit")]).inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("loraforge_queue_depth 3"), "{text}");
        assert!(
            text.contains("loraforge_jobs{status=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("loraforge_registry_cache_requests_total{result=\"hit\"} 1"),
            "{text}"
        );
    }
}
