//! Names that end up in storage paths and URLs, restricted to a safe alphabet.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An adapter's name: 1-63 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AdapterName(String);

impl AdapterName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok_first = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if s.is_empty() || s.len() > 63 || !ok_first || !ok_rest || s.contains("..") {
            return Err(format!(
                "invalid name {s:?}: use 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
            ));
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AdapterName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<AdapterName> for String {
    fn from(n: AdapterName) -> String {
        n.0
    }
}

impl fmt::Display for AdapterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn accepts_safe_and_rejects_unsafe_names() {
        assert!(AdapterName::parse("demo-1.v2_x").is_ok());
        for bad in ["", "Demo", "-x", "a/b", "a..b", "../x", &"a".repeat(64)] {
            assert!(AdapterName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
