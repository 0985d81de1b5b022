//! User routes for registered inputs: base models and datasets.

use super::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::error::ApiError;
use crate::registry::inputs::{self, InputKind, InputRow, RegisterInput};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

async fn register(state: &AppState, kind: InputKind, req: RegisterInput) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    let (row, created) = inputs::register(&state.pool, &state.settings.default_project, kind, req).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(row)))
}

async fn get(state: &AppState, kind: InputKind, name: &str) -> Result<Json<InputRow>, ApiError> {
    let row = inputs::get(&state.pool, &state.settings.default_project, kind, name).await?;
    Ok(Json(row.ok_or(ApiError::NotFound("input"))?))
}

pub async fn register_base_model(State(s): State<AppState>, ApiJson(req): ApiJson<RegisterInput>) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    register(&s, InputKind::BaseModel, req).await
}

pub async fn register_dataset(State(s): State<AppState>, ApiJson(req): ApiJson<RegisterInput>) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    register(&s, InputKind::Dataset, req).await
}

pub async fn get_base_model(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<InputRow>, ApiError> {
    get(&s, InputKind::BaseModel, &name).await
}

pub async fn get_dataset(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<InputRow>, ApiError> {
    get(&s, InputKind::Dataset, &name).await
}

pub async fn list_base_models(State(s): State<AppState>) -> Result<Json<Vec<InputRow>>, ApiError> {
    Ok(Json(inputs::list(&s.pool, &s.settings.default_project, InputKind::BaseModel).await?))
}

pub async fn list_datasets(State(s): State<AppState>) -> Result<Json<Vec<InputRow>>, ApiError> {
    Ok(Json(inputs::list(&s.pool, &s.settings.default_project, InputKind::Dataset).await?))
}
