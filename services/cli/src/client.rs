//! The HTTP client: requests with the configured key, errors read from problem+json.

use crate::config::Config;
use crate::error::{ApiFailure, CliError, Result};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// An RFC 9457 problem document as the API sends it; every field optional, so a proxy's
/// HTML error page still makes a readable error.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Problem {
    pub title: String,
    pub code: String,
    pub detail: String,
    pub field: Option<String>,
    pub errors: Vec<FieldError>,
    /// What to do about it, where the server knows.
    pub hint: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Clone)]
pub struct Client {
    config: Config,
    http: reqwest::Client,
}

impl Client {
    pub fn new(config: Config) -> Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("loraforge-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::usage(format!("building the HTTP client: {e}")))?;
        Ok(Client { config, http })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The URL of an API path made of segments, each percent-encoded (a name can never
    /// reach another route), with query pairs (`None` values left out).
    pub fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> url::Url {
        let mut url = url::Url::parse(&self.config.url).expect("checked when configured");
        url.path_segments_mut()
            .expect("http URLs have paths")
            .pop_if_empty()
            .extend(segments);
        let pairs: Vec<(&str, &String)> = query
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
            .collect();
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        url
    }

    pub fn request(&self, method: Method, url: url::Url) -> RequestBuilder {
        let request = self.http.request(method, url);
        match &self.config.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends a request; a non-2xx answer becomes [`CliError::Api`].
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let (client, request) = request.build_split();
        let request = request.map_err(|e| CliError::usage(format!("bad request: {e}")))?;
        let method = request.method().to_string();
        let path = request.url().path().to_string();
        let response = client
            .execute(request)
            .await
            .map_err(|e| self.connection_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let problem = serde_json::from_str::<Problem>(&text).unwrap_or_else(|_| Problem {
            detail: text
                .chars()
                .take(500)
                .collect::<String>()
                .trim()
                .to_string(),
            ..Problem::default()
        });
        Err(ApiFailure {
            method,
            path,
            status: status.as_u16(),
            problem,
        }
        .into())
    }

    /// `GET` an API path as JSON.
    pub async fn get(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Result<Value> {
        let url = self.url(segments, query);
        self.json_of(self.request(Method::GET, url)).await
    }

    /// Sends a request and reads its JSON answer (`null` for an empty body).
    pub async fn json_of(&self, request: RequestBuilder) -> Result<Value> {
        let response = self.send(request).await?;
        read_json(response).await
    }

    /// `method` with a JSON body.
    pub async fn send_json(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut request = self.request(method, self.url(segments, &[]));
        if let Some(body) = body {
            request = request.json(body);
        }
        self.json_of(request).await
    }

    pub fn connection_error(&self, e: &reqwest::Error) -> CliError {
        let url = &self.config.url;
        let mut message = format!("could not reach the control plane at {url}: {e}");
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        let hint = (e.is_connect() || e.is_timeout()).then(|| {
            format!(
                "is `loraforge serve` running there? The URL came from {}; set --url, {} or a profile",
                self.config.url_source,
                crate::config::URL_ENV
            )
        });
        CliError::Connection { message, hint }
    }
}

pub async fn read_json(response: Response) -> Result<Value> {
    let url = response.url().path().to_string();
    let bytes = response.bytes().await.map_err(|e| CliError::Connection {
        message: format!("reading the answer of {url}: {e}"),
        hint: None,
    })?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| CliError::Connection {
        message: format!("{url} answered something that is not JSON: {e}"),
        hint: None,
    })
}

/// A typed view of a JSON answer, for the human output (the JSON output prints the answer
/// as it came).
pub fn view<T: DeserializeOwned>(value: &Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| CliError::Connection {
        message: format!("unexpected answer from the server ({e}): {value}"),
        hint: Some("is the client older or newer than the server? `loraforge --version`".into()),
    })
}
