//! A job's inputs (base model directory, dataset files) made local: `file://` URIs are read
//! in place, anything else is downloaded into a scratch directory. Each input also gets
//! the digest that the manifest records as its lineage.

use crate::error::user_error;
use crate::export::file_digest;
use anyhow::{Context, Result};
use loraforge_spec::manifest::tree_digest_input;
use loraforge_spec::{DigestRef, FileDigest, ResolvedJobSpec};
use loraforge_storage::{sha256_hex, StorageError, Store};
use std::path::{Path, PathBuf};
use tokio::runtime::Runtime;

pub struct LocalInputs {
    pub model_dir: PathBuf,
    pub dataset: PathBuf,
    /// The separate validation file, when the job names one.
    pub validation: Option<PathBuf>,
    /// The refusal dataset of `safety.replay`, when the job names one, and its digest.
    pub replay: Option<(PathBuf, DigestRef)>,
    pub base_model: DigestRef,
    pub dataset_ref: DigestRef,
}

/// A local model directory's tree digest (what a job's lineage records for its base model).
pub fn model_digest(dir: &Path) -> Result<String> {
    Ok(sha256_hex(tree_digest_input(&digest_tree(dir)?).as_bytes()))
}

/// Makes the job's base model and data files local; downloads go under `scratch`.
pub fn fetch_inputs(rt: &Runtime, spec: &ResolvedJobSpec, scratch: &Path) -> Result<LocalInputs> {
    let base_model = spec.base_model_uri();
    let (model_dir, model_files) = match local_path(base_model)? {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(user_error(format!(
                    "base_model {base_model}: no such directory"
                )));
            }
            let files = digest_tree(&dir)?;
            (dir, files)
        }
        None => {
            let dir = scratch.join("model");
            let files = rt.block_on(download_tree(base_model, &dir))?;
            (dir, files)
        }
    };
    let (dataset, dataset_sha) = fetch_file(
        rt,
        "dataset.train",
        spec.train_uri(),
        &scratch.join("train.jsonl"),
    )?;
    let validation = match spec.validation_uri() {
        Some(uri) => Some(
            fetch_file(
                rt,
                "dataset.validation",
                uri,
                &scratch.join("validation.jsonl"),
            )?
            .0,
        ),
        None => None,
    };
    let replay = match spec.replay_uri() {
        Some(uri) => {
            let (path, sha256) = fetch_file(
                rt,
                "safety.replay.dataset",
                uri,
                &scratch.join("replay.jsonl"),
            )?;
            let digest = DigestRef {
                uri: uri.to_string(),
                sha256,
            };
            Some((path, digest))
        }
        None => None,
    };
    Ok(LocalInputs {
        model_dir,
        dataset,
        validation,
        replay,
        base_model: DigestRef {
            uri: base_model.to_string(),
            sha256: sha256_hex(tree_digest_input(&model_files).as_bytes()),
        },
        dataset_ref: DigestRef {
            uri: spec.train_uri().to_string(),
            sha256: dataset_sha,
        },
    })
}

/// One data file, read in place (`file://`) or downloaded to `download_to`: its path and sha256.
fn fetch_file(
    rt: &Runtime,
    field: &str,
    uri: &str,
    download_to: &Path,
) -> Result<(PathBuf, String)> {
    match local_path(uri)? {
        Some(path) => {
            if !path.is_file() {
                return Err(user_error(format!("{field} {uri}: no such file")));
            }
            let sha = file_digest(&path, field)?.sha256;
            Ok((path, sha))
        }
        None => {
            let sha = rt.block_on(download_object(field, uri, download_to))?;
            Ok((download_to.to_path_buf(), sha))
        }
    }
}

/// The local path of a `file://` URI; `None` for remote schemes.
fn local_path(uri: &str) -> Result<Option<PathBuf>> {
    let parsed =
        url::Url::parse(uri).map_err(|e| user_error(format!("{uri:?} is not a URI: {e}")))?;
    if parsed.scheme() != "file" {
        return Ok(None);
    }
    parsed
        .to_file_path()
        .map(Some)
        .map_err(|_| user_error(format!("{uri:?} does not name an absolute local path")))
}

/// Digests of every file under `root`, named by their `/`-separated path relative to it.
/// Dot-entries are skipped: tools keep caches there (`.cache/huggingface`) that differ
/// between copies of the same model.
fn digest_tree(root: &Path) -> Result<Vec<FileDigest>> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path
                    .strip_prefix(root)?
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                files.push(file_digest(&path, &name)?);
            }
        }
    }
    Ok(files)
}

/// Downloads every object under a directory URI into `dest`, returning their digests.
async fn download_tree(uri: &str, dest: &Path) -> Result<Vec<FileDigest>> {
    let store = Store::open(uri).map_err(|e| user_error(format!("base_model: {e}")))?;
    let listed = store.list("").await.map_err(storage_error)?;
    let mut files = Vec::new();
    for object in listed
        .into_iter()
        .filter(|o| !o.path.split('/').any(|part| part.starts_with('.')))
    {
        let target = dest.join(&object.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let (sha256, size) = store
            .download(&object.path, &target)
            .await
            .map_err(storage_error)?;
        files.push(FileDigest {
            name: object.path,
            sha256,
            size,
        });
    }
    if files.is_empty() {
        return Err(user_error(format!("base_model {uri}: no files there")));
    }
    Ok(files)
}

/// Downloads one object into `dest`, returning its sha256.
async fn download_object(field: &str, uri: &str, dest: &Path) -> Result<String> {
    let (store, name) = Store::open_object(uri).map_err(|e| user_error(format!("{field}: {e}")))?;
    let (sha256, _) = store.download(&name, dest).await.map_err(storage_error)?;
    Ok(sha256)
}

/// A missing object is the user's mistake; anything else is the storage's.
fn storage_error(err: StorageError) -> anyhow::Error {
    match err {
        StorageError::NotFound(uri) => user_error(format!("not found: {uri}")),
        other => other.into(),
    }
}
