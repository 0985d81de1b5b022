//! A job's events, read leniently (a newer server's event kinds are skipped, not fatal),
//! and the progress they add up to: the phase, step/total, loss, tokens/s, ETA and, for
//! the adaptive methods, the current total rank. Pure: the renderers in `watch` draw it.

use serde::Deserialize;
use serde_json::Value;

/// One event of `GET /v1/jobs/{id}/events` or its stream.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub seq: i64,
    pub created_at: Option<String>,
    pub event: Event,
    /// The event as it came, for `-o json`.
    pub raw: Value,
}

impl Envelope {
    pub fn parse(raw: Value) -> Envelope {
        let seq = raw["seq"].as_i64().unwrap_or_default();
        let created_at = raw["created_at"].as_str().map(str::to_string);
        let event = serde_json::from_value(raw.clone()).unwrap_or(Event::Other);
        Envelope {
            seq,
            created_at,
            event,
            raw,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Status {
        status: String,
        #[serde(default)]
        message: Option<String>,
    },
    Progress {
        step: u64,
        total_steps: u64,
        loss: f64,
        #[serde(default)]
        lr: Option<f64>,
        #[serde(default)]
        tokens_per_second: Option<f64>,
        #[serde(default)]
        eta_seconds: Option<f64>,
        #[serde(default)]
        grad_norm: Option<f64>,
    },
    Eval {
        step: u64,
        loss: f64,
    },
    Safety {
        report: SafetyReport,
    },
    /// The safety evaluation's progress: prompts answered by the base and the adapted model.
    Evaluation {
        done: u64,
        total: u64,
    },
    Checkpoint {
        step: u64,
        #[serde(default)]
        resumed: bool,
    },
    Log {
        message: String,
    },
    Ranks {
        step: u64,
        total: u64,
        #[serde(default)]
        budget: Option<u64>,
    },
    /// A kind this client does not know.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SafetyReport {
    #[serde(default)]
    pub harmful_prompts: u32,
    pub refusal_rate_base: f64,
    pub refusal_rate_adapted: f64,
    #[serde(default)]
    pub benign_kl_mean: f64,
    #[serde(default)]
    pub perplexity_base: f64,
    #[serde(default)]
    pub perplexity_adapted: f64,
}

/// Where a job stands, from its events so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressState {
    pub status: Option<String>,
    pub attempt: Option<String>,
    /// The newest "waiting for …" an executor reported while the job was scheduled.
    pub waiting: Option<String>,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub eval_loss: Option<(u64, f64)>,
    /// Total rank, and the budget the method steers it toward.
    pub rank: Option<(u64, Option<u64>)>,
    /// The safety evaluation's prompts answered, of all.
    pub evaluation: Option<(u64, u64)>,
    pub last_message: Option<String>,
}

impl ProgressState {
    /// Takes in one event; returns the line worth printing about it, if any (progress and
    /// ranks are what the bar shows, so they give none).
    pub fn apply(&mut self, event: &Event) -> Option<String> {
        match event {
            Event::Status { status, message } => {
                if status == "scheduled" {
                    self.attempt = message.clone();
                }
                if status != "scheduled" {
                    self.waiting = None;
                }
                // A retried attempt starts its steps over (from its checkpoint).
                if status == "queued" && self.status.is_some() {
                    self.eta_seconds = None;
                }
                self.status = Some(status.clone());
                self.last_message = message.clone();
                Some(describe(event))
            }
            Event::Progress {
                step,
                total_steps,
                loss,
                tokens_per_second,
                eta_seconds,
                ..
            } => {
                self.step = *step;
                self.total_steps = *total_steps;
                self.loss = Some(*loss);
                self.tokens_per_second = *tokens_per_second;
                self.eta_seconds = *eta_seconds;
                // A worker that reports steps is past waiting, whatever arrived first.
                self.waiting = None;
                None
            }
            Event::Eval { step, loss } => {
                self.eval_loss = Some((*step, *loss));
                Some(describe(event))
            }
            Event::Evaluation { done, total } => {
                self.evaluation = Some((*done, *total));
                None
            }
            // The bar (and a plain progress line) shows the total rank: no line of its own.
            Event::Ranks { total, budget, .. } => {
                self.rank = Some((*total, *budget));
                None
            }
            Event::Log { message } => {
                if message.starts_with("waiting for")
                    && matches!(self.status.as_deref(), Some("scheduled") | Some("queued"))
                {
                    self.waiting = Some(message.clone());
                }
                Some(describe(event))
            }
            Event::Checkpoint { .. } | Event::Safety { .. } => Some(describe(event)),
            Event::Other => None,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("succeeded" | "failed" | "cancelled")
        )
    }

    /// The phase in words: queued, waiting for capacity, training, evaluating, publishing, …
    pub fn phase(&self) -> String {
        if let Some(waiting) = &self.waiting {
            return waiting.clone();
        }
        match self.status.as_deref() {
            None => "submitted".into(),
            Some("scheduled") => match &self.attempt {
                Some(attempt) => format!("starting a worker ({attempt})"),
                None => "starting a worker".into(),
            },
            Some("running") => "training".into(),
            Some("evaluating") => match self.evaluation {
                Some((done, total)) => format!("evaluating {done}/{total}"),
                None => "evaluating".into(),
            },
            Some("cancel_requested") => "cancelling".into(),
            Some(other) => other.to_string(),
        }
    }

    /// Whether training has started reporting steps (the bar then has a length).
    pub fn has_steps(&self) -> bool {
        self.total_steps > 0
    }

    /// What the bar measures now: the safety evaluation's prompts while it runs, else the
    /// training steps (once there are any).
    pub fn bar(&self) -> Option<(u64, u64)> {
        match (self.status.as_deref(), self.evaluation) {
            (Some("evaluating"), Some((done, total))) if total > 0 => Some((done, total)),
            _ if self.has_steps() => Some((self.step, self.total_steps)),
            _ => None,
        }
    }

    /// What the bar's message (or a plain progress line) says besides step/total.
    pub fn metrics(&self) -> String {
        let mut parts = Vec::new();
        if let Some(loss) = self.loss {
            parts.push(format!("loss {loss:.4}"));
        }
        if let Some((_, eval)) = self.eval_loss {
            parts.push(format!("val {eval:.4}"));
        }
        // ETA and rank before throughput: a narrow terminal cuts the end of the line.
        let training = self.status.as_deref() == Some("running");
        if let (true, Some(eta)) = (training, self.eta_seconds) {
            parts.push(format!("ETA {}", duration(eta)));
        }
        if let Some((total, budget)) = self.rank {
            parts.push(match budget {
                Some(budget) => format!("rank {total}/{budget}"),
                None => format!("rank {total}"),
            });
        }
        if let Some(tps) = self.tokens_per_second {
            parts.push(format!("{} tok/s", compact(tps)));
        }
        parts.join(" · ")
    }

    /// One line with everything: `training · step 10/30 · loss 1.2345 · ETA 12s · 845 tok/s`.
    pub fn summary(&self) -> String {
        let mut line = self.phase();
        if self.has_steps() {
            line.push_str(&format!(" · step {}/{}", self.step, self.total_steps));
        }
        let metrics = self.metrics();
        if !metrics.is_empty() {
            line.push_str(" · ");
            line.push_str(&metrics);
        }
        line
    }
}

/// One event in words, as `jobs events` lists it.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Status { status, message } => match message {
            Some(m) if !m.is_empty() => format!("status {status}: {}", first_line(m)),
            _ => format!("status {status}"),
        },
        Event::Progress {
            step,
            total_steps,
            loss,
            lr,
            tokens_per_second,
            eta_seconds,
            grad_norm,
        } => {
            let mut line = format!("step {step}/{total_steps} loss {loss:.4}");
            if let Some(lr) = lr {
                line.push_str(&format!(" lr {lr:.3e}"));
            }
            if let Some(g) = grad_norm {
                line.push_str(&format!(" grad_norm {g:.3}"));
            }
            if let Some(tps) = tokens_per_second {
                line.push_str(&format!(" {} tok/s", compact(*tps)));
            }
            if let Some(eta) = eta_seconds {
                line.push_str(&format!(" ETA {}", duration(*eta)));
            }
            line
        }
        Event::Eval { step, loss } => format!("eval at step {step}: validation loss {loss:.4}"),
        Event::Safety { report: r } => format!(
            "safety: refusals {:.0}% -> {:.0}% of {} harmful prompts, benign KL {:.4}, perplexity {:.2} -> {:.2}",
            r.refusal_rate_base * 100.0,
            r.refusal_rate_adapted * 100.0,
            r.harmful_prompts,
            r.benign_kl_mean,
            r.perplexity_base,
            r.perplexity_adapted
        ),
        Event::Evaluation { done, total } => {
            format!("safety evaluation: {done}/{total} prompts answered")
        }
        Event::Checkpoint {
            step,
            resumed: false,
        } => format!("checkpoint saved at step {step}"),
        Event::Checkpoint {
            step,
            resumed: true,
        } => format!("resumed from the checkpoint of step {step}"),
        Event::Log { message } => format!("log: {message}"),
        Event::Ranks {
            step,
            total,
            budget,
        } => match budget {
            Some(b) => format!("ranks at step {step}: total {total} (budget {b})"),
            None => format!("ranks at step {step}: total {total}"),
        },
        Event::Other => "(an event this client does not know)".into(),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// `45s`, `3m12s`, `1h05m`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `845`, `12.3k`, `1.2M`.
pub fn compact(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(values: Vec<Value>) -> Vec<Envelope> {
        values.into_iter().map(Envelope::parse).collect()
    }

    fn feed(state: &mut ProgressState, values: Vec<Value>) -> Vec<String> {
        events(values)
            .iter()
            .filter_map(|e| state.apply(&e.event))
            .collect()
    }

    #[test]
    fn a_job_from_queued_to_succeeded() {
        let mut state = ProgressState::default();
        assert_eq!(state.summary(), "submitted");
        let lines = feed(
            &mut state,
            vec![
                json!({"seq": 1, "kind": "status", "status": "queued", "message": null}),
                json!({"seq": 2, "kind": "status", "status": "scheduled", "message": "attempt 1"}),
            ],
        );
        assert_eq!(lines, ["status queued", "status scheduled: attempt 1"]);
        assert_eq!(state.phase(), "starting a worker (attempt 1)");

        feed(
            &mut state,
            vec![
                json!({"seq": 3, "kind": "log", "message": "waiting for capacity: 0/4 nodes are available"}),
            ],
        );
        assert_eq!(
            state.phase(),
            "waiting for capacity: 0/4 nodes are available"
        );

        let lines = feed(
            &mut state,
            vec![
                json!({"seq": 4, "kind": "status", "status": "running", "message": null}),
                json!({"seq": 5, "kind": "progress", "step": 10, "total_steps": 30, "loss": 2.5,
                       "lr": 0.001, "tokens_per_second": 12345.0, "eta_seconds": 192.4, "grad_norm": 1.5}),
                json!({"seq": 6, "kind": "checkpoint", "step": 10, "prefix": "x", "resumed": false}),
                json!({"seq": 7, "kind": "eval", "step": 10, "loss": 2.75, "tokens": 100}),
            ],
        );
        assert_eq!(
            lines,
            [
                "status running",
                "checkpoint saved at step 10",
                "eval at step 10: validation loss 2.7500"
            ]
        );
        assert_eq!(
            state.summary(),
            "training · step 10/30 · loss 2.5000 · val 2.7500 · ETA 3m12s · 12.3k tok/s"
        );

        feed(
            &mut state,
            vec![json!({"seq": 8, "kind": "status", "status": "evaluating", "message": null})],
        );
        assert_eq!(
            state.summary(),
            "evaluating · step 10/30 · loss 2.5000 · val 2.7500 · 12.3k tok/s",
            "no ETA once training is over"
        );
        assert_eq!(state.bar(), Some((10, 30)));
        let lines = feed(
            &mut state,
            vec![json!({"seq": 8, "kind": "evaluation", "done": 40, "total": 200})],
        );
        assert!(lines.is_empty(), "the bar shows it");
        assert_eq!(state.phase(), "evaluating 40/200");
        assert_eq!(state.bar(), Some((40, 200)));
        let lines = feed(
            &mut state,
            vec![
                json!({"seq": 9, "kind": "safety", "report": {"harmful_prompts": 100, "judge": "keywords",
                       "refusal_rate_base": 0.95, "refusal_rate_adapted": 0.9, "benign_prompts": 20,
                       "benign_kl_mean": 0.01234, "perplexity_base": 10.0, "perplexity_adapted": 11.5,
                       "intruder_dimensions_total": 0, "tokens_generated": 10, "seconds": 1.0}}),
                json!({"seq": 10, "kind": "status", "status": "publishing", "message": null}),
            ],
        );
        assert_eq!(lines[0], "safety: refusals 95% -> 90% of 100 harmful prompts, benign KL 0.0123, perplexity 10.00 -> 11.50");
        assert_eq!(state.phase(), "publishing");
        assert!(!state.is_final());
        feed(
            &mut state,
            vec![json!({"seq": 11, "kind": "status", "status": "succeeded", "message": null})],
        );
        assert!(state.is_final());
        assert_eq!(state.phase(), "succeeded");
    }

    #[test]
    fn adaptive_methods_show_their_total_rank() {
        let mut state = ProgressState::default();
        let lines = feed(
            &mut state,
            vec![
                json!({"seq": 1, "kind": "status", "status": "running", "message": null}),
                json!({"seq": 2, "kind": "ranks", "step": 5, "total": 48, "budget": 64,
                       "per_module": {"a": 24, "b": 24}, "sparsity": null}),
                json!({"seq": 3, "kind": "progress", "step": 5, "total_steps": 100, "loss": 1.0,
                       "lr": 0.001, "tokens_per_second": 845.2, "eta_seconds": 45.0}),
            ],
        );
        assert_eq!(lines, ["status running"]);
        assert_eq!(
            describe(
                &Envelope::parse(
                    json!({"seq": 2, "kind": "ranks", "step": 5, "total": 48, "budget": 64})
                )
                .event
            ),
            "ranks at step 5: total 48 (budget 64)"
        );
        assert_eq!(
            state.summary(),
            "training · step 5/100 · loss 1.0000 · ETA 45s · rank 48/64 · 845 tok/s"
        );
        feed(
            &mut state,
            vec![
                json!({"seq": 4, "kind": "ranks", "step": 9, "total": 30, "budget": null, "per_module": {}, "sparsity": 0.5}),
            ],
        );
        assert!(state.summary().ends_with("rank 30 · 845 tok/s"));
    }

    #[test]
    fn unknown_kinds_and_fields_are_skipped_not_fatal() {
        let mut state = ProgressState::default();
        let parsed = events(vec![
            json!({"seq": 1, "kind": "a_future_kind", "whatever": [1, 2]}),
            json!({"seq": 2, "kind": "progress", "step": "not a number"}),
            json!({"seq": 3, "kind": "status", "status": "failed", "message": "user_error: bad data\nmore", "new_field": 1}),
        ]);
        assert_eq!(parsed[0].event, Event::Other);
        assert_eq!(parsed[1].event, Event::Other);
        let lines: Vec<String> = parsed
            .iter()
            .filter_map(|e| state.apply(&e.event))
            .collect();
        assert_eq!(lines, ["status failed: user_error: bad data"]);
        assert!(state.is_final());
        assert_eq!(parsed[2].seq, 3);
    }

    #[test]
    fn cancelling_and_retries() {
        let mut state = ProgressState::default();
        feed(
            &mut state,
            vec![
                json!({"seq": 1, "kind": "status", "status": "running", "message": null}),
                json!({"seq": 2, "kind": "status", "status": "cancel_requested", "message": null}),
            ],
        );
        assert_eq!(state.phase(), "cancelling");
        feed(
            &mut state,
            vec![json!({"seq": 3, "kind": "status", "status": "cancelled", "message": null})],
        );
        assert!(state.is_final());
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.0), "59s");
        assert_eq!(duration(61.0), "1m01s");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(compact(845.4), "845");
        assert_eq!(compact(12_345.0), "12.3k");
        assert_eq!(compact(2_500_000.0), "2.5M");
    }
}
