//! How a failed job is classified for the control plane: only system errors are
//! worth retrying, so everything caused by the job's own inputs is a [`Failure::User`].

use loraforge_spec::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The job's inputs are wrong (data, model files, hyper-parameters): a retry fails the same way.
    #[error("{0}")]
    User(String),
    /// The user asked to stop the job.
    #[error("cancelled on request")]
    Cancelled,
}

/// Shorthand for returning a user error from code that otherwise uses `anyhow`.
pub fn user_error(message: impl Into<String>) -> anyhow::Error {
    Failure::User(message.into()).into()
}

/// What an error means for the job, found anywhere in its cause chain.
pub fn classify(err: &anyhow::Error) -> Option<&Failure> {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Failure>())
}

/// The `kind` reported to the control plane for an error that ends a job.
pub fn error_kind(err: &anyhow::Error) -> ErrorKind {
    match classify(err) {
        Some(Failure::User(_)) => ErrorKind::UserError,
        _ => ErrorKind::SystemError,
    }
}

/// Runs `f`, turning a libtorch failure (which `tch` raises as a panic) during `what` into an
/// error, so a job fails with the reason instead of the process dying.
pub fn guard_libtorch<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(anyhow::anyhow!("libtorch failed during {what}: {message}"))
    })
}
