//! Who is calling. Users present a project API key (`loraforge_core::auth`); workers the
//! token of their attempt. Every user route takes a [`Caller`] and works inside its project
//! only, so another project's objects simply do not exist (404).

use crate::extract::bearer;
use crate::problem::ApiError;
use crate::ApiState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use loraforge_core::auth::{self, Scope};
use loraforge_core::jobs::{self, JobRow};
use loraforge_core::Error;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The authenticated caller of a user route.
#[derive(Debug, Clone)]
pub struct Caller(pub auth::Caller);

impl std::ops::Deref for Caller {
    type Target = auth::Caller;
    fn deref(&self) -> &auth::Caller {
        &self.0
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        if !state.settings.auth_enabled {
            return Ok(Caller(auth::Caller {
                project: state.settings.default_project.clone(),
                scope: Scope::Admin,
            }));
        }
        let key = bearer(&parts.headers).ok_or(Error::Unauthenticated)?;
        let caller = auth::authenticate(&state.pool, key)
            .await?
            .ok_or(Error::Unauthenticated)?;
        Ok(Caller(caller))
    }
}

/// The job whose current attempt's token the worker presents; any other token is refused.
pub async fn worker_job(
    state: &ApiState,
    job_id: Uuid,
    headers: &HeaderMap,
) -> Result<JobRow, ApiError> {
    let token = bearer(headers).ok_or(Error::Unauthenticated)?;
    let sha = Sha256::digest(token.as_bytes());
    Ok(jobs::authenticate_worker(&state.pool, job_id, &sha)
        .await?
        .ok_or(Error::Unauthenticated)?)
}
