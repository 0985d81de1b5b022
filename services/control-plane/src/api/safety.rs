//! The caller's project's safety policy.

use super::ApiJson;
use crate::app::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use axum::extract::State;
use axum::Json;
use loraforge_spec::safety::SafetyPolicy;

#[utoipa::path(get, path = "/v1/safety-policy", tag = "safety", responses((status = 200, body = SafetyPolicy)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SafetyPolicy>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(
        crate::safety::project_policy(&state.pool, &caller.project).await?,
    ))
}

#[utoipa::path(put, path = "/v1/safety-policy", tag = "safety", request_body = SafetyPolicy,
    responses((status = 200, body = SafetyPolicy), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(policy): ApiJson<SafetyPolicy>,
) -> Result<Json<SafetyPolicy>, ApiError> {
    caller.require(Scope::Admin)?;
    crate::safety::set_project_policy(&state.pool, &caller.project, &policy).await?;
    Ok(Json(policy))
}
