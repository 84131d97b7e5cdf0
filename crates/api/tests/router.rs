//! In-process router tests: every error path of the HTTP layer, authentication with static
//! tokens and JWTs (HS256, ES384), unknown and unreachable nodes. No node agent is involved; the
//! end-to-end tests with a real core0 live in the workspace's `tests/`.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use grid_api::config::{Config, JwtConfig, Scope, TokenConfig};
use grid_api::reconcile::nodes::NodesController;
use grid_api::server;
use grid_api::store::StateStore;
use grid_api::store::redb::RedbStore;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tower::ServiceExt;

const ADMIN: &str = "admin-secret";
const READ: &str = "read-secret";
const HS_SECRET: &str = "hs-secret-for-tests";
const JOIN: &str = "join-secret";
const JOIN2: &str = "other-join-secret";
const ES384_PRIVATE: &str = include_str!("fixtures/es384-private.pem");
const ES384_PUBLIC: &str = include_str!("fixtures/es384-public.pem");

struct Harness {
    app: Router,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(RedbStore::open(&dir.path().join("state.redb")).expect("open store"));
    let mut config = Config::new(dir.path());
    config.join_tokens = vec![JOIN.to_string(), JOIN2.to_string()];
    config.tokens = vec![
        TokenConfig {
            name: "admin".into(),
            token: ADMIN.into(),
            scope: Scope::Admin,
        },
        TokenConfig {
            name: "viewer".into(),
            token: READ.into(),
            scope: Scope::Read,
        },
    ];
    config.jwt = Some(JwtConfig {
        hs256_secret: Some(HS_SECRET.into()),
        es384_public_key_pem: Some(ES384_PUBLIC.into()),
        admin_scopes: vec!["grid:admin".into()],
        read_scopes: vec!["grid:read".into()],
    });
    let nodes = Arc::new(NodesController::new());
    let state = server::state(&config, store, nodes).expect("state");
    Harness {
        app: server::app(state),
        _dir: dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Harness {
    async fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some((ct, bytes)) => req
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(bytes))
                .expect("request"),
            None => req.body(Body::empty()).expect("request"),
        };
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Answer {
        self.send(Method::GET, uri, token, None).await
    }

    async fn post_json(&self, uri: &str, token: Option<&str>, body: Value) -> Answer {
        let bytes = serde_json::to_vec(&body).expect("json");
        self.send(Method::POST, uri, token, Some(("application/json", bytes)))
            .await
    }

    async fn join(&self, id: &str, redis_addr: &str) -> Answer {
        self.post_json(
            "/nodes/join",
            None,
            json!({"id": id, "hostname": format!("host-{id}"), "redisAddr": redis_addr,
                   "joinToken": JOIN}),
        )
        .await
    }
}

/// Asserts a JSON error answer with `status` whose message contains `needle`.
fn assert_error(a: &Answer, status: StatusCode, needle: &str) {
    assert_eq!(a.status, status, "body: {}", a.body);
    assert_eq!(
        a.headers[header::CONTENT_TYPE],
        "application/json",
        "errors are json"
    );
    let msg = a.body["error"].as_str().expect("error field");
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .expect("encode hs256")
}

fn es384(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES384),
        &claims,
        &EncodingKey::from_ec_pem(ES384_PRIVATE.as_bytes()).expect("fixture key"),
    )
    .expect("encode es384")
}

/// A localhost port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn health_and_docs_need_no_token() {
    let h = harness();
    let a = h.get("/health", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!({"status": "ok"}));
    let a = h.get("/openapi.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["info"]["title"], "Grid API");
    let a = h.get("/docs/", None).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_or_bad_token_is_401() {
    let h = harness();
    let a = h.get("/nodes", None).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "missing bearer token");
    assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer");
    let a = h.get("/nodes", Some("not-a-token")).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid token");
    // Unknown routes are not revealed without a token.
    let a = h.get("/nope", None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn read_token_may_only_read() {
    let h = harness();
    let a = h.get("/nodes", Some(READ)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!([]));
    let a = h
        .post_json("/nodes/n1/processes", Some(READ), json!({"name": "true"}))
        .await;
    assert_error(
        &a,
        StatusCode::FORBIDDEN,
        "token viewer has scope read; this request needs admin",
    );
}

#[tokio::test]
async fn jwts_hs256_and_es384_are_accepted_expired_is_not() {
    let h = harness();
    let exp = now() + 600;
    let t = hs256(json!({"sub": "alice", "exp": exp, "scope": "grid:admin"}));
    assert_eq!(h.get("/nodes", Some(&t)).await.status, StatusCode::OK);
    let t = es384(json!({"sub": "bob", "exp": exp, "scope": ["grid:read"]}));
    assert_eq!(h.get("/nodes", Some(&t)).await.status, StatusCode::OK);
    let a = h
        .post_json("/nodes/n1/processes", Some(&t), json!({"name": "true"}))
        .await;
    assert_error(&a, StatusCode::FORBIDDEN, "token bob has scope read");
    let t = hs256(json!({"exp": now() - 3600, "scope": "grid:admin"}));
    let a = h.get("/nodes", Some(&t)).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "expired");
    let t = es384(json!({"exp": now() - 3600, "scope": "grid:admin"}));
    assert_error(
        &h.get("/nodes", Some(&t)).await,
        StatusCode::UNAUTHORIZED,
        "expired",
    );
}

#[tokio::test]
async fn json_body_rejections_are_json() {
    let h = harness();
    let uri = "/nodes/n1/processes";
    let a = h
        .send(
            Method::POST,
            uri,
            Some(ADMIN),
            Some(("application/json", b"{".to_vec())),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "not valid json");
    let a = h
        .post_json(uri, Some(ADMIN), json!({"name": "ls", "bogus": 1}))
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "bogus");
    let a = h.post_json(uri, Some(ADMIN), json!({"name": 5})).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid type");
    let a = h
        .send(
            Method::POST,
            uri,
            Some(ADMIN),
            Some(("text/plain", b"{}".to_vec())),
        )
        .await;
    assert_error(&a, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json");
    let a = h.send(Method::POST, uri, Some(ADMIN), None).await;
    assert_error(&a, StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json");
    let mut big = b"{\"name\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend(b"\"}");
    let a = h
        .send(
            Method::POST,
            uri,
            Some(ADMIN),
            Some(("application/json", big)),
        )
        .await;
    assert_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "larger than");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_are_json() {
    let h = harness();
    let a = h.get("/nope/x", Some(ADMIN)).await;
    assert_error(&a, StatusCode::NOT_FOUND, "no route for GET /nope/x");
    let a = h.send(Method::PUT, "/nodes", Some(ADMIN), None).await;
    assert_error(
        &a,
        StatusCode::METHOD_NOT_ALLOWED,
        "method PUT is not allowed on /nodes",
    );
}

#[tokio::test]
async fn unknown_node_is_404_everywhere() {
    let h = harness();
    for uri in [
        "/nodes/ghost",
        "/nodes/ghost/mem",
        "/nodes/ghost/jobs",
        "/nodes/ghost/jobs/j1",
        "/nodes/ghost/jobs/j1/stream",
        "/nodes/ghost/processes",
        "/nodes/ghost/processes/12",
    ] {
        assert_error(
            &h.get(uri, Some(ADMIN)).await,
            StatusCode::NOT_FOUND,
            "ghost",
        );
    }
    let a = h
        .send(Method::POST, "/nodes/ghost/ping", Some(ADMIN), None)
        .await;
    assert_error(&a, StatusCode::NOT_FOUND, "node ghost not found");
    let a = h.get("/nodes/ghost/processes/abc", Some(ADMIN)).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "positive integer");
}

#[tokio::test]
async fn join_checks_its_token() {
    let h = harness();
    let a = h
        .post_json(
            "/nodes/join",
            None,
            json!({"id": "n1", "hostname": "h", "redisAddr": "127.0.0.1:1", "joinToken": "wrong"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    let a = h
        .post_json(
            "/nodes/join",
            None,
            json!({"id": "n1", "joinToken": JOIN, "extra": 1}),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "extra");
    let a = h.join("n1", "127.0.0.1:1").await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    // The same node joining again with its token is fine; another token may not take the id.
    assert_eq!(
        h.join("n1", "127.0.0.1:2").await.status,
        StatusCode::NO_CONTENT
    );
    let a = h
        .post_json(
            "/nodes/join",
            None,
            json!({"id": "n1", "hostname": "h", "redisAddr": "127.0.0.1:3", "joinToken": JOIN2}),
        )
        .await;
    assert_error(&a, StatusCode::CONFLICT, "another join token");
    let a = h
        .post_json(
            "/nodes/join",
            None,
            json!({"id": "bad/id", "hostname": "h", "redisAddr": "127.0.0.1:3", "joinToken": JOIN}),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "node id");
}

#[tokio::test]
async fn unreachable_node_pings_false_and_answers_503() {
    let h = harness();
    let addr = format!("127.0.0.1:{}", closed_port());
    let a = h.join("deadnode", &addr).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.body);
    let a = h.get("/nodes", Some(ADMIN)).await;
    assert_eq!(a.status, StatusCode::OK);
    let list = a.body.as_array().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], "deadnode");
    assert_eq!(list[0]["hostname"], "host-deadnode");
    assert!(
        list[0].get("redisAddr").is_none(),
        "no connection details to clients"
    );
    let a = h.get("/nodes/deadnode", Some(ADMIN)).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = h
        .send(Method::POST, "/nodes/deadnode/ping", Some(ADMIN), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!(false));
    let a = h.get("/nodes/deadnode/mem", Some(ADMIN)).await;
    assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "deadnode");
    let a = h
        .post_json(
            "/nodes/deadnode/processes",
            Some(ADMIN),
            json!({"name": "true"}),
        )
        .await;
    assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "deadnode");
    let a = h
        .post_json(
            "/nodes/deadnode/processes",
            Some(ADMIN),
            json!({"name": "true", "env": ["NOEQUALS"]}),
        )
        .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "NOEQUALS");
}
