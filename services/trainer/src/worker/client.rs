//! The control plane's worker routes for one job (`loraforge_spec::worker`), over HTTP with
//! the job's token.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use uuid::Uuid;

/// The worker routes of the control plane for one job, authenticated with its token.
pub struct ControlPlane {
    http: reqwest::Client,
    job_url: String,
    token: String,
}

impl ControlPlane {
    pub fn new(api: &str, job_id: Uuid, token: String) -> Result<ControlPlane> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(ControlPlane {
            http,
            job_url: format!("{}/v1/worker/jobs/{job_id}", api.trim_end_matches('/')),
            token,
        })
    }

    pub async fn get<R: DeserializeOwned>(&self) -> Result<R> {
        let request = self.http.get(&self.job_url).bearer_auth(&self.token);
        parse(&self.job_url, send(request, &self.job_url).await?)
    }

    /// POSTs `body` (if any) to `{job}/{path}`; `R = ()` for routes that answer 204.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let url = format!("{}/{path}", self.job_url);
        let mut request = self.http.post(&url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        parse(&url, send(request, &url).await?)
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
