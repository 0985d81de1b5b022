//! The web UI (`web/`, built by Vite): `index.html` at `/` and its content-hashed files
//! under `/assets/`, read from the directory the settings name (`LORAFORGE_WEB_DIR`). Same
//! origin as the API, so it needs no CORS and calls only the public routes. The UI routes
//! in the URL's fragment (`/#/jobs/…`), so every other path stays the API's: an unknown one
//! is still a problem+json 404.

use crate::ApiState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::path::PathBuf;

/// The page may load only its own scripts and styles and talk only to this origin. Inline
/// styles are allowed: the chart library positions its elements with them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
}

fn web_dir(state: &ApiState) -> Option<&PathBuf> {
    state.settings.web_dir.as_ref()
}

async fn index(State(state): State<ApiState>) -> Response {
    let page = match web_dir(&state) {
        Some(dir) => tokio::fs::read(dir.join("index.html")).await.ok(),
        None => None,
    };
    let Some(page) = page else {
        // Served as HTML: whoever asks for `/` is most likely a person with a browser.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!doctype html><title>loraforge</title><p>The web UI is not built: run \
             <code>npm ci &amp;&amp; npm run build</code> in <code>web/</code> \
             (<code>make quickstart</code> does), or point <code>LORAFORGE_WEB_DIR</code> at a build.",
        )
            .into_response();
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page names the current hashed assets: always revalidate it.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        page,
    )
        .into_response()
}

/// One built file; its name carries its content hash, so it may be cached for good. A
/// precompressed `<file>.gz` beside it is sent to clients that accept gzip.
async fn asset(
    State(state): State<ApiState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (Some(dir), Some(content_type)) = (web_dir(&state), content_type(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = dir.join("assets").join(&file);
    let compressed = if accepts_gzip(&headers) {
        tokio::fs::read(path.with_file_name(format!("{file}.gz")))
            .await
            .ok()
    } else {
        None
    };
    let encoded = compressed.is_some();
    let body = match compressed {
        Some(body) => body,
        None => match tokio::fs::read(&path).await {
            Ok(body) => body,
            Err(_) => return StatusCode::NOT_FOUND.into_response(),
        },
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::VARY, "accept-encoding"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    if encoded {
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// The content type of a file the build emits; `None` for any other name, including
/// anything that could leave the directory (the name is a single path segment already).
fn content_type(file: &str) -> Option<&'static str> {
    let plain = !file.starts_with('.')
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain {
        return None;
    }
    Some(match file.rsplit_once('.')?.1 {
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "woff2" => "font/woff2",
        "json" | "map" => "application/json",
        _ => return None,
    })
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            // `gzip;q=0` refuses it.
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::{accepts_gzip, content_type};
    use axum::http::{header, HeaderMap, HeaderValue};

    #[test]
    fn only_built_file_names_are_served() {
        assert_eq!(
            content_type("index-3f2a.js"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(content_type("app.css"), Some("text/css; charset=utf-8"));
        for refused in [
            "..", "../x.js", ".env.js", "x.js.gz", "a b.js", "x", "x.html",
        ] {
            assert_eq!(content_type(refused), None, "{refused}");
        }
    }

    #[test]
    fn gzip_is_sent_only_when_accepted() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br"));
        assert!(with("br;q=1.0, GZIP;q=0.5"));
        assert!(!with("br, gzip;q=0"));
        assert!(!with("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
