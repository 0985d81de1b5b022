//! Datasets uploaded through the API rather than registered by URI. An upload streams into the
//! artifact store (`datasets/<project>/<upload id>.jsonl`) as an object that is not visible
//! until committed, while its sha256 is computed and every line is checked against the dataset
//! formats (`loraforge_spec::dataset`). A refused upload (a bad line, over the size limit, the
//! client gone) is aborted: nothing is stored and nothing registered. An accepted one is
//! committed and registered as a dataset whose URI is that object, which workers read like any
//! other store URI (in place for a `file://` store, downloaded from a cloud one).

use super::inputs::{self, InputKind, InputRow};
use crate::error::{Error, Result};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use loraforge_spec::dataset::{DatasetSummary, LineChecker};
use loraforge_spec::{AdapterName, SpecError};
use loraforge_storage::{layout, Store, Upload};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// The format recorded for every dataset (as `POST /v1/datasets` records it).
const FORMAT: &str = "jsonl";

/// An upload read to its end and found good, not yet visible: [`register`](Self::register)
/// commits it, dropping it discards it.
pub struct StagedDataset {
    upload: Upload,
    /// Its path relative to the store root.
    path: String,
    pub sha256: String,
    pub size: u64,
    pub summary: DatasetSummary,
}

/// What an upload is registered as.
pub enum DatasetName {
    /// This name; uploading the same content under it again changes nothing.
    Given(AdapterName),
    /// `<stem>-<first 12 hex digits of the sha256>`: each distinct content gets its own name,
    /// and the same content the same one (how OpenAI-style file uploads are named).
    ByContent { stem: String },
}

/// Streams `body` into the store, checking it as it goes. `field` names the body in errors.
/// Over `max_bytes`: `TooLarge`; a bad file: `Invalid` with the first bad lines; a body that
/// breaks off: a malformed request.
pub async fn stage<S, E>(
    store: &Store,
    project: &str,
    mut body: S,
    max_bytes: u64,
    field: &str,
) -> Result<StagedDataset>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let path = layout::dataset_upload_path(project, &uuid::Uuid::new_v4().simple().to_string());
    let mut upload = store.upload(&path).await?;
    let (mut hasher, mut size, mut checker) = (Sha256::new(), 0u64, LineChecker::new());
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                discard(upload).await;
                return Err(Error::Invalid(SpecError::malformed(format!(
                    "the upload broke off: {e}"
                ))));
            }
        };
        size += chunk.len() as u64;
        if size > max_bytes {
            discard(upload).await;
            return Err(too_large(max_bytes));
        }
        hasher.update(&chunk);
        checker.feed(&chunk);
        if checker.is_full() {
            // Refused whatever follows: no need to read it.
            break;
        }
        upload.write(&chunk).await?;
    }
    match checker.finish(field) {
        Ok(summary) => Ok(StagedDataset {
            upload,
            path,
            sha256: hex::encode(hasher.finalize()),
            size,
            summary,
        }),
        Err(errors) => {
            discard(upload).await;
            Err(Error::Invalid(SpecError {
                errors,
                malformed: false,
            }))
        }
    }
}

/// The error for an upload over the limit.
pub fn too_large(max_bytes: u64) -> Error {
    Error::TooLarge(format!(
        "the upload is larger than {max_bytes} bytes, this server's limit (its LORAFORGE_MAX_UPLOAD_BYTES setting)"
    ))
}

impl StagedDataset {
    /// Registers the upload under `name` in `project`: committed and recorded, `true`; the
    /// same content already registered under that name, that row and `false` (the upload is
    /// discarded); other content under that name, a conflict.
    pub async fn register(
        self,
        pool: &PgPool,
        store: &Store,
        project: &str,
        name: DatasetName,
    ) -> Result<(InputRow, bool)> {
        let name = match name {
            DatasetName::Given(name) => name,
            DatasetName::ByContent { stem } => {
                AdapterName::parse(&format!("{}-{}", name_stem(&stem), &self.sha256[..12]))
                    .map_err(Error::Internal)?
            }
        };
        if let Some(existing) =
            inputs::get(pool, project, InputKind::Dataset, name.as_str()).await?
        {
            discard(self.upload).await;
            return same_content(existing, &self.sha256, &name);
        }
        let uri = self.upload.uri().to_string();
        self.upload.commit().await?;
        let inserted = inputs::insert_dataset(
            pool,
            project,
            name.as_str(),
            &uri,
            &self.sha256,
            self.size,
            FORMAT,
        )
        .await;
        match inserted {
            Ok(Some(row)) => Ok((row, true)),
            // Another upload took the name meanwhile: this object is no one's.
            Ok(None) => {
                delete_quietly(store, &self.path).await;
                let existing = inputs::get(pool, project, InputKind::Dataset, name.as_str())
                    .await?
                    .ok_or(Error::NotFound("dataset"))?;
                same_content(existing, &self.sha256, &name)
            }
            Err(e) => {
                delete_quietly(store, &self.path).await;
                Err(e.into())
            }
        }
    }
}

fn same_content(existing: InputRow, sha256: &str, name: &AdapterName) -> Result<(InputRow, bool)> {
    if existing.sha256 == sha256 {
        Ok((existing, false))
    } else {
        Err(Error::conflict(
            "name_taken",
            format!("dataset {name} is already registered with other content; upload under another name"),
        ))
    }
}

/// A name stem from a file name: `My Data (v2).jsonl` -> `my-data-v2`; at most 50 characters,
/// so the stem, a dash and 12 hex digits fit a name's 63; `file` when nothing is left.
pub fn name_stem(filename: &str) -> String {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let base = base
        .strip_suffix(".jsonl")
        .or_else(|| base.strip_suffix(".json"))
        .unwrap_or(base);
    let mut stem = String::new();
    for c in base.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
            stem.push(c);
        } else if !stem.is_empty() && !stem.ends_with('-') {
            stem.push('-');
        }
        if stem.len() >= 50 {
            break;
        }
    }
    let stem = stem.trim_end_matches(['-', '_']).trim_start_matches('_');
    if stem.is_empty() {
        "file".into()
    } else {
        stem.to_string()
    }
}

/// A discarded upload leaves nothing; failing to say so to the store is only logged (the
/// object was never visible).
async fn discard(upload: Upload) {
    let uri = upload.uri().to_string();
    if let Err(e) = upload.abort().await {
        tracing::warn!(%uri, error = %e, "discarding an upload failed");
    }
}

async fn delete_quietly(store: &Store, path: &str) {
    if let Err(e) = store.delete(path).await {
        tracing::warn!(path, error = %e, "deleting an unregistered upload failed");
    }
}

/// Whether `uri` is one of `project`'s uploads in `store`: read from the artifact store,
/// which `file://` inputs otherwise may never be.
pub fn is_upload_of(store: &Store, project: &str, uri: &str) -> bool {
    let prefix = format!("{}/", store.uri_of(&layout::datasets_prefix(project)));
    uri.strip_prefix(&prefix)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.contains(".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_become_name_stems() {
        assert_eq!(name_stem("train.jsonl"), "train");
        assert_eq!(name_stem("/tmp/My Data (v2).jsonl"), "my-data-v2");
        assert_eq!(name_stem("..."), "file");
        assert_eq!(name_stem("_x_"), "x");
        assert_eq!(name_stem(&"a".repeat(80)).len(), 50);
        for name in ["train.jsonl", "Ünïcode.jsonl", "-.-", "a b"] {
            let stem = name_stem(name);
            assert!(
                AdapterName::parse(&format!("{stem}-0123456789ab")).is_ok(),
                "{name} -> {stem}"
            );
        }
    }

    #[test]
    fn only_a_projects_own_uploads_count() {
        let store = Store::create(&format!(
            "file://{}",
            std::env::temp_dir().join("lf-uploads-test").display()
        ))
        .unwrap();
        let own = store.uri_of(&layout::dataset_upload_path("p", "abc"));
        assert!(is_upload_of(&store, "p", &own));
        assert!(!is_upload_of(&store, "q", &own));
        assert!(!is_upload_of(
            &store,
            "p",
            &store.uri_of("datasets/p/x/../../q/abc.jsonl")
        ));
        assert!(!is_upload_of(
            &store,
            "p",
            &store.uri_of("adapters/p/a/v1/x")
        ));
    }
}
