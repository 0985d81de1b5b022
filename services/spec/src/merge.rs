//! `loraforge_merge.json`: what a merged base model (`loraforge-trainer merge`) was made
//! from. Registering the model reads its `source`, so the registry's lineage edge from the
//! adapter version to the new base model follows the files wherever they are copied.

use serde::{Deserialize, Serialize};

pub const MERGE_RECORD_FILE: &str = "loraforge_merge.json";
pub const MERGE_RECORD_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub format: u32,
    /// The base model directory the adapter was merged into, as given.
    pub base_model: String,
    pub adapter: MergedAdapter,
    /// The registered adapter version the adapter files are, where known: from the command
    /// line, else from the adapter's `manifest.json`. What base-model registration takes as `source`.
    pub source: Option<MergeSource>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergedAdapter {
    /// The adapter directory, as given.
    pub path: String,
    /// sha256 of its `adapter_model.safetensors`, so the record names the exact weights.
    pub weights_sha256: String,
}

/// An adapter version, as `POST /v1/base-models` takes it in `source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeSource {
    pub adapter: String,
    pub version: i32,
}
