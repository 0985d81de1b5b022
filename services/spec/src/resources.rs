//! What a job's worker asks of the machine it runs on: GPUs and their type, CPU, memory,
//! scratch disk, tolerations, priority and the Kueue queue. The `kubernetes` executor turns
//! these into the worker Pod's requests and placement; the `local` executor has nothing to
//! place and ignores them. Quantities use Kubernetes' syntax (`8`, `500m`, `32Gi`) and are
//! checked here, so a bad value is refused at submission with its field path, not by the
//! cluster minutes later.

use crate::error::FieldError;
use serde::{Deserialize, Serialize};

/// Most GPUs one worker may ask for (one node's worth on today's largest machines).
pub const MAX_GPUS: u32 = 16;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs for the worker (`nvidia.com/gpu`). Default: 1 on the `kubernetes` executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 16))]
    pub gpus: Option<u32>,
    /// The GPU model, matched against the node label the operator configures
    /// (`LORAFORGE_K8S_GPU_LABEL`, default `nvidia.com/gpu.product`), e.g. `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            max_length = 63,
            pattern = r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"
        )
    )]
    pub gpu_type: Option<String>,
    /// CPU request and limit, as a Kubernetes quantity (`8`, `500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
        )
    )]
    pub cpu: Option<String>,
    /// Memory request and limit (`64Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
        )
    )]
    pub memory: Option<String>,
    /// Scratch disk for downloaded inputs and checkpoints (`100Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
        )
    )]
    pub ephemeral_storage: Option<String>,
    /// Taints the worker tolerates (GPU node pools are usually tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// A Kubernetes PriorityClass for the worker Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 253))]
    pub priority_class: Option<String>,
    /// A Kueue LocalQueue; overrides `LORAFORGE_K8S_QUEUE` for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 63))]
    pub queue: Option<String>,
}

/// A Kubernetes quantity: a decimal number with an optional binary, decimal or exponent suffix.
pub const QUANTITY_PATTERN: &str =
    r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$";

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// The taint key; empty with `Exists` tolerates every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Which taint effect it tolerates; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// With `NoExecute`: how long the Pod stays after the taint appears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl Resources {
    pub fn is_default(&self) -> bool {
        self == &Resources::default()
    }

    pub fn validate(&self, errors: &mut Vec<FieldError>) {
        let mut bad = |field: &str, msg: String| {
            errors.push(FieldError::new(format!("resources.{field}"), msg))
        };
        if let Some(n) = self.gpus {
            if n > MAX_GPUS {
                bad("gpus", format!("must be between 0 and {MAX_GPUS}"));
            }
        }
        if let Some(t) = &self.gpu_type {
            if let Err(m) = label_value(t) {
                bad("gpu_type", m);
            }
        }
        for (field, q) in [
            ("cpu", &self.cpu),
            ("memory", &self.memory),
            ("ephemeral_storage", &self.ephemeral_storage),
        ] {
            if let Some(q) = q {
                if !is_quantity(q) {
                    bad(
                        field,
                        format!("{q:?} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)"),
                    );
                } else if is_zero(q) {
                    bad(field, "must be more than zero".into());
                }
            }
        }
        for (i, t) in self.tolerations.iter().enumerate() {
            t.validate(&format!("tolerations[{i}]"), &mut bad);
        }
        if let Some(p) = &self.priority_class {
            if let Err(m) = dns_subdomain(p) {
                bad("priority_class", m);
            }
        }
        if let Some(q) = &self.queue {
            if let Err(m) = dns_label(q) {
                bad("queue", m);
            }
        }
    }
}

impl Toleration {
    fn validate(&self, at: &str, bad: &mut impl FnMut(&str, String)) {
        if let Some(k) = &self.key {
            if let Err(m) = qualified_name(k) {
                bad(&format!("{at}.key"), m);
            }
        }
        match self.operator {
            TolerationOperator::Exists if self.value.is_some() => bad(
                &format!("{at}.value"),
                "must be empty with operator Exists".into(),
            ),
            TolerationOperator::Equal if self.key.is_none() => bad(
                &format!("{at}.key"),
                "is required with operator Equal (use Exists to tolerate every taint)".into(),
            ),
            _ => {}
        }
        if let Some(v) = &self.value {
            if let Err(m) = label_value(v) {
                bad(&format!("{at}.value"), m);
            }
        }
        if self.toleration_seconds.is_some() && self.effect != Some(TaintEffect::NoExecute) {
            bad(
                &format!("{at}.toleration_seconds"),
                "only applies with effect NoExecute".into(),
            );
        }
    }
}

/// Kubernetes' quantity grammar (`resource.Quantity`), without its 2^63 range check.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix('+').unwrap_or(s);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = number.matches('.').count() <= 1 && number.chars().any(|c| c.is_ascii_digit());
    if !number_ok {
        return false;
    }
    const SUFFIXES: [&str; 16] = [
        "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E",
    ];
    if SUFFIXES.contains(&suffix) {
        return true;
    }
    // Exponent: e or E, optional sign, digits.
    let Some(exp) = suffix.strip_prefix(['e', 'E']) else {
        return false;
    };
    let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
    !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
}

fn is_zero(q: &str) -> bool {
    q.trim_start_matches('+')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .all(|c| c == '0' || c == '.')
}

/// A label value: at most 63 characters, alphanumeric at both ends, `-_.` inside.
pub fn label_value(s: &str) -> Result<(), String> {
    let ok = s.len() <= 63
        && (s.is_empty()
            || (s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))));
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a valid label value (63 characters at most: letters, digits, '-', '_', '.'; alphanumeric at both ends)")
    })
}

/// A DNS-1123 label: lower-case alphanumerics and '-', 63 at most.
pub fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a DNS-1123 label (lower-case letters, digits and '-', 63 at most)")
    })
}

/// A DNS-1123 subdomain: dot-separated labels, 253 characters at most.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| dns_label(l).is_ok());
    ok.then_some(()).ok_or_else(|| {
        format!("{s:?} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.')")
    })
}

/// A qualified name (`prefix/name` or `name`), as taint keys and label keys are.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty() && label_value(name).is_ok();
    let prefix_ok = prefix.is_none_or(|p| dns_subdomain(p).is_ok());
    (name_ok && prefix_ok).then_some(()).ok_or_else(|| {
        format!("{s:?} is not a valid key (an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_', '.')")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for good in [
            "1", "8", "500m", "0.5", ".5", "64Gi", "1e3", "2E-2", "+4", "100M", "1.5Ti",
        ] {
            assert!(is_quantity(good), "{good} should parse");
        }
        for bad in [
            "", "Gi", "1.2.3", "1GB", "-1", "1 Gi", "1e", "abc", ".", "1gi",
        ] {
            assert!(!is_quantity(bad), "{bad} should not parse");
        }
    }

    fn errors(json: serde_json::Value) -> Vec<String> {
        let r: Resources = serde_json::from_value(json).unwrap();
        let mut errors = Vec::new();
        r.validate(&mut errors);
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn fields_are_named() {
        assert!(errors(serde_json::json!({
            "gpus": 8, "gpu_type": "NVIDIA-H100-80GB-HBM3", "cpu": "16", "memory": "128Gi",
            "ephemeral_storage": "200Gi", "priority_class": "training-high", "queue": "team-a",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                            {"operator": "Exists"}]
        }))
        .is_empty());
        assert_eq!(
            errors(serde_json::json!({
                "gpus": 17, "gpu_type": "H100 80GB", "cpu": "lots", "memory": "0Gi",
                "priority_class": "High", "queue": "team_a",
                "tolerations": [{"key": "x", "operator": "Exists", "value": "y"},
                                {"operator": "Equal", "value": "y"},
                                {"key": "k", "toleration_seconds": 5}]
            })),
            [
                "resources.gpus",
                "resources.gpu_type",
                "resources.cpu",
                "resources.memory",
                "resources.tolerations[0].value",
                "resources.tolerations[1].key",
                "resources.tolerations[2].toleration_seconds",
                "resources.priority_class",
                "resources.queue",
            ]
        );
    }
}
