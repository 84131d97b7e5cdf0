//! Every error case of DECISIONS.md against the real grid-api binary with a real node: the right
//! status and always a JSON body `{"error": "..."}`.

use grid_tests::{Api, ApiOpts, Core0, Core0Opts, Grid};
use serde_json::json;
use std::time::Duration;

fn assert_error(r: &grid_tests::Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    let ctype = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ctype.starts_with("application/json"),
        "{status}: content-type {ctype}"
    );
    assert!(
        r.json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}: body {}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn error_cases_answer_their_status_with_a_json_body() {
    let api = Api::start(ApiOpts {
        config_toml: Some(
            "[[tokens]]\nname = \"viewer\"\ntoken = \"read-only-token\"\nscope = \"read\"\n".into(),
        ),
        ..ApiOpts::default()
    })
    .expect("api");
    let node = Core0::start(Core0Opts {
        join: Some((api.url.clone(), api.join_token.clone())),
        ..Core0Opts::default()
    })
    .expect("core0");
    let grid = Grid {
        api,
        nodes: vec![node],
    };
    grid.wait_status(&grid.nodes[0].node_id, "running", Duration::from_secs(20))
        .await
        .expect("node running");
    let http = grid.api.client();
    let node = grid.node_path(0);
    let procs = format!("{}{node}/processes", http.base);

    // Bad JSON, unknown field, wrong type, wrong content type.
    let raw = |body: &'static str, ctype: &'static str| {
        http.inner
            .post(&procs)
            .bearer_auth(&grid.api.token)
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let r = grid_tests::Http::read(raw("{not json", "application/json").await.expect("send"))
        .await
        .expect("read");
    assert_error(&r, 400);
    let r = http
        .post(
            &format!("{node}/processes"),
            json!({"name": "true", "bogus": 1}),
        )
        .await
        .expect("send");
    assert_error(&r, 400);
    assert!(
        r.json["error"].as_str().unwrap_or("").contains("bogus"),
        "{}",
        r.text
    );
    let r = http
        .post(&format!("{node}/processes"), json!({"name": 5}))
        .await
        .expect("send");
    assert_error(&r, 400);
    let r = grid_tests::Http::read(raw("name=true", "text/plain").await.expect("send"))
        .await
        .expect("read");
    assert_error(&r, 415);

    // Unknown node, job, pid; unknown route; wrong method.
    assert_error(&http.get("/nodes/nosuchnode/mem").await.expect("send"), 404);
    assert_error(
        &http
            .get(&format!("{node}/jobs/nosuchjob"))
            .await
            .expect("send"),
        404,
    );
    assert_error(
        &http
            .get(&format!("{node}/processes/999999999"))
            .await
            .expect("send"),
        404,
    );
    assert_error(
        &http
            .get(&format!("{node}/processes/notapid"))
            .await
            .expect("send"),
        400,
    );
    assert_error(&http.get("/no/such/route").await.expect("send"), 404);
    assert_error(
        &http.delete(&format!("{node}/mem")).await.expect("send"),
        405,
    );

    // No token, bad token, read-only token on a write (and allowed on a read).
    let anon = http.with_token(None);
    assert_error(&anon.get("/nodes").await.expect("send"), 401);
    assert_error(
        &http
            .with_token(Some("wrong"))
            .get("/nodes")
            .await
            .expect("send"),
        401,
    );
    let viewer = http.with_token(Some("read-only-token"));
    assert_eq!(viewer.get("/nodes").await.expect("send").status, 200);
    assert_error(
        &viewer
            .post_empty(&format!("{node}/reboot"))
            .await
            .expect("send"),
        403,
    );
    assert_error(
        &viewer
            .post(&format!("{node}/processes"), json!({"name": "true"}))
            .await
            .expect("send"),
        403,
    );
    // Health and docs need no token.
    assert_eq!(anon.get("/health").await.expect("send").status, 200);
    let doc = anon.get("/openapi.json").await.expect("send");
    assert_eq!(doc.status, 200);
    assert!(doc.json["paths"]["/nodes/{nodeid}/mem"].is_object());
    let docs = anon.get("/docs/").await.expect("send");
    assert_eq!(docs.status, 200);
    assert!(
        !docs.text.contains("cdn."),
        "docs assets are served locally"
    );
}
