//! Where artifacts live, relative to the storage root. The one place that knows.

/// `adapters/<project>/<adapter>/v<N>`: the files of one adapter version.
pub fn adapter_version_prefix(project: &str, adapter: &str, version: i32) -> String {
    format!("adapters/{project}/{adapter}/v{version}")
}

/// `checkpoints/<job>/<step>`: a training checkpoint.
pub fn checkpoint_prefix(job_id: &str, step: u32) -> String {
    format!("checkpoints/{job_id}/{step:09}")
}
