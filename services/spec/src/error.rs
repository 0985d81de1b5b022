//! Validation errors that name the offending field.

use serde::{Deserialize, Serialize};

/// One problem with one field of a request, e.g. `method.r: must be at least 1`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Dotted path of the field (`method.target_modules[1]`); empty for the body as a whole.
    pub field: String,
    pub message: String,
    /// The line of an uploaded file the problem is on (1-based), for problems with a file's
    /// content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            line: None,
        }
    }

    pub fn at_line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
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

    /// A document that is not even well-formed (no field to blame).
    pub fn malformed(message: impl Into<String>) -> Self {
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
    refuse_nul(bytes)?;
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

/// [`parse_json`] into a JSON value, refusing an object that names a key twice (serde's
/// own `Value` keeps the last one silently, so `"adapter_name": "BAD NAME",
/// "adapter_name": "ok"` would pass validation on the second). The error names the key.
pub fn parse_json_value(bytes: &[u8]) -> Result<serde_json::Value, SpecError> {
    refuse_nul(bytes)?;
    let duplicate = std::cell::RefCell::new(None);
    let checked: Result<UniqueKeysChecked, SpecError> = {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let seed = UniqueKeys {
            path: String::new(),
            duplicate: &duplicate,
        };
        serde::de::DeserializeSeed::deserialize(seed, &mut de)
            .map(|_| UniqueKeysChecked)
            .map_err(|e| SpecError::malformed(format!("malformed JSON: {e}")))
    };
    if let Some(field) = duplicate.into_inner() {
        return Err(SpecError::one(
            field,
            "is given twice; each key may appear once",
        ));
    }
    checked?;
    parse_json(bytes)
}

struct UniqueKeysChecked;

/// Walks a JSON document, recording the path of the first key an object repeats.
struct UniqueKeys<'a> {
    path: String,
    duplicate: &'a std::cell::RefCell<Option<String>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(UniqueKeys {
                path: format!("{}[{i}]", self.path),
                duplicate: self.duplicate,
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !seen.insert(key) {
                *self.duplicate.borrow_mut() = Some(path);
                return Err(serde::de::Error::custom("a key is given twice"));
            }
            map.next_value_seed(UniqueKeys {
                path,
                duplicate: self.duplicate,
            })?;
        }
        Ok(())
    }
}

fn refuse_nul(bytes: &[u8]) -> Result<(), SpecError> {
    if bytes.contains(&0) || bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Err(SpecError::malformed(
            "NUL characters (\\u0000) are not accepted",
        ));
    }
    Ok(())
}
