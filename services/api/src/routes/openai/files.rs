//! `/v1/files`: a file is a registered dataset, its id `file-<dataset name>`. An upload goes
//! through the same path as `POST /v1/datasets/{name}/upload` (streamed into the store,
//! every line checked, nothing kept if refused) and is registered as
//! `<file name stem>-<first 12 hex digits of its sha256>`: each content its own file, the
//! same content the same file.

use super::{errors, page_limit, unix, HasId, ListPage, OaCaller, OaPath, OaQuery, OpenAiError};
use crate::ApiState;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use loraforge_core::auth::Scope;
use loraforge_core::registry::inputs::{self, InputKind, InputRow};
use loraforge_core::registry::uploads::{self, DatasetName};
use loraforge_core::Error;
use loraforge_storage::{StorageError, Store};
use serde::{Deserialize, Serialize};

/// The only purpose a file may have here.
pub const FINE_TUNE: &str = "fine-tune";
/// Prefix of a file id.
const FILE_ID: &str = "file-";
/// What a form may hold besides the file (boundaries, headers, `purpose`) before its declared
/// length alone shows the file is too large.
const FORM_OVERHEAD: u64 = 64 * 1024;
/// Longest value of a form field other than the file.
const MAX_FIELD_BYTES: usize = 1024;

/// OpenAI's `file` object.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiFile)]
pub struct FileObject {
    /// `file-` and the dataset's name.
    pub id: String,
    /// Always `file`.
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    /// Always `fine-tune`.
    pub purpose: &'static str,
    /// Always `processed`: a file is checked before it is kept.
    pub status: &'static str,
    pub status_details: Option<String>,
    pub expires_at: Option<i64>,
    /// The dataset behind the file, as the native API shows it.
    pub loraforge: FileExtension,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiFileExtension)]
pub struct FileExtension {
    pub dataset: String,
    pub uri: String,
    pub sha256: String,
}

impl HasId for FileObject {
    fn id(&self) -> &str {
        &self.id
    }
}

super::list_type!(FileList, OpenAiFileList, FileObject);

/// The id of a dataset's file.
pub fn file_id(dataset: &str) -> String {
    format!("{FILE_ID}{dataset}")
}

/// The file object of a dataset.
pub fn file_object(store: &Store, project: &str, row: InputRow) -> FileObject {
    // An upload's object is named by upload id; the dataset's name says more.
    let filename = if uploads::is_upload_of(store, project, &row.uri) {
        format!("{}.jsonl", row.name)
    } else {
        row.uri.rsplit('/').next().unwrap_or(&row.uri).to_string()
    };
    FileObject {
        id: file_id(&row.name),
        object: "file",
        bytes: row.size,
        created_at: unix(row.created_at),
        filename,
        purpose: FINE_TUNE,
        status: "processed",
        status_details: None,
        expires_at: None,
        loraforge: FileExtension {
            dataset: row.name,
            uri: row.uri,
            sha256: row.sha256,
        },
    }
}

/// The dataset a file id (or a dataset's plain name) names, or `None`.
pub async fn find_dataset(
    state: &ApiState,
    project: &str,
    id: &str,
) -> Result<Option<InputRow>, OpenAiError> {
    if let Some(name) = id.strip_prefix(FILE_ID) {
        if let Some(row) = inputs::get(&state.pool, project, InputKind::Dataset, name).await? {
            return Ok(Some(row));
        }
    }
    Ok(inputs::get(&state.pool, project, InputKind::Dataset, id).await?)
}

/// The form of `POST /v1/files`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = OpenAiUploadForm)]
pub struct UploadForm {
    /// `fine-tune`.
    purpose: String,
    /// The JSONL training file.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// Uploads a training file (`multipart/form-data` with `purpose` = `fine-tune` and `file`):
/// checked line by line and registered as a dataset.
#[utoipa::path(post, path = "/v1/files", tag = "openai", operation_id = "openai_create_file",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, body = FileObject), errors::BadRequest, errors::Unauthorized, errors::Conflict, errors::TooLarge))]
pub async fn create(
    State(state): State<ApiState>,
    caller: OaCaller,
    request: Request,
) -> Result<Json<FileObject>, OpenAiError> {
    caller.require(Scope::Submit)?;
    let max = state.settings.max_upload_bytes;
    let declared = crate::routes::inputs::content_length(request.headers());
    if declared.is_some_and(|n| n > max.saturating_add(FORM_OVERHEAD)) {
        return Err(uploads::too_large(max).into());
    }
    let mut form = Multipart::from_request(request, &state)
        .await
        .map_err(|e| OpenAiError::invalid("file", e.body_text()))?;
    let (mut purpose, mut staged) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        match field.name() {
            Some("purpose") => {
                let mut value = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                    value.extend_from_slice(&chunk);
                    if value.len() > MAX_FIELD_BYTES {
                        return Err(OpenAiError::invalid("purpose", "is too long"));
                    }
                }
                purpose = Some(String::from_utf8_lossy(&value).into_owned());
            }
            Some("file") if staged.is_none() => {
                let stem = uploads::name_stem(field.file_name().unwrap_or("file"));
                let body = Box::pin(field.map_err(|e| e.body_text()));
                let upload =
                    uploads::stage(&state.store, &caller.project, body, max, "file").await?;
                staged = Some((upload, stem));
            }
            Some("file") => return Err(OpenAiError::invalid("file", "give one file")),
            // Files never expire here; the setting is read and ignored.
            Some(name) if name.starts_with("expires_after") => {
                let mut read = 0;
                while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                    read += chunk.len();
                    if read > MAX_FIELD_BYTES {
                        return Err(OpenAiError::invalid("expires_after", "is too long"));
                    }
                }
            }
            other => {
                return Err(OpenAiError::invalid(
                    other.unwrap_or(""),
                    "unknown form field: send `purpose` and `file`",
                ))
            }
        }
    }
    // Dropping a staged upload discards it: any refusal below keeps nothing.
    match purpose.as_deref() {
        Some(FINE_TUNE) => {}
        Some(other) => {
            return Err(OpenAiError::invalid(
                "purpose",
                format!("{other:?} is not supported: files here are training data (\"fine-tune\")"),
            ))
        }
        None => {
            return Err(OpenAiError::invalid(
                "purpose",
                "is required (\"fine-tune\")",
            ))
        }
    }
    let Some((upload, stem)) = staged else {
        return Err(OpenAiError::invalid("file", "is required"));
    };
    let (row, _) = upload
        .register(
            &state.pool,
            &state.store,
            &caller.project,
            DatasetName::ByContent { stem },
        )
        .await?;
    Ok(Json(file_object(&state.store, &caller.project, row)))
}

fn bad_form(e: axum::extract::multipart::MultipartError) -> OpenAiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        OpenAiError::from(Error::TooLarge(e.body_text()))
    } else {
        OpenAiError::invalid("file", format!("malformed form: {}", e.body_text()))
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// Only files of this purpose (all are `fine-tune`).
    purpose: Option<String>,
    /// Default 10000, at most 10000.
    limit: Option<i64>,
    /// `desc` (newest first, the default) or `asc`.
    order: Option<String>,
    /// The last id of the previous page.
    after: Option<String>,
}

/// The project's datasets, as files.
#[utoipa::path(get, path = "/v1/files", tag = "openai", operation_id = "openai_list_files", params(FilesQuery),
    responses((status = 200, body = FileList), errors::BadRequest, errors::Unauthorized))]
pub async fn list(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaQuery(q): OaQuery<FilesQuery>,
) -> Result<Json<FileList>, OpenAiError> {
    caller.require(Scope::Read)?;
    let limit = page_limit(q.limit, 10_000, 10_000)?;
    let descending = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(OpenAiError::invalid("order", "must be asc or desc")),
    };
    let mut rows = if q.purpose.as_deref().is_none_or(|p| p == FINE_TUNE) {
        inputs::list(&state.pool, &caller.project, InputKind::Dataset).await?
    } else {
        Vec::new()
    };
    rows.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    if descending {
        rows.reverse();
    }
    if let Some(after) = &q.after {
        let at = rows
            .iter()
            .position(|r| file_id(&r.name) == *after || r.name == *after)
            .ok_or_else(|| OpenAiError::invalid("after", format!("no file {after:?}")))?;
        rows.drain(..=at);
    }
    rows.truncate(limit + 1);
    let files = rows
        .into_iter()
        .map(|row| file_object(&state.store, &caller.project, row))
        .collect();
    Ok(Json(ListPage::of(files, limit).into()))
}

#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "openai", operation_id = "openai_retrieve_file",
    params(("file_id" = String, Path)), responses((status = 200, body = FileObject), errors::Unauthorized, errors::NotFound))]
pub async fn retrieve(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
) -> Result<Json<FileObject>, OpenAiError> {
    caller.require(Scope::Read)?;
    let row = find_dataset(&state, &caller.project, &id)
        .await?
        .ok_or(Error::NotFound("file"))?;
    Ok(Json(file_object(&state.store, &caller.project, row)))
}

/// The file's bytes.
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "openai", operation_id = "openai_file_content",
    params(("file_id" = String, Path)),
    responses((status = 200, description = "the file", content_type = "application/octet-stream"), errors::Unauthorized, errors::NotFound))]
pub async fn content(
    State(state): State<ApiState>,
    caller: OaCaller,
    OaPath(id): OaPath<String>,
) -> Result<Response, OpenAiError> {
    caller.require(Scope::Read)?;
    let row = find_dataset(&state, &caller.project, &id)
        .await?
        .ok_or(Error::NotFound("file"))?;
    // A dataset registered by URI may have gone from there since.
    let gone = |e: StorageError| match e {
        StorageError::NotFound(_) => Error::NotFound("file content"),
        e => e.into(),
    };
    let (store, name) = Store::open_object(&row.uri).map_err(gone)?;
    let stream = store.get_stream(&name).await.map_err(gone)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, row.size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
