//! The route table and the OpenAPI document, from one list: each route is registered once
//! with `routes!`, which takes its path and method from the handler's `#[utoipa::path]`,
//! so what is served and what is documented cannot drift. Served at `/openapi.json`.

use crate::routes::openai::{files as oa_files, jobs as oa_jobs};
use crate::routes::{adapters, identity, inputs, jobs, probes, safety, webhooks, worker};
use crate::ApiState;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
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
        (name = "auth", description = "Who the caller is"),
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
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::events))
        .routes(routes!(jobs::stream_events))
        .routes(routes!(jobs::cancel))
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

/// The API document, as served (built once).
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| routes().into_openapi())
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

async fn document() -> axum::Json<&'static utoipa::openapi::OpenApi> {
    axum::Json(openapi())
}
