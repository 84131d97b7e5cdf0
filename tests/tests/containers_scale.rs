//! End to end, containers at scale and at their edges, through grid-api on a real core0: twenty
//! containers made and deleted at once with nothing left behind, a file larger than 10 MiB in and
//! out, paths and symlinks that try to leave the container, and a port forward reached from
//! another network namespace.
//!
//! Like `containers.rs`, each test runs the whole grid in a network namespace of its own
//! ([`in_own_netns`]) with a node index of its own ([`TestGrid`]): the NAT bridge, veths and
//! nftables table never reach the host.

use grid_client::NodeClient;
use grid_tests::{
    IMAGE_PASSWD, Proc, TestGrid, busybox_image, create_body, create_container, download,
    in_own_netns, remove_container, start_process, test_dir, upload, wait_until,
};
use rand::RngCore;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Containers made at once.
const MANY: usize = 20;

/// The node's containers as core0 lists them: name → (corex pid, address).
async fn corex_list(grid: &TestGrid) -> BTreeMap<String, (i32, String)> {
    let node = &grid.nodes[0];
    let client = NodeClient::connect(&node.redis_addr, node.redis_password().as_deref())
        .await
        .expect("connect to the node's redis");
    let list: serde_json::Value = client
        .call_json("corex.list", json!({}), Duration::from_secs(30))
        .await
        .expect("corex.list");
    list.as_object()
        .expect("corex.list answers an object")
        .values()
        .map(|c| {
            let c = &c["container"];
            (
                c["name"].as_str().unwrap_or_default().to_string(),
                (
                    c["pid"]
                        .as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .unwrap_or(0),
                    c["ip"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// Lines of the mount tables of this process and of core0 that name `dir`.
fn mounts_naming(dir: &Path, core0_pid: i32) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    [
        "/proc/self/mountinfo".to_string(),
        format!("/proc/{core0_pid}/mountinfo"),
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .flat_map(|t| {
        t.lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect::<Vec<_>>()
    })
    .collect()
}

/// Subdirectories (container cgroups) below the node's cgroup directories.
fn cgroup_children(grid: &TestGrid) -> Vec<PathBuf> {
    grid.cgroup_dirs()
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|e| e.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .filter(|p| p.is_dir())
        .collect()
}

#[test]
fn twenty_containers_at_once_then_nothing_left() {
    in_own_netns(twenty_containers_at_once_then_nothing_left_body());
}

async fn twenty_containers_at_once_then_nothing_left_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    let names: Vec<String> = (0..MANY).map(|i| format!("many_{i}")).collect();

    futures::future::join_all(
        names
            .iter()
            .map(|n| create_container(&http, &node, create_body(n, &image))),
    )
    .await;

    let r = http.get(&format!("{node}/containers")).await.expect("list");
    assert_eq!(r.status, 200, "{}", r.text);
    let listed = r.json.as_array().expect("an array");
    assert_eq!(listed.len(), MANY, "{}", r.text);
    assert!(
        listed.iter().all(|c| c["status"] == "running"),
        "{}",
        r.text
    );
    let corex = corex_list(&grid).await;
    assert_eq!(corex.len(), MANY, "{corex:?}");
    let pids: Vec<i32> = corex.values().map(|(pid, _)| *pid).collect();
    assert!(
        pids.iter()
            .all(|p| *p > 0 && Path::new(&format!("/proc/{p}")).exists()),
        "every container has a live corex: {pids:?}"
    );
    // Twenty distinct addresses on the node's bridge.
    let mut ips: Vec<String> = corex.values().map(|(_, ip)| ip.clone()).collect();
    assert!(ips.iter().all(|ip| !ip.is_empty()), "{corex:?}");
    for n in &names {
        let r = http
            .get(&format!("{node}/containers/{n}"))
            .await
            .expect("get");
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "running", "{}", r.text);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), MANY, "addresses: {ips:?}");
    let data_dir = grid.nodes[0].data_dir.clone();
    let core0_pid = grid.nodes[0].proc.pid();
    // The roots are mounted in each corex's own mount namespace; none may leak to the host's
    // or core0's (checked again after the deletes).
    let before = mounts_naming(&data_dir, core0_pid);
    assert!(
        before.is_empty(),
        "container mounts in the host's namespace: {before:#?}"
    );

    futures::future::join_all(names.iter().map(|n| remove_container(&http, &node, n))).await;

    let r = http.get(&format!("{node}/containers")).await.expect("list");
    assert_eq!(r.json, json!([]), "{}", r.text);
    assert!(corex_list(&grid).await.is_empty());
    // terminate returns once corex is gone; a zombie is not left either.
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.contains("corex"))
        })
        .collect();
    assert!(alive.is_empty(), "corex processes left: {alive:?}");
    // Only the spare core0 keeps for the next create remains: its directory (marked by
    // spare.json) and its cgroups.
    let containers_dir = data_dir.join("containers");
    let spares: Vec<String> = std::fs::read_dir(&containers_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("spare.json").exists())
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(spares.len() <= 1, "spares: {spares:?}");
    let is_spare = |p: &std::path::Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| spares.iter().any(|s| n == s || n == format!("c{s}")))
    };
    let children: Vec<_> = cgroup_children(&grid)
        .into_iter()
        .filter(|c| !is_spare(c))
        .collect();
    assert!(children.is_empty(), "cgroups left: {children:?}");
    let mounts = mounts_naming(&data_dir, core0_pid);
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    let left: Vec<_> = std::fs::read_dir(&containers_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !is_spare(p))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "container directories left: {left:?}");
}

#[test]
fn big_files_and_escapes() {
    in_own_netns(big_files_and_escapes_body());
}

async fn big_files_and_escapes_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    let mut body = create_body("edges", &image);
    body["nics"] = json!([]);
    create_container(&http, &node, body).await;
    let base = format!("{node}/containers/edges");

    // 10 MiB and a bit of random bytes, in and out, byte for byte.
    let mut content = vec![0u8; 10 * 1024 * 1024 + 12_345];
    rand::rng().fill_bytes(&mut content);
    assert_eq!(upload(&http, &base, "/root/big.bin", &content).await, 204);
    let (status, got) = download(&http, &base, "/root/big.bin").await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), content.len());
    assert!(got == content, "downloaded bytes differ");

    // A host directory the container must never reach.
    let host_dir = test_dir("escape");
    let target = host_dir.join("target");
    std::fs::write(&target, b"host").expect("write host file");
    let target_s = target.to_str().expect("utf-8 path").to_string();
    let host_tmp = PathBuf::from(format!(
        "/tmp/grid-escape-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let host_tmp_s = host_tmp.to_str().expect("utf-8 path").to_string();

    // `..` stays in the container: the container's /etc/passwd, not the host's.
    let (status, got) = download(&http, &base, "/root/../../../../etc/passwd").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), IMAGE_PASSWD);
    // A write through `..` lands in the container's /tmp, not the host's.
    let through_dots = format!("/root/../../..{host_tmp_s}");
    assert_eq!(upload(&http, &base, &through_dots, b"inside").await, 204);
    assert!(!host_tmp.exists(), "{through_dots} reached the host");
    let (status, got) = download(&http, &base, &host_tmp_s).await;
    assert_eq!((status, got.as_slice()), (200, &b"inside"[..]));
    // The host file's absolute path and the same behind `..`: not the host's file.
    for p in [target_s.clone(), format!("/../../{target_s}")] {
        let status = upload(&http, &base, &p, b"escaped").await;
        assert_ne!(
            status, 204,
            "{p}: a directory of the host's path exists in the container"
        );
        let (status, _) = download(&http, &base, &p).await;
        assert_eq!(status, 404, "{p} reads a host file");
    }

    // Symlinks made inside by a job: to `/` and to the host file's path.
    let job = start_process(
        &http,
        &base,
        json!({"name": "/bin/sh", "args": ["-c",
            format!("ln -s / /root/hostroot && ln -s {target_s} /root/direct && mkdir -p /root/d && ln -s /tmp /root/d/up")]}),
    )
    .await;
    let result = grid_tests::wait_job(&http, &base, &job).await;
    assert_eq!(result["state"], "success", "{result}");
    let via_root = format!("/root/hostroot{host_tmp_s}-2");
    assert_eq!(upload(&http, &base, &via_root, b"inside").await, 204);
    assert!(
        !Path::new(&format!("{host_tmp_s}-2")).exists(),
        "{via_root} reached the host"
    );
    let status = upload(
        &http,
        &base,
        &format!("/root/hostroot{target_s}"),
        b"escaped",
    )
    .await;
    assert_ne!(
        status, 204,
        "the host file's directory exists in the container"
    );
    let status = upload(&http, &base, "/root/direct", b"escaped").await;
    assert_ne!(status, 204, "a symlink to a host path was followed out");
    let (status, _) = download(&http, &base, "/root/direct").await;
    assert_eq!(status, 404);
    let (status, got) = download(&http, &base, "/root/hostroot/etc/passwd").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), IMAGE_PASSWD);
    assert_eq!(
        std::fs::read(&target).expect("host file"),
        b"host",
        "the host file was written"
    );
    let entries: Vec<_> = std::fs::read_dir(&host_dir)
        .expect("host dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 1, "new files in the host dir: {entries:?}");

    remove_container(&http, &node, "edges").await;
}

/// A process in a network namespace of its own (made with `unshare --net`), killed on drop; the
/// namespace and any veth end moved into it vanish with it.
struct PeerNetns {
    proc: Proc,
}

impl PeerNetns {
    fn start() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("run unshare");
        let proc = Proc {
            child,
            name: "peer netns".into(),
        };
        let pid = proc.pid();
        let own = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        wait_until(
            "the peer has its own netns",
            Duration::from_secs(10),
            || {
                std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n != own)
                    && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
            },
        )
        .expect("unshare --net starts");
        Self { proc }
    }

    /// Runs `args` in the peer's network namespace; panics unless it succeeds.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run nsenter");
        assert!(
            out.status.success(),
            "{args:?} in the peer netns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.proc.pid().to_string())
            .arg("-n")
            .args(args)
            .stdin(Stdio::null());
        c
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

#[test]
fn a_port_forward_answers_from_another_netns() {
    in_own_netns(a_port_forward_answers_from_another_netns_body());
}

async fn a_port_forward_answers_from_another_netns_body() {
    let grid = TestGrid::start().await;
    let http = grid.api.client();
    let node = grid.node_path(0);
    let image = busybox_image();
    let mut body = create_body("web", &image);
    body["ports"] = json!(["8080:80"]);
    create_container(&http, &node, body).await;
    let base = format!("{node}/containers/web");
    start_process(
        &http,
        &base,
        json!({"name": "/bin/nc", "args": ["-ll", "-p", "80", "-e", "/bin/echo", "hi"]}),
    )
    .await;

    // A peer namespace linked to the node's (this test's) by a veth.
    let peer = PeerNetns::start();
    let pid = peer.proc.pid().to_string();
    ip(&[
        "link", "add", "tpeer0", "type", "veth", "peer", "name", "tpeer1",
    ]);
    ip(&["link", "set", "tpeer1", "netns", &pid]);
    ip(&["addr", "add", "10.231.0.1/24", "dev", "tpeer0"]);
    ip(&["link", "set", "tpeer0", "up"]);
    peer.run(&["ip", "link", "set", "lo", "up"]);
    peer.run(&["ip", "addr", "add", "10.231.0.2/24", "dev", "tpeer1"]);
    peer.run(&["ip", "link", "set", "tpeer1", "up"]);

    // The listener starts asynchronously: ask until it answers.
    let mut last = String::new();
    let answered = wait_until(
        "the forwarded port answers from the peer",
        Duration::from_secs(20),
        || {
            let out = peer
                .command(&["busybox", "nc", "-w", "2", "10.231.0.1", "8080"])
                .output()
                .expect("run nc");
            last = format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim() == "hi"
        },
    );
    assert!(answered.is_ok(), "last answer: {last:?}");

    remove_container(&http, &node, "web").await;
    // The forward went with the container.
    let out = peer
        .command(&["busybox", "nc", "-w", "2", "10.231.0.1", "8080"])
        .output()
        .expect("run nc");
    assert_ne!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
}
