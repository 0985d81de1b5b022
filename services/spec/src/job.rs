//! A training job as the user submits it, and the states it moves through.

use crate::error::{from_value, parse_json_value, FieldError, SpecError};
use crate::method::MethodConfig;
use crate::names::AdapterName;
use crate::resources::Resources;
use crate::uri::check_data_uri;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Name of the adapter this job publishes a new version of.
    pub adapter_name: AdapterName,
    /// A Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`):
    /// its URI, or the name of a registered base model.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub base_model: InputRef,
    pub dataset: DatasetSpec,
    pub method: MethodConfig,
    pub training: TrainingConfig,
    /// Continue training from this adapter version (same method and shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// Tighten the project's safety gate for this job (or switch it off, if allowed).
    #[serde(default)]
    pub safety: crate::safety::SafetyOverrides,
    /// What the worker needs from the machine (GPUs, CPU, memory, placement); used by the
    /// `kubernetes` executor.
    #[serde(default, skip_serializing_if = "Resources::is_default")]
    pub resources: Resources,
}

/// An adapter version by reference: `latest` (newest ready), an alias, or a number.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub adapter: AdapterName,
    #[serde(rename = "ref", default = "latest")]
    pub reference: String,
}

fn latest() -> String {
    "latest".into()
}

/// A data input is named by URI (`scheme://…`) or by its registered name.
pub fn is_uri(reference: &str) -> bool {
    reference.contains("://")
}

/// A job input (base model or dataset) as the user wrote it: a URI, or the name of a
/// registered input that the control plane resolves once, at submission
/// ([`ResolvedJobSpec`]). On the wire it is the plain string either way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InputRef {
    Uri(String),
    Name(String),
}

impl InputRef {
    pub fn parse(reference: impl Into<String>) -> InputRef {
        let reference = reference.into();
        if is_uri(&reference) {
            InputRef::Uri(reference)
        } else {
            InputRef::Name(reference)
        }
    }

    /// The string as written (a URI or a name).
    pub fn as_str(&self) -> &str {
        match self {
            InputRef::Uri(s) | InputRef::Name(s) => s,
        }
    }

    pub fn uri(&self) -> Option<&str> {
        match self {
            InputRef::Uri(u) => Some(u),
            InputRef::Name(_) => None,
        }
    }

    pub(crate) fn check(&self, field: &str, errors: &mut Vec<FieldError>) {
        let checked = match self {
            InputRef::Uri(u) => check_data_uri(u),
            InputRef::Name(n) => AdapterName::parse(n).map(drop),
        };
        if let Err(m) = checked {
            errors.push(FieldError::new(field, m));
        }
    }
}

impl fmt::Display for InputRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for InputRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for InputRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(InputRef::parse)
    }
}

/// A job spec whose inputs are all URIs: what the control plane stores after resolving
/// registered names at submission, and what a worker trains. Reading one back refuses a
/// name, so a worker never has to resolve anything.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ResolvedJobSpec(JobSpec);

#[derive(Debug, thiserror::Error)]
#[error("{field} is {name:?}, a name; a resolved spec holds URIs only")]
pub struct UnresolvedInput {
    pub field: &'static str,
    pub name: String,
}

impl ResolvedJobSpec {
    /// Accepts a spec whose inputs are already URIs.
    pub fn new(spec: JobSpec) -> Result<ResolvedJobSpec, UnresolvedInput> {
        let named = |field: &'static str, r: &InputRef| match r {
            InputRef::Name(n) => Err(UnresolvedInput {
                field,
                name: n.clone(),
            }),
            InputRef::Uri(_) => Ok(()),
        };
        named("base_model", &spec.base_model)?;
        named("dataset.train", &spec.dataset.train)?;
        if let Some(v) = &spec.dataset.validation {
            named("dataset.validation", v)?;
        }
        if let Some(d) = spec.safety.replay.as_ref().and_then(|r| r.dataset.as_ref()) {
            named("safety.replay.dataset", d)?;
        }
        Ok(ResolvedJobSpec(spec))
    }

    pub fn base_model_uri(&self) -> &str {
        self.0.base_model.as_str()
    }

    pub fn train_uri(&self) -> &str {
        self.0.dataset.train.as_str()
    }

    pub fn validation_uri(&self) -> Option<&str> {
        self.0.dataset.validation.as_ref().map(InputRef::as_str)
    }

    /// The refusal dataset of `safety.replay`, when the job names one.
    pub fn replay_uri(&self) -> Option<&str> {
        let replay = self.0.safety.replay.as_ref()?;
        replay.dataset.as_ref().map(InputRef::as_str)
    }

    pub fn into_inner(self) -> JobSpec {
        self.0
    }
}

impl std::ops::Deref for ResolvedJobSpec {
    type Target = JobSpec;
    fn deref(&self) -> &JobSpec {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ResolvedJobSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ResolvedJobSpec::new(JobSpec::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// JSONL file (URI or registered dataset name). Each line is one example:
    /// `{"messages": [{"role", "content"}, …]}` (chat; loss on assistant turns only),
    /// `{"prompt": …, "completion": …}` (loss on the completion only), or `{"text": …}`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub train: InputRef,
    /// A separate validation file; or see `validation_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub validation: Option<InputRef>,
    /// Hold out this fraction of the training examples (deterministically, by seed) for
    /// validation when no validation file is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_fraction: Option<f64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub max_steps: u32,
    pub learning_rate: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_seq_len")]
    pub seq_len: u32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub warmup_steps: u32,
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; `null` turns clipping off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Learning-rate schedule after warmup.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Optimizer steps accumulate gradients over this many batches.
    #[serde(default = "one")]
    pub gradient_accumulation_steps: u32,
    /// Stop after this many passes over the training set, if that comes before max_steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Concatenate examples into full `seq_len` rows (loss masks kept) instead of padding.
    #[serde(default)]
    pub packing: bool,
    /// Save a checkpoint (adapter, optimizer, RNG, data position) every N steps, so a
    /// retried attempt resumes from it; `null` turns checkpoints off.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: Option<u32>,
    /// Evaluate the validation loss every N steps (and always at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<u32>,
    /// Where to train: `auto` (CUDA when present), `cpu` or `cuda`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Trade compute for memory: `layers` keeps only each decoder layer's input during the
    /// forward pass and recomputes the layer in the backward pass (about a third more compute,
    /// a fraction of the activation memory); `offload` does the same with those inputs moved
    /// to pinned host memory and brought back for their layer's recomputation (less GPU
    /// memory still, for the time of the copies; on the CPU it is `layers`); `none` keeps
    /// everything.
    #[serde(default)]
    pub gradient_checkpointing: GradientCheckpointing,
    /// Wall-clock limit of one attempt (`90m`, `2h`, `1h30m`, `45s`): a worker still
    /// running then is stopped and the job fails as a `user_error` naming this limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$", example = "2h")
    )]
    pub max_duration: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    Linear,
    Cosine,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientCheckpointing {
    // Plain comments: doc comments on the variants would turn the CRD's `enum` into a `oneOf`.
    #[default]
    None,
    Layers,
    // On the CPU, where there is no device memory to save, the same as `Layers`.
    Offload,
}

fn one() -> u32 {
    1
}
fn default_checkpoint_every() -> Option<u32> {
    Some(100)
}

fn default_batch_size() -> u32 {
    4
}
fn default_seq_len() -> u32 {
    512
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}

pub const MAX_STEPS: u32 = 10_000_000;
pub const MAX_BATCH: u32 = 4096;
pub const MAX_SEQ_LEN: u32 = 131_072;

impl TrainingConfig {
    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        let mut bad = |field: &str, msg: String| {
            errors.push(FieldError::new(format!("training.{field}"), msg))
        };
        if self.max_steps == 0 || self.max_steps > MAX_STEPS {
            bad("max_steps", format!("must be between 1 and {MAX_STEPS}"));
        }
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate < 10.0)
        {
            bad("learning_rate", "must be a positive number below 10".into());
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            bad("batch_size", format!("must be between 1 and {MAX_BATCH}"));
        }
        if self.seq_len < 2 || self.seq_len > MAX_SEQ_LEN {
            bad("seq_len", format!("must be between 2 and {MAX_SEQ_LEN}"));
        }
        if self.warmup_steps > self.max_steps {
            bad("warmup_steps", "must not exceed max_steps".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bad("weight_decay", "must be a non-negative number".into());
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                bad("max_grad_norm", "must be a positive number or null".into());
            }
        }
        if self.gradient_accumulation_steps == 0 || self.gradient_accumulation_steps > 4096 {
            bad(
                "gradient_accumulation_steps",
                "must be between 1 and 4096".into(),
            );
        }
        if self.epochs == Some(0) {
            bad("epochs", "must be at least 1".into());
        }
        if self.checkpoint_every == Some(0) {
            bad(
                "checkpoint_every",
                "must be at least 1, or null for no checkpoints".into(),
            );
        }
        if self.eval_every == Some(0) {
            bad("eval_every", "must be at least 1".into());
        }
        if let Some(d) = &self.max_duration {
            match parse_duration(d) {
                Some(secs) if (1..=MAX_DURATION_SECS).contains(&secs) => {}
                Some(_) => bad("max_duration", "must be between 1s and 30 days (720h)".into()),
                None => bad(
                    "max_duration",
                    format!("{d:?} is not a duration; write hours, minutes and seconds, e.g. 2h, 90m, 1h30m, 45s"),
                ),
            }
        }
    }

    /// [`max_duration`](Self::max_duration) in seconds, once validated.
    pub fn max_duration_secs(&self) -> Option<u64> {
        self.max_duration.as_deref().and_then(parse_duration)
    }
}

pub const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;

/// `1h30m`, `90m`, `45s`: hours, minutes and seconds, each at most once and in that order.
pub fn parse_duration(s: &str) -> Option<u64> {
    let mut rest = s;
    let mut total: u64 = 0;
    let mut seen = 0;
    for (unit, secs) in [('h', 3600u64), ('m', 60), ('s', 1)] {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || !rest[digits..].starts_with(unit) {
            continue;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        total = total.checked_add(n.checked_mul(secs)?)?;
        rest = &rest[digits + 1..];
        seen += 1;
    }
    (seen > 0 && rest.is_empty()).then_some(total)
}

impl JobSpec {
    /// Parses and validates a submitted job. Every problem found is reported, each
    /// naming its field, so a user can fix them all in one go.
    pub fn parse(bytes: &[u8]) -> Result<JobSpec, SpecError> {
        let value: serde_json::Value = parse_json_value(bytes)?;
        if let Some(method) = value.get("method") {
            MethodConfig::check_fields(method)?;
        }
        let spec: JobSpec = from_value(value, "")?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let mut errors = Vec::new();
        self.base_model.check("base_model", &mut errors);
        self.dataset.train.check("dataset.train", &mut errors);
        if let Some(v) = &self.dataset.validation {
            v.check("dataset.validation", &mut errors);
        }
        if let Some(f) = self.dataset.validation_fraction {
            if !(f.is_finite() && f > 0.0 && f <= 0.5) {
                errors.push(FieldError::new(
                    "dataset.validation_fraction",
                    "must be in (0, 0.5]",
                ));
            } else if self.dataset.validation.is_some() {
                errors.push(FieldError::new(
                    "dataset.validation_fraction",
                    "give a validation file or a fraction, not both",
                ));
            }
        }
        if let Some(p) = &self.parent {
            if p.reference.is_empty() || p.reference.len() > 63 {
                errors.push(FieldError::new(
                    "parent.ref",
                    "must be latest, an alias or a version number",
                ));
            }
        }
        if let Some(replay) = &self.safety.replay {
            replay.validate(&mut errors);
        }
        errors.extend(self.method.validate(&self.training));
        self.training.validate(&mut errors);
        self.resources.validate(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecError {
                errors,
                malformed: false,
            })
        }
    }
}

/// Where a job is in its life (docs/architecture.md draws the lifecycle). Stored as text.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "text", rename_all = "snake_case")
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Scheduled,
    Running,
    Evaluating,
    Publishing,
    Succeeded,
    Failed,
    CancelRequested,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Queued,
        JobStatus::Scheduled,
        JobStatus::Running,
        JobStatus::Evaluating,
        JobStatus::Publishing,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::CancelRequested,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Scheduled => "scheduled",
            JobStatus::Running => "running",
            JobStatus::Evaluating => "evaluating",
            JobStatus::Publishing => "publishing",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::CancelRequested => "cancel_requested",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The final states, for queries that bind them as a text array.
    pub const FINAL: [&'static str; 3] = ["succeeded", "failed", "cancelled"];

    /// The transitions of the lifecycle diagram; everything else is refused.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        if self.is_final() {
            return false;
        }
        match next {
            Failed => true,
            CancelRequested => self != CancelRequested,
            Cancelled => true,
            Queued => matches!(self, Scheduled | Running | Evaluating | Publishing),
            Scheduled => self == Queued,
            Running => self == Scheduled,
            Evaluating => self == Running,
            Publishing => matches!(self, Running | Evaluating),
            Succeeded => self == Publishing,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

/// Why a job failed. Only `SystemError` is worth retrying.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "text", rename_all = "snake_case")
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    UserError,
    SystemError,
    SafetyBlocked,
    DeadlineExceeded,
    /// The worker ran out of a resource it was given (its memory limit, GPU memory): the
    /// same job would fail again, so it is not retried; the message says which limit.
    ResourceExhausted,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::UserError => "user_error",
            ErrorKind::SystemError => "system_error",
            ErrorKind::SafetyBlocked => "safety_blocked",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::ResourceExhausted => "resource_exhausted",
        }
    }
}

impl FromStr for ErrorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            ErrorKind::UserError,
            ErrorKind::SystemError,
            ErrorKind::SafetyBlocked,
            ErrorKind::DeadlineExceeded,
            ErrorKind::ResourceExhausted,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
        .ok_or_else(|| format!("unknown error kind {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(method: &str) -> String {
        format!(
            r#"{{"adapter_name":"demo","base_model":"file:///m","dataset":{{"train":"file:///d.jsonl"}},
               "method":{method},"training":{{"max_steps":3,"learning_rate":0.001}}}}"#
        )
    }

    #[test]
    fn parses_a_minimal_job_with_defaults() {
        let spec = JobSpec::parse(body(r#"{"type":"lora","r":8}"#).as_bytes()).unwrap();
        assert_eq!(spec.training.batch_size, 4);
        let MethodConfig::Lora(l) = spec.method else {
            panic!("a lora job parses as lora")
        };
        assert_eq!(l.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(l.scaling(), 2.0);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"type":"lora","r":0}"#, "method.r"),
            (r#"{"type":"bogus","r":8}"#, "method.type"),
            (
                r#"{"type":"lora","r":8,"target_modules":["q_proj","wq"]}"#,
                "method.target_modules[1]",
            ),
            (r#"{"type":"lora","r":8,"dropout":1.5}"#, "method.dropout"),
            (r#"{"type":"lora","r":"eight"}"#, "method.r"),
            (r#"{"type":"lora","r":8,"alhpa":4}"#, "method.alhpa"),
        ];
        for (m, field) in cases {
            let err = JobSpec::parse(body(m).as_bytes()).unwrap_err();
            assert_eq!(err.errors[0].field, field, "{m}: {err}");
        }
        let err = JobSpec::parse(br#"{"adapter_name":"a\u0000"}"#).unwrap_err();
        assert!(err.malformed, "{err}");
        let err = JobSpec::parse(b"{not json").unwrap_err();
        assert!(
            err.malformed && err.errors[0].message.starts_with("malformed JSON"),
            "{err}"
        );
    }

    #[test]
    fn gradient_checkpointing_is_none_layers_or_offload_and_a_wrong_value_names_them() {
        let spec = JobSpec::parse(body(r#"{"type":"lora","r":8}"#).as_bytes()).unwrap();
        assert_eq!(
            spec.training.gradient_checkpointing,
            GradientCheckpointing::None
        );
        let with = |value: &str| {
            body(r#"{"type":"lora","r":8}"#).replace(
                r#""learning_rate":0.001"#,
                &format!(r#""learning_rate":0.001,"gradient_checkpointing":{value}"#),
            )
        };
        for (value, expected) in [
            ("layers", GradientCheckpointing::Layers),
            ("offload", GradientCheckpointing::Offload),
        ] {
            let spec = JobSpec::parse(with(&format!(r#""{value}""#)).as_bytes()).unwrap();
            assert_eq!(spec.training.gradient_checkpointing, expected);
        }
        let err = JobSpec::parse(with(r#""everything""#).as_bytes()).unwrap_err();
        assert_eq!(
            err.errors[0].field, "training.gradient_checkpointing",
            "{err}"
        );
        for value in ["`none`", "`layers`", "`offload`"] {
            assert!(err.errors[0].message.contains(value), "{err}");
        }
    }

    #[test]
    fn lifecycle_refuses_skipping_states() {
        assert!(JobStatus::Queued.can_become(JobStatus::Scheduled));
        assert!(!JobStatus::Queued.can_become(JobStatus::Succeeded));
        assert!(!JobStatus::Succeeded.can_become(JobStatus::Failed));
        assert!(JobStatus::Running.can_become(JobStatus::CancelRequested));
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
        }
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn the_final_set_is_what_is_final() {
        let finals: Vec<&str> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(JobStatus::as_str)
            .collect();
        assert_eq!(finals, JobStatus::FINAL);
    }

    #[test]
    fn inputs_are_uris_or_names_and_a_resolved_spec_holds_uris_only() {
        assert_eq!(
            InputRef::parse("s3://b/k"),
            InputRef::Uri("s3://b/k".into())
        );
        assert_eq!(InputRef::parse("my-data"), InputRef::Name("my-data".into()));
        let spec: JobSpec = serde_json::from_str(
            r#"{"adapter_name":"a","base_model":"base","dataset":{"train":"file:///d.jsonl"},
                "method":{"type":"lora","r":4},"training":{"max_steps":1,"learning_rate":0.1}}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&spec).unwrap()["base_model"], "base");
        let refused = ResolvedJobSpec::new(spec.clone()).unwrap_err();
        assert_eq!(refused.field, "base_model");
        let mut resolved = spec;
        resolved.base_model = InputRef::Uri("file:///m".into());
        let resolved = ResolvedJobSpec::new(resolved).unwrap();
        assert_eq!(resolved.base_model_uri(), "file:///m");
        let back: ResolvedJobSpec =
            serde_json::from_value(serde_json::to_value(&resolved).unwrap()).unwrap();
        assert_eq!(back, resolved);
    }
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2h"), Some(7200));
        assert_eq!(parse_duration("90m"), Some(5400));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("1h2m3s"), Some(3723));
        assert_eq!(parse_duration("45s"), Some(45));
        for bad in ["", "2", "h", "30m1h", "1h1h", "1d", "2 h", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;

    fn with_safety(safety: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(
            format!(
                r#"{{"adapter_name":"demo","base_model":"file:///m","dataset":{{"train":"file:///d.jsonl"}},
                   "method":{{"type":"lora","r":8}},"training":{{"max_steps":3,"learning_rate":0.001}},
                   "safety":{safety}}}"#
            )
            .as_bytes(),
        )
    }

    fn fields(safety: &str) -> Vec<String> {
        with_safety(safety)
            .unwrap_err()
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn replay_parses_with_and_without_a_dataset() {
        let builtin = with_safety(r#"{"replay":{"fraction":0.1}}"#).unwrap();
        let replay = builtin.safety.replay.as_ref().unwrap();
        assert_eq!((replay.fraction, replay.dataset.as_ref()), (0.1, None));
        assert!(builtin.safety.enabled, "replay leaves the gate on");
        let named = with_safety(r#"{"replay":{"fraction":0.5,"dataset":"refusals"}}"#).unwrap();
        assert_eq!(
            named.safety.replay.unwrap().dataset,
            Some(InputRef::Name("refusals".into()))
        );
    }

    #[test]
    fn replay_errors_name_the_field() {
        for bad in ["0", "-0.1", "0.51", "1"] {
            assert_eq!(
                fields(&format!(r#"{{"replay":{{"fraction":{bad}}}}}"#)),
                ["safety.replay.fraction"],
                "{bad}"
            );
        }
        assert_eq!(
            fields(r#"{"replay":{"fraction":0.1,"dataset":"ftp://x/y.jsonl"}}"#),
            ["safety.replay.dataset"]
        );
        assert_eq!(
            fields(r#"{"replay":{"fraction":0.1,"dataset":"Not A Name"}}"#),
            ["safety.replay.dataset"]
        );
        // serde names the block, and its message the field.
        for (body, field, named) in [
            (
                r#"{"replay":{"fraction":0.1,"datset":"refusals"}}"#,
                "safety.replay.datset",
                "datset",
            ),
            (r#"{"replay":{}}"#, "safety.replay", "fraction"),
        ] {
            let err = with_safety(body).unwrap_err();
            assert_eq!(err.errors[0].field, field, "{err}");
            assert!(err.errors[0].message.contains(named), "{err}");
        }
    }

    #[test]
    fn a_resolved_spec_refuses_a_named_replay_dataset() {
        let named = with_safety(r#"{"replay":{"fraction":0.1,"dataset":"refusals"}}"#).unwrap();
        assert_eq!(
            ResolvedJobSpec::new(named).unwrap_err().field,
            "safety.replay.dataset"
        );
        let uri =
            with_safety(r#"{"replay":{"fraction":0.1,"dataset":"file:///r.jsonl"}}"#).unwrap();
        let resolved = ResolvedJobSpec::new(uri).unwrap();
        assert_eq!(resolved.replay_uri(), Some("file:///r.jsonl"));
    }

    #[test]
    fn replay_counts_are_the_share_of_the_mix() {
        let replay = |fraction| crate::safety::RefusalReplay {
            fraction,
            dataset: None,
        };
        assert_eq!(replay(0.1).examples_for(90), 10);
        assert_eq!(replay(0.5).examples_for(32), 32);
        assert_eq!(replay(0.2).examples_for(32), 8);
        assert_eq!(replay(0.01).examples_for(3), 1, "at least one");
    }
}
