//! Tests' stand-in for a Kubernetes API server: kube's `tower-test` mock, as kube-rs
//! recommends. The test answers each request the code under test makes, in order, and
//! checks it.

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

pub type ApiServer = Handle<Request<Body>, Response<Body>>;

/// A client whose requests the returned handle answers.
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers the next request: asserts its method and path, returns its query and JSON body
/// for more checks.
pub async fn expect(
    server: &mut ApiServer,
    method: Method,
    path: &str,
    answer: (u16, Value),
) -> (String, Value) {
    let (request, respond) = server.next_request().await.expect("a request");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path(), path);
    let query = request.uri().query().unwrap_or_default().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    respond.send_response(
        Response::builder()
            .status(answer.0)
            .body(Body::from(serde_json::to_vec(&answer.1).unwrap()))
            .unwrap(),
    );
    (query, body)
}

/// A failure as the API server words it.
pub fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
    )
}

pub fn not_found() -> (u16, Value) {
    status(404, "NotFound")
}
