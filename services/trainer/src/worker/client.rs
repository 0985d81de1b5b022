//! The control plane's worker routes for one job (`loraforge_spec::worker`), over HTTP with
//! the job's token.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use uuid::Uuid;

/// The worker routes of the control plane for one job, authenticated with its token.
/// A call the control plane did not answer (it restarts, the network blips) or answered with
/// a server error is tried again with backoff for up to `retry_for` (the lease, by default
/// 60 s: `LORAFORGE_WORKER_RETRY_SECS`), so a short outage costs no attempt; a refusal (4xx)
/// is final at once. Every route is safe to repeat: reads, heartbeats, stage and version
/// reservation are idempotent on the control plane's side.
pub struct ControlPlane {
    http: reqwest::Client,
    job_url: String,
    token: String,
    retry_for: Duration,
}

/// The first pause between tries; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);

impl ControlPlane {
    pub fn new(api: &str, job_id: Uuid, token: String) -> Result<ControlPlane> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let retry_for = std::env::var("LORAFORGE_WORKER_RETRY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_secs);
        Ok(ControlPlane {
            http,
            job_url: format!("{}/v1/worker/jobs/{job_id}", api.trim_end_matches('/')),
            token,
            retry_for,
        })
    }

    pub async fn get<R: DeserializeOwned>(&self) -> Result<R> {
        let body = self
            .with_retries(&self.job_url, || {
                self.http.get(&self.job_url).bearer_auth(&self.token)
            })
            .await?;
        parse(&self.job_url, body)
    }

    /// Sends the request `make` builds until it is answered, retrying what is worth it.
    async fn with_retries(
        &self,
        url: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes> {
        let start = std::time::Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            match send(make(), url).await {
                Ok(body) => return Ok(body),
                Err(err) if refused(&err) || start.elapsed() + pause > self.retry_for => {
                    return Err(err)
                }
                Err(err) => {
                    tracing::warn!("{url}: {err:#}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    /// POSTs `body` (if any) to `{job}/{path}`; `R = ()` for routes that answer 204.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let url = format!("{}/{path}", self.job_url);
        let answer = self
            .with_retries(&url, || {
                let request = self.http.post(&url).bearer_auth(&self.token);
                match body {
                    Some(body) => request.json(body),
                    None => request,
                }
            })
            .await?;
        parse(&url, answer)
    }
}

/// An answer of the control plane other than success.
#[derive(Debug, thiserror::Error)]
#[error("{url} answered {status}: {body}")]
struct Unsuccessful {
    url: String,
    status: reqwest::StatusCode,
    body: String,
}

/// Whether the control plane refused a request (4xx: a stale token, a request it will never
/// take), as opposed to failing to answer it, which is worth another try.
pub fn refused(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Unsuccessful>()
        .is_some_and(|e| e.status.is_client_error())
}

async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<bytes::Bytes> {
    let response = request
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        let body: String = String::from_utf8_lossy(&body).chars().take(500).collect();
        return Err(Unsuccessful {
            url: url.to_string(),
            status,
            body,
        }
        .into());
    }
    Ok(body)
}

/// Parses an answer; an empty body reads as JSON `null`, which is what `()` expects.
fn parse<R: DeserializeOwned>(url: &str, body: bytes::Bytes) -> Result<R> {
    let body: &[u8] = if body.is_empty() { b"null" } else { &body };
    serde_json::from_slice(body).with_context(|| format!("unexpected answer from {url}"))
}
