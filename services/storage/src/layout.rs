//! Where artifacts live, relative to the storage root. The one place that knows: writers
//! build paths here and readers (garbage collection) parse them here.

/// Root of every adapter version's folder.
pub const ADAPTERS: &str = "adapters";
/// Root of every job's checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
/// Root of every uploaded dataset. Registered datasets are never deleted, so garbage
/// collection does not look here.
pub const DATASETS: &str = "datasets";

/// Root of the base models' stored safety-evaluation sides, shared by every job on a base
/// (not registry artifacts: garbage collection leaves them alone, and deleting them costs
/// only the time to measure again).
pub const BASELINES: &str = "baselines";

/// `baselines/<key>`: one base model's side of the safety evaluation.
pub fn baseline_prefix(key: &str) -> String {
    format!("{BASELINES}/{key}")
}

/// `adapters/<project>/<adapter>/v<N>`: the files of one adapter version.
pub fn adapter_version_prefix(project: &str, adapter: &str, version: i32) -> String {
    format!("{ADAPTERS}/{project}/{adapter}/v{version}")
}

/// `checkpoints/<job>/<step>`: a training checkpoint.
pub fn checkpoint_prefix(job_id: &str, step: u32) -> String {
    format!("{CHECKPOINTS}/{job_id}/{step:09}")
}

/// `datasets/<project>`: the folder of a project's uploaded datasets.
pub fn datasets_prefix(project: &str) -> String {
    format!("{DATASETS}/{project}")
}

/// `datasets/<project>/<upload id>.jsonl`: one uploaded dataset file. The id is fresh for each
/// upload, so two uploads never write the same object.
pub fn dataset_upload_path(project: &str, upload_id: &str) -> String {
    format!("{}/{upload_id}.jsonl", datasets_prefix(project))
}

/// What a stored object's path is, by the layout above.
#[derive(Debug, PartialEq, Eq)]
pub enum Located<'a> {
    /// A file of an adapter version.
    AdapterVersion {
        project: &'a str,
        adapter: &'a str,
        version: i32,
    },
    /// A file of one job's checkpoints (the job id as written, maybe not a UUID).
    Checkpoint { job_id: &'a str },
    /// Not in either shape.
    Unknown,
}

impl Located<'_> {
    /// The folder that holds everything of the same artifact (a version, a job's
    /// checkpoints), for grouping objects.
    pub fn folder(&self) -> Option<String> {
        match self {
            Located::AdapterVersion {
                project,
                adapter,
                version,
            } => Some(adapter_version_prefix(project, adapter, *version)),
            Located::Checkpoint { job_id } => Some(format!("{CHECKPOINTS}/{job_id}")),
            Located::Unknown => None,
        }
    }
}

/// Parses a path relative to the storage root.
pub fn locate(path: &str) -> Located<'_> {
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        [ADAPTERS, project, adapter, v, file, ..] if !file.is_empty() => {
            match v.strip_prefix('v').and_then(|n| n.parse::<i32>().ok()) {
                Some(version) => Located::AdapterVersion {
                    project,
                    adapter,
                    version,
                },
                None => Located::Unknown,
            }
        }
        [CHECKPOINTS, job_id, _, ..] => Located::Checkpoint { job_id },
        _ => Located::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_built_here_are_located_here() {
        let file = format!("{}/manifest.json", adapter_version_prefix("p", "a", 7));
        let located = locate(&file);
        assert_eq!(
            located,
            Located::AdapterVersion {
                project: "p",
                adapter: "a",
                version: 7
            }
        );
        assert_eq!(located.folder(), Some(adapter_version_prefix("p", "a", 7)));
        let ckpt = format!("{}/adapter.safetensors", checkpoint_prefix("j1", 5));
        assert_eq!(locate(&ckpt), Located::Checkpoint { job_id: "j1" });
        assert_eq!(locate("adapters/p/a/vX/f"), Located::Unknown);
        assert_eq!(locate("adapters/p/a/v1"), Located::Unknown);
        assert_eq!(locate("elsewhere/x"), Located::Unknown);
    }
}
