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

#[utoipa::path(post, path = "/v1/base-models", tag = "inputs", request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn register_base_model(State(s): State<AppState>, ApiJson(req): ApiJson<RegisterInput>) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    register(&s, InputKind::BaseModel, req).await
}

#[utoipa::path(post, path = "/v1/datasets", tag = "inputs", request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn register_dataset(State(s): State<AppState>, ApiJson(req): ApiJson<RegisterInput>) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    register(&s, InputKind::Dataset, req).await
}

#[utoipa::path(get, path = "/v1/base-models/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn get_base_model(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<InputRow>, ApiError> {
    get(&s, InputKind::BaseModel, &name).await
}

#[utoipa::path(get, path = "/v1/datasets/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn get_dataset(State(s): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Json<InputRow>, ApiError> {
    get(&s, InputKind::Dataset, &name).await
}

#[utoipa::path(get, path = "/v1/base-models", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_base_models(State(s): State<AppState>) -> Result<Json<Vec<InputRow>>, ApiError> {
    Ok(Json(inputs::list(&s.pool, &s.settings.default_project, InputKind::BaseModel).await?))
}

#[utoipa::path(get, path = "/v1/datasets", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_datasets(State(s): State<AppState>) -> Result<Json<Vec<InputRow>>, ApiError> {
    Ok(Json(inputs::list(&s.pool, &s.settings.default_project, InputKind::Dataset).await?))
}
