//! Names that end up in storage paths and URLs, restricted to a safe alphabet.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The rule of [`AdapterName::parse`] as a regular expression (no lookaround, so every JSON
/// Schema tool can generate from it), for the API document: a letter or digit, then
/// `a-z 0-9 . _ -` with no two dots in a row. The length (1 to [`NAME_MAX_LEN`]) is separate.
pub const NAME_PATTERN: &str = r"^[a-z0-9](\.?[a-z0-9_-])*\.?$";
pub const NAME_MAX_LEN: usize = 63;

/// An adapter's name: 1-63 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
/// The same rule names aliases, tags, projects, datasets and base models.
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
        if s.is_empty() || s.len() > NAME_MAX_LEN || !ok_first || !ok_rest || s.contains("..") {
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

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for AdapterName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A name: 1-63 characters of `a-z 0-9 . _ -`, starting with a letter or digit, \
                 no two dots in a row.",
            ))
            .pattern(Some(NAME_PATTERN))
            .min_length(Some(1))
            .max_length(Some(NAME_MAX_LEN))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for AdapterName {}

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

    /// The document's pattern says what `parse` does, on names built from every character
    /// class at every position.
    #[test]
    fn the_pattern_agrees_with_parse() {
        let pattern = regex::Regex::new(NAME_PATTERN).unwrap();
        let alphabet = ["a", "z", "0", "9", ".", "_", "-", "A", "/", " ", "é"];
        let mut names = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = names
                .iter()
                .flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}")))
                .collect();
            names.extend(longer);
        }
        for name in &names {
            let by_pattern = pattern.is_match(name) && name.len() <= NAME_MAX_LEN;
            assert_eq!(by_pattern, AdapterName::parse(name).is_ok(), "{name:?}");
        }
        #[cfg(feature = "openapi")]
        {
            let schema =
                serde_json::to_value(<AdapterName as utoipa::PartialSchema>::schema()).unwrap();
            assert_eq!(schema["pattern"], NAME_PATTERN, "{schema}");
        }
    }
}
