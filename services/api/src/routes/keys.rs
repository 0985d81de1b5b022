//! The project's API keys, for its admins: create (the key is answered once and stored
//! only as a hash), list (never the keys), revoke. A project's first key comes from the
//! server-side `loraforge keys create --project`, since no key exists yet to call these.

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_core::auth::{self, CreatedKey, KeyInfo, Scope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// read < submit < admin
    pub scope: Scope,
}

/// Creates a key in the caller's project. The answer holds the whole key, once.
#[utoipa::path(post, path = "/v1/keys", tag = "auth", operation_id = "create_key", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), problems::BadRequest, problems::Unauthorized, problems::Unprocessable))]
pub async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let key = auth::create_key(&state.pool, &caller.project, body.scope).await?;
    tracing::info!(project = caller.project, key_id = %key.id, scope = key.scope.as_str(), "API key created");
    Ok((
        StatusCode::CREATED,
        // The secret must not linger in a cache on the way.
        [(header::CACHE_CONTROL, "no-store")],
        Json(key),
    )
        .into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyList {
    keys: Vec<KeyInfo>,
}

/// The caller's project's keys, newest first, revoked ones included.
#[utoipa::path(get, path = "/v1/keys", tag = "auth", operation_id = "list_keys",
    responses((status = 200, body = KeyList), problems::Unauthorized))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(KeyList {
        keys: auth::list_keys(&state.pool, &caller.project).await?,
    }))
}

/// Revokes a key of the caller's project at once (revoking it again is fine).
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "auth", operation_id = "revoke_key",
    params(("id" = Uuid, Path)), responses((status = 204, description = "revoked"), problems::Unauthorized, problems::NotFound))]
pub async fn revoke(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    auth::revoke_project_key(&state.pool, &caller.project, id).await?;
    tracing::info!(project = caller.project, key_id = %id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
