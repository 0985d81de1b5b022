//! `loraforge-trainer merge`: an adapter of any PEFT family folded into its base model's
//! weights, `W' = W + ΔW` (`ΔW = scaling · B A` for LoRA; each family's in `crate::families`),
//! written as a new Hugging Face model directory that can be registered and trained on as a base
//! model of its own. `loraforge_merge.json` records the adapter it came from, so the registry
//! can keep the lineage.

use crate::error::user_error;
use crate::export::{file_digest, PeftAdapter};
use crate::families::{updates, Update};
use crate::model::weights::{read_safetensors, weight_files};
use anyhow::{Context, Result};
use loraforge_spec::manifest::{ADAPTER_WEIGHTS_FILE, MANIFEST_FILE};
use loraforge_spec::merge::{
    MergeRecord, MergeSource, MergedAdapter, MERGE_RECORD_FILE, MERGE_RECORD_FORMAT,
};
use serde_json::Value;
use std::path::Path;
use tch::{Kind, Tensor};

/// What was merged, for the command's output.
#[derive(Debug, serde::Serialize)]
pub struct MergeSummary {
    pub merged_modules: usize,
    pub record: MergeRecord,
}

/// Merges the adapter in `adapter_dir` into the model in `model_dir`, writing `out`: the weights
/// (same files and dtypes as the base, one file in memory at a time), the base's other files
/// (config, tokenizer, chat template) copied, and the merge record. `source` names the adapter
/// version; without it, the adapter's `manifest.json` says which it is, where it has one.
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    source: Option<MergeSource>,
) -> Result<MergeSummary> {
    if same_dir(model_dir, out) {
        return Err(user_error(
            "--out must differ from --model: the base model is read while the merge is written",
        ));
    }
    let adapter = PeftAdapter::load(adapter_dir)?;
    let mut updates = updates(&adapter)?;
    let merged_modules = updates.len();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let files = weight_files(model_dir)?;
    for file in &files {
        let mut tensors = Vec::new();
        read_safetensors(file, |name, tensor| tensors.push((name, tensor)))?;
        for (name, weight) in tensors.iter_mut() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if let Some(update) = updates.remove(module) {
                *weight = merged_weight(name, weight, &update)?;
            }
        }
        let name = file.file_name().context("weight file without a name")?;
        Tensor::write_safetensors(&tensors, out.join(name))?;
    }
    if let Some(module) = updates.keys().next() {
        return Err(user_error(format!(
            "the adapter adapts {module}, which the base model has no weight for"
        )));
    }

    let weight_names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    for entry in
        std::fs::read_dir(model_dir).with_context(|| format!("reading {}", model_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        // The base's own merge record, if it was merged too, is replaced by ours.
        if !entry.file_type()?.is_file()
            || weight_names.contains(&name.as_os_str())
            || name == MERGE_RECORD_FILE
        {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name))
            .with_context(|| format!("copying {} to {}", entry.path().display(), out.display()))?;
    }

    let source = match source {
        Some(source) => Some(source),
        None => manifest_source(adapter_dir)?,
    };
    let record = MergeRecord {
        format: MERGE_RECORD_FORMAT,
        base_model: model_dir.display().to_string(),
        adapter: MergedAdapter {
            path: adapter_dir.display().to_string(),
            weights_sha256: file_digest(
                &adapter_dir.join(ADAPTER_WEIGHTS_FILE),
                ADAPTER_WEIGHTS_FILE,
            )?
            .sha256,
        },
        source,
    };
    std::fs::write(
        out.join(MERGE_RECORD_FILE),
        serde_json::to_vec_pretty(&record)?,
    )?;
    Ok(MergeSummary {
        merged_modules,
        record,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `W + ΔW`, computed in fp32 and stored in the weight's own dtype.
fn merged_weight(name: &str, weight: &Tensor, update: &Update) -> Result<Tensor> {
    let delta = update.delta(name, weight)?;
    Ok((weight.to_kind(Kind::Float) + delta).to_kind(weight.kind()))
}

/// The adapter version an artifact directory is, from its `manifest.json`. Local `train`
/// writes version 0, which is no registered version.
fn manifest_source(adapter_dir: &Path) -> Result<Option<MergeSource>> {
    let path = adapter_dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(user_error(format!("cannot read {}: {e}", path.display()))),
    };
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|e| user_error(format!("{} is not valid JSON: {e}", path.display())))?;
    let name = manifest.get("adapter_name").and_then(Value::as_str);
    let version = manifest
        .get("version")
        .and_then(Value::as_i64)
        .and_then(|v| i32::try_from(v).ok());
    Ok(match (name, version) {
        (Some(name), Some(version)) if version > 0 => Some(MergeSource {
            adapter: name.to_string(),
            version,
        }),
        _ => None,
    })
}
