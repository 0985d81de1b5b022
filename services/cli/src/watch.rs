//! Following a job live: its server-sent event stream (resumed with `Last-Event-ID` after a
//! dropped connection), drawn as a progress bar on a terminal and as plain lines otherwise.
//! Ctrl-C detaches; the job goes on.

use crate::client::Client;
use crate::error::{CliError, Result};
use crate::progress::{describe, Envelope, Event, ProgressState};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// What the follower prints for each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `--watch`: the bar, with the notable events (status, checkpoints, evals, logs) as lines.
    Watch,
    /// `events --follow`: every event as a line, and the bar.
    Events,
    /// `events --follow -o json`: every event as one JSON line, nothing else.
    Json,
}

/// Where the display goes: stdout, or stderr when stdout carries the JSON answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub enum Followed {
    /// The job is final; its last state as `GET /v1/jobs/{id}` answers it.
    Finished {
        job: Value,
        state: Box<ProgressState>,
    },
    /// Ctrl-C.
    Detached,
}

/// Follows a job from the event after `after` until it is final, or Ctrl-C.
pub async fn follow(
    client: &Client,
    job_id: &str,
    after: i64,
    style: Style,
    stream: Stream,
) -> Result<Followed> {
    let mut display = Display::new(style, stream);
    let mut state = ProgressState::default();
    let mut last_seq = after;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut failures = 0u32;
    loop {
        let pass = read_stream(client, job_id, &mut last_seq, &mut state, &mut display);
        let outcome = tokio::select! {
            _ = &mut ctrl_c => {
                display.finish();
                return Ok(Followed::Detached);
            }
            outcome = pass => outcome,
        };
        match outcome {
            // The stream ends once the job is final; make sure, then answer the job.
            Ok(()) => {
                let job = client.get(&["v1", "jobs", job_id], &[]).await?;
                if is_final(&job) {
                    display.finish();
                    return Ok(Followed::Finished {
                        job,
                        state: Box::new(state),
                    });
                }
                failures = 0;
            }
            Err(e @ CliError::Connection { .. }) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    display.note(&format!("{e}; reconnecting (Ctrl-C to detach)"));
                }
            }
            Err(e) if e.api_status().is_some_and(|s| s >= 500) => {
                failures += 1;
                display.note(&format!("{e}; retrying"));
            }
            Err(e) => {
                display.finish();
                return Err(e);
            }
        }
        let wait = Duration::from_millis(500 * u64::from(failures.clamp(1, 10)));
        tokio::select! {
            _ = &mut ctrl_c => {
                display.finish();
                return Ok(Followed::Detached);
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn is_final(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// One connection to the stream, until it ends or fails.
async fn read_stream(
    client: &Client,
    job_id: &str,
    last_seq: &mut i64,
    state: &mut ProgressState,
    display: &mut Display,
) -> Result<()> {
    let url = client.url(&["v1", "jobs", job_id, "events", "stream"], &[]);
    let request = client
        .request(Method::GET, url)
        .header("accept", "text/event-stream")
        .header("last-event-id", last_seq.to_string());
    let response = client.send(request).await?;
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.connection_error(&e))?;
        for message in parser.push(&chunk) {
            if message.event.as_deref() == Some("error") {
                return Err(CliError::Connection {
                    message: format!("the event stream failed: {}", message.data),
                    hint: None,
                });
            }
            let Ok(raw) = serde_json::from_str::<Value>(&message.data) else {
                continue;
            };
            let envelope = Envelope::parse(raw);
            if envelope.seq <= *last_seq {
                continue;
            }
            *last_seq = envelope.seq;
            let line = state.apply(&envelope.event);
            display.event(&envelope, state, line);
        }
    }
    Ok(())
}

/// One server-sent event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Splits a byte stream into server-sent events (the WHATWG rules this API uses: `id`,
/// `event` and `data` fields, comments, events ended by a blank line).
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    current: SseMessage,
    has_data: bool,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if self.has_data {
                    out.push(std::mem::take(&mut self.current));
                }
                self.current = SseMessage::default();
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                "id" => self.current.id = Some(value.to_string()),
                "event" => self.current.event = Some(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// The bar on a terminal; plain lines otherwise.
pub struct Display {
    style: Style,
    stream: Stream,
    bar: Option<ProgressBar>,
    /// For plain progress lines: when the last one was printed, and its step.
    last_plain: Option<(Instant, u64, String)>,
}

/// A plain progress line at most this often (and at the first and the last step).
const PLAIN_EVERY: Duration = Duration::from_secs(5);

impl Display {
    pub fn new(style: Style, stream: Stream) -> Display {
        let tty = match stream {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        let bar = (tty && style != Style::Json).then(|| {
            let target = match stream {
                Stream::Stdout => ProgressDrawTarget::stdout(),
                Stream::Stderr => ProgressDrawTarget::stderr(),
            };
            let bar = ProgressBar::with_draw_target(None, target);
            bar.set_style(spinner_style());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message("submitted");
            bar
        });
        Display {
            style,
            stream,
            bar,
            last_plain: None,
        }
    }

    fn println(&self, line: &str) {
        match (&self.bar, self.stream) {
            (Some(bar), _) => bar.println(line),
            (None, Stream::Stdout) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            (None, Stream::Stderr) => eprintln!("{line}"),
        }
    }

    /// A remark of the client's own (reconnecting, …).
    pub fn note(&mut self, line: &str) {
        match self.style {
            Style::Json => eprintln!("{line}"),
            _ => self.println(line),
        }
    }

    pub fn event(&mut self, e: &Envelope, state: &ProgressState, line: Option<String>) {
        match self.style {
            Style::Json => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", e.raw);
                let _ = out.flush();
                return;
            }
            Style::Events => {
                if !matches!(e.event, Event::Other) {
                    self.println(&event_line(e));
                }
            }
            Style::Watch => {
                if let Some(line) = line {
                    self.println(&line);
                }
            }
        }
        match &self.bar {
            Some(bar) => draw(bar, state),
            None if self.style == Style::Watch => self.plain_progress(e, state),
            None => {}
        }
    }

    /// A progress line now and then: the first step (or evaluated prompt), every few
    /// seconds, the last one.
    fn plain_progress(&mut self, e: &Envelope, state: &ProgressState) {
        let (position, length) = match e.event {
            Event::Progress {
                step, total_steps, ..
            } => (step, total_steps),
            Event::Evaluation { done, total } => (done, total),
            _ => return,
        };
        let phase = match e.event {
            Event::Evaluation { .. } => "evaluation".to_string(),
            _ => state.phase(),
        };
        let due = match &self.last_plain {
            None => true,
            Some((at, last, last_phase)) => {
                position == length
                    || *last_phase != phase
                    || (position != *last && at.elapsed() >= PLAIN_EVERY)
            }
        };
        if due {
            self.println(&state.summary());
            self.last_plain = Some((Instant::now(), position, phase));
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `#12 09:41:07 step 10/30 loss 2.5000 …`, as `jobs events` lists events.
pub fn event_line(e: &Envelope) -> String {
    let time = e
        .created_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%H:%M:%S")
                .to_string()
        })
        .unwrap_or_default();
    let text = match &e.event {
        Event::Other => format!(
            "{} (not known to this client)",
            e.raw["kind"].as_str().unwrap_or("?")
        ),
        event => describe(event),
    };
    format!("#{} {time} {text}", e.seq)
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {wide_msg}").expect("a valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner:.cyan} {prefix:.bold} [{bar:20.cyan/blue}] {pos}/{len} {wide_msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

fn draw(bar: &ProgressBar, state: &ProgressState) {
    match state.bar() {
        Some((position, length)) => {
            // The bar's numbers are the evaluation's while it runs: the label need not repeat them.
            let label = match state.status.as_deref() {
                Some("evaluating") => "evaluating".to_string(),
                _ => state.phase(),
            };
            bar.set_prefix(label);
            bar.set_message(state.metrics());
            if bar.length().is_none() {
                bar.set_style(bar_style());
            }
            bar.set_length(length);
            bar.set_position(position);
        }
        None => bar.set_message(state.phase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\nid: 1\nda").is_empty());
        let got = p.push(
            b"ta: {\"seq\":1}\n\nid: 2\r\ndata: a\r\ndata: b\r\n\r\nevent: error\ndata: failed\n\n",
        );
        assert_eq!(
            got,
            [
                SseMessage {
                    id: Some("1".into()),
                    event: None,
                    data: "{\"seq\":1}".into()
                },
                SseMessage {
                    id: Some("2".into()),
                    event: None,
                    data: "a\nb".into()
                },
                SseMessage {
                    id: None,
                    event: Some("error".into()),
                    data: "failed".into()
                },
            ]
        );
    }

    #[test]
    fn event_lines_name_seq_and_what_happened() {
        let e = Envelope::parse(serde_json::json!({
            "seq": 7, "created_at": "not a time", "kind": "checkpoint", "step": 10, "prefix": "p", "resumed": false
        }));
        assert_eq!(event_line(&e), "#7  checkpoint saved at step 10");
        let e = Envelope::parse(serde_json::json!({"seq": 8, "kind": "novel"}));
        assert_eq!(event_line(&e), "#8  novel (not known to this client)");
    }
}
