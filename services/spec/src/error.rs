//! Validation errors that name the offending field.

use serde::{Deserialize, Serialize};

/// One problem with one field of a request, e.g. `method.r: must be at least 1`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Dotted path of the field (`method.target_modules[1]`); empty for the body as a whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// All the problems found in one submitted document.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(.errors))]
pub struct SpecError {
    pub errors: Vec<FieldError>,
    /// The document was not parseable JSON at all (as opposed to wrong fields).
    pub malformed: bool,
}

fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| {
            if e.field.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.field, e.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl SpecError {
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError::new(field, message)],
            malformed: false,
        }
    }

    fn malformed(message: String) -> Self {
        Self {
            errors: vec![FieldError::new("", message)],
            malformed: true,
        }
    }
}

impl From<FieldError> for SpecError {
    fn from(e: FieldError) -> Self {
        Self {
            errors: vec![e],
            malformed: false,
        }
    }
}

/// Deserializes an already-parsed value into `T`, reporting the failing field's path
/// under `prefix` (e.g. `method` + `r`).
pub fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    prefix: &str,
) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (prefix, inner.as_str()) {
            (p, ".") => p.to_string(),
            ("", i) => i.to_string(),
            (p, i) => format!("{p}.{i}"),
        };
        SpecError::one(field, e.into_inner().to_string())
    })
}

/// Parses JSON into `T`, reporting the path of the field that failed (`method.r`).
/// NUL characters are refused up front: Postgres cannot store them in text or jsonb.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SpecError> {
    if bytes.contains(&0) || bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Err(SpecError::malformed(
            "NUL characters (\\u0000) are not accepted".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return SpecError::malformed(format!("malformed JSON: {inner}"));
        }
        let message = {
            // serde appends " at line L column C"; the field path says where already.
            let text = inner.to_string();
            match text.rfind(" at line ") {
                Some(i) => text[..i].to_string(),
                None => text,
            }
        };
        SpecError::one(field, message)
    })?;
    de.end()
        .map_err(|e| SpecError::malformed(format!("malformed JSON: {e}")))?;
    Ok(value)
}
