//! The loraforge control plane: the REST API, the job queue in Postgres, the
//! scheduler that hands claimed jobs to an executor, the lease monitor, and the
//! adapter registry. It never links libtorch: training happens in workers.
//!
//! Where things live:
//! - `settings`: configuration from the environment.
//! - `app`: `Application::build` wires everything and serves (port 0 in tests).
//! - `api`: HTTP routes for users (`api::public`) and workers (`api::worker`).
//! - `jobs`: the queue and job lifecycle (every transition goes through here).
//! - `registry`: adapters and their versions, publish verification, lineage.
//! - `scheduler`, `lease`: background loops that claim jobs and requeue lost ones.
//! - `executor`: the `Executor` trait and its implementations (`local`).

pub mod api;
pub mod app;
pub mod auth;
pub mod error;
pub mod executor;
pub mod jobs;
pub mod lease;
pub mod registry;
pub mod safety;
pub mod scheduler;
pub mod settings;
pub mod webhooks;

pub use app::Application;
pub use settings::Settings;
