//! In-process router tests of the container endpoints: validation (400 naming the problem),
//! unknown node (404), duplicate name (409), the list and get shapes, the answers for a container
//! that is not running, and a failed create through the real reconciler (the node cannot be
//! reached: 503 and no record left). No node agent is involved; the end-to-end tests with a real
//! core0 live in the workspace's `tests/tests/containers.rs`.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use grid_api::config::{Config, Scope, TokenConfig};
use grid_api::reconcile::containers::{self as ctrs, ContainerSpec, ContainersController, KIND};
use grid_api::reconcile::nodes::{self as registry, NodesController};
use grid_api::reconcile::{self, Controller, Observed, Reconciler, ReconcilerHandle};
use grid_api::server;
use grid_api::store::StateStore;
use grid_api::store::redb::RedbStore;
use grid_proto::api::{ContainerStatus, CreateContainer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const ADMIN: &str = "admin-secret";
const NODE: &str = "node1";

struct Harness {
    app: Router,
    store: Arc<dyn StateStore>,
    _reconciler: Option<ReconcilerHandle>,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    body: Value,
}

/// A server whose node `node1` is registered at an address nobody listens on; with
/// `reconcile`, the container controller runs too.
async fn harness(reconcile: bool) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(RedbStore::open(&dir.path().join("state.redb")).expect("open store"));
    let mut config = Config::new(dir.path());
    config.tokens = vec![TokenConfig {
        name: "admin".into(),
        token: ADMIN.into(),
        scope: Scope::Admin,
    }];
    // A port that was free a moment ago: connections are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    registry::register_node(
        store.as_ref(),
        registry::NodeSpec {
            id: NODE.into(),
            hostname: "h".into(),
            redis_addr: dead.to_string(),
            redis_password: String::new(),
            instance_id: String::new(),
            source: registry::NodeSource::Config,
            token_hash: None,
        },
    )
    .await
    .expect("register node");
    let nodes = Arc::new(NodesController::new());
    let reconciler = reconcile.then(|| {
        let c: Arc<dyn Controller> =
            Arc::new(ContainersController::new(store.clone(), nodes.clone()));
        Reconciler::new(store.clone(), vec![c]).spawn()
    });
    let state = server::state(&config, store.clone(), nodes).expect("state");
    Harness {
        app: server::app(state),
        store,
        _reconciler: reconciler,
        _dir: dir,
    }
}

impl Harness {
    async fn send(&self, method: Method, uri: &str, body: Option<Value>) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"));
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&b).expect("json")))
                .expect("request"),
            None => req.body(Body::empty()).expect("request"),
        };
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer { status, body }
    }

    /// Writes a container record directly, optionally with an observed outcome.
    async fn put_container(&self, name: &str, observed: Option<Value>) {
        let create: CreateContainer = serde_json::from_value(json!({
            "id": name, "hostname": name, "flist": "http://h/i.tar.gz",
            "nics": [{"type": "default"}]
        }))
        .expect("create body");
        let spec = ContainerSpec {
            node: NODE.into(),
            create,
            status: ContainerStatus::Running,
        };
        let rname = ctrs::record_name(NODE, name);
        let generation = reconcile::write_desired(
            self.store.as_ref(),
            KIND,
            &rname,
            serde_json::to_value(&spec).expect("spec"),
        )
        .await
        .expect("write desired");
        if let Some(data) = observed {
            let mut o = Observed::new("running", data);
            o.observed_generation = generation;
            grid_api::store::put_json(
                self.store.as_ref(),
                &reconcile::observed_key(KIND, &rname),
                &o,
            )
            .await
            .expect("put observed");
        }
    }

    /// Marks the node running, as its controller would.
    async fn node_running(&self) {
        let d = reconcile::get_desired(self.store.as_ref(), registry::KIND, NODE)
            .await
            .expect("read")
            .expect("node record");
        let mut o = Observed::new(registry::STATUS_RUNNING, json!({}));
        o.observed_generation = d.value.generation;
        grid_api::store::put_json(
            self.store.as_ref(),
            &reconcile::observed_key(registry::KIND, NODE),
            &o,
        )
        .await
        .expect("put observed");
    }
}

fn seed_body(name: &str) -> Value {
    json!({"id": name, "hostname": name, "flist": "http://h/busybox.tar.gz",
        "hostNetworking": false, "filesystems": [], "initprocesses": [], "ports": [],
        "nics": [{"type": "default"}]})
}

fn assert_error(a: &Answer, status: StatusCode, needle: &str) {
    assert_eq!(a.status, status, "body: {}", a.body);
    let msg = a.body["error"].as_str().expect("error field");
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
}

#[tokio::test]
async fn create_refuses_invalid_bodies_naming_the_problem() {
    let h = harness(false).await;
    let uri = format!("/nodes/{NODE}/containers");
    let with = |patch: Value| {
        let mut b = seed_body("c1");
        for (k, v) in patch.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let cases = [
        (
            with(json!({"nics": [{"type": "vlan", "id": "3"}]})),
            "nic type \"vlan\" is not supported",
        ),
        (
            with(json!({"nics": [{"type": "zerotier", "id": "x"}]})),
            "\"default\"",
        ),
        (with(json!({"ports": ["80:http"]})), "port \"80:http\""),
        (
            with(json!({"ports": ["80:80/sctp"]})),
            "port \"80:80/sctp\"",
        ),
        (with(json!({"flist": ""})), "flist must not be empty"),
        (with(json!({"flist": "gopher://x"})), "flist"),
        (with(json!({"id": "bad name"})), "container id"),
        (with(json!({"bogus": 1})), "bogus"),
        (
            with(json!({"nics": [{"type": "default", "extra": 1}]})),
            "extra",
        ),
    ];
    for (body, needle) in cases {
        let a = h.send(Method::POST, &uri, Some(body.clone())).await;
        assert_error(&a, StatusCode::BAD_REQUEST, needle);
    }
    let mut no_flist = seed_body("c1");
    no_flist.as_object_mut().expect("object").remove("flist");
    let a = h.send(Method::POST, &uri, Some(no_flist)).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "flist");
    // Nothing was written.
    let list = h.send(Method::GET, &uri, None).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body, json!([]));
}

#[tokio::test]
async fn unknown_node_is_404_and_duplicate_name_is_409() {
    let h = harness(false).await;
    let a = h
        .send(
            Method::POST,
            "/nodes/nope/containers",
            Some(seed_body("c1")),
        )
        .await;
    assert_error(&a, StatusCode::NOT_FOUND, "node nope not found");
    let a = h.send(Method::GET, "/nodes/nope/containers", None).await;
    assert_error(&a, StatusCode::NOT_FOUND, "node nope not found");

    h.put_container("vfw_21", None).await;
    let a = h
        .send(
            Method::POST,
            &format!("/nodes/{NODE}/containers"),
            Some(seed_body("vfw_21")),
        )
        .await;
    assert_error(&a, StatusCode::CONFLICT, "container vfw_21 already exists");
    let a = h
        .send(
            Method::GET,
            &format!("/nodes/{NODE}/containers/other"),
            None,
        )
        .await;
    assert_error(&a, StatusCode::NOT_FOUND, "container other not found");
}

#[tokio::test]
async fn list_and_get_have_the_seed_shapes() {
    let h = harness(false).await;
    h.put_container(
        "vfw_21",
        Some(json!({"containerId": 7, "status": "running", "ip": "172.18.0.5"})),
    )
    .await;
    let a = h
        .send(Method::GET, &format!("/nodes/{NODE}/containers"), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!([{"flist": "http://h/i.tar.gz", "hostname": "vfw_21", "id": "vfw_21",
            "status": "running"}])
    );
    let a = h
        .send(
            Method::GET,
            &format!("/nodes/{NODE}/containers/vfw_21"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["containerId"], 7);
    assert_eq!(a.body["status"], "running");
    assert_eq!(a.body["initprocesses"], json!([]));
    assert_eq!(
        a.body["nics"],
        json!([{"type": "default", "id": "", "status": "up"}])
    );
    assert_eq!(a.body["hostNetworking"], false);
    assert_eq!(a.body["ip"], "172.18.0.5");
}

#[tokio::test]
async fn a_container_that_is_not_running_answers_409_and_ping_false() {
    let h = harness(false).await;
    h.node_running().await;
    h.put_container("c1", None).await;
    let base = format!("/nodes/{NODE}/containers/c1");
    for (method, path) in [
        (Method::GET, "/jobs"),
        (Method::GET, "/processes"),
        (Method::GET, "/state"),
        (Method::GET, "/info"),
        (Method::GET, "/filesystem?path=/etc/hostname"),
    ] {
        let a = h.send(method, &format!("{base}{path}"), None).await;
        assert_error(&a, StatusCode::CONFLICT, "is not running");
    }
    let a = h.send(Method::POST, &format!("{base}/ping"), None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!(false));
    // The desired status is already running.
    let a = h.send(Method::POST, &format!("{base}/start"), None).await;
    assert_error(&a, StatusCode::CONFLICT, "already running");
    // A path is required before anything else.
    let a = h
        .send(Method::GET, &format!("{base}/filesystem"), None)
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "path");
    let a = h
        .send(Method::DELETE, &format!("{base}/filesystem"), None)
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "path");
}

#[tokio::test]
async fn a_failed_create_answers_the_node_error_and_leaves_no_record() {
    let h = harness(true).await;
    let a = tokio::time::timeout(
        Duration::from_secs(60),
        h.send(
            Method::POST,
            &format!("/nodes/{NODE}/containers"),
            Some(seed_body("c1")),
        ),
    )
    .await
    .expect("the create answers");
    assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "unreachable");
    assert!(
        reconcile::get_desired(h.store.as_ref(), KIND, &ctrs::record_name(NODE, "c1"))
            .await
            .expect("read")
            .is_none(),
        "a failed create leaves no desired record"
    );
    let a = h
        .send(Method::GET, &format!("/nodes/{NODE}/containers"), None)
        .await;
    assert_eq!(a.body, json!([]));
}
