//! Node controller tests against a real redis-server (no core0: the tests either leave the queue
//! alone or consume it by hand).

use super::*;
use crate::reconcile::{Reconciler, WaitError, get_observed, observed_key, wait_observed};
use crate::store::WatchEventKind;
use crate::store::redb::RedbStore;
use futures::StreamExt;
use grid_proto::commands::{QUEUE_DEFAULT, flag_key, result_key};
use grid_proto::{Command, CommandResult, State};
use redis::AsyncCommands;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Instant;

/// Longest wait for something that must happen.
const WAIT: Duration = Duration::from_secs(10);

const PASSWORD: &str = "s3cret pass";

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
            .args(["--requirepass", PASSWORD])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let stdout = child.stdout.take().expect("stdout is piped");
        // From here on the guard kills the server, even when the test fails.
        let server = Self {
            addr: format!("127.0.0.1:{port}"),
            child,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // Waits for the readiness line, then keeps draining so redis never blocks on its log;
        // ends when redis exits.
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

    async fn conn(&self, response_timeout: Option<Duration>) -> redis::aio::MultiplexedConnection {
        let url = format!("redis://:s3cret%20pass@{}/", self.addr);
        let client = redis::Client::open(url).expect("redis url");
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(response_timeout);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plays core0 by hand: takes commands off `core:default`, flags them and answers `core.ping`
/// and `info.os`.
async fn serve_by_hand(mut conn: redis::aio::MultiplexedConnection) {
    loop {
        let (_, text): (String, String) = redis::cmd("BLPOP")
            .arg(QUEUE_DEFAULT)
            .arg(0)
            .query_async(&mut conn)
            .await
            .expect("blpop");
        let cmd: Command = serde_json::from_str(&text).expect("a command");
        let _: i64 = conn.rpush(flag_key(&cmd.id), "").await.expect("flag");
        let (state, data) = match cmd.command.as_str() {
            "core.ping" => (State::Success, "\"PONG test\"".to_string()),
            "info.os" => (
                State::Success,
                json!({"hostname": "hand-host", "instanceId": "inst-1"}).to_string(),
            ),
            _ => (State::UnknownCmd, String::new()),
        };
        let result = CommandResult {
            data,
            level: 20,
            ..CommandResult::bare(&cmd, state)
        };
        let body = serde_json::to_string(&result).expect("encode result");
        let _: i64 = conn.rpush(result_key(&cmd.id), body).await.expect("result");
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    redis: RedisServer,
    store: Arc<dyn StateStore>,
    nodes: Arc<NodesController>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(&dir.path().join("s.redb")).expect("open store");
    Setup {
        _dir: dir,
        redis: RedisServer::start(),
        store: Arc::new(store),
        nodes: Arc::new(NodesController::new()),
    }
}

impl Setup {
    fn spec(&self, id: &str) -> NodeSpec {
        NodeSpec {
            id: id.to_string(),
            hostname: "registered-host".into(),
            redis_addr: self.redis.addr.clone(),
            redis_password: PASSWORD.into(),
            instance_id: String::new(),
            source: NodeSource::Config,
            token_hash: None,
        }
    }

    fn spawn(&self) -> crate::reconcile::ReconcilerHandle {
        Reconciler::new(self.store.clone(), vec![self.nodes.clone()]).spawn()
    }

    /// Waits until the observed status of `id` is `status`.
    async fn wait_status(&self, id: &str, status: &str) -> Observed {
        let key = observed_key(KIND, id);
        let wait = async {
            let snap = self.store.snapshot(&key).await.expect("snapshot");
            if let Some(kv) = snap.kvs.iter().find(|kv| kv.key == key) {
                let o = decode_json::<Observed>(kv).expect("observed").value;
                if o.status == status {
                    return o;
                }
            }
            let mut w = self.store.watch(&key, snap.revision).await.expect("watch");
            while let Some(ev) = w.next().await {
                let ev = ev.expect("watch event");
                if ev.kv.key == key && ev.kind == WatchEventKind::Put {
                    let o = decode_json::<Observed>(&ev.kv).expect("observed").value;
                    if o.status == status {
                        return o;
                    }
                }
            }
            panic!("watch ended");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("{id} never became {status}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_agent_is_halted_and_its_ping_withdrawn() {
    let s = setup();
    let generation = register_node(&*s.store, s.spec("n1"))
        .await
        .expect("register");
    let started = Instant::now();
    let handle = s.spawn();
    match wait_observed(&*s.store, KIND, "n1", generation, WAIT).await {
        Err(WaitError::Failed(msg)) => assert!(msg.contains("did not pick up"), "{msg}"),
        other => panic!("expected the node to be halted, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let o = get_observed(&*s.store, KIND, "n1")
        .await
        .expect("get")
        .expect("observed");
    assert_eq!(o.status, STATUS_HALTED);
    let view = get_node(&*s.store, "n1").await.expect("get").expect("node");
    assert_eq!(view.status, NodeStatus::Halted);
    assert_eq!(view.hostname, "registered-host");
    // The Redis connection itself is fine, so the controller keeps it for handlers.
    assert!(s.nodes.client("n1").is_some());

    // Stop the loop (in-flight checks finish and withdraw their ping): nothing is left queued.
    handle.shutdown().await;
    let mut conn = s.redis.conn(Some(Duration::from_secs(5))).await;
    let queued: i64 = conn.llen(QUEUE_DEFAULT).await.expect("llen");
    assert_eq!(
        queued, 0,
        "a ping nobody took must be removed from the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_answering_by_hand_is_running_then_halted_when_it_stops() {
    let s = setup();
    let consumer = tokio::spawn(serve_by_hand(s.redis.conn(None).await));
    let generation = register_node(&*s.store, s.spec("n2"))
        .await
        .expect("register");
    let handle = s.spawn();
    let o = wait_observed(&*s.store, KIND, "n2", generation, WAIT)
        .await
        .expect("node answers");
    assert_eq!(o.status, STATUS_RUNNING);
    assert_eq!(
        o.data,
        json!({"hostname": "hand-host", "instanceId": "inst-1"})
    );
    let view = get_node(&*s.store, "n2").await.expect("get").expect("node");
    assert_eq!(
        view,
        NodeView {
            id: "n2".into(),
            hostname: "hand-host".into(),
            status: NodeStatus::Running,
            instance_id: "inst-1".into(),
            redis_addr: s.redis.addr.clone(),
        }
    );
    let nodes = list_nodes(&*s.store).await.expect("list");
    assert_eq!(nodes, vec![view]);
    // Handlers reuse the controller's connection.
    let client = s.nodes.client("n2").expect("client");
    let pong = client
        .call_json::<String>(CORE_PING, json!({}), Duration::from_secs(5))
        .await
        .expect("ping through the shared client");
    assert_eq!(pong, "PONG test");

    // The agent goes away: two missed checks later the node is halted.
    consumer.abort();
    let _ = consumer.await;
    let stopped = Instant::now();
    let o = s.wait_status("n2", STATUS_HALTED).await;
    assert!(o.error.is_some());
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    let view = get_node(&*s.store, "n2").await.expect("get").expect("node");
    assert_eq!(view.status, NodeStatus::Halted);
    // What was learnt stays shown.
    assert_eq!(view.instance_id, "inst-1");

    // It comes back: running again.
    let consumer = tokio::spawn(serve_by_hand(s.redis.conn(None).await));
    s.wait_status("n2", STATUS_RUNNING).await;
    consumer.abort();
    let _ = consumer.await;
    handle.shutdown().await;
}

#[tokio::test]
async fn registration_protects_joined_nodes_by_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(&dir.path().join("s.redb")).expect("open store");
    let store: &dyn StateStore = &store;
    let joined = NodeSpec {
        id: "n3".into(),
        hostname: "h".into(),
        redis_addr: "127.0.0.1:1".into(),
        redis_password: "pw".into(),
        instance_id: "i1".into(),
        source: NodeSource::Join,
        token_hash: Some(hash_token("token-a")),
    };
    assert_eq!(register_node(store, joined.clone()).await.expect("join"), 1);
    // The same join again changes nothing.
    assert_eq!(
        register_node(store, joined.clone()).await.expect("rejoin"),
        1
    );
    // Another token may not take the id.
    let thief = NodeSpec {
        redis_addr: "10.0.0.9:6379".into(),
        token_hash: Some(hash_token("token-b")),
        ..joined.clone()
    };
    assert!(matches!(
        register_node(store, thief).await,
        Err(RegisterError::TokenMismatch { .. })
    ));
    let no_token = NodeSpec {
        source: NodeSource::Config,
        token_hash: None,
        ..joined.clone()
    };
    assert!(matches!(
        register_node(store, no_token).await,
        Err(RegisterError::TokenMismatch { .. })
    ));
    // The same token with a new address (the node restarted): a new generation.
    let moved = NodeSpec {
        redis_addr: "127.0.0.1:2".into(),
        instance_id: "i2".into(),
        ..joined
    };
    assert_eq!(register_node(store, moved).await.expect("rejoin"), 2);
    let spec = node_spec(store, "n3").await.expect("spec").expect("exists");
    assert_eq!(spec.redis_addr, "127.0.0.1:2");

    // Not checked yet: halted, with what was registered.
    let nodes = list_nodes(store).await.expect("list");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, NodeStatus::Halted);
    assert_eq!(nodes[0].instance_id, "i2");
    assert!(get_node(store, "nope").await.expect("get").is_none());

    let bad = NodeSpec {
        id: "a/b".into(),
        ..spec
    };
    assert!(matches!(
        register_node(store, bad).await,
        Err(RegisterError::InvalidId(_))
    ));
}

#[test]
fn tokens_hash_to_hex_sha256() {
    assert_eq!(
        hash_token("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert!(same_hash(&hash_token("x"), &hash_token("x")));
    assert!(!same_hash(&hash_token("x"), &hash_token("y")));
    assert!(!same_hash(&hash_token("x"), ""));
}
