//! Training's events, forwarded to the control plane in batches by a background task, so the
//! training loop never waits for HTTP except where it asks to (a checkpoint's announcement).

use super::client::{refused, ControlPlane};
use crate::training::Reporter;
use anyhow::{anyhow, Result};
use loraforge_spec::worker::{EventBatch, EventPayload};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Events are sent at most this often, so a fast loop does not flood the control plane.
const EVENT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// The control plane's limit on events per batch.
const MAX_EVENTS_PER_BATCH: usize = 1000;
/// Events that could not be delivered because the control plane was unreachable or failing
/// (a restart, a database outage) are sent again after this delay, doubling up to
/// `RETRY_MAX_DELAY`, for at most `RETRY_LIMIT`.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
const RETRY_LIMIT: Duration = Duration::from_secs(120);

/// What the training thread hands the forwarding task.
enum Forwarded {
    Event(EventPayload),
    /// Answered once every event handed over before it is recorded, or could not be.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// A [`Reporter`] that hands events to a background task, which posts them in batches.
pub struct EventForwarder {
    sender: mpsc::UnboundedSender<Forwarded>,
    /// Until [`EventForwarder::finish`].
    task: Option<JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
}

impl EventForwarder {
    pub fn start(runtime: &Runtime, control_plane: Arc<ControlPlane>) -> EventForwarder {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = runtime.spawn(forward_events(control_plane, receiver));
        EventForwarder {
            sender,
            task: Some(task),
            runtime: runtime.handle().clone(),
        }
    }

    /// Sends what is still queued and stops; events reported afterwards are dropped.
    pub async fn finish(&mut self) {
        // Closing the channel ends the task once it has sent what is queued.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.sender, closed));
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::warn!("event forwarder stopped: {err}");
            }
        }
    }
}

impl Reporter for EventForwarder {
    fn report(&mut self, event: EventPayload) {
        if let EventPayload::Log { message } = &event {
            tracing::info!("{message}");
        }
        // Until `finish` the task receives every event; afterwards the send fails and is ignored.
        let _ = self.sender.send(Forwarded::Event(event));
    }

    fn flush(&mut self) -> Result<()> {
        let (answer, answered) = oneshot::channel();
        let stopped = || anyhow!("the event forwarder stopped");
        self.sender
            .send(Forwarded::Flush(answer))
            .map_err(|_| stopped())?;
        match self.runtime.block_on(answered) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(anyhow!(
                "the control plane did not record the job's events: {message}"
            )),
            Err(_) => Err(stopped()),
        }
    }
}

/// Posts events in batches of what arrived within [`EVENT_FLUSH_INTERVAL`] (at once when a
/// flush is asked for), in order, retrying while the control plane is unreachable or failing.
async fn forward_events(
    control_plane: Arc<ControlPlane>,
    mut receiver: mpsc::UnboundedReceiver<Forwarded>,
) {
    while let Some(first) = receiver.recv().await {
        let (mut events, mut flushes) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        let deadline = Instant::now() + EVENT_FLUSH_INTERVAL;
        while let Some(item) = next.take() {
            match item {
                Forwarded::Event(event) => events.push(event),
                Forwarded::Flush(answer) => flushes.push(answer),
            }
            if flushes.is_empty() {
                next = tokio::time::timeout_at(deadline, receiver.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        let delivered = deliver_events(&control_plane, events).await;
        if let Err(message) = &delivered {
            tracing::warn!("events were lost: {message}");
        }
        for answer in flushes {
            let _ = answer.send(delivered.clone());
        }
    }
}

async fn deliver_events(
    control_plane: &ControlPlane,
    events: Vec<EventPayload>,
) -> Result<(), String> {
    for chunk in events.chunks(MAX_EVENTS_PER_BATCH) {
        let batch = EventBatch {
            events: chunk.to_vec(),
        };
        let (started, mut delay) = (Instant::now(), RETRY_FIRST_DELAY);
        loop {
            match control_plane.post::<_, ()>("events", Some(&batch)).await {
                Ok(()) => break,
                Err(err) if !refused(&err) && started.elapsed() < RETRY_LIMIT => {
                    tracing::warn!("could not send {} events, retrying: {err:#}", chunk.len());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                }
                Err(err) => return Err(format!("{} events not sent: {err:#}", chunk.len())),
            }
        }
    }
    Ok(())
}
