//! The core0 wire protocol driven by a raw Redis client, and the lifecycles of agent and API:
//! crash and restart, safe reboot, API restart, commands whose caller gave up.

use grid_tests::{Core0, Core0Opts, Grid, Redis, test_dir};
use redis::Commands;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn push(conn: &mut redis::Connection, cmd: Value) {
    let _: i64 = conn
        .rpush("core:default", cmd.to_string())
        .expect("RPUSH core:default");
}

fn wait_result(conn: &mut redis::Connection, id: &str, secs: f64) -> Option<Value> {
    let key = format!("result:{id}");
    let got: Option<String> = redis::cmd("BRPOPLPUSH")
        .arg(&key)
        .arg(&key)
        .arg(secs)
        .query(conn)
        .expect("BRPOPLPUSH");
    got.map(|t| serde_json::from_str(&t).expect("a Result is JSON"))
}

fn node_conn(node: &Core0) -> redis::Connection {
    let pw = node
        .redis_password()
        .expect("core0 wrote its redis password");
    redis::Client::open(format!("redis://:{pw}@{}/", node.redis_addr))
        .and_then(|c| c.get_connection())
        .expect("core0's redis answers")
}

#[test]
fn a_raw_redis_client_drives_core0_by_the_wire_protocol_alone() {
    let node = Core0::start(Core0Opts::default()).expect("core0");
    let mut conn = node_conn(&node);

    push(
        &mut conn,
        json!({"id": "p1", "command": "core.ping", "arguments": {}, "queue": null, "max_time": null, "stream": false, "tags": null}),
    );
    let r = wait_result(&mut conn, "p1", 10.0).expect("ping result");
    assert_eq!(r["state"], "SUCCESS");
    assert_eq!(r["level"], 20);
    let pong: String =
        serde_json::from_str(r["data"].as_str().expect("data")).expect("JSON string");
    assert!(pong.starts_with("PONG "), "{pong}");
    let flag_ttl: i64 = conn.ttl("result:p1:flag").expect("TTL");
    let result_ttl: i64 = conn.ttl("result:p1").expect("TTL");
    assert!(
        flag_ttl > 290 && result_ttl > 290,
        "TTLs {flag_ttl} {result_ttl}"
    );

    push(
        &mut conn,
        json!({"id": "u1", "command": "no.such.command", "arguments": {}}),
    );
    let r = wait_result(&mut conn, "u1", 10.0).expect("unknown result");
    assert_eq!(r["state"], "UNKNOWN_CMD");
    assert_eq!(r["starttime"], 0);

    push(
        &mut conn,
        json!({"id": "s1", "command": "core.system", "arguments": {"name": "sh", "args": ["-c", "echo a; echo b >&2; exit 5"]}}),
    );
    let r = wait_result(&mut conn, "s1", 10.0).expect("system result");
    assert_eq!(r["state"], "ERROR");
    assert_eq!(r["code"], 5);
    assert_eq!(r["streams"], json!(["a\n", "b\n"]));

    push(
        &mut conn,
        json!({"id": "b1", "command": "bash", "arguments": {"script": "echo '20::{\"x\": 1}'"}}),
    );
    let r = wait_result(&mut conn, "b1", 10.0).expect("bash result");
    assert_eq!(r["state"], "SUCCESS");
    assert_eq!(r["level"], 20);
    assert_eq!(
        serde_json::from_str::<Value>(r["data"].as_str().unwrap_or("")).ok(),
        Some(json!({"x": 1}))
    );

    // Duplicate id while the first is running.
    push(
        &mut conn,
        json!({"id": "d1", "command": "core.system", "arguments": {"name": "sleep", "args": ["1"]}}),
    );
    let _: Option<String> = redis::cmd("BRPOPLPUSH")
        .arg("result:d1:flag")
        .arg("result:d1:flag")
        .arg(5)
        .query(&mut conn)
        .expect("flag");
    push(
        &mut conn,
        json!({"id": "d1", "command": "core.ping", "arguments": {}}),
    );
    let dup = wait_result(&mut conn, "d1", 5.0).expect("duplicate result");
    assert_eq!(dup["state"], "DUPILICATE_ID");
    let ttl: i64 = conn.ttl("result:d1:flag").expect("TTL");
    assert_eq!(ttl, -1, "the running job's flag is untouched");
    let start = Instant::now();
    loop {
        let all: Vec<String> = conn.lrange("result:d1", 0, -1).expect("LRANGE");
        if all.len() == 1 && all[0].contains("\"SUCCESS\"") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "real result replaces the duplicate: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // max_time on the wire.
    push(
        &mut conn,
        json!({"id": "t1", "command": "core.system", "max_time": 1, "arguments": {"name": "sleep", "args": ["30"]}}),
    );
    let r = wait_result(&mut conn, "t1", 10.0).expect("timeout result");
    assert_eq!(r["state"], "TIMEOUT");

    // Queued jobs run one at a time, in order.
    for i in 0..3 {
        push(
            &mut conn,
            json!({"id": format!("q{i}"), "command": "core.system", "queue": "grid-test-q",
            "arguments": {"name": "sleep", "args": ["0.3"]}}),
        );
    }
    let rs: Vec<Value> = (0..3)
        .map(|i| wait_result(&mut conn, &format!("q{i}"), 10.0).expect("queued"))
        .collect();
    for w in rs.windows(2) {
        let end_prev = w[0]["starttime"].as_i64().unwrap_or(0) + w[0]["time"].as_i64().unwrap_or(0);
        assert!(
            w[1]["starttime"].as_i64().unwrap_or(0) >= end_prev - 5,
            "serial: {w:?}"
        );
    }
}

#[test]
fn a_command_whose_caller_gave_up_never_runs_later() {
    let dir = test_dir("gaveup");
    let redis = Redis::start(&dir).expect("redis");
    let marker = dir.join("ran");
    let node_opts = Core0Opts {
        redis_url: Some(redis.url()),
        ..Core0Opts::default()
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt
        .block_on(grid_client::NodeClient::connect(
            &redis.addr,
            Some(&redis.password),
        ))
        .expect("client");
    let script = format!("touch {}", marker.display());

    // 1. No agent at all: the command is withdrawn from the queue.
    let err = rt
        .block_on(client.call(
            "bash",
            json!({"script": script}),
            Duration::from_millis(300),
        ))
        .expect_err("nobody consumes");
    assert!(
        matches!(err, grid_client::ClientError::NotPickedUp { .. }),
        "{err}"
    );
    let mut conn = redis.conn();
    let queued: i64 = conn.llen("core:default").expect("LLEN");
    assert_eq!(queued, 0, "withdrawn");

    // 2. An agent that is frozen while it holds the command: it drops it (deadline) on waking.
    let mut node = Core0::start(node_opts.clone()).expect("core0");
    node.proc.signal(libc::SIGSTOP);
    // kill(2) returns before the target stops: wait until every thread of the agent is stopped,
    // so that it cannot take the command in time (a command taken before its deadline runs).
    let pid = node.proc.pid();
    grid_tests::wait_until("core0 is stopped", Duration::from_secs(10), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| {
                            s.rsplit_once(')')
                                .map(|(_, r)| r.trim_start().starts_with('T'))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    })
    .expect("SIGSTOP takes effect");
    let err = rt
        .block_on(client.call(
            "bash",
            json!({"script": script}),
            Duration::from_millis(300),
        ))
        .expect_err("frozen agent");
    assert!(
        matches!(
            err,
            grid_client::ClientError::NotPickedUp { .. } | grid_client::ClientError::Timeout { .. }
        ),
        "{err}"
    );
    node.proc.signal(libc::SIGCONT);
    // The agent is alive again: a later command runs, the stale one did not.
    let r = rt
        .block_on(client.call("core.ping", json!({}), Duration::from_secs(10)))
        .expect("agent answers again");
    assert_eq!(r.state, grid_proto::State::Success);
    let r = rt
        .block_on(client.call(
            "bash",
            json!({"script": "sleep 0.2"}),
            Duration::from_secs(10),
        ))
        .expect("a later job runs");
    assert_eq!(r.state, grid_proto::State::Success);
    assert!(!marker.exists(), "a command whose caller gave up ran late");
    node.proc.kill();
    drop(node);
}

#[test]
fn core0_sigkill_and_restart_keeps_redis_and_finished_results() {
    let node = Core0::start(Core0Opts::default()).expect("core0");
    let mut conn = node_conn(&node);
    push(
        &mut conn,
        json!({"id": "k1", "command": "core.system", "arguments": {"name": "echo", "args": ["kept"]}}),
    );
    let r = wait_result(&mut conn, "k1", 10.0).expect("result");
    assert_eq!(r["state"], "SUCCESS");
    let redis_pid = std::fs::read_to_string(node.data_dir.join("run/redis.pid"))
        .expect("core0 keeps a redis pid file")
        .trim()
        .to_string();

    let mut node = node;
    node.proc.kill(); // SIGKILL
    assert!(
        std::path::Path::new(&format!("/proc/{redis_pid}")).exists(),
        "redis outlives core0"
    );
    let opts = node.opts.clone();
    // Keep the old guard from tearing the node down: restart in place.
    std::mem::forget(node);
    let node = Core0::start(opts).expect("core0 restarts");
    let again = std::fs::read_to_string(node.data_dir.join("run/redis.pid")).expect("pid file");
    assert_eq!(
        again.trim(),
        redis_pid,
        "the restarted core0 adopted the same redis-server"
    );
    let mut conn = node_conn(&node);
    let kept: Vec<String> = conn.lrange("result:k1", 0, -1).expect("LRANGE");
    assert_eq!(kept.len(), 1);
    assert!(kept[0].contains("kept\\n"));
    push(
        &mut conn,
        json!({"id": "k2", "command": "core.ping", "arguments": {}}),
    );
    assert_eq!(
        wait_result(&mut conn, "k2", 10.0).expect("ping")["state"],
        "SUCCESS"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn safe_reboot_kills_jobs_shows_halted_then_running_with_a_new_instance() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);
    let before = http.get(&format!("{node}/info")).await.expect("info").json["instanceId"].clone();
    let marker = format!("reboot-{}", uuid::Uuid::new_v4().simple());
    let r = http
        .post(
            &format!("{node}/processes"),
            json!({"name": "sh", "args": ["-c", "sleep 600", marker]}),
        )
        .await
        .expect("start");
    assert_eq!(r.status, 202);
    let pid = {
        let start = Instant::now();
        loop {
            let ps = http.get(&format!("{node}/processes")).await.expect("ps");
            if let Some(p) = ps.json.as_array().and_then(|a| {
                a.iter()
                    .find(|p| p["cmdline"].as_str().is_some_and(|c| c.contains(&marker)))
            }) {
                break p["pid"].as_i64().expect("pid");
            }
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let r = http
        .post_empty(&format!("{node}/reboot"))
        .await
        .expect("reboot");
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    grid.wait_status(&grid.nodes[0].node_id, "halted", Duration::from_secs(10))
        .await
        .expect("seen halted");
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the job's process died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    grid.wait_status(&grid.nodes[0].node_id, "running", Duration::from_secs(30))
        .await
        .expect("back");
    let after = http.get(&format!("{node}/info")).await.expect("info").json["instanceId"].clone();
    assert_ne!(before, after, "a new instance id after reboot");
    let jobs = http.get(&format!("{node}/jobs")).await.expect("jobs");
    assert_eq!(jobs.status, 200);
    assert!(
        jobs.json
            .as_array()
            .is_some_and(|a| a.iter().all(|j| j["startTime"].as_i64().is_some()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_restart_keeps_registered_nodes_and_archived_results() {
    let mut grid = Grid::start(1).await.expect("grid");
    let node = grid.node_path(0);
    let http = grid.api.client();
    let r = http
        .post(
            &format!("{node}/processes"),
            json!({"name": "echo", "args": ["archived"]}),
        )
        .await
        .expect("start");
    assert_eq!(r.status, 202);
    let loc = r.headers["location"]
        .to_str()
        .expect("location")
        .to_string();
    let start = Instant::now();
    loop {
        let j = http.get(&loc).await.expect("job");
        if j.json["state"] == "success" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    grid.api.restart().expect("API restarts");
    let http = grid.api.client();
    let id = grid.nodes[0].node_id.clone();
    grid.wait_status(&id, "running", Duration::from_secs(20))
        .await
        .expect("node still registered");
    let list = http.get("/nodes").await.expect("nodes");
    assert_eq!(list.json.as_array().map(Vec::len), Some(1));
    // The node's copy is gone (as after its 300 s TTL): the API still answers from its archive.
    let pw = grid.nodes[0].redis_password().expect("password");
    let mut conn = redis::Client::open(format!("redis://:{pw}@{}/", grid.nodes[0].redis_addr))
        .and_then(|c| c.get_connection())
        .expect("redis");
    let job_id = loc.rsplit('/').next().expect("id");
    let _: i64 = conn.del(format!("result:{job_id}")).expect("DEL");
    let _: i64 = conn.del(format!("result:{job_id}:flag")).expect("DEL");
    let j = http.get(&loc).await.expect("job");
    assert_eq!(j.status, 200, "{}", j.text);
    assert_eq!(j.json["stdout"], "archived\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_comes_back_at_a_new_address_re_registers() {
    let mut grid = Grid::start(1).await.expect("grid");
    let id = grid.nodes[0].node_id.clone();
    let http = grid.api.client();
    let old_addr = grid.nodes[0].redis_addr.clone();
    // The node goes away completely (agent and its redis) ...
    drop(grid.nodes.pop());
    grid.wait_status(&id, "halted", Duration::from_secs(15))
        .await
        .expect("seen halted");
    // ... and comes back with the same id on another port and data dir.
    let node = Core0::start(Core0Opts {
        node_id: Some(id.clone()),
        join: Some((grid.api.url.clone(), grid.api.join_token.clone())),
        ..Core0Opts::default()
    })
    .expect("core0 again");
    assert_ne!(node.redis_addr, old_addr);
    grid.nodes.push(node);
    grid.wait_status(&id, "running", Duration::from_secs(20))
        .await
        .expect("running again");
    let mem = http.get(&format!("/nodes/{id}/mem")).await.expect("mem");
    assert_eq!(mem.status, 200, "{}", mem.text);

    // Another agent claiming that id with a wrong join token is refused.
    let r = http
        .with_token(None)
        .post(
            "/nodes/join",
            json!({"id": id, "hostname": "impostor", "redisAddr": "127.0.0.1:1",
                   "redisPassword": "", "instanceId": "x", "joinToken": "not-the-token"}),
        )
        .await
        .expect("join");
    assert!(
        r.status == 403 || r.status == 409,
        "{} {}",
        r.status,
        r.text
    );
    grid.wait_status(&id, "running", Duration::from_secs(5))
        .await
        .expect("still running");
}
