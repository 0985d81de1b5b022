//! API keys and the caller behind each request. A key is `lf_<prefix>_<secret>`,
//! shown once at creation and stored as a sha256; it belongs to one project with one
//! scope (`read` < `submit` < `admin`). Every user route takes a [`Caller`] and works
//! inside its project only, so another project's objects simply do not exist (404).

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    pub project: String,
    pub scope: Scope,
    /// The part after `lf_` that listings show, to recognise the key by.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
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
    let created_at = sqlx::query_scalar!(
        "INSERT INTO api_keys (id, project, scope, prefix, key_sha256) VALUES ($1, $2, $3, $4, $5)
         RETURNING created_at",
        id,
        project,
        scope.as_str(),
        &prefix,
        Sha256::digest(key.as_bytes()).to_vec(),
    )
    .fetch_one(pool)
    .await?;
    Ok(CreatedKey {
        id,
        project: project.into(),
        scope,
        prefix,
        created_at,
        key,
    })
}

/// A key as listings show it: never the key itself, nor its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: Uuid,
    pub prefix: String,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    /// `null` while the key works.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The project's keys, newest first, revoked ones included.
pub async fn list_keys(pool: &PgPool, project: &str) -> Result<Vec<KeyInfo>> {
    let rows = sqlx::query!(
        "SELECT id, prefix, scope, created_at, revoked_at FROM api_keys
         WHERE project = $1 ORDER BY created_at DESC, id",
        project,
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(KeyInfo {
                id: r.id,
                prefix: r.prefix,
                scope: r.scope.parse().map_err(Error::Internal)?,
                created_at: r.created_at,
                revoked_at: r.revoked_at,
            })
        })
        .collect()
}

/// Revokes one key of the project (a no-op if it already is); another project's key, or
/// none, is not found.
pub async fn revoke_project_key(pool: &PgPool, project: &str, id: Uuid) -> Result<()> {
    let found = sqlx::query_scalar!(
        r#"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
           WHERE id = $1 AND project = $2 RETURNING id"#,
        id,
        project,
    )
    .fetch_optional(pool)
    .await?;
    found.map(|_| ()).ok_or(Error::NotFound("API key"))
}

/// Revokes the key with this prefix, whatever its project: the server-side command's way,
/// for whoever runs the control plane.
pub async fn revoke_key(pool: &PgPool, prefix: &str) -> Result<bool, sqlx::Error> {
    let n = sqlx::query!(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
        prefix,
    )
    .execute(pool)
    .await?;
    Ok(n.rows_affected() > 0)
}
