//! Shared types of loraforge, used by the control plane and the trainer alike:
//! what a user submits (`JobSpec`, `MethodConfig`), what a worker reports (`worker`),
//! what gets published (`AdapterManifest`, PEFT `adapter_config.json`), and the
//! validation that keeps bad values out of all of them. No heavy dependencies here.

pub mod dataset;
pub mod error;
pub mod job;
pub mod manifest;
pub mod merge;
pub mod methods;
pub mod model;
pub mod names;
pub mod peft;
pub mod resources;
pub mod safety;
pub mod uri;
pub mod worker;

pub use error::{FieldError, SpecError};
pub use job::{
    DatasetSpec, DeviceChoice, ErrorKind, GradientCheckpointing, InputRef, JobSpec, JobStatus,
    LrSchedule, ParentRef, ResolvedJobSpec, TrainingConfig,
};
pub use manifest::{AdapterManifest, DigestRef, FileDigest, TrainingMetrics};
/// The methods' old path (`loraforge_spec::method::AdaLoraConfig`), kept for its users.
pub use methods as method;
pub use methods::{LoraConfig, LoraInit, MethodConfig, MethodParams};
pub use names::AdapterName;
pub use resources::Resources;
