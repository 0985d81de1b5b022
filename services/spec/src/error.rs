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

/// Parses a JSON object into `T`, reporting the path of the field that failed (`method.r`),
/// with the checks of [`parse_json_value`]. Only an object: serde would also read a struct
/// from an array of its fields in order (so `[]` would be a struct of defaults).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SpecError> {
    let value = parse_json_value(bytes)?;
    if !value.is_object() {
        return Err(SpecError::one("", "the body must be a JSON object"));
    }
    from_value(value, "")
}

/// Parses JSON into a value. NUL characters are refused up front (Postgres cannot store them in
/// text or jsonb), and so is an object that names a key twice (serde's own check covers struct
/// fields only, not maps or flattened fields). A number without a fractional part is an integer
/// (`3.0` is `3`), as JSON Schema, and so the API document, has it.
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
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| SpecError::malformed(format!("malformed JSON: {e}")))?;
    integral_numbers(&mut value);
    Ok(value)
}

/// Rewrites each number that has no fractional part (and fits an `i64` exactly) as an integer.
fn integral_numbers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                // Below 2^53 every integer is exact in an f64.
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Alias {
        version: i32,
        #[serde(default)]
        weight: f64,
    }

    #[test]
    fn integers_may_be_written_with_a_zero_fraction() {
        let alias: Alias = parse_json(br#"{"version": 3.0, "weight": 2.0}"#).unwrap();
        assert_eq!((alias.version, alias.weight), (3, 2.0));
        let half = parse_json::<Alias>(br#"{"version": 3.5}"#).unwrap_err();
        assert_eq!(half.errors[0].field, "version", "{half}");
        assert!(!half.malformed);
    }

    #[test]
    fn bodies_are_checked_before_they_are_read() {
        let twice = parse_json::<Alias>(br#"{"version": 1, "version": 2}"#).unwrap_err();
        assert_eq!(twice.errors[0].field, "version", "{twice}");
        assert!(
            parse_json::<Alias>(b"{\"version\": 1")
                .unwrap_err()
                .malformed
        );
        assert!(
            parse_json::<Alias>(b"{\"version\": 1} x")
                .unwrap_err()
                .malformed
        );
        assert!(
            parse_json::<Alias>(b"{\"version\": 1, \"w\\u0000\": 1}")
                .unwrap_err()
                .malformed
        );
        for not_an_object in ["[]", "[1]", "1", "null"] {
            let refused = parse_json::<Alias>(not_an_object.as_bytes()).unwrap_err();
            assert!(refused.to_string().contains("JSON object"), "{refused}");
        }
        let unknown = parse_json::<Alias>(br#"{"version": 1, "colour": 2}"#).unwrap_err();
        assert!(unknown.to_string().contains("colour"), "{unknown}");
    }
}
