//! User routes for the adapter registry: listing, versions, aliases, tags, resolve,
//! file downloads (with Range) and presigned URLs, lineage, deletion.

use super::{ApiJson, ApiPath, ApiQuery};
use crate::app::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::registry::aliases::{self, AliasRow, Resolved};
use crate::registry::cache::Entry;
use crate::registry::{
    self, lineage, AdapterFilter, AdapterSummary, LineageView, VersionRow, VersionView,
};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::time::Duration;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::validation(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

async fn find(
    state: &AppState,
    caller: &Caller,
    name: &str,
    version: i32,
) -> Result<VersionRow, ApiError> {
    registry::get_version(&state.pool, caller.project.as_str(), name, version)
        .await?
        .ok_or(ApiError::NotFound("adapter version"))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AdapterPage {
    adapters: Vec<AdapterSummary>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/adapters", tag = "registry", params(AdapterFilter),
    responses((status = 200, body = AdapterPage), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<AdapterFilter>,
) -> Result<Json<AdapterPage>, ApiError> {
    caller.require(Scope::Read)?;
    let limit = page_size(filter.limit)?;
    let adapters =
        registry::list_adapters(&state.pool, caller.project.as_str(), &filter, limit).await?;
    let next_cursor = (adapters.len() as i64 == limit)
        .then(|| adapters.last().map(|a| a.name.clone()))
        .flatten();
    Ok(Json(AdapterPage {
        adapters,
        next_cursor,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VersionsQuery {
    /// Versions below this number (the last one of the previous page).
    before: Option<i32>,
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionPage {
    versions: Vec<VersionView>,
    aliases: Vec<AliasRow>,
    next_before: Option<i32>,
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions", tag = "registry", params(("name" = String, Path), VersionsQuery),
    responses((status = 200, body = VersionPage), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn versions(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<VersionsQuery>,
) -> Result<Json<VersionPage>, ApiError> {
    caller.require(Scope::Read)?;
    let limit = page_size(q.limit)?;
    let project = caller.project.as_str();
    let rows = registry::list_versions(&state.pool, project, &name, q.before, limit).await?;
    if rows.is_empty() && q.before.is_none() {
        return Err(ApiError::NotFound("adapter"));
    }
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|v| v.version))
        .flatten();
    let aliases = aliases::list(&state.pool, project, &name).await?;
    let versions = rows.into_iter().map(|r| r.view(&state.store)).collect();
    Ok(Json(VersionPage {
        versions,
        aliases,
        next_before,
    }))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path)), responses((status = 200, body = VersionView), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn version(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let project = caller.project.as_str();
    cached_json(&state, project, &name, Entry::Version(version), async {
        Ok(find(&state, &caller, &name, version)
            .await?
            .view(&state.store))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/versions/{version}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path)), responses((status = 204, description = "deleted"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn delete_version(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    registry::delete_version(&state, caller.project.as_str(), &name, version).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DepthQuery {
    #[serde(default = "one")]
    depth: u32,
}

fn one() -> u32 {
    1
}

const MAX_DEPTH: u32 = 32;

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/lineage", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), DepthQuery), responses((status = 200, body = LineageView), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn lineage(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
    ApiQuery(q): ApiQuery<DepthQuery>,
) -> Result<Json<LineageView>, ApiError> {
    caller.require(Scope::Read)?;
    if q.depth > MAX_DEPTH {
        return Err(ApiError::validation(
            "depth",
            format!("must be at most {MAX_DEPTH}"),
        ));
    }
    let row = find(&state, &caller, &name, version).await?;
    let graph = lineage::ancestors(&state.pool, caller.project.as_str(), &row, q.depth).await?;
    Ok(Json(row.lineage(graph)))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/descendants", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), DepthQuery), responses((status = 200, body = lineage::Graph), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn descendants(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
    ApiQuery(q): ApiQuery<DepthQuery>,
) -> Result<Json<lineage::Graph>, ApiError> {
    caller.require(Scope::Read)?;
    if q.depth > MAX_DEPTH {
        return Err(ApiError::validation(
            "depth",
            format!("must be at most {MAX_DEPTH}"),
        ));
    }
    let row = find(&state, &caller, &name, version).await?;
    Ok(Json(
        lineage::descendants(&state.pool, caller.project.as_str(), &row, q.depth).await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    version: i32,
}

#[utoipa::path(put, path = "/v1/adapters/{name}/aliases/{alias}", tag = "registry", request_body = SetAlias,
    params(("name" = String, Path), ("alias" = String, Path)), responses((status = 200, body = AliasRow), (status = 400, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn put_alias(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, alias)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SetAlias>,
) -> Result<Json<AliasRow>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        aliases::set(
            &state.pool,
            caller.project.as_str(),
            &name,
            &alias,
            body.version,
        )
        .await?,
    ))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/aliases/{alias}", tag = "registry",
    params(("name" = String, Path), ("alias" = String, Path)), responses((status = 204, description = "deleted"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn delete_alias(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, alias)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    aliases::delete(&state.pool, caller.project.as_str(), &name, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/adapters/{name}/versions/{version}/tags/{tag}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), ("tag" = String, Path)), responses((status = 200, body = Vec<String>), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn put_tag(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version, tag)): ApiPath<(String, i32, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        registry::set_tag(
            &state.pool,
            caller.project.as_str(),
            &name,
            version,
            &tag,
            true,
        )
        .await?,
    ))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/versions/{version}/tags/{tag}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), ("tag" = String, Path)), responses((status = 200, body = Vec<String>), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn delete_tag(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version, tag)): ApiPath<(String, i32, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        registry::set_tag(
            &state.pool,
            caller.project.as_str(),
            &name,
            version,
            &tag,
            false,
        )
        .await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ResolveQuery {
    #[serde(rename = "ref", default = "latest")]
    reference: String,
}

fn latest() -> String {
    "latest".into()
}

#[utoipa::path(get, path = "/v1/adapters/{name}/resolve", tag = "registry", params(("name" = String, Path), ResolveQuery),
    responses((status = 200, body = Resolved), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 410, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 422, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn resolve(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<ResolveQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let project = caller.project.as_str();
    let entry = Entry::Resolve(q.reference.clone());
    cached_json(&state, project, &name, entry, async {
        aliases::resolve(&state.pool, &state.store, project, &name, &q.reference).await
    })
    .await
}

/// A registry answer from the read cache, or computed, serialized and cached. The ticket is
/// taken before `compute` runs (futures start when awaited), so an answer that a concurrent
/// write may have made stale is not kept.
async fn cached_json<T: Serialize>(
    state: &AppState,
    project: &str,
    adapter: &str,
    entry: Entry,
    compute: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<Response, ApiError> {
    let cache = &state.read_cache;
    let body = match cache.get(project, adapter, &entry) {
        Some(body) => body,
        None => {
            let ticket = cache.ticket();
            let value = compute.await?;
            let body = Bytes::from(serde_json::to_vec(&value).map_err(anyhow::Error::from)?);
            cache.insert(ticket, project, adapter, entry, body.clone());
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The version's file, if the registry lists it and the version is not deleted.
async fn listed_file(
    state: &AppState,
    caller: &Caller,
    name: &str,
    version: i32,
    file: &str,
) -> Result<(VersionRow, u64), ApiError> {
    let row = find(state, caller, name, version).await?;
    if row.status == "deleted" {
        return Err(ApiError::Gone(format!(
            "version {version} of {name} was deleted"
        )));
    }
    let size = row
        .files
        .0
        .iter()
        .find(|f| f.name == file)
        .map(|f| f.size)
        .ok_or(ApiError::NotFound("file"))?;
    Ok((row, size))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/files/{file}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), ("file" = String, Path), ("Range" = Option<String>, Header)),
    responses((status = 200, description = "the file", content_type = "application/octet-stream"),
               (status = 206, description = "the requested range", content_type = "application/octet-stream"),
               (status = 416, description = "range not satisfiable"), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 410, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
/// Streams a file; honours a single `Range: bytes=…` (206, or 416 if unsatisfiable).
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version, file)): ApiPath<(String, i32, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let (row, size) = listed_file(&state, &caller, &name, version, &file).await?;
    let path = format!("{}/{file}", row.storage_prefix);
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if let Some(range) = range {
        let Some((start, end)) = parse_range(range, size) else {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        };
        let bytes = state
            .store
            .get_range(&path, start..end + 1)
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        return Ok((
            StatusCode::PARTIAL_CONTENT,
            [
                (header::CONTENT_TYPE, content_type.to_string()),
                (header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")),
                (header::ACCEPT_RANGES, "bytes".to_string()),
            ],
            bytes,
        )
            .into_response());
    }
    let stream = state
        .store
        .get_stream(&path)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::ACCEPT_RANGES, "bytes".to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes -> inclusive range.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PresignedUrl {
    url: String,
    expires_in_seconds: u64,
}

const PRESIGN_TTL: Duration = Duration::from_secs(3600);

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/files/{file}/url", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), ("file" = String, Path)),
    responses((status = 200, body = PresignedUrl), (status = 404, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 409, description = "problem", body = crate::error::Problem, content_type = "application/problem+json"), (status = 410, description = "problem", body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn presign(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((name, version, file)): ApiPath<(String, i32, String)>,
) -> Result<Json<PresignedUrl>, ApiError> {
    caller.require(Scope::Read)?;
    let (row, _) = listed_file(&state, &caller, &name, version, &file).await?;
    let url = state
        .store
        .presigned_get(&format!("{}/{file}", row.storage_prefix), PRESIGN_TTL)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .ok_or_else(|| ApiError::Conflict {
            code: "presign_unsupported",
            detail: "this artifact store cannot presign URLs; download through /files/{file}"
                .into(),
        })?;
    Ok(Json(PresignedUrl {
        url: url.to_string(),
        expires_in_seconds: PRESIGN_TTL.as_secs(),
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-2", 100), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
