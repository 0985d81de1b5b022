//! User routes for registered inputs: base models and datasets.

use super::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::registry::inputs::{self, InputKind, InputRow, RegisterInput};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

async fn register(
    state: &AppState,
    caller: &Caller,
    kind: InputKind,
    req: RegisterInput,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    let (row, created) = inputs::register(
        &state.pool,
        &state.settings.file_roots,
        caller.project.as_str(),
        kind,
        req,
    )
    .await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(row),
    ))
}

async fn get(
    state: &AppState,
    caller: &Caller,
    kind: InputKind,
    name: &str,
) -> Result<Json<InputRow>, ApiError> {
    let row = inputs::get(&state.pool, caller.project.as_str(), kind, name).await?;
    Ok(Json(row.ok_or(ApiError::NotFound("input"))?))
}

#[utoipa::path(post, path = "/v1/base-models", tag = "inputs", request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn register_base_model(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterInput>,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    caller.require(Scope::Submit)?;
    register(&s, &caller, InputKind::BaseModel, req).await
}

#[utoipa::path(post, path = "/v1/datasets", tag = "inputs", request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn register_dataset(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterInput>,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    caller.require(Scope::Submit)?;
    register(&s, &caller, InputKind::Dataset, req).await
}

#[utoipa::path(get, path = "/v1/base-models/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn get_base_model(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<InputRow>, ApiError> {
    caller.require(Scope::Read)?;
    get(&s, &caller, InputKind::BaseModel, &name).await
}

#[utoipa::path(get, path = "/v1/datasets/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn get_dataset(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<InputRow>, ApiError> {
    caller.require(Scope::Read)?;
    get(&s, &caller, InputKind::Dataset, &name).await
}

#[utoipa::path(get, path = "/v1/base-models", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_base_models(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<InputRow>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        inputs::list(&s.pool, caller.project.as_str(), InputKind::BaseModel).await?,
    ))
}

#[utoipa::path(get, path = "/v1/datasets", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_datasets(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<InputRow>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        inputs::list(&s.pool, caller.project.as_str(), InputKind::Dataset).await?,
    ))
}
