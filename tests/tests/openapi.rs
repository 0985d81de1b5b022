//! The OpenAPI document is generated from the code and snapshot-tested, so any change
//! to the API shows up in review as a diff of `tests/snapshots/openapi.json`.
//! Refresh it with `UPDATE_SNAPSHOTS=1 make test` after an intended change.

mod common;

use common::TestApp;
use serde_json::Value;

#[tokio::test]
async fn openapi_document_matches_the_snapshot() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let (code, doc) = app.get_json("/openapi.json").await?;
    assert_eq!(code, 200);
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}/events",
        "/v1/adapters/{name}/resolve",
        "/v1/worker/jobs/{id}/complete",
    ] {
        assert!(paths.contains_key(path), "{path} missing from the document");
    }
    assert!(doc["components"]["schemas"]["JobSpec"].is_object());
    // Generated clients (the web UI's, web/scripts/gen-api.mjs) need each operation named once.
    let mut operation_ids = std::collections::BTreeMap::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            if let Some(other) = operation_ids.insert(id.clone(), format!("{method} {path}")) {
                panic!("operationId {id:?} of {method} {path} is also {other}'s");
            }
        }
    }
    // Every schema a route refers to is in the document (a response type's own schema is not
    // collected by itself: one missing from `components` leaves a dangling reference).
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(
            schemas.contains_key(name),
            "{name} is referred to but not in components"
        );
    }
    let rendered = serde_json::to_string_pretty(&doc)? + "\n";
    let snapshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/openapi.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&snapshot, &rendered)?;
    }
    let expected = std::fs::read_to_string(&snapshot).unwrap_or_default();
    let expected: Value = serde_json::from_str(&expected).unwrap_or(Value::Null);
    assert!(
        expected == doc,
        "the API changed: review the difference, then run with UPDATE_SNAPSHOTS=1 to accept it ({})",
        snapshot.display()
    );
    app.stop().await
}
