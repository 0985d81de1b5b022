//! The `LoraJob` custom resource (`loraforge.dev/v1alpha1`): a job declared as a Kubernetes
//! object. Its spec is the JobSpec the REST API takes, kept as the raw object the user
//! wrote so the operator parses it with the same code (and the same field-named errors) as
//! `POST /v1/jobs`; its schema in the CRD comes from that JobSpec's own schema ([`super::crd`]).

use kube::CustomResource;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "loraforge.dev";
pub const VERSION: &str = "v1alpha1";
/// Held while the object's job may still run; removed once the job is over.
pub const FINALIZER: &str = "loraforge.dev/job";

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "loraforge.dev",
    version = "v1alpha1",
    kind = "LoraJob",
    plural = "lorajobs",
    shortname = "lj",
    namespaced,
    status = "LoraJobStatus",
    schema = "disabled",
    printcolumn = r#"{"name":"Adapter","type":"string","jsonPath":".spec.adapter_name"}"#,
    printcolumn = r#"{"name":"Method","type":"string","jsonPath":".spec.method.type"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.loss"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.adapterVersion.version"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct LoraJobSpec {
    /// The JobSpec's fields, as written.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoraJobStatus {
    /// The job's state (`queued` … `succeeded`, `failed`, `cancelled`), or `rejected` when
    /// the spec was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// `step/max_steps`, as the printer column shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<AdapterVersionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterVersionStatus {
    pub name: String,
    pub version: i32,
    pub uri: String,
}

/// A condition as Kubernetes writes them (`metav1.Condition`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl LoraJobStatus {
    /// A status with every field present (its keys name everything a status can hold).
    pub fn full() -> LoraJobStatus {
        LoraJobStatus {
            phase: Some(String::new()),
            conditions: vec![Condition::default()],
            job_id: Some(String::new()),
            attempt: Some(0),
            step: Some(String::new()),
            max_steps: Some(0),
            loss: Some(0.0),
            adapter_version: Some(AdapterVersionStatus::default()),
            safety_decision: Some(String::new()),
            observed_generation: Some(0),
        }
    }
}
