//! Downloading a version's files, each checked against the size and sha256 the registry
//! recorded: a file is written beside its final name and renamed only once it matches, so a
//! tampered or truncated download never lands under the real name.

use crate::client::Client;
use crate::error::{CliError, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// A file of a version as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FileDigest {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// Hashes bytes as they pass, then checks them against the recorded digest.
#[derive(Default)]
pub struct Verifier {
    hasher: Sha256,
    size: u64,
}

impl Verifier {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    pub fn check(self, expected: &FileDigest) -> Result<()> {
        let sha = hex::encode(self.hasher.finalize());
        if self.size != expected.size {
            return Err(CliError::Integrity(format!(
                "{}: {} bytes arrived, the registry recorded {}; the download was discarded",
                expected.name, self.size, expected.size
            )));
        }
        if !sha.eq_ignore_ascii_case(&expected.sha256) {
            return Err(CliError::Integrity(format!(
                "{}: sha256 {sha} does not match the registry's {}; the download was discarded",
                expected.name, expected.sha256
            )));
        }
        Ok(())
    }
}

/// Whether the file at `path` is exactly `expected`.
pub fn verify_file(path: &Path, expected: &FileDigest) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| CliError::io(path.display(), e))?;
    let mut verifier = Verifier::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| CliError::io(path.display(), e))?;
        if n == 0 {
            break;
        }
        verifier.update(&buf[..n]);
    }
    verifier.check(expected)
}

/// A file name the registry gave, refused unless it is one plain name (never a path that
/// could write outside the target directory).
pub fn safe_name(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name);
    if ok {
        Ok(name)
    } else {
        Err(CliError::Integrity(format!(
            "the registry lists a file named {name:?}, which is not a plain file name; nothing was written for it"
        )))
    }
}

#[derive(Debug, Serialize)]
pub struct Downloaded {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// Already present with the right digest, so not downloaded again.
    pub kept: bool,
}

/// Downloads every file of `adapter`@`version` into `dir` (created if missing), verifying
/// each; a file already there with the right digest is kept.
pub async fn version_files(
    client: &Client,
    adapter: &str,
    version: i64,
    files: &[FileDigest],
    dir: &Path,
    show_progress: bool,
) -> Result<Vec<Downloaded>> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::io(dir.display(), e))?;
    for f in files {
        safe_name(&f.name)?;
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut out = Vec::new();
    let version_segment = version.to_string();
    for f in files {
        let path = dir.join(&f.name);
        if path.is_file() && verify_file(&path, f).is_ok() {
            if let Some(bar) = &bar {
                bar.inc(f.size);
            }
            out.push(Downloaded {
                name: f.name.clone(),
                path,
                sha256: f.sha256.clone(),
                size: f.size,
                kept: true,
            });
            continue;
        }
        if let Some(bar) = &bar {
            bar.set_message(f.name.clone());
        }
        let partial = dir.join(format!(".{}.partial", f.name));
        let url = client.url(
            &[
                "v1",
                "adapters",
                adapter,
                "versions",
                &version_segment,
                "files",
                &f.name,
            ],
            &[],
        );
        let result = fetch_into(client, url, &partial, f, bar.as_ref()).await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&partial);
            if let Some(bar) = &bar {
                bar.abandon();
            }
            return Err(e);
        }
        std::fs::rename(&partial, &path).map_err(|e| CliError::io(path.display(), e))?;
        out.push(Downloaded {
            name: f.name.clone(),
            path,
            sha256: f.sha256.clone(),
            size: f.size,
            kept: false,
        });
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(out)
}

async fn fetch_into(
    client: &Client,
    url: url::Url,
    partial: &Path,
    expected: &FileDigest,
    bar: Option<&ProgressBar>,
) -> Result<()> {
    let response = client.send(client.request(Method::GET, url)).await?;
    let mut file =
        std::fs::File::create(partial).map_err(|e| CliError::io(partial.display(), e))?;
    let mut verifier = Verifier::default();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.connection_error(&e))?;
        verifier.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| CliError::io(partial.display(), e))?;
        if let Some(bar) = bar {
            bar.inc(chunk.len() as u64);
        }
    }
    file.sync_all()
        .map_err(|e| CliError::io(partial.display(), e))?;
    verifier.check(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(name: &str, bytes: &[u8]) -> FileDigest {
        FileDigest {
            name: name.into(),
            sha256: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn matching_bytes_pass_in_any_chunking() {
        let bytes = b"adapter weights".repeat(1000);
        let expected = digest_of("adapter_model.safetensors", &bytes);
        let mut v = Verifier::default();
        for chunk in bytes.chunks(333) {
            v.update(chunk);
        }
        v.check(&expected).unwrap();
    }

    #[test]
    fn a_tampered_download_is_detected() {
        let bytes = b"adapter weights".repeat(100);
        let expected = digest_of("adapter_model.safetensors", &bytes);
        let mut tampered = bytes.clone();
        tampered[10] ^= 1;
        let mut v = Verifier::default();
        v.update(&tampered);
        let err = v.check(&expected).unwrap_err();
        assert!(matches!(err, CliError::Integrity(_)));
        assert!(err.to_string().contains("does not match"), "{err}");
        // A truncated one too, by its size.
        let mut v = Verifier::default();
        v.update(&bytes[..bytes.len() - 1]);
        assert!(v
            .check(&expected)
            .unwrap_err()
            .to_string()
            .contains("bytes arrived"));
    }

    #[test]
    fn files_on_disk_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, b"{}").unwrap();
        verify_file(&path, &digest_of("adapter_config.json", b"{}")).unwrap();
        std::fs::write(&path, b"{ }").unwrap();
        assert!(verify_file(&path, &digest_of("adapter_config.json", b"{}")).is_err());
    }

    #[test]
    fn only_plain_names_are_written() {
        for ok in ["adapter_model.safetensors", "manifest.json", "a..b"] {
            assert_eq!(safe_name(ok).unwrap(), ok);
        }
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "x\0"] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
    }
}
