//! The lease kept alive while a job runs, and a user's cancel request passed on to it.

use super::client::{refused, ControlPlane};
use loraforge_spec::worker::HeartbeatResponse;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Seconds between heartbeats unless `LORAFORGE_HEARTBEAT_SECS` says otherwise.
const DEFAULT_HEARTBEAT_SECS: u64 = 10;

/// How often the lease is renewed.
pub fn heartbeat_interval() -> Duration {
    let secs = std::env::var("LORAFORGE_HEARTBEAT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s: &u64| s > 0);
    Duration::from_secs(secs.unwrap_or(DEFAULT_HEARTBEAT_SECS))
}

/// Keeps the lease alive and turns a user's cancel request into the training loop's flag.
/// A failed heartbeat is only logged: the lease outlives a few of them. A refused one means
/// the lease already expired and the job went to another attempt: this one stops (`lease_lost`),
/// so that it writes no more checkpoints beside its successor's.
pub async fn send_heartbeats(
    control_plane: Arc<ControlPlane>,
    cancel: Arc<AtomicBool>,
    lease_lost: Arc<AtomicBool>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match control_plane
            .post::<(), HeartbeatResponse>("heartbeat", None)
            .await
        {
            Ok(response) if response.cancel_requested => {
                if !cancel.swap(true, Ordering::Relaxed) {
                    tracing::info!("cancel requested; stopping");
                }
            }
            Ok(_) => {}
            Err(err) if refused(&err) => {
                tracing::warn!("heartbeat refused, the lease is lost; stopping: {err:#}");
                lease_lost.store(true, Ordering::Relaxed);
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(err) => tracing::warn!("heartbeat failed: {err:#}"),
        }
    }
}
