//! End to end: grid-api + core0 + redis-server, driven over HTTP, checked against the host.

use grid_tests::{Grid, Http, start_process, wait_job_within};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn meminfo_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo is readable");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{key} in /proc/meminfo"))
}

/// Finds the pid of the process whose command line contains `marker`, through the API.
async fn find_pid(http: &Http, node: &str, marker: &str) -> i64 {
    let start = Instant::now();
    loop {
        let r = http
            .get(&format!("{node}/processes"))
            .await
            .expect("GET processes");
        assert_eq!(r.status, 200);
        if let Some(p) = r.json.as_array().and_then(|a| {
            a.iter()
                .find(|p| p["cmdline"].as_str().is_some_and(|c| c.contains(marker)))
        }) {
            return p["pid"].as_i64().expect("pid is a number");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no process with {marker}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_list_matches_the_seed_shape_and_mem_matches_proc() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let r = http.get("/nodes").await.expect("GET /nodes");
    assert_eq!(r.status, 200);
    let nodes = r.json.as_array().expect("a list");
    assert_eq!(nodes.len(), 1);
    let mut keys: Vec<_> = nodes[0]
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(keys, ["hostname", "id", "status"]);
    assert_eq!(nodes[0]["id"], grid.nodes[0].node_id.as_str());
    assert_eq!(nodes[0]["status"], "running");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(nodes[0]["hostname"], hostname.trim());

    let r = http
        .get(&format!("{}/mem", grid.node_path(0)))
        .await
        .expect("mem");
    assert_eq!(r.status, 200, "{}", r.text);
    let mut keys: Vec<_> = r
        .json
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "active",
            "available",
            "buffers",
            "cached",
            "free",
            "inactive",
            "total",
            "used",
            "usedPercent",
            "wired"
        ]
    );
    assert_eq!(
        r.json["total"].as_u64(),
        Some(meminfo_kib("MemTotal") * 1024)
    );
    let avail = r.json["available"].as_u64().expect("available") as i64;
    let host_avail = (meminfo_kib("MemAvailable") * 1024) as i64;
    assert!(
        (avail - host_avail).abs() < 256 << 20,
        "available {avail} vs {host_avail}"
    );

    for what in ["cpus", "disks", "nics"] {
        let r = http
            .get(&format!("{}/{what}", grid.node_path(0)))
            .await
            .expect(what);
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        assert!(r.json.is_array(), "{what} is a list");
    }
    let cpus = http
        .get(&format!("{}/cpus", grid.node_path(0)))
        .await
        .expect("cpus");
    let host_cpus = std::fs::read_to_string("/proc/cpuinfo")
        .expect("cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(cpus.json.as_array().map(Vec::len), Some(host_cpus));
    let nics = http
        .get(&format!("{}/nics", grid.node_path(0)))
        .await
        .expect("nics");
    let lo = nics
        .json
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "lo"))
        .cloned();
    let lo = lo.expect("lo is listed");
    assert!(
        lo["addrs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "127.0.0.1/8")),
        "{lo}"
    );
    let info = http
        .get(&format!("{}/info", grid.node_path(0)))
        .await
        .expect("info");
    assert_eq!(info.json["os"], "linux");
    assert!(!info.json["instanceId"].as_str().unwrap_or("").is_empty());
    let state = http
        .get(&format!("{}/state", grid.node_path(0)))
        .await
        .expect("state");
    assert_eq!(state.status, 200, "{}", state.text);
    assert!(state.json["rss"].as_u64().unwrap_or(0) > 0);
    let ping = http
        .post_empty(&format!("{}/ping", grid.node_path(0)))
        .await
        .expect("ping");
    assert_eq!((ping.status, ping.json.clone()), (200, json!(true)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_a_real_process_listed_killable_by_job_id_and_by_pid() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);

    // A busy loop, named by a marker so it can be found among the host's processes.
    let marker = format!("busy-{}", uuid::Uuid::new_v4().simple());
    let id = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "while :; do :; done", marker], "maxTime": 60}),
    )
    .await;
    let jobs = http.get(&format!("{node}/jobs")).await.expect("jobs");
    let item = jobs
        .json
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == id.as_str()))
        .cloned()
        .expect("the job is listed");
    let start_ms = item["startTime"].as_i64().expect("startTime");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!(
        (now_ms - start_ms).abs() < 60_000,
        "startTime is ms since the epoch"
    );

    let pid = find_pid(&http, &node, &marker).await;
    let host_cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the pid is real");
    assert!(String::from_utf8_lossy(&host_cmdline).contains(&marker));
    let cpu = |v: &Value| {
        v["cpu"]["user"].as_f64().unwrap_or(0.0) + v["cpu"]["system"].as_f64().unwrap_or(0.0)
    };
    let first = http
        .get(&format!("{node}/processes/{pid}"))
        .await
        .expect("process");
    assert_eq!(first.status, 200, "{}", first.text);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = http
        .get(&format!("{node}/processes/{pid}"))
        .await
        .expect("process");
    assert!(
        cpu(&second.json) > cpu(&first.json),
        "cpu time grows: {} then {}",
        first.json,
        second.json
    );

    let r = http
        .delete(&format!("{node}/jobs/{id}"))
        .await
        .expect("kill job");
    assert_eq!(r.status, 204, "{}", r.text);
    let result = wait_job_within(&http, &node, &id, Duration::from_secs(10)).await;
    assert_eq!(result["state"], "killed", "{result}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie_free(pid));

    // Kill by pid.
    let marker2 = format!("sleeper-{}", uuid::Uuid::new_v4().simple());
    let id2 = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "sleep 600", marker2]}),
    )
    .await;
    let pid2 = find_pid(&http, &node, &marker2).await;
    let r = http
        .delete(&format!("{node}/processes/{pid2}"))
        .await
        .expect("kill pid");
    assert_eq!(r.status, 204, "{}", r.text);
    let result = wait_job_within(&http, &node, &id2, Duration::from_secs(10)).await;
    assert_ne!(result["state"], "success", "{result}");
    let r = http
        .get(&format!("{node}/processes/{pid2}"))
        .await
        .expect("gone");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.json["error"].is_string());
}

fn is_zombie_free(pid: i64) -> bool {
    // The pid may have been reused by then; what matters is that our marker process is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_timeouts_and_results_through_the_api() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);

    let ok = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "echo out; echo err >&2"]}),
    )
    .await;
    let r = wait_job_within(&http, &node, &ok, Duration::from_secs(10)).await;
    assert_eq!(r["state"], "success", "{r}");
    assert_eq!(r["code"], 0);
    assert_eq!(r["stdout"], "out\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["name"], "core.system");
    assert!(r["startTime"].as_i64().unwrap_or(0) > 1_600_000_000_000);

    let bad = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "exit 7"]}),
    )
    .await;
    let r = wait_job_within(&http, &node, &bad, Duration::from_secs(10)).await;
    assert_eq!(
        (r["state"].clone(), r["code"].clone()),
        (json!("error"), json!(7)),
        "{r}"
    );

    let env = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "echo $GRID_X; pwd; cat"], "env": ["GRID_X=42"], "pwd": "/tmp", "stdin": "in"}),
    )
    .await;
    let r = wait_job_within(&http, &node, &env, Duration::from_secs(10)).await;
    assert_eq!(r["stdout"], "42\n/tmp\nin\n", "{r}");

    let started = Instant::now();
    let slow = start_process(
        &http,
        &node,
        json!({"name": "sleep", "args": ["30"], "maxTime": 1}),
    )
    .await;
    let r = wait_job_within(&http, &node, &slow, Duration::from_secs(10)).await;
    assert_eq!(r["state"], "timeout", "{r}");
    assert!(started.elapsed() < Duration::from_secs(8));

    let missing = start_process(&http, &node, json!({"name": "/nonexistent/grid-binary"})).await;
    let r = wait_job_within(&http, &node, &missing, Duration::from_secs(10)).await;
    assert_eq!(r["state"], "error", "{r}");

    let r = http
        .get(&format!("{node}/jobs/no-such-job"))
        .await
        .expect("unknown job");
    assert_eq!(r.status, 404);
    assert!(r.json["error"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_lines_arrive_in_order_over_sse() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);
    let id = start_process(
        &http,
        &node,
        json!({"name": "sh", "args": ["-c", "for i in $(seq 1 50); do echo line$i; done; echo bad >&2; exit 4"]}),
    )
    .await;
    let resp = http
        .inner
        .get(format!("{}{node}/jobs/{id}/stream", http.base))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let body = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the stream ends after the exit event")
        .expect("body");
    let events = parse_sse(&body);
    let stdout: Vec<_> = events
        .iter()
        .filter(|(e, _)| e == "stdout")
        .map(|(_, d)| d.clone())
        .collect();
    let want: Vec<_> = (1..=50).map(|i| format!("line{i}")).collect();
    assert_eq!(stdout, want);
    assert!(events.iter().any(|(e, d)| e == "stderr" && d == "bad"));
    let (last_event, last_data) = events.last().expect("events").clone();
    assert_eq!(last_event, "exit");
    let exit: Value = serde_json::from_str(&last_data).expect("exit data is JSON");
    assert_eq!(
        (exit["state"].clone(), exit["code"].clone()),
        (json!("error"), json!(4))
    );
}

fn parse_sse(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut event, mut data) = (String::from("message"), Vec::new());
    for line in body.lines() {
        if line.is_empty() {
            if !data.is_empty() {
                out.push((event.clone(), data.join("\n")));
            }
            event = "message".into();
            data.clear();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim_start().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
        }
    }
    if !data.is_empty() {
        out.push((event, data.join("\n")));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn wire_states_reach_the_api_in_lowercase() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);
    let pw = grid.nodes[0].redis_password().expect("password");
    let client = grid_client::NodeClient::connect(&grid.nodes[0].redis_addr, Some(&pw))
        .await
        .expect("node redis");
    // An unknown command sent on the wire by any client: the API reports it as `unknown_cmd`.
    let r = client
        .call("no.such.command", json!({}), Duration::from_secs(10))
        .await
        .expect("a result");
    assert_eq!(r.state, grid_proto::State::UnknownCmd);
    let j = http
        .get(&format!("{node}/jobs/{}", r.id))
        .await
        .expect("job");
    assert_eq!(j.status, 200, "{}", j.text);
    assert_eq!(j.json["state"], "unknown_cmd");
    assert_eq!(j.json["name"], "no.such.command");
}
