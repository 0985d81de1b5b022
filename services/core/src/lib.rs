//! The loraforge control plane's core: everything it knows and decides, with no HTTP in
//! it. The REST API (`loraforge-api`), the CLI and the coming operator and web UI are
//! faces on top; nothing here imports them (a test checks that this crate does not
//! depend on axum).
//!
//! Where things live (docs/architecture.md draws the layers and a job's path):
//! - [`jobs`]: the queue and the job lifecycle (`transition`, `claim`), submission, and
//!   [`jobs::attempts`], the one place that decides how an attempt ends.
//! - [`registry`]: adapter versions, the publish protocol, aliases, lineage, registered
//!   inputs, garbage collection, and the read cache.
//! - [`executor`]: the `Executor` trait and its implementations (`local`).
//! - [`scheduler`], [`lease`]: the background loops that claim jobs and take back lost ones.
//! - [`webhooks`], [`safety`], [`auth`]: subscriptions, the safety policy, API keys.
//! - [`views`]: the typed answers the API serializes.
//! - [`metrics`]: Prometheus families, kept by the code that changes what they count.
//! - [`db`], [`notify`], [`settings`], [`error`]: plumbing.

pub mod auth;
pub mod context;
pub mod db;
pub mod error;
pub mod executor;
pub mod jobs;
#[cfg(test)]
mod kube_mock;
pub mod lease;
pub mod metrics;
pub mod notify;
pub mod operator;
pub mod registry;
pub mod safety;
pub mod scheduler;
pub mod settings;
pub mod views;
pub mod webhooks;

pub use context::Context;
pub use error::{Error, Result};
pub use settings::Settings;
