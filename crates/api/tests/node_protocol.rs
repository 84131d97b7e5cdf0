//! The direct endpoints over a real redis-server, with the test playing the node: it consumes
//! `core:default` and answers with the core0 protocol by hand (flag, `stream:<id>` records,
//! `result:<id>`). This checks the API's side of the protocol (job lookup, archive, the SSE hub)
//! without core0; the end-to-end tests with the real agent live in the workspace's `tests/`.

use axum::Router;
use axum::body::{Body, BodyDataStream};
use axum::http::{Method, Request, StatusCode, header};
use futures::StreamExt;
use grid_api::config::{Config, Scope, TokenConfig};
use grid_api::reconcile::nodes::NodesController;
use grid_api::server;
use grid_api::store::StateStore;
use grid_api::store::redb::RedbStore;
use grid_proto::commands::{QUEUE_DEFAULT, flag_key, result_key, stream_key};
use grid_proto::wire::{StreamMessage, StreamRecord, level, meta};
use grid_proto::{Command, CommandResult, State};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const TOKEN: &str = "admin-token";
const JOIN: &str = "join-token";
const WAIT: Duration = Duration::from_secs(10);

/// A redis-server on a free port, killed on drop.
struct RedisServer {
    child: Child,
    addr: String,
}

impl RedisServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut child = std::process::Command::new("/usr/bin/redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let stdout = child.stdout.take().expect("stdout is piped");
        let server = Self {
            addr: format!("127.0.0.1:{port}"),
            child,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = ready_tx.send(());
                }
            }
        });
        assert!(
            ready_rx.recv_timeout(WAIT).is_ok(),
            "redis-server did not become ready"
        );
        server
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://{}/", self.addr)).expect("url");
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn result(cmd: &Command, state: State, data: Value) -> CommandResult {
    CommandResult {
        data: data.to_string(),
        level: level::RESULT_JSON,
        starttime: 1_700_000_000_000,
        ..CommandResult::bare(cmd, state)
    }
}

fn record(id: &str, lvl: u16, flags: u32, line: &str) -> String {
    serde_json::to_string(&StreamRecord {
        core: 0,
        command: id.to_string(),
        message: StreamMessage {
            message: line.to_string(),
            epoch: 0,
            meta: meta::pack(lvl, meta::STREAM | flags),
        },
    })
    .expect("record json")
}

/// Jobs of the played node that are still running, and what lets the slow one finish.
#[derive(Default)]
struct Played {
    running: std::sync::Mutex<Vec<Command>>,
    finish: tokio::sync::Notify,
    /// `process.list` calls for [`VANISHING`]: it exists for the first one only.
    vanishing_lookups: std::sync::atomic::AtomicUsize,
}

/// A process the node may not signal (EPERM).
const PROTECTED: i64 = 4242;
/// A process that ends between the API's lookup and its signal.
const VANISHING: i64 = 4343;

fn process(pid: i64) -> Value {
    json!([grid_proto::info::ProcessInfo {
        pid,
        name: "p".into(),
        ..Default::default()
    }])
}

/// Runs the `slow` process: one line, then the rest when the test says so.
async fn slow_job(client: redis::Client, played: Arc<Played>, cmd: Command) {
    // Its own connection: the node's loop blocks its connection in BLPOP.
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let id = cmd.id.clone();
    let _: () = conn
        .rpush(stream_key(&id), record(&id, level::STDOUT, 0, "hello"))
        .await
        .expect("stream");
    played.finish.notified().await;
    for rec in [
        record(&id, level::STDERR, 0, "oops"),
        record(&id, level::STDERR, meta::EXIT_ERROR, ""),
    ] {
        let _: () = conn.rpush(stream_key(&id), rec).await.expect("stream");
    }
    played.running.lock().expect("lock").retain(|c| c.id != id);
    let r = CommandResult {
        streams: Some(["hello\n".into(), "oops\n".into()]),
        code: Some(3),
        ..CommandResult::bare(&cmd, State::Error)
    };
    let text = serde_json::to_string(&r).expect("result json");
    let _: () = conn.rpush(result_key(&id), text).await.expect("result");
    let _: () = conn.expire(flag_key(&id), 300).await.expect("expire");
}

/// Plays the node: answers every command on `core:default` until the connection closes.
async fn play_node(client: redis::Client, played: Arc<Played>) {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect");
    loop {
        let got: Option<(String, String)> = match conn.blpop(QUEUE_DEFAULT, 0.0).await {
            Ok(v) => v,
            Err(_) => return,
        };
        let Some((_, text)) = got else { continue };
        let cmd: Command = serde_json::from_str(&text).expect("command json");
        let _: () = conn.rpush(flag_key(&cmd.id), "").await.expect("flag");
        let r = match cmd.command.as_str() {
            "core.ping" => result(&cmd, State::Success, json!("PONG test")),
            "info.mem" => result(
                &cmd,
                State::Success,
                serde_json::to_value(grid_proto::info::MemInfo {
                    total: 1 << 30,
                    ..Default::default()
                })
                .expect("mem"),
            ),
            "job.list" if cmd.arguments.get("id").is_some() => {
                let running = played.running.lock().expect("lock").clone();
                match running
                    .into_iter()
                    .find(|c| Some(&json!(c.id)) == cmd.arguments.get("id"))
                {
                    Some(c) => result(
                        &cmd,
                        State::Success,
                        json!([{"cpu": 0.0, "rss": 0, "vms": 0, "swap": 0, "debug": "",
                                "starttime": 1_700_000_000_000_i64, "cmd": c}]),
                    ),
                    None => result(&cmd, State::Error, json!("job not found")),
                }
            }
            "job.list" => result(&cmd, State::Success, json!([])),
            "job.kill" => result(&cmd, State::Success, json!(false)),
            "job.killall" => result(&cmd, State::Success, json!(true)),
            "process.list" if cmd.arguments["pid"] == PROTECTED => {
                result(&cmd, State::Success, process(PROTECTED))
            }
            "process.list" if cmd.arguments["pid"] == VANISHING => {
                let n = played
                    .vanishing_lookups
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n == 0 {
                    result(&cmd, State::Success, process(VANISHING))
                } else {
                    result(
                        &cmd,
                        State::Error,
                        json!(format!("process {VANISHING} not found")),
                    )
                }
            }
            "process.list" => result(&cmd, State::Error, json!("process not found")),
            "process.kill" if cmd.arguments["pid"] == PROTECTED => result(
                &cmd,
                State::Error,
                json!(format!("not permitted to signal process {PROTECTED}")),
            ),
            "process.kill" => result(
                &cmd,
                State::Error,
                json!(format!("process {} not found", cmd.arguments["pid"])),
            ),
            "core.system" if cmd.arguments["name"] == "slow" => {
                played.running.lock().expect("lock").push(cmd.clone());
                tokio::spawn(slow_job(client.clone(), played.clone(), cmd));
                continue;
            }
            "core.system" => {
                let id = &cmd.id;
                for rec in [
                    record(id, level::STDOUT, 0, "hello"),
                    record(id, level::STDERR, 0, "oops"),
                    record(id, level::STDOUT, meta::EXIT_SUCCESS, ""),
                ] {
                    let _: () = conn.rpush(stream_key(id), rec).await.expect("stream");
                }
                CommandResult {
                    streams: Some(["hello\n".into(), "oops\n".into()]),
                    code: Some(0),
                    level: 0,
                    data: String::new(),
                    ..result(&cmd, State::Success, Value::Null)
                }
            }
            _ => CommandResult::bare(&cmd, State::UnknownCmd),
        };
        let text = serde_json::to_string(&r).expect("result json");
        let _: () = conn.rpush(result_key(&cmd.id), text).await.expect("result");
        let _: () = conn.expire(flag_key(&cmd.id), 300).await.expect("expire");
    }
}

struct Harness {
    app: Router,
    state: grid_api::http::AppState,
    played: Arc<Played>,
    redis: RedisServer,
    node: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.node.abort();
    }
}

async fn harness() -> Harness {
    harness_with(|s| s).await
}

/// A harness whose app state `adjust` may change first.
async fn harness_with(
    adjust: impl FnOnce(grid_api::http::AppState) -> grid_api::http::AppState,
) -> Harness {
    let redis = RedisServer::start();
    let played = Arc::new(Played::default());
    let client = redis::Client::open(format!("redis://{}/", redis.addr)).expect("url");
    let node = tokio::spawn(play_node(client, played.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn StateStore> =
        Arc::new(RedbStore::open(&dir.path().join("state.redb")).expect("open store"));
    let mut config = Config::new(dir.path());
    config.join_tokens = vec![JOIN.into()];
    config.tokens = vec![TokenConfig {
        name: "admin".into(),
        token: TOKEN.into(),
        scope: Scope::Admin,
    }];
    let state =
        adjust(server::state(&config, store, Arc::new(NodesController::new())).expect("app state"));
    let h = Harness {
        app: server::app(state.clone()),
        state,
        played,
        redis,
        node,
        _dir: dir,
    };
    let (status, _, body) = h
        .send(
            Method::POST,
            "/nodes/join",
            Some(
                json!({"id": "n1", "hostname": "h1", "redisAddr": h.redis.addr,
                        "joinToken": JOIN}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    h
}

impl Harness {
    async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        let req = match body {
            Some(v) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = tokio::time::timeout(WAIT * 6, self.app.clone().oneshot(req))
            .await
            .expect("answer in time")
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = tokio::time::timeout(WAIT * 6, axum::body::to_bytes(resp.into_body(), 1 << 20))
            .await
            .expect("body in time")
            .expect("body");
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    async fn json(&self, method: Method, uri: &str) -> (StatusCode, Value) {
        let (status, _, text) = self.send(method, uri, None).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

impl Harness {
    /// Opens the SSE stream of job `id` and reads it until `until` appears in it.
    async fn open_stream(&self, id: &str, until: &str) -> (BodyDataStream, String) {
        let req = Request::builder()
            .uri(format!("/nodes/n1/jobs/{id}/stream"))
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body().into_data_stream();
        let mut text = String::new();
        while !text.contains(until) {
            text.push_str(&next_chunk(&mut body).await.expect("the stream goes on"));
        }
        (body, text)
    }

    /// Starts the `slow` job and returns its id.
    async fn start_slow(&self) -> String {
        let (status, _, text) = self
            .send(
                Method::POST,
                "/nodes/n1/processes",
                Some(json!({"name": "slow"})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
        serde_json::from_str::<Value>(&text).expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    /// Waits until `cond` holds, checking every 20 ms (the API has no notification for it).
    async fn eventually(&self, what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond().await {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The next data chunk of a body, `None` at its end.
async fn next_chunk(body: &mut BodyDataStream) -> Option<String> {
    let data = tokio::time::timeout(WAIT, body.next())
        .await
        .expect("a chunk in time")?
        .expect("body chunk");
    Some(String::from_utf8_lossy(&data).into_owned())
}

/// `(event, data)` pairs of an SSE body.
fn sse_events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d.to_string());
                } else if line == "data:" {
                    data.push(String::new());
                }
            }
            event.map(|e| (e, data.join("\n")))
        })
        .collect()
}

#[tokio::test]
async fn direct_calls_answer_from_the_node() {
    let h = harness().await;
    assert_eq!(
        h.json(Method::POST, "/nodes/n1/ping").await,
        (StatusCode::OK, json!(true))
    );
    let (status, mem) = h.json(Method::GET, "/nodes/n1/mem").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mem.as_object().expect("object").len(), 10);
    assert_eq!(mem["total"], 1 << 30);
    assert_eq!(
        h.json(Method::GET, "/nodes/n1/jobs").await,
        (StatusCode::OK, json!([]))
    );
    let (status, body) = h.json(Method::GET, "/nodes/n1/processes/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "process 999999 not found on node n1");
    let (status, body) = h.json(Method::GET, "/nodes/n1/jobs/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "job nope not found on node n1");
    let (status, body) = h.json(Method::DELETE, "/nodes/n1/jobs/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = h.json(Method::DELETE, "/nodes/n1/jobs").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = h.json(Method::GET, "/nodes/n1/jobs/nope/stream").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // A built-in the node does not know is not a client error.
    let (status, _) = h.json(Method::GET, "/nodes/n1/cpus").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn started_process_streams_and_is_kept_after_the_node_forgets_it() {
    let h = harness().await;
    let (status, headers, text) = h
        .send(
            Method::POST,
            "/nodes/n1/processes",
            Some(json!({"name": "echo", "args": ["hello"], "env": {"A": "1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let body: Value = serde_json::from_str(&text).expect("json");
    let id = body["id"].as_str().expect("job id").to_string();
    assert_eq!(
        headers[header::LOCATION].to_str().expect("ascii"),
        format!("/nodes/n1/jobs/{id}")
    );

    let (status, headers, text) = h
        .send(Method::GET, &format!("/nodes/n1/jobs/{id}/stream"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let expected = vec![
        ("stdout".to_string(), "hello".to_string()),
        ("stderr".to_string(), "oops".to_string()),
        (
            "exit".to_string(),
            r#"{"state":"success","code":0}"#.to_string(),
        ),
    ];
    assert_eq!(sse_events(&text), expected);

    let (status, job) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["state"], "success");
    assert_eq!(job["code"], 0);
    assert_eq!(job["stdout"], "hello\n");
    assert_eq!(job["name"], "core.system");

    // The node forgets the job (its 300 s TTL): the API still answers, and replays the stream.
    let mut conn = h.redis.conn().await;
    let _: () = conn
        .del(&[result_key(&id), flag_key(&id), stream_key(&id)])
        .await
        .expect("del");
    let (status, again) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
    assert_eq!((status, &again), (StatusCode::OK, &job));
    let (status, _, text) = h
        .send(Method::GET, &format!("/nodes/n1/jobs/{id}/stream"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sse_events(&text), expected);
}

#[tokio::test]
async fn one_reader_fans_out_to_late_subscribers() {
    let h = Arc::new(harness().await);
    let (status, _, text) = h
        .send(
            Method::POST,
            "/nodes/n1/processes",
            Some(json!({"name": "slow"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let id = serde_json::from_str::<Value>(&text).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (status, job) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["state"], "running");
    assert_eq!(job["startTime"], 1_700_000_000_000_i64);

    let uri = format!("/nodes/n1/jobs/{id}/stream");
    let first = {
        let (h, uri) = (h.clone(), uri.clone());
        tokio::spawn(async move { h.send(Method::GET, &uri, None).await })
    };
    // The first subscriber's reader takes "hello" off the node's list.
    let mut conn = h.redis.conn().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let len: i64 = conn.llen(stream_key(&id)).await.expect("llen");
        let exists: bool = conn.exists(stream_key(&id)).await.expect("exists");
        if len == 0 && !exists {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream never consumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = {
        let (h, uri) = (h.clone(), uri.clone());
        tokio::spawn(async move { h.send(Method::GET, &uri, None).await })
    };
    // Let the second request subscribe before the job ends; then finish it.
    let (status, job) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
    assert_eq!(
        (status, job["state"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    h.played.finish.notify_one();
    let expected = vec![
        ("stdout".to_string(), "hello".to_string()),
        ("stderr".to_string(), "oops".to_string()),
        (
            "exit".to_string(),
            r#"{"state":"error","code":3}"#.to_string(),
        ),
    ];
    for task in [first, second] {
        let (status, _, text) = task.await.expect("request task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sse_events(&text), expected);
    }
}

#[tokio::test]
async fn refused_signals_answer_404_or_409_not_500() {
    let h = harness().await;
    let signal = json!({"signal": 15});
    let (status, _, body) = h
        .send(
            Method::POST,
            &format!("/nodes/n1/processes/{PROTECTED}"),
            Some(signal.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("not permitted to send signal 15"), "{body}");
    let (status, body) = h
        .json(Method::DELETE, &format!("/nodes/n1/processes/{PROTECTED}"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // Found by the lookup, gone by the signal.
    let (status, body) = h
        .json(Method::DELETE, &format!("/nodes/n1/processes/{VANISHING}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        body["error"],
        format!("process {VANISHING} not found on node n1")
    );
}

#[tokio::test]
async fn looking_a_finished_job_up_again_writes_nothing() {
    let h = harness().await;
    let (status, _, text) = h
        .send(
            Method::POST,
            "/nodes/n1/processes",
            Some(json!({"name": "echo"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    let id = serde_json::from_str::<Value>(&text).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let key = grid_api::archive::key("n1", &id);
    h.eventually("the result is archived", async || {
        h.state.store.get(&key).await.expect("get").is_some()
    })
    .await;
    let revision = h.state.store.current_revision().await.expect("revision");
    for _ in 0..3 {
        let (status, job) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
        assert_eq!(
            (status, job["state"].as_str()),
            (StatusCode::OK, Some("success"))
        );
        let (status, _, _) = h
            .send(Method::GET, &format!("/nodes/n1/jobs/{id}/stream"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        h.state.store.current_revision().await.expect("revision"),
        revision,
        "a lookup wrote to the store"
    );
}

#[tokio::test]
async fn a_reader_nobody_listens_to_stops_and_a_late_subscriber_gets_the_result() {
    let h = harness_with(|mut s| {
        s.streams = s
            .streams
            .with_timing(Duration::from_millis(100), Duration::from_millis(200));
        s
    })
    .await;
    let id = h.start_slow().await;
    let (body, _) = h.open_stream(&id, "hello").await;
    assert!(h.state.streams.is_reading("n1", &id));
    // The only subscriber hangs up: the reader stops although the job runs on.
    drop(body);
    h.eventually("the reader stops", async || {
        !h.state.streams.is_reading("n1", &id)
    })
    .await;
    let (status, job) = h.json(Method::GET, &format!("/nodes/n1/jobs/{id}")).await;
    assert_eq!(
        (status, job["state"].as_str()),
        (StatusCode::OK, Some("running"))
    );

    // The job ends; a new subscriber gets all of it from the result.
    h.played.finish.notify_one();
    let mut conn = h.redis.conn().await;
    h.eventually("the job has its result", async || {
        conn.exists(result_key(&id)).await.expect("exists")
    })
    .await;
    let (status, _, text) = h
        .send(Method::GET, &format!("/nodes/n1/jobs/{id}/stream"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sse_events(&text),
        vec![
            ("stdout".to_string(), "hello".to_string()),
            ("stderr".to_string(), "oops".to_string()),
            (
                "exit".to_string(),
                r#"{"state":"error","code":3}"#.to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let h = harness().await;
    let id = h.start_slow().await;
    let (mut body, mut text) = h.open_stream(&id, "hello").await;
    h.state.shutdown.trigger();
    while let Some(chunk) = next_chunk(&mut body).await {
        text.push_str(&chunk);
    }
    let events = sse_events(&text);
    assert_eq!(
        events.last(),
        Some(&(
            "error".to_string(),
            r#"{"error":"grid-api is shutting down"}"#.to_string()
        )),
        "{text}"
    );
    h.played.finish.notify_one();
}
