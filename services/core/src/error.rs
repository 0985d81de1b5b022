//! The core's one error type. Every operation says what went wrong in domain terms; the
//! HTTP face maps these to problem+json in one place (`loraforge_api::problem`), a CLI
//! prints them.

use loraforge_spec::SpecError;
use loraforge_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's content is wrong; each problem names its field.
    #[error("invalid: {0}")]
    Invalid(SpecError),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with the current state; `code` is stable for clients.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// It existed and was deleted.
    #[error("{0}")]
    Gone(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The request's content is larger than a configured limit (which the message names).
    #[error("{0}")]
    TooLarge(String),
    /// The caller presented no valid credentials.
    #[error("missing or invalid credentials")]
    Unauthenticated,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("artifact store: {0}")]
    Storage(#[from] StorageError),
    /// Anything else that is our fault, with its cause.
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(SpecError::one(field, message))
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Conflict {
            code,
            detail: detail.into(),
        }
    }

    /// Postgres is not there right now (rather than: this request broke it).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Database(e) if database_unavailable(e))
    }
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Self {
        Error::Invalid(e)
    }
}

/// Errors that mean "Postgres is not there right now" rather than "this request broke":
/// no connection, or the server refusing or dropping connections (SQLSTATE classes 08
/// and 57P, and 55000 for a database not accepting connections).
pub fn database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "55000"),
        _ => false,
    }
}
