//! The route table and the OpenAPI document, from one list: each route is registered once
//! with `routes!`, which takes its path and method from the handler's `#[utoipa::path]`,
//! so what is served and what is documented cannot drift. Served at `/openapi.json`.

use crate::routes::openai::{files as oa_files, jobs as oa_jobs};
use crate::routes::{adapters, identity, inputs, jobs, keys, probes, safety, webhooks, worker};
use crate::ApiState;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use loraforge_spec::{AdapterName, MethodConfig};
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "loraforge", description = "Train LoRA-family adapters and keep them as versioned, traceable artifacts."),
    // The problem document is referenced by every route's problem answers, OpenAI's error
    // body by the OpenAI-compatible routes' answers.
    components(schemas(crate::problem::Problem, crate::routes::openai::ErrorBody)),
    modifiers(&SecuritySchemes),
    security(("api_key" = [])),
    tags(
        (name = "auth", description = "Who the caller is, and the project's API keys"),
        (name = "jobs", description = "Submit training jobs and follow them"),
        (name = "registry", description = "Adapters, versions, aliases, lineage, downloads"),
        (name = "inputs", description = "Registered base models and datasets"),
        (name = "webhooks", description = "Subscriptions and their delivery log"),
        (name = "safety", description = "The project's safety gate policy"),
        (name = "worker", description = "The protocol between the control plane and its workers"),
        (name = "openai", description = "OpenAI-compatible fine-tuning: files and fine_tuning.jobs, in OpenAI's shapes and error body (docs/openai-api.md)"),
    )
)]
struct ApiDoc;

/// Every route, documented ones through `routes!`; the probes, `/metrics` and
/// `/openapi.json` itself are not part of the API document.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(identity::me))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke))
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::stream_events))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::logs))
        .routes(routes!(adapters::list))
        .routes(routes!(adapters::versions))
        .routes(routes!(adapters::version, adapters::delete_version))
        .routes(routes!(adapters::lineage))
        .routes(routes!(adapters::descendants))
        .routes(routes!(adapters::download))
        .routes(routes!(adapters::presign))
        .routes(routes!(adapters::put_tag, adapters::delete_tag))
        .routes(routes!(adapters::put_alias, adapters::delete_alias))
        .routes(routes!(adapters::resolve))
        .routes(routes!(
            inputs::register_base_model,
            inputs::list_base_models
        ))
        .routes(routes!(inputs::get_base_model))
        .routes(routes!(inputs::register_dataset, inputs::list_datasets))
        .routes(routes!(inputs::get_dataset))
        .routes(routes!(inputs::upload_dataset))
        .routes(routes!(safety::get, safety::put))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::delete))
        .routes(routes!(webhooks::deliveries))
        .merge(
            // A file upload is bounded by LORAFORGE_MAX_UPLOAD_BYTES as it streams, not by the
            // request body limit of every other route.
            OpenApiRouter::new()
                .routes(routes!(oa_files::create, oa_files::list))
                .layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(oa_files::retrieve))
        .routes(routes!(oa_files::content))
        .routes(routes!(oa_jobs::create, oa_jobs::list))
        .routes(routes!(oa_jobs::retrieve))
        .routes(routes!(oa_jobs::cancel))
        .routes(routes!(oa_jobs::events))
        .routes(routes!(oa_jobs::checkpoints))
        .routes(routes!(worker::assignment))
        .routes(routes!(worker::stage))
        .routes(routes!(worker::events))
        .routes(routes!(worker::heartbeat))
        .routes(routes!(worker::reserve_version))
        .routes(routes!(worker::complete))
        .routes(routes!(worker::fail))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/openapi.json", get(document))
}

/// The API document, as served (built once): each route's own entry, completed by
/// [`complete`] with what every route shares.
pub fn openapi() -> &'static Value {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc =
            serde_json::to_value(routes().into_openapi()).expect("the document serializes");
        complete(&mut doc);
        declare_method_defaults(&mut doc);
        doc
    })
}

/// Gives each method's parameters the `default` a job gets by leaving them out
/// ([`MethodConfig::defaults`], read from serde), so the clients that build their knobs from
/// this document (the web form, `loraforge methods get`) show them; the derive knows only the
/// types. The method union's variants name their parameter schema and their `type` tag.
fn declare_method_defaults(doc: &mut Value) {
    let variants = doc["components"]["schemas"]["MethodConfig"]["oneOf"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for variant in variants {
        let parts = &variant["allOf"];
        let schema = parts[0]["$ref"].as_str().unwrap_or_default();
        let schema = schema.trim_start_matches("#/components/schemas/");
        let tag = parts[1]["properties"]["type"]["enum"][0]
            .as_str()
            .unwrap_or_default();
        let defaults = MethodConfig::defaults(tag)
            .unwrap_or_else(|| panic!("the document's method {tag:?} is in the registry"));
        let properties = &mut doc["components"]["schemas"][schema]["properties"];
        for (name, default) in defaults {
            if let Some(property) = properties.get_mut(&name) {
                property["default"] = default;
            }
        }
    }
}

/// Adds to each operation what it shares with the others, so that the document says what
/// the server does without every handler repeating it:
/// - the problems any route can answer: 400 (a NUL in the path or query, which Postgres
///   cannot hold; a body that is not JSON), 422 where it takes a query, 401 (no or a bad key; a worker route's bad token), 403
///   where the route needs more than the `read` scope (its `security` names the scope), 413
///   where it takes a body, 503 (the database is unreachable);
/// - the rule of names on the path parameters that are names (`name`, `alias`, `tag`), and
///   that versions count from 1. A request that breaks them finds nothing (404) or is refused
///   (422); the schema says so, so clients and fuzzers know before they ask.
fn complete(doc: &mut Value) {
    let name = serde_json::to_value(<AdapterName as utoipa::PartialSchema>::schema())
        .expect("the name schema serializes");
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let privileged = needs_scope(op);
            let takes_body = op.get("requestBody").is_some();
            // The OpenAI-compatible routes answer with OpenAI's error body (routes::openai).
            let openai = op["tags"]
                .as_array()
                .is_some_and(|tags| tags.iter().any(|t| t == "openai"));
            let has_query = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            let responses = op["responses"]
                .as_object_mut()
                .expect("every operation answers");
            let mut add = |status: &str, why: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| error_response(why, openai));
            };
            add(
                "400",
                "problem: malformed (a NUL in the path or query, a body that is not JSON)",
            );
            add("401", "problem: no credentials, or credentials that are not valid (revoked, expired, another attempt's)");
            if privileged {
                add(
                    "403",
                    "problem: the key's scope is below the one this route needs",
                );
            }
            if takes_body {
                add(
                    "413",
                    "problem: the request body is larger than the server accepts",
                );
            }
            if has_query {
                add(
                    "422",
                    "problem: a query parameter that does not parse or is out of range",
                );
            }
            add(
                "503",
                "problem: the database is unreachable; try again shortly",
            );
            let params = op.get_mut("parameters").and_then(Value::as_array_mut);
            for param in params.into_iter().flatten() {
                let named = match (param["in"].as_str(), param["name"].as_str()) {
                    (Some("path"), Some("name" | "tag")) => Some(name.clone()),
                    // `latest` and numbers are the references aliases stand beside.
                    (Some("path"), Some("alias")) => Some(json!({"allOf": [name],
                        "not": {"anyOf": [{"const": "latest"}, {"pattern": "^[0-9]+$"}]}})),
                    (Some("path"), Some("version")) => {
                        Some(json!({"type": "integer", "format": "int32", "minimum": 1}))
                    }
                    _ => None,
                };
                match named {
                    Some(schema) => param["schema"] = schema,
                    None => without_nul(&mut param["schema"]),
                }
            }
        }
    }
}

/// A free-text parameter (a string with no pattern, format or enum of its own) holds no NUL:
/// the server refuses `%00` anywhere in the query (400), since Postgres text cannot hold it.
fn without_nul(schema: &mut Value) {
    let free_text = schema["type"] == "string"
        && ["pattern", "format", "enum"]
            .iter()
            .all(|k| schema.get(k).is_none());
    if free_text {
        schema["pattern"] = json!("^[^\\u0000]*$");
    }
}

/// Whether the operation's `security` names a scope (`["submit"]`, `["admin"]`): routes
/// open to every key of the project name none.
fn needs_scope(op: &Value) -> bool {
    let scopes = op["security"].as_array().into_iter().flatten();
    scopes
        .filter_map(Value::as_object)
        .flat_map(|requirement| requirement.values())
        .any(|s| s.as_array().is_some_and(|s| !s.is_empty()))
}

fn error_response(description: &str, openai: bool) -> Value {
    let (content_type, schema) = match openai {
        true => ("application/json", "OpenAiErrorBody"),
        false => ("application/problem+json", "Problem"),
    };
    json!({
        "description": description,
        "content": {content_type: {"schema": {"$ref": format!("#/components/schemas/{schema}")}}},
    })
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("lf_… API key of a project"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "worker_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("per-attempt worker token"))
                    .build(),
            ),
        );
    }
}

async fn document() -> axum::Json<&'static Value> {
    axum::Json(openapi())
}
