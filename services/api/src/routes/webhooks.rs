//! User routes for webhook subscriptions and their delivery log.

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_core::webhooks::{self, CreatedWebhook, DeliveryRow, NewWebhook, WebhookRow};
use uuid::Uuid;

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", security(("api_key" = ["admin"])), request_body = NewWebhook, responses((status = 201, body = CreatedWebhook), problems::BadRequest, problems::Unprocessable))]
pub async fn create(
    State(s): State<ApiState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewWebhook>,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    caller.require(Scope::Admin)?;
    Ok((
        StatusCode::CREATED,
        Json(webhooks::create(&s.pool, caller.project.as_str(), req).await?),
    ))
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", security(("api_key" = ["admin"])), operation_id = "list_webhooks", responses((status = 200, body = Vec<WebhookRow>)))]
pub async fn list(
    State(s): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<WebhookRow>>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        webhooks::list(&s.pool, caller.project.as_str()).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", security(("api_key" = ["admin"])), params(("id" = Uuid, Path)), responses((status = 204, description = "deleted"), problems::NotFound))]
pub async fn delete(
    State(s): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    webhooks::delete(&s.pool, caller.project.as_str(), id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks", security(("api_key" = ["admin"])), params(("id" = Uuid, Path)), responses((status = 200, body = Vec<DeliveryRow>), problems::NotFound))]
pub async fn deliveries(
    State(s): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Vec<DeliveryRow>>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        webhooks::deliveries(&s.pool, caller.project.as_str(), id).await?,
    ))
}
