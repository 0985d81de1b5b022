//! The loraforge control plane, assembled: [`Application`] connects the database and
//! the store, builds the core's [`Context`], serves the REST API (`loraforge-api`) and
//! runs the core's background loops. The layers (docs/architecture.md):
//!
//! ```text
//!   loraforge (this crate: wiring, the CLI binary)
//!     └─ loraforge-api (axum routes, problem+json, OpenAPI)
//!          └─ loraforge-core (jobs, attempts, scheduler, executors, registry, …)
//!               └─ loraforge-spec, loraforge-storage
//! ```
//!
//! The core's modules are re-exported under their old names for the CLI and the tests.

mod app;
pub mod crd;
mod serve;

pub use app::{connect, Application};
pub use loraforge_core::{auth, executor, jobs, operator, registry, settings, Context, Settings};
