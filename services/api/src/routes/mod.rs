//! Handlers, one module per resource. Each takes the caller, parses, calls the core and
//! shapes the answer; the `#[utoipa::path]` beside it is its OpenAPI entry.

pub mod adapters;
pub mod identity;
pub mod inputs;
pub mod jobs;
pub mod keys;
pub mod openai;
pub mod probes;
pub mod safety;
pub mod webhooks;
pub mod worker;
