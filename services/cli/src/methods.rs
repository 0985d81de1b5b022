//! `loraforge methods …`: the adapter methods the server offers and their knobs, read from its
//! OpenAPI document (`GET /openapi.json`), not from this client's build, so a method or knob
//! the server gained since is listed too. The document's `MethodConfig` is the union of the
//! methods: each variant is its parameter schema plus its `type` tag.

use crate::client::Client;
use crate::error::{exit, CliError, Result};
use crate::output::{self, Output};
use crate::Common;
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{json, Map, Value};

#[derive(Debug, Args)]
pub struct MethodsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: MethodsCommand,
}

#[derive(Debug, Subcommand)]
pub enum MethodsCommand {
    /// Every adapter method the server offers (a job's `method.type`), with a line on each.
    List,
    /// One method's knobs: name, type, default, allowed values, description.
    Get {
        /// The method's `type` (`loraforge methods list` names them).
        name: String,
    },
}

/// A method as the server's document describes it.
#[derive(Debug, Clone, Serialize)]
pub struct Method {
    /// The `type` a job's `method` names it by.
    #[serde(rename = "type")]
    pub tag: String,
    pub description: String,
    pub knobs: Vec<Knob>,
}

/// One field of a method's `method` object (other than `type`).
#[derive(Debug, Clone, Serialize)]
pub struct Knob {
    pub name: String,
    /// `integer`, `number`, `boolean`, `string`, `enum`, `list of string`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// A job must give it (it has no default).
    pub required: bool,
    /// `null` is accepted (the knob is optional without a fixed default).
    pub nullable: bool,
    /// What it is when a job leaves it out, where the document says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum: Option<Value>,
    /// The values an `enum` knob accepts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    pub description: String,
}

pub async fn run(args: MethodsArgs) -> Result<u8> {
    let client = args.common.client()?;
    let methods = fetch(&client).await?;
    let out = args.common.output;
    match args.command {
        MethodsCommand::List => match out {
            Output::Json => output::print_json(&json!(methods
                .iter()
                .map(|m| json!({"type": m.tag, "description": m.description}))
                .collect::<Vec<_>>())),
            Output::Table => {
                let rows: Vec<Vec<String>> = methods
                    .iter()
                    .map(|m| vec![m.tag.clone(), m.description.clone()])
                    .collect();
                output::print_text(&output::table(&["METHOD", "DESCRIPTION"], &rows));
            }
        },
        MethodsCommand::Get { name } => {
            let method = find(&methods, &name)?;
            match out {
                Output::Json => output::print_json(&json!(method)),
                Output::Table => output::print_text(&describe_method(method)),
            }
        }
    }
    Ok(exit::OK)
}

/// The methods of the server's API document.
pub async fn fetch(client: &Client) -> Result<Vec<Method>> {
    let doc = client.get(&["openapi.json"], &[]).await?;
    methods_of(&doc).ok_or_else(|| CliError::Connection {
        message: format!(
            "the API document of {} has no method schemas (components.schemas.MethodConfig)",
            client.config().url
        ),
        hint: Some("is the client newer than the server? `loraforge --version`".into()),
    })
}

/// The method named `tag`, or an error that lists the ones there are.
pub fn find<'a>(methods: &'a [Method], tag: &str) -> Result<&'a Method> {
    methods.iter().find(|m| m.tag == tag).ok_or_else(|| {
        let known: Vec<&str> = methods.iter().map(|m| m.tag.as_str()).collect();
        CliError::usage(format!(
            "the server has no method {tag:?}; it has {}",
            known.join(", ")
        ))
    })
}

/// Reads the method union out of an OpenAPI document; `None` where it has none.
pub fn methods_of(doc: &Value) -> Option<Vec<Method>> {
    let schemas = doc["components"]["schemas"].as_object()?;
    let variants = schemas.get("MethodConfig")?["oneOf"].as_array()?;
    let methods = variants
        .iter()
        .filter_map(|variant| {
            let parts = variant["allOf"].as_array()?;
            // One part is the `type` tag, the other the parameters (a reference, or inline).
            let tag = parts
                .iter()
                .find_map(|p| p["properties"]["type"]["enum"][0].as_str())?;
            let params = parts
                .iter()
                .find(|p| p["properties"]["type"]["enum"].is_null())
                .map(|p| resolve(p, schemas))
                .unwrap_or(&Value::Null);
            Some(Method {
                tag: tag.to_string(),
                description: one_line(&output::text(&variant["description"])),
                knobs: knobs_of(params, schemas),
            })
        })
        .collect();
    Some(methods)
}

/// The schema a `$ref` points at (itself where it is none).
fn resolve<'a>(schema: &'a Value, schemas: &'a Map<String, Value>) -> &'a Value {
    schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .and_then(|name| schemas.get(name))
        .unwrap_or(schema)
}

/// A parameter schema's fields, required ones first, then by name.
fn knobs_of(params: &Value, schemas: &Map<String, Value>) -> Vec<Knob> {
    let required: Vec<&str> = params["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut knobs: Vec<Knob> = params["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, property)| knob(name, property, required.contains(&name.as_str()), schemas))
        .collect();
    knobs.sort_by(|a, b| b.required.cmp(&a.required).then(a.name.cmp(&b.name)));
    knobs
}

fn knob(name: &str, property: &Value, required: bool, schemas: &Map<String, Value>) -> Knob {
    // `Option<Enum>` comes as `oneOf: [null, $ref]`; a plain one as the `$ref` alone.
    let variants: Vec<&Value> = match property["oneOf"].as_array() {
        Some(vs) => vs.iter().collect(),
        None => vec![property],
    };
    let nullable = variants.iter().any(|v| is_null_type(v));
    let shape = variants
        .iter()
        .find(|v| v["type"] != "null")
        .map(|v| resolve(v, schemas))
        .unwrap_or(property);
    let options: Vec<String> = shape["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .map(output::text)
        .collect();
    let kind = match (options.is_empty(), type_of(shape)) {
        (false, _) => "enum".to_string(),
        (true, Some("array")) => match type_of(resolve(&shape["items"], schemas)) {
            Some(item) => format!("list of {item}"),
            None => "list".to_string(),
        },
        (true, Some(t)) => t.to_string(),
        (true, None) => "object".to_string(),
    };
    let description = [&property["description"], &shape["description"]]
        .into_iter()
        .find_map(Value::as_str)
        .unwrap_or_default();
    Knob {
        name: name.to_string(),
        kind,
        required,
        nullable,
        default: property.get("default").cloned(),
        minimum: shape.get("minimum").cloned(),
        maximum: shape.get("maximum").cloned(),
        options,
        description: one_line(description),
    }
}

/// The non-null `type` of a schema (`"integer"`, or `["integer", "null"]`).
fn type_of(schema: &Value) -> Option<&str> {
    match &schema["type"] {
        Value::String(t) => Some(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    }
}

fn is_null_type(schema: &Value) -> bool {
    match &schema["type"] {
        Value::String(t) => t == "null",
        Value::Array(ts) => ts.iter().any(|t| t == "null"),
        _ => false,
    }
}

/// A doc comment's lines as one line (their breaks only wrap the source).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A knob's value as a person reads it: strings bare, lists comma-separated.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(value_text).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// The allowed values of a knob, as far as the document states them.
fn allowed(knob: &Knob) -> String {
    if !knob.options.is_empty() {
        return knob.options.join(" | ");
    }
    match (&knob.minimum, &knob.maximum) {
        (Some(min), Some(max)) => format!("{min}..{max}"),
        (Some(min), None) => format!(">= {min}"),
        (None, Some(max)) => format!("<= {max}"),
        (None, None) => String::new(),
    }
}

/// A method as `methods get` prints it: its description, then a table of its knobs.
pub fn describe_method(method: &Method) -> String {
    let rows: Vec<Vec<String>> = method
        .knobs
        .iter()
        .map(|k| {
            let default = match (&k.default, k.required) {
                (_, true) => "(required)".to_string(),
                (Some(d), false) => value_text(d),
                (None, false) => String::new(),
            };
            let kind = match k.nullable {
                true => format!("{} or null", k.kind),
                false => k.kind.clone(),
            };
            vec![
                k.name.clone(),
                kind,
                default,
                allowed(k),
                k.description.clone(),
            ]
        })
        .collect();
    format!(
        "{}: {}\n\n{}",
        method.tag,
        method.description,
        output::table(
            &["KNOB", "TYPE", "DEFAULT", "ALLOWED", "DESCRIPTION"],
            &rows
        )
    )
}

/// What to say of `knob`, a field of `method` (a job's `method` object) that its method does not
/// have: the knobs it has. `None` where the document does not know the method.
pub fn unknown_knob(methods: &[Method], method: &Value, knob: &str) -> Option<String> {
    let tag = method["type"].as_str()?;
    let known = methods.iter().find(|m| m.tag == tag)?;
    let names: Vec<&str> = known.knobs.iter().map(|k| k.name.as_str()).collect();
    Some(format!(
        "{tag} has no knob {knob:?}; its knobs are {}",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes utoipa writes: a union of `allOf: [$ref, {type tag}]`, plain and optional
    /// fields, an enum by reference, defaults where the server declares them.
    fn doc() -> Value {
        json!({"components": {"schemas": {
            "MethodConfig": {"oneOf": [
                {"description": "Plain LoRA\n(Hu et al.).", "allOf": [
                    {"$ref": "#/components/schemas/LoraConfig"},
                    {"type": "object", "required": ["type"],
                     "properties": {"type": {"type": "string", "enum": ["lora"]}}}]},
                {"description": "MiSS.", "allOf": [
                    {"$ref": "#/components/schemas/MissConfig"},
                    {"type": "object", "required": ["type"],
                     "properties": {"type": {"type": "string", "enum": ["miss"]}}}]}
            ]},
            "LoraConfig": {"type": "object", "required": ["r"], "properties": {
                "r": {"type": "integer", "format": "int32", "minimum": 0},
                "alpha": {"type": "number", "default": 16.0},
                "target_modules": {"type": "array", "items": {"type": "string"},
                                   "default": ["q_proj", "v_proj"]}}},
            "MissConfig": {"type": "object", "properties": {
                "init": {"$ref": "#/components/schemas/MissInit", "default": "balance"},
                "seed": {"type": ["integer", "null"], "description": "The\nseed.", "default": null},
                "mode": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/MissInit"}]}}},
            "MissInit": {"type": "string", "enum": ["balance", "bat", "mini"],
                         "description": "The variant."}
        }}})
    }

    #[test]
    fn methods_and_their_knobs_come_from_the_document() {
        let methods = methods_of(&doc()).unwrap();
        let tags: Vec<&str> = methods.iter().map(|m| m.tag.as_str()).collect();
        assert_eq!(tags, ["lora", "miss"]);
        let lora = &methods[0];
        let names: Vec<&str> = lora.knobs.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["r", "alpha", "target_modules"], "required first");
        assert!(lora.knobs[0].required && lora.knobs[0].default.is_none());
        assert_eq!(lora.knobs[0].minimum, Some(json!(0)));
        assert_eq!(lora.knobs[1].default, Some(json!(16.0)));
        assert_eq!(lora.knobs[2].kind, "list of string");
        let miss = &methods[1];
        let init = miss.knobs.iter().find(|k| k.name == "init").unwrap();
        assert_eq!(init.kind, "enum");
        assert_eq!(init.options, ["balance", "bat", "mini"]);
        assert_eq!(init.default, Some(json!("balance")));
        assert_eq!(init.description, "The variant.");
        let seed = miss.knobs.iter().find(|k| k.name == "seed").unwrap();
        assert!(seed.nullable && seed.kind == "integer", "{seed:?}");
        assert_eq!(seed.description, "The seed.");
        let mode = miss.knobs.iter().find(|k| k.name == "mode").unwrap();
        assert!(mode.nullable && mode.kind == "enum", "{mode:?}");
        assert!(methods_of(&json!({"components": {"schemas": {}}})).is_none());
    }

    #[test]
    fn a_method_prints_as_a_table_of_knobs() {
        let methods = methods_of(&doc()).unwrap();
        let text = describe_method(&methods[0]);
        assert!(
            text.starts_with("lora: Plain LoRA (Hu et al.).\n\nKNOB "),
            "{text}"
        );
        let row = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} ")));
            line.unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(row("r"), "r integer (required) >= 0");
        assert_eq!(row("alpha"), "alpha number 16.0");
        assert_eq!(
            row("target_modules"),
            "target_modules list of string [q_proj, v_proj]"
        );
        let miss = describe_method(&methods[1]);
        assert!(miss.contains("balance | bat | mini"), "{miss}");
    }

    #[test]
    fn unknown_knobs_are_named_with_the_known_ones() {
        let methods = methods_of(&doc()).unwrap();
        let method = json!({"type": "lora", "r": 8, "alhpa": 16});
        assert_eq!(
            unknown_knob(&methods, &method, "alhpa").as_deref(),
            Some(r#"lora has no knob "alhpa"; its knobs are r, alpha, target_modules"#)
        );
        // A method the server does not list is its answer's to refuse.
        assert_eq!(
            unknown_knob(&methods, &json!({"type": "bogus", "x": 1}), "x"),
            None
        );
        assert!(find(&methods, "bogus")
            .unwrap_err()
            .to_string()
            .contains("it has lora, miss"));
    }
}
