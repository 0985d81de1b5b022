//! User routes for the adapter registry.

use super::ApiPath;
use crate::app::AppState;
use crate::error::ApiError;
use crate::registry::{self, LineageView, VersionRow, VersionView};
use axum::extract::State;
use axum::Json;

async fn find(state: &AppState, name: &str, version: i32) -> Result<VersionRow, ApiError> {
    registry::get_version(&state.pool, &state.settings.default_project, name, version)
        .await?
        .ok_or(ApiError::NotFound("adapter version"))
}

pub async fn version(
    State(state): State<AppState>,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<Json<VersionView>, ApiError> {
    Ok(Json(find(&state, &name, version).await?.view(&state.store)))
}

pub async fn lineage(
    State(state): State<AppState>,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<Json<LineageView>, ApiError> {
    Ok(Json(find(&state, &name, version).await?.lineage()))
}
