//! User routes for registered inputs: base models and datasets.

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_core::registry::inputs::{self, InputKind, InputRow, RegisterInput};
use loraforge_core::Error;

async fn register(
    state: &ApiState,
    caller: &Caller,
    kind: InputKind,
    req: RegisterInput,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    let (row, created) = inputs::register(
        &state.pool,
        &state.settings.file_inputs(),
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
    state: &ApiState,
    caller: &Caller,
    kind: InputKind,
    name: &str,
) -> Result<Json<InputRow>, ApiError> {
    let row = inputs::get(&state.pool, caller.project.as_str(), kind, name).await?;
    Ok(Json(row.ok_or(Error::NotFound("input"))?))
}

#[utoipa::path(post, path = "/v1/base-models", tag = "inputs", security(("api_key" = ["submit"])), request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), problems::BadRequest, problems::Conflict, problems::Unprocessable))]
pub async fn register_base_model(
    State(s): State<ApiState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterInput>,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    caller.require(Scope::Submit)?;
    register(&s, &caller, InputKind::BaseModel, req).await
}

#[utoipa::path(post, path = "/v1/datasets", tag = "inputs", security(("api_key" = ["submit"])), request_body = RegisterInput,
    responses((status = 201, body = InputRow), (status = 200, description = "already registered", body = InputRow), problems::BadRequest, problems::Conflict, problems::Unprocessable))]
pub async fn register_dataset(
    State(s): State<ApiState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterInput>,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    caller.require(Scope::Submit)?;
    register(&s, &caller, InputKind::Dataset, req).await
}

#[utoipa::path(get, path = "/v1/base-models/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), problems::NotFound))]
pub async fn get_base_model(
    State(s): State<ApiState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<InputRow>, ApiError> {
    caller.require(Scope::Read)?;
    get(&s, &caller, InputKind::BaseModel, &name).await
}

#[utoipa::path(get, path = "/v1/datasets/{name}", tag = "inputs", params(("name" = String, Path)), responses((status = 200, body = InputRow), problems::NotFound))]
pub async fn get_dataset(
    State(s): State<ApiState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<InputRow>, ApiError> {
    caller.require(Scope::Read)?;
    get(&s, &caller, InputKind::Dataset, &name).await
}

#[utoipa::path(get, path = "/v1/base-models", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_base_models(
    State(s): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<InputRow>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        inputs::list(&s.pool, caller.project.as_str(), InputKind::BaseModel).await?,
    ))
}

#[utoipa::path(get, path = "/v1/datasets", tag = "inputs", responses((status = 200, body = Vec<InputRow>)))]
pub async fn list_datasets(
    State(s): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<InputRow>>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        inputs::list(&s.pool, caller.project.as_str(), InputKind::Dataset).await?,
    ))
}
