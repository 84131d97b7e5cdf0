//! End to end: containers through grid-api on a real core0 (corex.* of CONTAINERS-CONTRACT.md),
//! with a busybox root filesystem the test builds with the `tar` crate from `/bin/busybox`.
//!
//! Each test runs the whole grid (redis, grid-api, core0 and the containers) in a network
//! namespace of its own that the test thread makes: the NAT bridge, the veths and the nftables
//! table of the default nic land there, never on the host, and vanish with the namespace. Each
//! container a test makes is deleted through the API at the end, and core0's teardown (on drop of
//! the node) removes anything left.

use grid_tests::{
    Http, TestGrid, busybox_image, create_body, create_container, download, in_own_netns,
    remove_container, start_process, test_dir, upload, wait_job,
};
use serde_json::json;
use std::time::{Duration, Instant};

/// Creates a container with one default nic and checks the seed's answer.
async fn create(http: &Http, node: &str, name: &str, image: &std::path::Path) {
    create_container(http, node, create_body(name, image)).await;
}

/// Deletes a container through the API and checks the 204.
async fn remove(http: &Http, node: &str, name: &str) {
    remove_container(http, node, name).await;
}

#[test]
fn create_list_get_and_delete_a_container() {
    in_own_netns(create_list_get_and_delete_a_container_body());
}

async fn create_list_get_and_delete_a_container_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    create(&http, &node, "vfw_21", &image).await;

    let r = http.get(&format!("{node}/containers")).await.expect("list");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json,
        json!([{"flist": image.to_str(), "hostname": "vfw_21", "id": "vfw_21",
            "status": "running"}])
    );
    let r = http
        .get(&format!("{node}/containers/vfw_21"))
        .await
        .expect("get");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["containerId"].as_u64().is_some(), "{}", r.json);
    assert_eq!(r.json["status"], "running");
    assert_eq!(r.json["nics"][0]["type"], "default");
    // Its address, as the container itself sees it on eth0.
    let ip = r.json["ip"].as_str().expect("an address").to_string();
    let base = format!("{node}/containers/vfw_21");
    let job = start_process(
        &http,
        &base,
        json!({"name": "/bin/ip", "pwd": "", "args": ["-4", "-o", "addr", "show", "dev", "eth0"], "env": []}),
    )
    .await;
    let result = wait_job(&http, &base, &job).await;
    let shown = result["stdout"].as_str().unwrap_or_default();
    assert!(
        shown.contains(&format!("inet {ip}/")),
        "{ip} not in {result}"
    );

    // The same name again on that node.
    let r = http
        .post(&format!("{node}/containers"), create_body("vfw_21", &image))
        .await
        .expect("duplicate");
    assert_eq!(r.status, 409, "{}", r.text);

    let r = http
        .post_empty(&format!("{node}/containers/vfw_21/ping"))
        .await
        .expect("ping");
    assert_eq!(r.json, json!(true));

    remove(&http, &node, "vfw_21").await;
    let r = http.get(&format!("{node}/containers")).await.expect("list");
    assert_eq!(r.json, json!([]));
    let r = http
        .get(&format!("{node}/containers/vfw_21"))
        .await
        .expect("get");
    assert_eq!(r.status, 404);
}

#[test]
fn a_failed_create_answers_400_and_leaves_nothing() {
    in_own_netns(a_failed_create_answers_400_and_leaves_nothing_body());
}

async fn a_failed_create_answers_400_and_leaves_nothing_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let dir = test_dir("badimage");
    let not_tar = dir.join("not-a-tar.tar");
    std::fs::write(&not_tar, b"this is not an archive").expect("write");
    for flist in [
        not_tar.to_str().expect("utf-8").to_string(),
        "/nonexistent/image.tar".to_string(),
    ] {
        let mut body = create_body("bad", std::path::Path::new("/x"));
        body["flist"] = json!(flist);
        let r = http
            .post(&format!("{node}/containers"), body)
            .await
            .expect("create");
        assert_eq!(r.status, 400, "{flist}: {}", r.text);
        assert!(r.json["error"].is_string(), "{}", r.text);
        let r = http.get(&format!("{node}/containers")).await.expect("list");
        assert_eq!(r.json, json!([]), "a failed create leaves no record");
    }
}

#[test]
fn processes_and_jobs_inside_a_container() {
    in_own_netns(processes_and_jobs_inside_a_container_body());
}

async fn processes_and_jobs_inside_a_container_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    create(&http, &node, "vfw_22", &image).await;
    let base = format!("{node}/containers/vfw_22");

    // A long job: listed with its start time, its process visible, killed by DELETE.
    let sleeper = start_process(
        &http,
        &base,
        json!({"name": "/bin/sleep", "pwd": "", "args": ["300"], "env": []}),
    )
    .await;
    let r = http.get(&format!("{base}/jobs")).await.expect("jobs");
    assert_eq!(r.status, 200, "{}", r.text);
    let item = r
        .json
        .as_array()
        .expect("array")
        .iter()
        .find(|j| j["id"] == sleeper.as_str())
        .cloned()
        .expect("the job is listed");
    assert!(item["startTime"].as_i64().is_some_and(|t| t > 0));
    // The job is accepted before corex has exec'd its process: wait for it to appear.
    let started = Instant::now();
    let p = loop {
        let r = http
            .get(&format!("{base}/processes"))
            .await
            .expect("processes");
        assert_eq!(r.status, 200, "{}", r.text);
        if let Some(p) = r
            .json
            .as_array()
            .expect("array")
            .iter()
            .find(|p| p["cmdline"].as_str().is_some_and(|c| c.contains("sleep")))
            .cloned()
        {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sleep process is listed: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for k in [
        "guestnice",
        "idle",
        "iowait",
        "irq",
        "nice",
        "softirq",
        "steal",
        "stolen",
        "system",
        "user",
    ] {
        assert!(p["cpu"][k].is_number(), "cpu.{k} in {p}");
    }
    for k in ["pid", "rss", "swap", "vms"] {
        assert!(p[k].is_number(), "{k} in {p}");
    }
    let r = http
        .delete(&format!("{base}/jobs/{sleeper}"))
        .await
        .expect("kill");
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(wait_job(&http, &base, &sleeper).await["state"], "killed");

    // Output and exit code, in the result and in the live stream.
    let job = start_process(
        &http,
        &base,
        json!({"name": "/bin/sh", "args": ["-c", "hostname; echo oops >&2; exit 3"]}),
    )
    .await;
    let r = http
        .inner
        .get(format!("{}{base}/jobs/{job}/stream", http.base))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    let text = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .expect("the stream ends")
        .expect("stream body");
    assert!(text.contains("event: stdout\ndata: vfw_22"), "{text}");
    assert!(text.contains("event: stderr\ndata: oops"), "{text}");
    assert!(text.contains("event: exit"), "{text}");
    let result = wait_job(&http, &base, &job).await;
    assert_eq!(result["state"], "error");
    assert_eq!(result["code"], 3);
    assert_eq!(result["stdout"], "vfw_22\n");

    // Signals, info and state.
    let r = http.get(&format!("{base}/info")).await.expect("info");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["hostname"], "vfw_22");
    let r = http.get(&format!("{base}/state")).await.expect("state");
    assert_eq!(r.status, 200, "{}", r.text);

    remove(&http, &node, "vfw_22").await;
}

#[test]
fn files_go_in_and_out_and_survive_stop_and_start() {
    in_own_netns(files_go_in_and_out_and_survive_stop_and_start_body());
}

async fn files_go_in_and_out_and_survive_stop_and_start_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    create(&http, &node, "files", &image).await;
    let base = format!("{node}/containers/files");

    // More than two 512 KiB blocks, not a multiple of the block size.
    let content: Vec<u8> = (0..1_300_000u32)
        .map(|i| u8::try_from(i * 7 % 251).expect("below 251"))
        .collect();
    assert_eq!(upload(&http, &base, "/root/data.bin", &content).await, 204);
    let (status, got) = download(&http, &base, "/root/data.bin").await;
    assert_eq!(status, 200);
    assert!(got == content, "downloaded bytes differ");
    let (status, _) = download(&http, &base, "/root/missing").await;
    assert_eq!(status, 404);
    let r = http
        .get(&format!("{base}/filesystem"))
        .await
        .expect("no path");
    assert_eq!(r.status, 400);

    // Stop keeps the filesystem; a container that is not running answers 409 and ping false.
    let r = http
        .post_empty(&format!("{base}/stop"))
        .await
        .expect("stop");
    assert_eq!(r.status, 204, "{}", r.text);
    let r = http
        .post_empty(&format!("{base}/stop"))
        .await
        .expect("stop again");
    assert_eq!(r.status, 409, "{}", r.text);
    let r = http
        .post_empty(&format!("{base}/ping"))
        .await
        .expect("ping");
    assert_eq!(r.json, json!(false));
    let r = http.get(&format!("{base}/jobs")).await.expect("jobs");
    assert_eq!(r.status, 409, "{}", r.text);
    let r = http.get(&format!("{node}/containers")).await.expect("list");
    assert_eq!(r.json[0]["status"], "halted");
    let r = http
        .post_empty(&format!("{base}/start"))
        .await
        .expect("start");
    assert_eq!(r.status, 201, "{}", r.text);
    let (status, got) = download(&http, &base, "/root/data.bin").await;
    assert_eq!(status, 200);
    assert!(got == content, "the file survived stop and start");

    // Delete by query and by JSON body.
    let r = http
        .delete(&format!("{base}/filesystem?path=/root/data.bin"))
        .await
        .expect("delete");
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(upload(&http, &base, "/root/b", b"x").await, 204);
    let r = http
        .req(
            reqwest::Method::DELETE,
            &format!("{base}/filesystem"),
            Some(json!({"path": "/root/b"})),
        )
        .await
        .expect("delete by body");
    assert_eq!(r.status, 204, "{}", r.text);
    let (status, _) = download(&http, &base, "/root/b").await;
    assert_eq!(status, 404);

    remove(&http, &node, "files").await;
}

#[test]
fn the_container_comes_back_after_a_safe_reboot() {
    in_own_netns(the_container_comes_back_after_a_safe_reboot_body());
}

async fn the_container_comes_back_after_a_safe_reboot_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    create(&http, &node, "phoenix", &image).await;
    let base = format!("{node}/containers/phoenix");
    assert_eq!(upload(&http, &base, "/root/keep", b"kept").await, 204);

    let instance = |v: &serde_json::Value| v["instanceId"].as_str().map(String::from);
    let before = instance(&http.get(&format!("{node}/info")).await.expect("info").json);
    assert!(before.is_some(), "node info has an instance id");
    let r = http
        .post_empty(&format!("{node}/reboot"))
        .await
        .expect("reboot");
    assert_eq!(r.status, 204, "{}", r.text);
    // The reboot happens after its answer: until the node answers as a new instance, the old
    // one (and its container) may still be there.
    let start = Instant::now();
    loop {
        let r = http.get(&format!("{node}/info")).await.expect("info");
        if r.status == 200 && instance(&r.json).is_some_and(|i| Some(&i) != before.as_ref()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node not back as a new instance after the reboot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The reconciler brings the container back (resync every 10 s) with its filesystem.
    loop {
        let r = http
            .post_empty(&format!("{base}/ping"))
            .await
            .expect("ping");
        if r.json == json!(true) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "container not back after the reboot"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, got) = download(&http, &base, "/root/keep").await;
    assert_eq!(status, 200);
    assert_eq!(got, b"kept");
    remove(&http, &node, "phoenix").await;
}
