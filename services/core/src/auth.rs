//! API keys and the caller behind each request. A key is `lf_<prefix>_<secret>`,
//! shown once at creation and stored as a sha256; it belongs to one project with one
//! scope (`read` < `submit` < `admin`). Every user route takes a [`Caller`] and works
//! inside its project only, so another project's objects simply do not exist (404).

use crate::error::{Error, Result};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Read,
    Submit,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Scope::Read),
            "submit" => Ok(Scope::Submit),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?}: use read, submit or admin"
            )),
        }
    }
}

/// Who is calling: their project and what they may do there.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project: String,
    pub scope: Scope,
}

impl Caller {
    /// Refuses the request unless the caller's scope includes `needed`.
    pub fn require(&self, needed: Scope) -> Result<&Self> {
        if self.scope >= needed {
            Ok(self)
        } else {
            Err(Error::Forbidden(format!(
                "this needs a key with scope {} or above",
                needed.as_str()
            )))
        }
    }
}

/// The caller a key belongs to, if it is a live key.
pub async fn authenticate(pool: &PgPool, key: &str) -> Result<Option<Caller>> {
    let found = sqlx::query!(
        "SELECT project, scope FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL",
        Sha256::digest(key.as_bytes()).to_vec(),
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.project, r.scope));
    let Some((project, scope)) = found else {
        return Ok(None);
    };
    let scope = scope.parse().map_err(Error::Internal)?;
    Ok(Some(Caller { project, scope }))
}

#[derive(Debug, Serialize)]
pub struct CreatedKey {
    pub id: Uuid,
    pub project: String,
    pub scope: Scope,
    /// The whole key. It is not stored and cannot be shown again.
    pub key: String,
}

/// Creates a key; the returned secret is the only copy.
pub async fn create_key(pool: &PgPool, project: &str, scope: Scope) -> Result<CreatedKey> {
    loraforge_spec::AdapterName::parse(project).map_err(|m| Error::invalid("project", m))?;
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    let mut prefix = [0u8; 4];
    rand::rng().fill_bytes(&mut prefix);
    let prefix = hex::encode(prefix);
    let key = format!("lf_{prefix}_{}", hex::encode(secret));
    let id = Uuid::new_v4();
    sqlx::query!(
        "INSERT INTO api_keys (id, project, scope, prefix, key_sha256) VALUES ($1, $2, $3, $4, $5)",
        id,
        project,
        scope.as_str(),
        &prefix,
        Sha256::digest(key.as_bytes()).to_vec(),
    )
    .execute(pool)
    .await?;
    Ok(CreatedKey {
        id,
        project: project.into(),
        scope,
        key,
    })
}

pub async fn revoke_key(pool: &PgPool, prefix: &str) -> Result<bool, sqlx::Error> {
    let n = sqlx::query!(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
        prefix,
    )
    .execute(pool)
    .await?;
    Ok(n.rows_affected() > 0)
}
