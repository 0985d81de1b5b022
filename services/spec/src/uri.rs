//! Data references (base models, datasets, the artifact store) are URIs that
//! `object_store` can open: `file:///abs/path`, `s3://bucket/key`, `gs://…`, `az://…`.

pub const SCHEMES: &[&str] = &["file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss"];

/// Checks the shape of a data URI; whether it exists is checked where storage is at hand.
pub fn check_data_uri(uri: &str) -> Result<(), String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!(
            "{uri:?} is not a URI; expected e.g. file:///abs/path or s3://bucket/key"
        ));
    };
    if !SCHEMES.contains(&scheme) {
        return Err(format!(
            "unsupported scheme {scheme:?}; supported: {}",
            SCHEMES.join(", ")
        ));
    }
    if scheme == "file" && !rest.starts_with('/') {
        return Err(format!(
            "{uri:?}: file URIs need an absolute path (file:///abs/path)"
        ));
    }
    if rest.split('/').any(|seg| seg == "..") {
        return Err(format!("{uri:?}: '..' segments are not allowed"));
    }
    if rest.trim_matches('/').is_empty() {
        return Err(format!("{uri:?} names no object"));
    }
    // One rule for every reader: `train.jsonl/` is not `train.jsonl` to a worker.
    if rest.ends_with('/') {
        return Err(format!(
            "{uri:?} ends with '/': name the file or directory without a trailing slash"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn data_uris() {
        assert!(check_data_uri("file:///data/train.jsonl").is_ok());
        assert!(check_data_uri("s3://bucket/a/b.jsonl").is_ok());
        assert!(check_data_uri("file://relative/x").is_err());
        assert!(check_data_uri("http://x/y").is_err());
        assert!(check_data_uri("/plain/path").is_err());
        assert!(check_data_uri("file:///a/../etc/passwd").is_err());
    }
}
