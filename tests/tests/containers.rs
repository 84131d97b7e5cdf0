//! End to end: containers through grid-api on a real core0 (corex.* of CONTAINERS-CONTRACT.md),
//! with a busybox root filesystem the test builds with the `tar` crate from `/bin/busybox`.
//!
//! Each test runs the whole grid (redis, grid-api, core0 and the containers) in a network
//! namespace of its own that the test thread makes: the NAT bridge, the veths and the nftables
//! table of the default nic land there, never on the host, and vanish with the namespace. Each
//! container a test makes is deleted through the API at the end, and core0's teardown (on drop of
//! the node) removes anything left.

use grid_tests::{Api, ApiOpts, Core0, Core0Opts, Grid, Http, test_dir};
use serde_json::{Value, json};
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Runs `test` on this thread, moved first into a new network namespace with `lo` up. Every
/// process the test starts (redis-server, grid-api, core0, its containers) inherits it, and the
/// runtime is single-threaded so every socket the test opens is made there too; the namespace
/// disappears with the last of them.
fn in_own_netns(test: impl Future<Output = ()>) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare a network namespace for the test thread (needs root)");
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set lo up: {status}");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(test);
}

/// A node index of its own for each test of this run (900 to 999, apart from the ones
/// core0's own tests use): the node's cgroups (`grid/n<idx>`) are shared by the whole host, so
/// two tests at once must not both be node 0.
fn node_idx() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 900 + u16::try_from(std::process::id() % 20).expect("below 20") * 5;
    base + NEXT.fetch_add(1, Ordering::SeqCst) % 5
}

/// The grid of one test (an API and one node with its own node index); on drop, after the
/// node's teardown, the node's cgroup parent `grid/n<idx>` is removed from the host.
struct TestGrid {
    grid: Option<Grid>,
    idx: u16,
}

impl TestGrid {
    async fn start() -> Self {
        let idx = node_idx();
        let api = Api::start(ApiOpts::default()).expect("grid-api starts");
        let data_dir = test_dir("node");
        std::fs::write(data_dir.join("node-index"), idx.to_string()).expect("node index");
        let node = Core0::start(Core0Opts {
            join: Some((api.url.clone(), api.join_token.clone())),
            data_dir: Some(data_dir),
            ..Core0Opts::default()
        })
        .expect("core0 starts");
        let grid = Grid {
            api,
            nodes: vec![node],
        };
        grid.wait_status(&grid.nodes[0].node_id, "running", Duration::from_secs(20))
            .await
            .expect("the node joins");
        Self {
            grid: Some(grid),
            idx,
        }
    }
}

impl std::ops::Deref for TestGrid {
    type Target = Grid;
    fn deref(&self) -> &Grid {
        self.grid.as_ref().expect("the grid lives until drop")
    }
}

impl Drop for TestGrid {
    fn drop(&mut self) {
        drop(self.grid.take());
        let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for c in controllers.flatten() {
            // Empty by now (core0's terminate or teardown removed the containers' cgroups).
            let _ = std::fs::remove_dir(c.path().join("grid").join(format!("n{}", self.idx)));
        }
    }
}

/// A header with every numeric field set (an all-zero header is not a valid tar header).
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// Writes a root filesystem image (plain tar) holding `/bin/busybox` and the applets the tests
/// use as symlinks; returns its path (an absolute path on the node, which is this host).
fn busybox_image() -> PathBuf {
    let dir = test_dir("image");
    let path = dir.join("busybox.tar");
    let file = std::fs::File::create(&path).expect("create image file");
    let mut tar = tar::Builder::new(file);
    for d in ["bin", "etc", "tmp", "proc", "dev", "sys", "root"] {
        let mut h = header(
            tar::EntryType::Directory,
            if d == "tmp" { 0o1777 } else { 0o755 },
            0,
        );
        tar.append_data(&mut h, d, std::io::empty())
            .expect("directory entry");
    }
    tar.append_path_with_name("/bin/busybox", "bin/busybox")
        .expect("busybox entry");
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "hostname", "ps", "true", "false", "wc",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("applet link");
    }
    let hosts = b"127.0.0.1 localhost\n";
    let mut h = header(tar::EntryType::Regular, 0o644, hosts.len() as u64);
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
