//! The checked-in OpenAPI document (`openapi/grid.json`) is the one the code makes, and it
//! describes exactly the router's routes.
//!
//! Refresh it with `GRID_UPDATE_OPENAPI=1 cargo test -p grid-api --test openapi`.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use grid_api::config::{Config, Scope, TokenConfig};
use grid_api::http::{UNDOCUMENTED, route_table};
use grid_api::reconcile::nodes::NodesController;
use grid_api::store::StateStore;
use grid_api::store::redb::RedbStore;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use tower::ServiceExt;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/grid.json")
}

#[test]
fn checked_in_document_is_fresh() {
    let fresh = grid_api::openapi::pretty_json().expect("document serializes");
    let path = checked_in();
    if std::env::var_os("GRID_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &fresh).expect("write openapi/grid.json");
        return;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        old == fresh,
        "openapi/grid.json is stale; refresh it with:\n  \
         GRID_UPDATE_OPENAPI=1 cargo test -p grid-api --test openapi"
    );
}

fn documented() -> BTreeSet<(String, String)> {
    let doc = serde_json::to_value(grid_api::http::openapi()).expect("document json");
    let mut set = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                set.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    set
}

#[test]
fn document_paths_equal_the_route_table() {
    let table: BTreeSet<_> = route_table()
        .routes()
        .into_iter()
        .filter(|(_, p)| !UNDOCUMENTED.contains(&p.as_str()))
        .collect();
    assert_eq!(documented(), table);
    assert!(documented().contains(&(
        "GET".to_string(),
        "/nodes/{nodeid}/jobs/{jobid}/stream".to_string()
    )));
}

/// Every documented (method, path) reaches a handler of the real router: no `no route` 404
/// and no 405 from the fallbacks.
#[tokio::test]
async fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(RedbStore::open(&dir.path().join("state.redb")).expect("open store"));
    let mut config = Config::new(dir.path());
    config.tokens = vec![TokenConfig {
        name: "admin".into(),
        token: "t".into(),
        scope: Scope::Admin,
    }];
    let nodes = Arc::new(NodesController::new());
    let app = grid_api::server::app(grid_api::server::state(&config, store, nodes).expect("state"));
    for (method, path) in documented() {
        let uri = path
            .replace("{nodeid}", "ghost")
            .replace("{jobid}", "j1")
            .replace("{processid}", "12");
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("method"))
            .uri(&uri)
            .header("authorization", "Bearer t")
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {text}"
        );
        assert!(!text.contains("no route for"), "{method} {uri}: {text}");
    }
}
