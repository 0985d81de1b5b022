//! The one wrapper over `object_store` used by the control plane and the trainer.
//!
//! A [`Store`] is opened from a URL (`file:///abs/dir`, `s3://bucket/prefix`,
//! `gs://…`, `az://…`); cloud credentials and endpoints come from the standard
//! environment variables the `object_store` builders read (`AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `GOOGLE_*`, `AZURE_*`, …).
//! Paths given to a store are relative to its root. [`layout`] says where things go.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub mod layout;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("storage error at {uri}: {source}")]
    Backend {
        uri: String,
        #[source]
        source: object_store::Error,
    },
    #[error("local file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Uploads larger than this go through multipart upload.
const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;

/// An object store rooted at a URL.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Cloud backends can presign URLs; the local filesystem cannot.
    signer: Option<Arc<dyn Signer>>,
    root: String,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// An object listed under a prefix, with its path relative to the store root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub size: u64,
}

impl Store {
    /// Opens an existing store (a `file://` root must exist): for reading inputs.
    pub fn open(url: &str) -> Result<Store> {
        Self::open_with(url, false)
    }

    /// Opens the store a URL names, creating a missing `file://` root: for the artifact store.
    pub fn create(url: &str) -> Result<Store> {
        Self::open_with(url, true)
    }

    fn open_with(url: &str, create: bool) -> Result<Store> {
        let invalid = |reason: String| StorageError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let url = url.trim_end_matches('/').to_string();
        type Opened = (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>, String);
        let (inner, signer, root): Opened = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| invalid("not an absolute local path".into()))?;
                if create {
                    std::fs::create_dir_all(&dir).map_err(|e| StorageError::Io {
                        path: dir.display().to_string(),
                        source: e,
                    })?;
                } else if !dir.is_dir() {
                    return Err(StorageError::NotFound(url));
                }
                let fs =
                    object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| {
                        StorageError::Backend {
                            uri: url.clone(),
                            source: e,
                        }
                    })?;
                (Arc::new(fs), None, String::new())
            }
            "s3" | "s3a" => {
                let s3 = Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url.as_str())
                        .build()
                        .map_err(|e| invalid(e.to_string()))?,
                );
                (s3.clone(), Some(s3), bucket_prefix(&parsed))
            }
            "gs" => {
                let gcs = Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url.as_str())
                        .build()
                        .map_err(|e| invalid(e.to_string()))?,
                );
                (gcs.clone(), Some(gcs), bucket_prefix(&parsed))
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let az = Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url.as_str())
                        .build()
                        .map_err(|e| invalid(e.to_string()))?,
                );
                (az.clone(), Some(az), bucket_prefix(&parsed))
            }
            other => return Err(invalid(format!("unsupported scheme {other:?}"))),
        };
        Ok(Store {
            inner,
            signer,
            root,
            url,
        })
    }

    /// Opens the store holding the object a URI names, and that object's relative path.
    pub fn open_object(uri: &str) -> Result<(Store, String)> {
        let trimmed = uri.trim_end_matches('/');
        match trimmed.rsplit_once('/') {
            Some((dir, name)) if !name.is_empty() && dir.contains("://") && !dir.ends_with(':') => {
                let dir = if dir.ends_with(":/") {
                    format!("{dir}/")
                } else {
                    dir.to_string()
                };
                Ok((Store::open(&dir)?, name.to_string()))
            }
            _ => Err(StorageError::InvalidUrl {
                url: uri.into(),
                reason: "names no object".into(),
            }),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The full URI of a path under this store.
    pub fn uri_of(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel.trim_start_matches('/'))
    }

    fn path(&self, rel: &str) -> Path {
        let rel = rel.trim_matches('/');
        if self.root.is_empty() {
            Path::from(rel)
        } else if rel.is_empty() {
            Path::from(self.root.as_str())
        } else {
            Path::from(format!("{}/{}", self.root, rel))
        }
    }

    fn backend(&self, rel: &str) -> impl FnOnce(object_store::Error) -> StorageError + '_ {
        let uri = self.uri_of(rel);
        move |e| match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound(uri),
            e => StorageError::Backend { uri, source: e },
        }
    }

    pub async fn put(&self, rel: &str, data: Bytes) -> Result<()> {
        let path = self.path(rel);
        if data.len() <= MULTIPART_THRESHOLD {
            self.inner
                .put(&path, PutPayload::from(data))
                .await
                .map_err(self.backend(rel))?;
        } else {
            let upload = self
                .inner
                .put_multipart(&path)
                .await
                .map_err(self.backend(rel))?;
            let mut writer = WriteMultipart::new(upload);
            writer.write(&data);
            writer.finish().await.map_err(self.backend(rel))?;
        }
        Ok(())
    }

    /// Starts writing an object in parts, for content too large to hold in memory: nothing is
    /// visible at `rel` until [`Upload::commit`], and [`Upload::abort`] (or dropping the upload)
    /// leaves nothing behind.
    pub async fn upload(&self, rel: &str) -> Result<Upload> {
        let multipart = self
            .inner
            .put_multipart(&self.path(rel))
            .await
            .map_err(self.backend(rel))?;
        Ok(Upload {
            writer: Some(WriteMultipart::new(multipart)),
            uri: self.uri_of(rel),
        })
    }

    pub async fn get(&self, rel: &str) -> Result<Bytes> {
        let got = self
            .inner
            .get(&self.path(rel))
            .await
            .map_err(self.backend(rel))?;
        got.bytes().await.map_err(self.backend(rel))
    }

    /// The object's bytes as a stream, for serving large files without buffering them.
    pub async fn get_stream(
        &self,
        rel: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes>>> {
        let uri = self.uri_of(rel);
        let got = self
            .inner
            .get(&self.path(rel))
            .await
            .map_err(self.backend(rel))?;
        Ok(Box::pin(got.into_stream().map_err(move |e| {
            StorageError::Backend {
                uri: uri.clone(),
                source: e,
            }
        })))
    }

    /// A presigned GET URL valid for `expires`, where the backend can sign (S3, GCS, Azure).
    pub async fn presigned_get(
        &self,
        rel: &str,
        expires: std::time::Duration,
    ) -> Result<Option<url::Url>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(http::Method::GET, &self.path(rel), expires)
            .await
            .map_err(self.backend(rel))?;
        Ok(Some(url))
    }

    /// A byte range of an object (e.g. a safetensors header).
    pub async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.inner
            .get_range(&self.path(rel), range)
            .await
            .map_err(self.backend(rel))
    }

    /// Size of an object, or `None` if there is none.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self.inner.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend(rel)(e)),
        }
    }

    /// sha256 (hex) and size of a stored object, streamed.
    pub async fn digest(&self, rel: &str) -> Result<(String, u64)> {
        let got = self
            .inner
            .get(&self.path(rel))
            .await
            .map_err(self.backend(rel))?;
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(self.backend(rel))? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((hex::encode(hasher.finalize()), size))
    }

    /// Every object under a prefix, with paths relative to the store root.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let base = self.path(prefix);
        let strip = if self.root.is_empty() {
            0
        } else {
            self.root.len() + 1
        };
        let metas: Vec<_> = self
            .inner
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(self.backend(prefix))?;
        let mut out: Vec<Listed> = metas
            .into_iter()
            .map(|m| Listed {
                path: m.location.as_ref()[strip..].to_string(),
                size: m.size,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Deletes one object; a missing one is fine.
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.inner.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend(rel)(e)),
        }
    }

    /// Deletes every object under a prefix; returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let listed = self.list(prefix).await?;
        for l in &listed {
            self.delete(&l.path).await?;
        }
        Ok(listed.len())
    }

    /// Copies an object into a local file, returning its sha256 and size.
    pub async fn download(&self, rel: &str, dest: &std::path::Path) -> Result<(String, u64)> {
        use std::io::Write;
        let got = self
            .inner
            .get(&self.path(rel))
            .await
            .map_err(self.backend(rel))?;
        let mut stream = got.into_stream();
        let io = |e| StorageError::Io {
            path: dest.display().to_string(),
            source: e,
        };
        let tmp = dest.with_extension("partial");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(self.backend(rel))? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, dest).map_err(io)?;
        Ok((hex::encode(hasher.finalize()), size))
    }
}

/// Parts of one upload in flight at once; the writer waits beyond that (back pressure on the
/// producer, so memory holds a few parts, not the object).
const UPLOAD_CONCURRENCY: usize = 4;

/// An object being written in parts ([`Store::upload`]).
pub struct Upload {
    /// `None` once committed or aborted.
    writer: Option<WriteMultipart>,
    uri: String,
}

impl Upload {
    /// The URI the object will have once committed.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Appends bytes; waits while too many parts are in flight.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let writer = self
            .writer
            .as_mut()
            .expect("an upload is written before it ends");
        writer
            .wait_for_capacity(UPLOAD_CONCURRENCY)
            .await
            .map_err(|e| backend_error(&self.uri, e))?;
        writer.write(data);
        Ok(())
    }

    /// Makes the object visible, whole.
    pub async fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("an upload ends once");
        writer
            .finish()
            .await
            .map(drop)
            .map_err(|e| backend_error(&self.uri, e))
    }

    /// Discards what was written.
    pub async fn abort(mut self) -> Result<()> {
        let writer = self.writer.take().expect("an upload ends once");
        writer
            .abort()
            .await
            .map_err(|e| backend_error(&self.uri, e))
    }
}

impl Drop for Upload {
    /// An upload dropped midway (its request gone) is aborted in the background, so no staged
    /// parts stay behind.
    fn drop(&mut self) {
        if let (Some(writer), Ok(runtime)) =
            (self.writer.take(), tokio::runtime::Handle::try_current())
        {
            let uri = std::mem::take(&mut self.uri);
            runtime.spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::warn!(%uri, error = %e, "aborting an abandoned upload failed");
                }
            });
        }
    }
}

fn backend_error(uri: &str, e: object_store::Error) -> StorageError {
    StorageError::Backend {
        uri: uri.to_string(),
        source: e,
    }
}

fn bucket_prefix(url: &url::Url) -> String {
    url.path().trim_matches('/').to_string()
}

impl Store {
    /// Digest of every object under `prefix` (dot-entries skipped: tool caches differ
    /// between copies of one model), as `manifest::tree_digest_input` lines hashed;
    /// also the total size. The trainer computes the same over a local directory.
    pub async fn tree_digest(&self, prefix: &str) -> Result<(String, u64, usize)> {
        let mut lines = Vec::new();
        let mut total = 0;
        for object in self.list(prefix).await? {
            let rel = object
                .path
                .strip_prefix(prefix)
                .unwrap_or(&object.path)
                .trim_start_matches('/')
                .to_string();
            if rel.split('/').any(|part| part.starts_with('.')) {
                continue;
            }
            let (sha, size) = self.digest(&object.path).await?;
            total += size;
            lines.push((rel, sha));
        }
        lines.sort();
        let text: String = lines
            .iter()
            .map(|(name, sha)| format!("{sha}  {name}\n"))
            .collect();
        Ok((sha256_hex(text.as_bytes()), total, lines.len()))
    }
}

/// sha256 (hex) of bytes in memory.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_roundtrip_list_digest_delete() {
        let dir = std::env::temp_dir().join(format!("lf-store-{}", std::process::id()));
        assert!(matches!(
            Store::open(&format!("file://{}", dir.display())),
            Err(StorageError::NotFound(_))
        ));
        let store = Store::create(&format!("file://{}", dir.display())).unwrap();
        store
            .put("a/v1/x.bin", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        store
            .put("a/v1/y.bin", Bytes::from_static(b"world!"))
            .await
            .unwrap();
        assert_eq!(
            store.get("a/v1/x.bin").await.unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(store.size("a/v1/y.bin").await.unwrap(), Some(6));
        assert_eq!(store.size("a/v1/none").await.unwrap(), None);
        let (sha, size) = store.digest("a/v1/x.bin").await.unwrap();
        assert_eq!((sha.as_str(), size), (sha256_hex(b"hello").as_str(), 5));
        let listed = store.list("a").await.unwrap();
        assert_eq!(
            listed.iter().map(|l| l.path.as_str()).collect::<Vec<_>>(),
            ["a/v1/x.bin", "a/v1/y.bin"]
        );
        assert_eq!(store.delete_prefix("a/v1").await.unwrap(), 2);
        assert!(store.list("a").await.unwrap().is_empty());
        assert!(matches!(
            store.get("a/v1/x.bin").await,
            Err(StorageError::NotFound(_))
        ));
        let (s2, name) =
            Store::open_object(&format!("file://{}/a/b.jsonl", dir.display())).unwrap();
        assert_eq!(name, "b.jsonl");
        assert!(s2.url().ends_with("/a"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn an_upload_is_visible_only_once_committed() {
        let dir = tempfile_dir("upload");
        let store = Store::create(&format!("file://{}", dir.display())).unwrap();
        let mut upload = store.upload("d/a.jsonl").await.unwrap();
        assert!(upload.uri().ends_with("/d/a.jsonl"));
        let part = vec![b'x'; 3 * 1024 * 1024];
        for _ in 0..3 {
            upload.write(&part).await.unwrap();
        }
        assert_eq!(store.size("d/a.jsonl").await.unwrap(), None);
        upload.commit().await.unwrap();
        assert_eq!(
            store.size("d/a.jsonl").await.unwrap(),
            Some(9 * 1024 * 1024)
        );

        let mut aborted = store.upload("d/b.jsonl").await.unwrap();
        aborted.write(b"partial").await.unwrap();
        aborted.abort().await.unwrap();
        let mut dropped = store.upload("d/c.jsonl").await.unwrap();
        dropped.write(b"partial").await.unwrap();
        drop(dropped);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Nothing left of either, staged parts included.
        let names: Vec<_> = std::fs::read_dir(dir.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a.jsonl"]);
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("lf-store-{name}-{}", std::process::id()))
    }
}
