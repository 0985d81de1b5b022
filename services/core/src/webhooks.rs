//! Webhooks: subscriptions per project, deliveries written in the same transaction as
//! the change they announce, and a dispatcher that signs (HMAC-SHA256), sends and
//! retries them with exponential backoff.
//!
//! Each request carries `X-Loraforge-Event`, `X-Loraforge-Delivery`,
//! `X-Loraforge-Timestamp` (unix seconds) and `X-Loraforge-Signature: sha256=<hex>`,
//! the HMAC of `"<timestamp>.<body>"` under the subscription's secret.

use crate::error::{Error, Result};
use crate::settings::Settings;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub const JOB_SUCCEEDED: &str = "job.succeeded";
pub const JOB_FAILED: &str = "job.failed";
pub const VERSION_READY: &str = "adapter_version.ready";
pub const VERSION_QUARANTINED: &str = "adapter_version.quarantined";
pub const ALIAS_MOVED: &str = "alias.moved";
pub const EVENTS: &[&str] = &[
    JOB_SUCCEEDED,
    JOB_FAILED,
    VERSION_READY,
    VERSION_QUARANTINED,
    ALIAS_MOVED,
];

/// The API document's name for an event type: one of [`EVENTS`].
pub struct EventName;

impl utoipa::PartialSchema for EventName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(EVENTS.iter().copied()))
            .into()
    }
}

impl utoipa::ToSchema for EventName {}

/// A delivery is abandoned (`failed`) after this many attempts.
pub const MAX_ATTEMPTS: i32 = 8;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// An http(s) URL with a host (as WHATWG URL parsing reads it).
    #[schema(pattern = "^[hH][tT][tT][pP][sS]?://")]
    pub url: String,
    /// One or more event types.
    #[schema(min_items = 1, value_type = Vec<EventName>)]
    pub events: Vec<String>,
    /// Optional: one is generated when absent. Returned only at creation.
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct WebhookRow {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: WebhookRow,
    pub secret: String,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub event: String,
    #[schema(value_type = Object)]
    pub payload: Json<serde_json::Value>,
    pub status: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

pub async fn create(pool: &PgPool, project: &str, new: NewWebhook) -> Result<CreatedWebhook> {
    let url = url_ok(&new.url).map_err(|m| Error::invalid("url", m))?;
    if new.events.is_empty() {
        return Err(Error::invalid(
            "events",
            format!("name at least one of {}", EVENTS.join(", ")),
        ));
    }
    for (i, e) in new.events.iter().enumerate() {
        if !EVENTS.contains(&e.as_str()) {
            return Err(Error::invalid(
                format!("events[{i}]"),
                format!("unknown event {e:?}; known: {}", EVENTS.join(", ")),
            ));
        }
    }
    let secret = match new.secret {
        Some(s) if s.len() >= 16 => s,
        Some(_) => return Err(Error::invalid("secret", "must be at least 16 characters")),
        None => {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            format!("whsec_{}", hex::encode(bytes))
        }
    };
    let webhook: WebhookRow = sqlx::query_as!(
        WebhookRow,
        "INSERT INTO webhooks (id, project, url, secret, events) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, url, events, created_at",
        Uuid::new_v4(),
        project,
        url,
        &secret,
        &new.events[..],
    )
    .fetch_one(pool)
    .await?;
    Ok(CreatedWebhook { webhook, secret })
}

fn url_ok(raw: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err("must be an http(s) URL with a host".into());
    }
    Ok(parsed.to_string())
}

pub async fn list(pool: &PgPool, project: &str) -> Result<Vec<WebhookRow>, sqlx::Error> {
    sqlx::query_as!(
        WebhookRow,
        "SELECT id, url, events, created_at FROM webhooks WHERE project = $1 ORDER BY created_at",
        project,
    )
    .fetch_all(pool)
    .await
}

pub async fn delete(pool: &PgPool, project: &str, id: Uuid) -> Result<()> {
    let n = sqlx::query!(
        "DELETE FROM webhooks WHERE project = $1 AND id = $2",
        project,
        id
    )
    .execute(pool)
    .await?;
    if n.rows_affected() == 0 {
        return Err(Error::NotFound("webhook"));
    }
    Ok(())
}

pub async fn deliveries(pool: &PgPool, project: &str, id: Uuid) -> Result<Vec<DeliveryRow>> {
    let exists: Option<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM webhooks WHERE project = $1 AND id = $2",
        project,
        id
    )
    .fetch_optional(pool)
    .await?;
    exists.ok_or(Error::NotFound("webhook"))?;
    Ok(sqlx::query_as!(
        DeliveryRow,
        r#"SELECT id, event, payload AS "payload: Json<serde_json::Value>", status, attempts, last_status,
                  last_error, created_at, delivered_at
           FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at, id"#,
        id,
    )
    .fetch_all(pool)
    .await?)
}

/// Queues a delivery of `event` to every subscription of the project that wants it.
/// Call inside the transaction that makes the change, so both happen or neither. The
/// subscriptions are locked (`FOR KEY SHARE`) as they are read: a delete of one that commits
/// meanwhile is waited for and the subscription skipped, where the delivery's foreign key
/// failed before (a 500 that schemathesis's stateful phase found).
pub async fn enqueue(
    conn: &mut PgConnection,
    project: &str,
    event: &str,
    data: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let payload = serde_json::json!({"event": event, "project": project, "occurred_at": Utc::now(), "data": data});
    sqlx::query!(
        "INSERT INTO webhook_deliveries (id, webhook_id, event, payload, status)
         SELECT gen_random_uuid(), id, $2, $3, 'pending' FROM webhooks WHERE project = $1 AND $2 = ANY(events)
         FOR KEY SHARE",
        project,
        event,
        Json(payload) as _,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The signature header value for a body sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub async fn run_dispatcher(
    pool: PgPool,
    settings: std::sync::Arc<Settings>,
    mut stop: watch::Receiver<bool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    loop {
        match dispatch_due(&pool, &settings, &client).await {
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "webhook dispatch failed"),
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
}

/// Sends the deliveries that are due; returns how many it tried.
async fn dispatch_due(
    pool: &PgPool,
    settings: &Settings,
    client: &reqwest::Client,
) -> Result<usize, sqlx::Error> {
    // Claim by pushing the next attempt out, so another dispatcher skips these meanwhile.
    let due: Vec<(Uuid, String, Json<serde_json::Value>, i32, String, String)> = sqlx::query!(
        r#"UPDATE webhook_deliveries d SET next_attempt_at = now() + interval '60 seconds'
           FROM webhooks w
           WHERE w.id = d.webhook_id AND d.id IN (
               SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()
               ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED)
           RETURNING d.id, d.event, d.payload AS "payload: Json<serde_json::Value>", d.attempts, w.url, w.secret"#,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r.event, r.payload, r.attempts, r.url, r.secret))
    .collect();
    for (id, event, payload, attempts, url, secret) in &due {
        let body = serde_json::to_vec(&payload.0).unwrap_or_default();
        let timestamp = Utc::now().timestamp();
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-loraforge-event", event)
            .header("x-loraforge-delivery", id.to_string())
            .header("x-loraforge-timestamp", timestamp.to_string())
            .header("x-loraforge-signature", signature(secret, timestamp, &body))
            .body(body)
            .send()
            .await;
        let (ok, status, error) = match result {
            Ok(r) => (
                r.status().is_success(),
                Some(r.status().as_u16() as i32),
                None,
            ),
            Err(e) => (false, None, Some(e.without_url().to_string())),
        };
        let attempts = attempts + 1;
        let backoff = settings.webhook_backoff.as_secs_f64() * 2f64.powi(attempts - 1);
        sqlx::query!(
            "UPDATE webhook_deliveries SET attempts = $2::int, last_status = $3, last_error = $4,
                    status = CASE WHEN $5 THEN 'delivered' WHEN $2::int >= $6::int THEN 'failed' ELSE 'pending' END,
                    delivered_at = CASE WHEN $5 THEN now() END,
                    next_attempt_at = now() + make_interval(secs => $7)
             WHERE id = $1",
            id,
            attempts,
            status,
            error,
            ok,
            MAX_ATTEMPTS,
            backoff.min(3600.0),
        )
        .execute(pool)
        .await?;
    }
    Ok(due.len())
}
