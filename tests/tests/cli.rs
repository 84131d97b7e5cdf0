//! `grid dev` and the `grid` CLI, as a user runs them.

use grid_tests::{GracefulProc, Proc, bin, free_port, test_dir, wait_ready_line};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn children_of(root: i32) -> HashSet<i32> {
    let mut all: Vec<(i32, i32)> = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        all.push((pid, ppid));
    }
    let mut out = HashSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &all {
            if ppid == p && out.insert(pid) {
                frontier.push(pid);
            }
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn grid_dev_runs_a_grid_that_the_cli_drives_and_cleans_up_on_sigint() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(bin("grid"))
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--nodes",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start grid dev");
    let stdout = child.stdout.take().expect("piped");
    let mut dev = GracefulProc(Proc {
        child,
        name: "grid dev".into(),
    });

    // `token: <token>` first, then `ready: http://...`.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let token_line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("grid dev prints its token");
    let token = token_line
        .strip_prefix("token: ")
        .expect("first line is `token: <token>`")
        .to_string();
    let ready = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("grid dev gets ready");
    assert_eq!(ready, format!("ready: {url}"));

    let grid = |args: &[&str]| {
        Command::new(bin("grid"))
            .args(args)
            .env("GRID_URL", &url)
            .env("GRID_TOKEN", &token)
            .output()
            .expect("run grid")
    };
    let out = grid(&["--json", "nodes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    let nodes = nodes.as_array().expect("list").clone();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n["status"] == "running"));
    let id = nodes[0]["id"].as_str().expect("id").to_string();

    let out = grid(&["nodes"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&id) && table.contains("running"), "{table}");

    let out = grid(&[
        "job",
        "run",
        &id,
        "--",
        "sh",
        "-c",
        "echo hello; echo oops >&2; exit 3",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(3));

    let out = grid(&["node", &id, "mem"]);
    assert!(out.status.success());
    let out = grid(&["node", "nope", "mem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    // Everything grid dev started goes away with it.
    let started = children_of(dev.0.pid());
    assert!(
        started.len() >= 3,
        "grid-api, 2 core0 (and their redis) run under grid dev: {started:?}"
    );
    dev.0.signal(libc::SIGINT);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = dev.0.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "grid dev exits on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "grid dev exits 0 on SIGINT: {status}");
    let start = Instant::now();
    while started.iter().any(|&p| alive(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left running: {:?}",
            started.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the API port is closed"
    );
}

#[test]
fn grid_dev_with_a_data_dir_keeps_state_across_restarts() {
    let data = test_dir("dev-data");
    let token = "kept-token";
    let run = || {
        let port = free_port();
        let mut child = Command::new(bin("grid"))
            .args([
                "dev",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token",
                token,
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start grid dev");
        let stdout = child.stdout.take().expect("piped");
        let proc = GracefulProc(Proc {
            child,
            name: "grid dev".into(),
        });
        let ready = wait_ready_line(stdout, "ready: ", Duration::from_secs(90)).expect("ready");
        (proc, ready, port)
    };
    let (mut first, ready, port) = run();
    assert_eq!(ready, format!("ready: http://127.0.0.1:{port}"));
    let nodes_of = |port: u16| {
        let out = Command::new(bin("grid"))
            .args([
                "--json",
                "--url",
                &format!("http://127.0.0.1:{port}"),
                "--token",
                token,
                "nodes",
            ])
            .output()
            .expect("grid nodes");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let before = nodes_of(port);
    let status = first.stop(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "grid dev exits 0 on SIGTERM: {status:?}"
    );
    assert!(data.join("api").exists(), "--data-dir is kept");
    let (_second, _, port2) = run();
    assert_eq!(nodes_of(port2)[0]["id"], before[0]["id"]);
}
