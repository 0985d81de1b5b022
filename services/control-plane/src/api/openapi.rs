//! The OpenAPI document of the whole API, generated from the handlers' annotations
//! and the types they take and return. Served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "loraforge", description = "Train LoRA-family adapters and keep them as versioned, traceable artifacts."),
    paths(
        super::jobs::submit, super::jobs::get, super::jobs::events, super::jobs::stream_events, super::jobs::cancel,
        super::adapters::list, super::adapters::versions, super::adapters::version, super::adapters::delete_version,
        super::adapters::lineage, super::adapters::descendants, super::adapters::put_alias, super::adapters::delete_alias,
        super::adapters::put_tag, super::adapters::delete_tag, super::adapters::resolve, super::adapters::download,
        super::adapters::presign,
        super::inputs::register_base_model, super::inputs::list_base_models, super::inputs::get_base_model,
        super::inputs::register_dataset, super::inputs::list_datasets, super::inputs::get_dataset,
        super::safety::get, super::safety::put,
        super::webhooks::create, super::webhooks::list, super::webhooks::delete, super::webhooks::deliveries,
        super::worker::assignment, super::worker::stage, super::worker::events, super::worker::heartbeat,
        super::worker::reserve_version, super::worker::complete, super::worker::fail,
    ),
    modifiers(&SecuritySchemes),
    security(("api_key" = [])),
    tags(
        (name = "jobs", description = "Submit training jobs and follow them"),
        (name = "registry", description = "Adapters, versions, aliases, lineage, downloads"),
        (name = "inputs", description = "Registered base models and datasets"),
        (name = "webhooks", description = "Subscriptions and their delivery log"),
        (name = "safety", description = "The project's safety gate policy"),
        (name = "worker", description = "The protocol between the control plane and its workers"),
    )
)]
pub struct ApiDoc;

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

pub async fn document() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
