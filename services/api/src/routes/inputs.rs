//! User routes for registered inputs: base models and datasets, registered by URI or (datasets)
//! uploaded.

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_core::registry::inputs::{self, InputKind, InputRow, RegisterInput};
use loraforge_core::registry::uploads::{self, DatasetName};
use loraforge_core::Error;
use loraforge_spec::AdapterName;

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
    Ok(registered(row, created))
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

/// Uploads a JSONL dataset and registers it under `name`: the body is the file itself (any
/// content type). It is stored in the artifact store as it streams, its sha256 computed and
/// every line checked against the three formats; only a file that passes is kept and
/// registered. A refused one (422 naming the first bad lines, 413 over the server's
/// `LORAFORGE_MAX_UPLOAD_BYTES`) leaves nothing behind.
#[utoipa::path(post, path = "/v1/datasets/{name}/upload", tag = "inputs", operation_id = "upload_dataset",
    params(("name" = String, Path, description = "the name to register it under")),
    request_body(content = String, content_type = "application/octet-stream",
        description = "the JSONL file: one example per line, `{\"messages\": [...]}`, `{\"prompt\", \"completion\"}` or `{\"text\"}`"),
    responses((status = 201, body = InputRow), (status = 200, description = "the same content is already registered under this name", body = InputRow),
              problems::BadRequest, problems::Conflict, problems::TooLarge, problems::Unprocessable))]
pub async fn upload_dataset(
    State(s): State<ApiState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<InputRow>), ApiError> {
    caller.require(Scope::Submit)?;
    let name = AdapterName::parse(&name).map_err(|m| ApiError::invalid("name", m))?;
    let max = s.settings.max_upload_bytes;
    // Refused unread when the client says up front that it is too large.
    if content_length(&headers).is_some_and(|n| n > max) {
        return Err(uploads::too_large(max).into());
    }
    let staged = uploads::stage(
        &s.store,
        &caller.project,
        body.into_data_stream(),
        max,
        "body",
    )
    .await?;
    let (row, created) = staged
        .register(&s.pool, &s.store, &caller.project, DatasetName::Given(name))
        .await?;
    Ok(registered(row, created))
}

/// The request's declared `Content-Length`, if any.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
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

/// A registration's answer: 201 with the row when it is new, 200 when the same input was
/// registered already.
fn registered(row: InputRow, created: bool) -> (StatusCode, Json<InputRow>) {
    let status = match created {
        true => StatusCode::CREATED,
        false => StatusCode::OK,
    };
    (status, Json(row))
}
