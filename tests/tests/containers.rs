//! End to end: containers through grid-api on a real core0 (corex.* of CONTAINERS-CONTRACT.md),
//! with a busybox root filesystem the test builds with the `tar` crate from `/bin/busybox`.
//!
//! Every test is ignored until core0 implements the corex commands (issue 3); each container a
//! test makes is deleted through the API at the end, and core0's teardown (on drop of the node)
//! removes anything left.

use grid_tests::{Grid, Http, test_dir};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Writes a root filesystem image (plain tar) holding `/bin/busybox` and the applets the tests
/// use as symlinks; returns its path (an absolute path on the node, which is this host).
fn busybox_image() -> PathBuf {
    let dir = test_dir("image");
    let path = dir.join("busybox.tar");
    let file = std::fs::File::create(&path).expect("create image file");
    let mut tar = tar::Builder::new(file);
    for d in ["bin", "etc", "tmp", "proc", "dev", "sys", "root"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if d == "tmp" { 0o1777 } else { 0o755 });
        h.set_size(0);
        tar.append_data(&mut h, d, std::io::empty())
            .expect("directory entry");
    }
    tar.append_path_with_name("/bin/busybox", "bin/busybox")
        .expect("busybox entry");
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "hostname", "ps", "true", "false", "wc",
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("applet link");
    }
    let mut h = tar::Header::new_gnu();
    let hosts = b"127.0.0.1 localhost\n";
    h.set_size(hosts.len() as u64);
    h.set_mode(0o644);
    tar.append_data(&mut h, "etc/hosts", &hosts[..])
        .expect("hosts entry");
    tar.finish().expect("finish image");
    path
}

fn create_body(name: &str, image: &std::path::Path) -> Value {
    json!({"id": name, "hostname": name, "flist": image.to_str().expect("utf-8 path"),
        "hostNetworking": false, "filesystems": [], "initprocesses": [], "ports": [],
        "nics": [{"type": "default"}]})
}

/// Creates a container and checks the seed's answer: 204 with a Location.
async fn create(http: &Http, node: &str, name: &str, image: &std::path::Path) {
    let r = http
        .post(&format!("{node}/containers"), create_body(name, image))
        .await
        .expect("POST containers");
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("{node}/containers/{name}").as_str())
    );
}

/// Deletes a container through the API and checks the 204 (core0's teardown, when the node is
/// dropped, removes what a failed test left).
async fn remove(http: &Http, node: &str, name: &str) {
    let r = http
        .delete(&format!("{node}/containers/{name}"))
        .await
        .expect("DELETE container");
    assert_eq!(r.status, 204, "{}", r.text);
}

/// Starts a process in the container; returns the job id from the 202's Location.
async fn start_process(http: &Http, base: &str, body: Value) -> String {
    let r = http
        .post(&format!("{base}/processes"), body)
        .await
        .expect("POST processes");
    assert_eq!(r.status, 202, "{}", r.text);
    let loc = r
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("202 carries a Location")
        .to_string();
    let prefix = format!("{base}/jobs/");
    assert!(loc.starts_with(&prefix), "{loc}");
    loc[prefix.len()..].to_string()
}

async fn wait_job(http: &Http, base: &str, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let r = http
            .get(&format!("{base}/jobs/{id}"))
            .await
            .expect("GET job");
        assert_eq!(r.status, 200, "{}", r.text);
        if r.json["state"] != "running" {
            return r.json;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "job {id} hangs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A multipart body with one field `file`.
fn multipart(content: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("test-{}", uuid::Uuid::new_v4().simple());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(http: &Http, base: &str, path: &str, content: &[u8]) -> u16 {
    let (ct, body) = multipart(content);
    let r = http
        .inner
        .post(format!("{}{base}/filesystem?path={path}", http.base))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("upload");
    r.status().as_u16()
}

async fn download(http: &Http, base: &str, path: &str) -> (u16, Vec<u8>) {
    let r = http
        .inner
        .get(format!("{}{base}/filesystem?path={path}", http.base))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .send()
        .await
        .expect("download");
    let status = r.status().as_u16();
    (status, r.bytes().await.expect("body").to_vec())
}

#[tokio::test]
#[ignore = "needs corex.* in core0 (issue 3 in progress)"]
async fn create_list_get_and_delete_a_container() {
    let grid = Grid::start(1).await.expect("grid");
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

#[tokio::test]
#[ignore = "needs corex.* in core0 (issue 3 in progress)"]
async fn a_failed_create_answers_400_and_leaves_nothing() {
    let grid = Grid::start(1).await.expect("grid");
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

#[tokio::test]
#[ignore = "needs corex.* in core0 (issue 3 in progress)"]
async fn processes_and_jobs_inside_a_container() {
    let grid = Grid::start(1).await.expect("grid");
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
    let r = http
        .get(&format!("{base}/processes"))
        .await
        .expect("processes");
    assert_eq!(r.status, 200, "{}", r.text);
    let p = r
        .json
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["cmdline"].as_str().is_some_and(|c| c.contains("sleep")))
        .cloned()
        .expect("the sleep process is listed");
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

#[tokio::test]
#[ignore = "needs corex.* in core0 (issue 3 in progress)"]
async fn files_go_in_and_out_and_survive_stop_and_start() {
    let grid = Grid::start(1).await.expect("grid");
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

#[tokio::test]
#[ignore = "needs corex.* in core0 (issue 3 in progress)"]
async fn the_container_comes_back_after_a_safe_reboot() {
    let grid = Grid::start(1).await.expect("grid");
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    create(&http, &node, "phoenix", &image).await;
    let base = format!("{node}/containers/phoenix");
    assert_eq!(upload(&http, &base, "/root/keep", b"kept").await, 204);

    let r = http
        .post_empty(&format!("{node}/reboot"))
        .await
        .expect("reboot");
    assert_eq!(r.status, 204, "{}", r.text);
    // The reconciler brings it back (resync every 10 s) with its filesystem.
    let start = Instant::now();
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
