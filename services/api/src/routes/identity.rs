//! Who the caller is: what a client (the web UI's sign-in) asks before anything else.

use crate::auth::Caller;
use crate::problem::problems;
use crate::ApiState;
use axum::extract::State;
use axum::Json;
use loraforge_core::auth::Scope;
use serde::Serialize;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Identity {
    /// The project every route works in for this caller.
    pub project: String,
    pub scope: Scope,
    /// `false` in dev mode (`LORAFORGE_AUTH=disabled`): no key is needed, and every
    /// caller is an admin of the default project.
    pub auth_enabled: bool,
}

/// The caller's project and scope; 401 without a valid key (unless auth is disabled).
#[utoipa::path(get, path = "/v1/me", tag = "auth",
    responses((status = 200, body = Identity), problems::Unauthorized))]
pub async fn me(State(state): State<ApiState>, caller: Caller) -> Json<Identity> {
    Json(Identity {
        project: caller.project.clone(),
        scope: caller.scope,
        auth_enabled: state.settings.auth_enabled,
    })
}
