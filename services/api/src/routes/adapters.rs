//! User routes for the adapter registry: listing, versions, aliases, tags, resolve,
//! file downloads (with Range) and presigned URLs, lineage, deletion.

use crate::auth::Caller;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::problem::{problems, ApiError};
use crate::ApiState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_core::auth::Scope;
use loraforge_core::registry::aliases::{self, AliasRow, Resolved};
use loraforge_core::registry::cache::Entry;
use loraforge_core::registry::{self, lineage, AdapterFilter, AdapterSummary};
use loraforge_core::views::{LineageView, VersionView};
use loraforge_core::Error;
use serde::{Deserialize, Serialize};
use std::time::Duration;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

fn page_size(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AdapterPage {
    adapters: Vec<AdapterSummary>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/adapters", tag = "registry", operation_id = "list_adapters", params(AdapterFilter),
    responses((status = 200, body = AdapterPage), problems::Unprocessable))]
pub async fn list(
    State(state): State<ApiState>,
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
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionPage {
    versions: Vec<VersionView>,
    aliases: Vec<AliasRow>,
    next_before: Option<i32>,
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions", tag = "registry", params(("name" = String, Path), VersionsQuery),
    responses((status = 200, body = VersionPage), problems::NotFound, problems::Unprocessable))]
pub async fn versions(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<VersionsQuery>,
) -> Result<Json<VersionPage>, ApiError> {
    caller.require(Scope::Read)?;
    // A name no adapter can have names none (the list of an unused valid name is empty).
    loraforge_spec::AdapterName::parse(&name).map_err(|_| Error::NotFound("adapter"))?;
    let limit = page_size(q.limit)?;
    let project = caller.project.as_str();
    let rows = registry::list_versions(&state.pool, project, &name, q.before, limit).await?;
    if rows.is_empty() && q.before.is_none() {
        return Err(Error::NotFound("adapter").into());
    }
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|v| v.version))
        .flatten();
    let aliases = aliases::list(&state.pool, project, &name).await?;
    let versions = rows
        .into_iter()
        .map(|r| VersionView::new(r, &state.store))
        .collect();
    Ok(Json(VersionPage {
        versions,
        aliases,
        next_before,
    }))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path)), responses((status = 200, body = VersionView), problems::NotFound))]
pub async fn version(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let project = caller.project.as_str();
    cached_json(&state, project, &name, Entry::Version(version), async {
        let row = registry::find_version(&state.pool, project, &name, version).await?;
        Ok(VersionView::new(row, &state.store))
    })
    .await
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/versions/{version}", tag = "registry",
    security(("api_key" = ["admin"])), params(("name" = String, Path), ("version" = i32, Path)), responses((status = 204, description = "deleted"), problems::NotFound, problems::Conflict))]
pub async fn delete_version(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    registry::delete_version(&state, &caller.project, &name, version).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DepthQuery {
    #[serde(default = "one")]
    #[param(minimum = 0, maximum = 32)]
    depth: u32,
}

fn one() -> u32 {
    1
}

const MAX_DEPTH: u32 = 32;

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/lineage", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), DepthQuery), responses((status = 200, body = LineageView), problems::NotFound, problems::Unprocessable))]
pub async fn lineage(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
    ApiQuery(q): ApiQuery<DepthQuery>,
) -> Result<Json<LineageView>, ApiError> {
    caller.require(Scope::Read)?;
    if q.depth > MAX_DEPTH {
        return Err(ApiError::invalid(
            "depth",
            format!("must be at most {MAX_DEPTH}"),
        ));
    }
    let row = registry::find_version(&state.pool, &caller.project, &name, version).await?;
    let graph = lineage::ancestors(&state.pool, &caller.project, &row, q.depth).await?;
    Ok(Json(LineageView::new(row, graph)))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/descendants", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), DepthQuery), responses((status = 200, body = lineage::Graph), problems::NotFound, problems::Unprocessable))]
pub async fn descendants(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version)): ApiPath<(String, i32)>,
    ApiQuery(q): ApiQuery<DepthQuery>,
) -> Result<Json<lineage::Graph>, ApiError> {
    caller.require(Scope::Read)?;
    if q.depth > MAX_DEPTH {
        return Err(ApiError::invalid(
            "depth",
            format!("must be at most {MAX_DEPTH}"),
        ));
    }
    let row = registry::find_version(&state.pool, &caller.project, &name, version).await?;
    Ok(Json(
        lineage::descendants(&state.pool, &caller.project, &row, q.depth).await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    version: i32,
}

#[utoipa::path(put, path = "/v1/adapters/{name}/aliases/{alias}", tag = "registry", security(("api_key" = ["admin"])), request_body = SetAlias,
    params(("name" = String, Path), ("alias" = String, Path)), responses((status = 200, body = AliasRow), problems::BadRequest, problems::NotFound, problems::Conflict, problems::Unprocessable))]
pub async fn put_alias(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, alias)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SetAlias>,
) -> Result<Json<AliasRow>, ApiError> {
    caller.require(Scope::Admin)?;
    Ok(Json(
        aliases::set(&state, &caller.project, &name, &alias, body.version).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/aliases/{alias}", tag = "registry",
    security(("api_key" = ["admin"])), params(("name" = String, Path), ("alias" = String, Path)), responses((status = 204, description = "deleted"), problems::NotFound))]
pub async fn delete_alias(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, alias)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::Admin)?;
    aliases::delete(&state, &caller.project, &name, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/adapters/{name}/versions/{version}/tags/{tag}", tag = "registry",
    security(("api_key" = ["admin"])), params(("name" = String, Path), ("version" = i32, Path), ("tag" = String, Path)), responses((status = 200, body = Vec<String>), problems::NotFound, problems::Unprocessable))]
pub async fn put_tag(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version, tag)): ApiPath<(String, i32, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    set_tag(&state, &caller, &name, version, &tag, true).await
}

/// Both tag routes: admin only, answering the version's tags after.
async fn set_tag(
    state: &ApiState,
    caller: &Caller,
    name: &str,
    version: i32,
    tag: &str,
    present: bool,
) -> Result<Json<Vec<String>>, ApiError> {
    caller.require(Scope::Admin)?;
    let tags = registry::set_tag(state, &caller.project, name, version, tag, present).await?;
    Ok(Json(tags))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}/versions/{version}/tags/{tag}", tag = "registry",
    security(("api_key" = ["admin"])), params(("name" = String, Path), ("version" = i32, Path), ("tag" = String, Path)), responses((status = 200, body = Vec<String>), problems::NotFound, problems::Unprocessable))]
pub async fn delete_tag(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version, tag)): ApiPath<(String, i32, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    set_tag(&state, &caller, &name, version, &tag, false).await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ResolveQuery {
    /// `latest` (the default: the newest ready version), an alias or a version number.
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// Which version a serving engine should load. `name` may carry the reference itself,
/// `name@ref` (`demo@3`, `demo@prod`): the form a fine-tuning job's `fine_tuned_model` takes.
#[utoipa::path(get, path = "/v1/adapters/{name}/resolve", tag = "registry",
    params(("name" = String, Path, description = "the adapter's name, or `name@ref`"), ResolveQuery),
    responses((status = 200, body = Resolved), problems::NotFound,
               (status = 409, description = "problem: the version is quarantined by the safety gate (`version_quarantined`); it is not served",
                content_type = "application/problem+json", body = crate::problem::Problem),
               problems::Gone, problems::Unprocessable))]
pub async fn resolve(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<ResolveQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let (name, reference) = match (name.split_once('@'), q.reference) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "ref",
                "the name already says which version (name@ref): give the reference once",
            ))
        }
        (Some((name, reference)), None) => (name.to_string(), reference.to_string()),
        (None, reference) => (name, reference.unwrap_or_else(|| "latest".into())),
    };
    let project = caller.project.as_str();
    let entry = Entry::Resolve(reference.clone());
    cached_json(&state, project, &name, entry, async {
        Ok(aliases::resolve(&state.pool, &state.store, project, &name, &reference).await?)
    })
    .await
}

/// A registry answer from the read cache, or computed, serialized and cached. The ticket is
/// taken before `compute` runs (futures start when awaited), so an answer that a concurrent
/// write may have made stale is not kept.
async fn cached_json<T: Serialize>(
    state: &ApiState,
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
            let body = serde_json::to_vec(&value).map_err(|e| Error::Internal(e.to_string()))?;
            let body = Bytes::from(body);
            cache.insert(ticket, project, adapter, entry, body.clone());
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// `allow`: an admin fetching a quarantined version's file for review. Without it, or
    /// without admin scope, a quarantined version's files are refused.
    #[param(inline)]
    quarantined: Option<QuarantinedAccess>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuarantinedAccess {
    Allow,
}

/// A listed file of a version; a quarantined version's only for an admin who asked for it
/// explicitly, so that nothing serves it by accident.
async fn servable_file(
    state: &ApiState,
    caller: &Caller,
    name: &str,
    version: i32,
    file: &str,
    q: &FileQuery,
) -> Result<(registry::VersionRow, loraforge_spec::FileDigest), ApiError> {
    let (row, digest) =
        registry::listed_file(&state.pool, &caller.project, name, version, file).await?;
    if row.status == registry::VersionStatus::Quarantined {
        if caller.scope < Scope::Admin {
            return Err(Error::Forbidden(format!(
                "version {version} of {name} is quarantined by the safety gate; its files are \
                 for review only, by a key with scope admin and `?quarantined=allow`"
            ))
            .into());
        }
        if q.quarantined != Some(QuarantinedAccess::Allow) {
            let refusal = aliases::quarantined(name, &row);
            return Err(Error::conflict(
                "version_quarantined",
                format!("{refusal}; to review its files add `?quarantined=allow`"),
            )
            .into());
        }
    }
    Ok((row, digest))
}

#[utoipa::path(get, path = "/v1/adapters/{name}/versions/{version}/files/{file}", tag = "registry",
    params(("name" = String, Path), ("version" = i32, Path), ("file" = String, Path), FileQuery, ("Range" = Option<String>, Header)),
    responses((status = 200, description = "the file: `application/json` for `.json` files, else `application/octet-stream`",
                content(("application/octet-stream"), ("application/json"))),
               (status = 206, description = "the requested range (content types as for 200)",
                content(("application/octet-stream"), ("application/json"))),
               (status = 403, description = "problem: the version is quarantined and the key's scope is not admin",
                content_type = "application/problem+json", body = crate::problem::Problem),
               (status = 409, description = "problem: the version is quarantined (`version_quarantined`) and the request has no `?quarantined=allow`",
                content_type = "application/problem+json", body = crate::problem::Problem),
               (status = 416, description = "range not satisfiable"), problems::NotFound, problems::Gone))]
/// Streams a file; honours a single `Range: bytes=…` (206, or 416 if unsatisfiable).
pub async fn download(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version, file)): ApiPath<(String, i32, String)>,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let (row, digest) = servable_file(&state, &caller, &name, version, &file, &q).await?;
    let size = digest.size;
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
            .map_err(Error::from)?;
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
    let stream = state.store.get_stream(&path).await.map_err(Error::from)?;
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
    params(("name" = String, Path), ("version" = i32, Path), ("file" = String, Path), FileQuery),
    responses((status = 200, body = PresignedUrl),
               (status = 403, description = "problem: the version is quarantined and the key's scope is not admin",
                content_type = "application/problem+json", body = crate::problem::Problem),
               (status = 409, description = "problem: the version is quarantined (`version_quarantined`) and the request has no `?quarantined=allow`, or the store cannot presign (`presign_unsupported`)",
                content_type = "application/problem+json", body = crate::problem::Problem),
               problems::NotFound, problems::Gone))]
pub async fn presign(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath((name, version, file)): ApiPath<(String, i32, String)>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Json<PresignedUrl>, ApiError> {
    caller.require(Scope::Read)?;
    let (row, _) = servable_file(&state, &caller, &name, version, &file, &q).await?;
    let url = state
        .store
        .presigned_get(&format!("{}/{file}", row.storage_prefix), PRESIGN_TTL)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| {
            Error::conflict(
                "presign_unsupported",
                "this artifact store cannot presign URLs; download through /files/{file}",
            )
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
