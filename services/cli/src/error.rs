//! What can go wrong in a command, and the exit status each outcome gives (docs/cli.md).

use crate::client::Problem;
use std::fmt;

/// Exit statuses, one per outcome, so scripts can tell them apart.
pub mod exit {
    /// The command did what it was asked; a watched job succeeded.
    pub const OK: u8 = 0;
    /// Something failed on the way: the server could not be reached or answered 5xx, a
    /// local file could not be read or written, a download did not match its digest.
    pub const FAILURE: u8 = 1;
    /// The command was refused: bad arguments, configuration or job file, or the API
    /// answered 4xx (its problem document is printed).
    pub const REFUSED: u8 = 2;
    /// The job failed with `user_error` (bad data or settings: fix and resubmit).
    pub const USER_ERROR: u8 = 3;
    /// The job failed with `system_error` (its retries ran out).
    pub const SYSTEM_ERROR: u8 = 4;
    /// The job was cancelled.
    pub const CANCELLED: u8 = 5;
    /// The job failed with `safety_blocked`: its version was quarantined by the safety gate.
    pub const SAFETY_BLOCKED: u8 = 6;
    /// The job failed with `deadline_exceeded` (`training.max_duration`).
    pub const DEADLINE_EXCEEDED: u8 = 7;
    /// The job failed with `resource_exhausted` (its worker ran out of memory).
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// The job failed with an error kind this client does not know (a newer server).
    pub const OTHER_FAILURE: u8 = 9;
    /// Ctrl-C while watching: the client detached; the job goes on.
    pub const DETACHED: u8 = 130;
}

/// The exit status for a job that ended in `status` with `error_kind` (when failed).
pub fn job_exit_code(status: &str, error_kind: Option<&str>) -> u8 {
    match status {
        "succeeded" => exit::OK,
        "cancelled" => exit::CANCELLED,
        "failed" => match error_kind.unwrap_or_default() {
            "user_error" => exit::USER_ERROR,
            "system_error" => exit::SYSTEM_ERROR,
            "safety_blocked" => exit::SAFETY_BLOCKED,
            "deadline_exceeded" => exit::DEADLINE_EXCEEDED,
            "resource_exhausted" => exit::RESOURCE_EXHAUSTED,
            _ => exit::OTHER_FAILURE,
        },
        _ => exit::OTHER_FAILURE,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments, configuration or input file: nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The API refused the request (4xx) or failed (5xx) with a problem document.
    #[error("{}", .0.title_line())]
    Api(Box<ApiFailure>),
    /// The server could not be reached, or its answer could not be read.
    #[error("{message}")]
    Connection {
        message: String,
        hint: Option<String>,
    },
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A download did not match the digest the registry recorded.
    #[error("{0}")]
    Integrity(String),
}

/// A request the API answered with an error status.
#[derive(Debug)]
pub struct ApiFailure {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub problem: Problem,
}

impl ApiFailure {
    fn title_line(&self) -> String {
        let p = &self.problem;
        let mut line = if p.title.is_empty() {
            format!("{} {} answered {}", self.method, self.path, self.status)
        } else {
            p.title.clone()
        };
        let code = if p.code.is_empty() {
            self.status.to_string()
        } else {
            format!("{} {}", self.status, p.code)
        };
        line.push_str(&format!(" ({code})"));
        line
    }
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError::Usage(message.into())
    }

    pub fn io(what: impl fmt::Display, e: impl fmt::Display) -> Self {
        CliError::Io(format!("{what}: {e}"))
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::REFUSED,
            CliError::Api(f) if f.status < 500 => exit::REFUSED,
            CliError::Api(_) | CliError::Connection { .. } | CliError::Io(_) => exit::FAILURE,
            CliError::Integrity(_) => exit::FAILURE,
        }
    }

    /// The status of an API refusal, if this is one.
    pub fn api_status(&self) -> Option<u16> {
        match self {
            CliError::Api(f) => Some(f.status),
            _ => None,
        }
    }

    /// What to print on stderr: the message, the problem's detail and field errors, and a
    /// hint where one helps.
    pub fn render(&self) -> String {
        let mut out = format!("error: {self}\n");
        match self {
            CliError::Api(f) => {
                let p = &f.problem;
                let field_lines: Vec<String> = p
                    .errors
                    .iter()
                    .map(|e| match e.field.as_str() {
                        "" => format!("  - {}", e.message),
                        field => format!("  - {field}: {}", e.message),
                    })
                    .collect();
                // The detail of a validation problem repeats its field errors; print them once.
                if !p.detail.is_empty() && field_lines.is_empty() {
                    out.push_str(&format!("  {}\n", p.detail));
                }
                for line in field_lines {
                    out.push_str(&line);
                    out.push('\n');
                }
                let hint = p.hint.clone().or_else(|| status_hint(f.status, &p.detail));
                if let Some(hint) = hint {
                    out.push_str(&format!("hint: {hint}\n"));
                }
            }
            CliError::Connection {
                hint: Some(hint), ..
            } => out.push_str(&format!("hint: {hint}\n")),
            _ => {}
        }
        out
    }
}

/// What a newcomer most likely needs to do about a status the server gave no hint for.
fn status_hint(status: u16, detail: &str) -> Option<String> {
    match status {
        404 if detail == "route not found" => Some(
            "this server has no such route: it may be older than this client (`loraforge --version`)".into(),
        ),
        401 => Some(
            "pass an API key: --api-key, LORAFORGE_API_KEY or a profile in ~/.config/loraforge/config.toml; \
             the first key of a project comes from `loraforge keys create --project NAME --scope admin` on the server"
                .into(),
        ),
        403 => Some("this key's scope is too small: read < submit < admin; an admin of the project can create another with `loraforge keys create --scope ...`".into()),
        404 => Some("names and ids are looked up in your key's project only (`loraforge whoami` shows which)".into()),
        _ => None,
    }
}

impl From<ApiFailure> for CliError {
    fn from(f: ApiFailure) -> Self {
        CliError::Api(Box::new(f))
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{FieldError, Problem};

    #[test]
    fn each_outcome_has_its_own_exit_status() {
        assert_eq!(job_exit_code("succeeded", None), 0);
        assert_eq!(job_exit_code("failed", Some("user_error")), 3);
        assert_eq!(job_exit_code("failed", Some("system_error")), 4);
        assert_eq!(job_exit_code("cancelled", None), 5);
        assert_eq!(job_exit_code("failed", Some("safety_blocked")), 6);
        assert_eq!(job_exit_code("failed", Some("deadline_exceeded")), 7);
        assert_eq!(job_exit_code("failed", Some("resource_exhausted")), 8);
        assert_eq!(job_exit_code("failed", Some("a_new_kind")), 9);
        let codes = [
            exit::OK,
            exit::FAILURE,
            exit::REFUSED,
            exit::USER_ERROR,
            exit::SYSTEM_ERROR,
            exit::CANCELLED,
            exit::SAFETY_BLOCKED,
            exit::DEADLINE_EXCEEDED,
            exit::RESOURCE_EXHAUSTED,
            exit::OTHER_FAILURE,
            exit::DETACHED,
        ];
        let distinct: std::collections::BTreeSet<u8> = codes.iter().copied().collect();
        assert_eq!(distinct.len(), codes.len());
    }

    fn api(status: u16, problem: Problem) -> CliError {
        ApiFailure {
            method: "POST".into(),
            path: "/v1/jobs".into(),
            status,
            problem,
        }
        .into()
    }

    #[test]
    fn refusals_and_failures_exit_differently() {
        assert_eq!(CliError::usage("x").exit_code(), exit::REFUSED);
        assert_eq!(api(422, Problem::default()).exit_code(), exit::REFUSED);
        assert_eq!(api(503, Problem::default()).exit_code(), exit::FAILURE);
        let offline = CliError::Connection {
            message: "down".into(),
            hint: None,
        };
        assert_eq!(offline.exit_code(), exit::FAILURE);
        assert_eq!(CliError::Integrity("x".into()).exit_code(), exit::FAILURE);
    }

    #[test]
    fn problems_print_their_title_fields_and_hint() {
        let problem = Problem {
            title: "Invalid request".into(),
            code: "validation_failed".into(),
            detail: "training.max_steps: must be at least 1; method.r: must be positive".into(),
            errors: vec![
                FieldError {
                    field: "training.max_steps".into(),
                    message: "must be at least 1".into(),
                },
                FieldError {
                    field: "method.r".into(),
                    message: "must be positive".into(),
                },
            ],
            hint: Some("see docs/methods.md".into()),
            ..Problem::default()
        };
        let text = api(422, problem).render();
        assert_eq!(
            text,
            "error: Invalid request (422 validation_failed)\n\
             \x20 - training.max_steps: must be at least 1\n\
             \x20 - method.r: must be positive\n\
             hint: see docs/methods.md\n"
        );
        let unauthorized = api(
            401,
            Problem {
                title: "Unauthorized".into(),
                code: "unauthorized".into(),
                detail: "a valid API key is required".into(),
                ..Problem::default()
            },
        )
        .render();
        assert!(unauthorized.starts_with(
            "error: Unauthorized (401 unauthorized)\n  a valid API key is required\nhint: pass an API key"
        ));
    }
}
