//! Liveness and readiness.

use crate::problem::ApiError;
use crate::ApiState;
use axum::extract::State;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when Postgres answers.
pub async fn readyz(State(state): State<ApiState>) -> Result<&'static str, ApiError> {
    sqlx::query!(r#"SELECT 1 AS "one!""#)
        .fetch_one(&state.pool)
        .await?;
    Ok("ready")
}
