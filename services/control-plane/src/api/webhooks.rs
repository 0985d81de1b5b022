//! User routes for webhook subscriptions and their delivery log.

use super::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::error::ApiError;
use crate::webhooks::{self, CreatedWebhook, DeliveryRow, NewWebhook, WebhookRow};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use uuid::Uuid;

pub async fn create(State(s): State<AppState>, ApiJson(req): ApiJson<NewWebhook>) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    Ok((StatusCode::CREATED, Json(webhooks::create(&s.pool, &s.settings.default_project, req).await?)))
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Vec<WebhookRow>>, ApiError> {
    Ok(Json(webhooks::list(&s.pool, &s.settings.default_project).await?))
}

pub async fn delete(State(s): State<AppState>, ApiPath(id): ApiPath<Uuid>) -> Result<StatusCode, ApiError> {
    webhooks::delete(&s.pool, &s.settings.default_project, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deliveries(State(s): State<AppState>, ApiPath(id): ApiPath<Uuid>) -> Result<Json<Vec<DeliveryRow>>, ApiError> {
    Ok(Json(webhooks::deliveries(&s.pool, &s.settings.default_project, id).await?))
}
