//! Every Kubernetes API call the control plane makes (the kubernetes executor's and the
//! operator's), as the RBAC rules that allow exactly those: the Helm chart's Role lists the
//! same rules, and a test compares them, so the Role grants each verb the code uses and no
//! more.

/// (API group, resource, verbs).
pub const RULES: &[(&str, &str, &[&str])] = &[
    // The executor: worker Jobs (create, delete; watched and listed for reconciliation).
    (
        "batch",
        "jobs",
        &["create", "delete", "get", "list", "watch"],
    ),
    // Their Pods are watched, and a failed worker's log is read.
    ("", "pods", &["get", "list", "watch"]),
    ("", "pods/log", &["get"]),
    // The per-attempt token Secret: created, owned by its Job (patch), deleted.
    ("", "secrets", &["create", "delete", "patch"]),
    // The operator's Kubernetes Events (both APIs, whichever the recorder uses).
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // LoraJobs: watched, finalizer added and removed.
    (
        "loraforge.dev",
        "lorajobs",
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "loraforge.dev",
        "lorajobs/status",
        &["get", "patch", "update"],
    ),
    // Leader election.
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
];
// Namespaces and nodes are never read: the namespace is configured, placement is the
// scheduler's.
