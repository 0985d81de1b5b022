//! Who is calling. Users present a project API key (`loraforge_core::auth`); workers the
//! token of their attempt. Every user route takes a [`Caller`] and works inside its project
//! only, so another project's objects simply do not exist (404).

use crate::extract::{bearer, ApiPath};
use crate::problem::ApiError;
use crate::ApiState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
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
/// The job a worker's request is for (`/v1/worker/jobs/{id}/…`), once its bearer token is
/// checked against the attempt's. An extractor on the request's parts: it runs before any
/// body extractor, so a request without a valid token is refused (401) unread.
pub struct WorkerJob(pub JobRow);

impl FromRequestParts<ApiState> for WorkerJob {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)
            .ok_or(Error::Unauthenticated)?
            .to_string();
        let ApiPath(job_id) = ApiPath::<Uuid>::from_request_parts(parts, state).await?;
        let sha = Sha256::digest(token.as_bytes());
        Ok(WorkerJob(
            jobs::authenticate_worker(&state.pool, job_id, &sha)
                .await?
                .ok_or(Error::Unauthenticated)?,
        ))
    }
}
