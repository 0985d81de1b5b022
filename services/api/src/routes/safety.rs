//! The caller's project's safety policy.

use crate::auth::Caller;
use crate::extract::ApiJson;
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_spec::safety::SafetyPolicy;

#[utoipa::path(get, path = "/v1/safety-policy", tag = "safety", operation_id = "get_safety_policy", responses((status = 200, body = SafetyPolicy)))]
pub async fn get(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<SafetyPolicy>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        loraforge_core::safety::project_policy(&state.pool, &caller.project).await?,
    ))
}

#[utoipa::path(put, path = "/v1/safety-policy", tag = "safety", security(("api_key" = ["admin"])), request_body = SafetyPolicy,
    responses((status = 200, body = SafetyPolicy), problems::Unprocessable))]
pub async fn put(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(policy): ApiJson<SafetyPolicy>,
) -> Result<Json<SafetyPolicy>, ApiError> {
    caller.require(Scope::Admin)?;
    loraforge_core::safety::set_project_policy(&state.pool, &caller.project, &policy).await?;
    Ok(Json(policy))
}
