//! Postgres LISTEN with reconnection: the one loop behind the scheduler's wake-ups and the
//! registry cache's evictions. A notification sent while the connection is down is lost,
//! so a subscriber hears `Connected` after every (re)connection and must assume it missed
//! something then.

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::time::Duration;

/// How long to wait before trying to connect again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    /// Listening (again); anything sent before now may have been missed.
    Connected,
    /// One notification's payload.
    Message(String),
    /// The connection dropped; reconnecting on the next call.
    Disconnected,
}

pub struct Subscription {
    pool: PgPool,
    channel: &'static str,
    listener: Option<PgListener>,
}

impl Subscription {
    pub fn new(pool: PgPool, channel: &'static str) -> Self {
        Subscription {
            pool,
            channel,
            listener: None,
        }
    }

    /// The next signal; waits (retrying the connection every second) until there is one.
    /// Cancel-safe: dropping the future loses no notification that was already received.
    pub async fn next(&mut self) -> Signal {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.connect().await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        return Signal::Connected;
                    }
                    Err(e) => {
                        tracing::warn!(channel = self.channel, error = %e, "LISTEN cannot connect; retrying");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            };
            return match listener.try_recv().await {
                Ok(Some(n)) => Signal::Message(n.payload().to_string()),
                Ok(None) | Err(_) => {
                    tracing::warn!(channel = self.channel, "LISTEN connection lost");
                    self.listener = None;
                    Signal::Disconnected
                }
            };
        }
    }

    async fn connect(&self) -> sqlx::Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.ignore_pool_close_event(true);
        listener.listen(self.channel).await?;
        Ok(listener)
    }
}
