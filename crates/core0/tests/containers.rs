//! End-to-end tests of containers: the real core0 binary (as root) with a test redis-server on a
//! unix socket, a busybox image built here as a `file://` tarball, driven only with raw Redis
//! commands. Networking tests run core0 inside a network namespace the test makes.

mod common;

use common::{push, result};
use grid_proto::wire::{CommandResult, State, StreamRecord, meta};
use serde_json::{Value, json};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Node indexes of this test run: distinct per test, so cgroups and names never collide.
fn node_idx() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 500 + (std::process::id() % 40) as u16 * 10;
    base + NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A redis-server on a unix socket (reachable from any network namespace), killed on drop.
struct Redis {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("redis.sock");
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let url = format!("unix://{}", sock.display());
        let r = Redis {
            child,
            url,
            _dir: dir,
        };
        drop(r.conn());
        r
    }

    fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            // Readiness poll: the server accepts connections once it is up.
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return c;
            }
            assert!(Instant::now() < until, "redis does not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace of the test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("gridt-{}-{tag}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip")
                .success(),
            "ip netns add {name}"
        );
        let ns = Netns(name);
        ns.out(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn out(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The node's data: a temp dir with its node index; on drop every container's corex is killed
/// and the node's cgroup parent removed.
struct Node {
    dir: tempfile::TempDir,
    idx: u16,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = node_idx();
        std::fs::write(dir.path().join("node-index"), idx.to_string()).expect("node index");
        Node { dir, idx }
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    fn container_dir(&self, id: u64) -> PathBuf {
        self.data().join("containers").join(id.to_string())
    }

    fn cgroup_parent(&self) -> String {
        format!("grid/n{}", self.idx)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.data().join("containers")) {
            for e in entries.flatten() {
                if let Ok(rec) = std::fs::read_to_string(e.path().join("corex.pid"))
                    && let Some(pid) = rec.split_whitespace().next().and_then(|p| p.parse().ok())
                {
                    // SAFETY: kill(2) with integer arguments; corex's pid from its record.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Ok(layout) = core0::containers::cgroups::Layout::detect(Path::new(
            core0::containers::cgroups::CGROUP_ROOT,
        )) {
            let _ = core0::containers::cgroups::remove_parent(
                &layout,
                &self.cgroup_parent(),
                Duration::from_secs(5),
            );
        }
    }
}

/// A core0 process on a node's data directory, killed on drop.
struct Core0 {
    child: Child,
    _lines: mpsc::Receiver<String>,
}

impl Core0 {
    fn start(node: &Node, redis: &Redis, netns: Option<&Netns>) -> Self {
        let mut cmd = match netns {
            Some(ns) => {
                // nsenter switches only the network namespace (`ip netns exec` would also
                // remount /sys, hiding the cgroup hierarchy).
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.0))
                    .arg(env!("CARGO_BIN_EXE_core0"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_core0")),
        };
        cmd.args(["--node-id", "testnode", "--data-dir"])
            .arg(node.data())
            .args(["--redis-url", &redis.url])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        if std::env::var_os("CORE0_TEST_LOG").is_none() {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().expect("start core0");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("core0 ready line");
        assert!(line.starts_with("core0 ready"), "{line}");
        Core0 {
            child,
            _lines: lines,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM (a normal stop) and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.child.wait().expect("core0 exits")
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Core0 {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A busybox root file system as a tarball (`file://` image), in its own temp dir.
struct Image {
    _dir: tempfile::TempDir,
    url: String,
}

impl Image {
    fn build() -> Self {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "needs a static /bin/busybox (apt-get install busybox-static)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("busybox.tar");
        let file = std::fs::File::create(&path).expect("create tar");
        let mut tar = tar::Builder::new(file);
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(if d == "tmp" { 0o1777 } else { 0o755 });
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            tar.append_data(&mut h, d, std::io::empty())
                .expect("dir entry");
        }
        tar.append_path_with_name(busybox, "bin/busybox")
            .expect("busybox entry");
        let list = Command::new(busybox)
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet.is_empty() || applet == "busybox" {
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
                .expect("applet link");
        }
        tar.into_inner().expect("finish tar");
        Image {
            url: format!("file://{}", path.display()),
            _dir: dir,
        }
    }
}

fn run(c: &mut redis::Connection, id: &str, command: &str, args: Value) -> CommandResult {
    push(c, json!({"id": id, "command": command, "arguments": args}));
    result(c, id, 60)
}

fn ok(c: &mut redis::Connection, id: &str, command: &str, args: Value) -> Value {
    let r = run(c, id, command, args);
    assert_eq!(r.state, State::Success, "{command}: {}", r.data);
    r.json_data().expect("json data")
}

fn create(c: &mut redis::Connection, id: &str, args: Value) -> u64 {
    ok(c, id, "corex.create", args)
        .as_u64()
        .expect("container id")
}

/// Dispatches `cmd` into `container` and waits for its result.
fn dispatch(c: &mut redis::Connection, container: u64, cmd: Value) -> CommandResult {
    let id = cmd["id"].as_str().expect("command id").to_string();
    let got = ok(
        c,
        &format!("d-{id}"),
        "corex.dispatch",
        json!({"container": container, "command": cmd}),
    );
    assert_eq!(got, json!(id), "dispatch returns the job id");
    result(c, &id, 60)
}

fn inside(
    c: &mut redis::Connection,
    container: u64,
    id: &str,
    command: &str,
    args: Value,
) -> CommandResult {
    dispatch(
        c,
        container,
        json!({"id": id, "command": command, "arguments": args}),
    )
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Starts a TCP listener on port 8081 in container `id` (busybox nc) and waits until it listens.
fn go_listen(c: &mut redis::Connection, id: u64) {
    let r = inside(
        c,
        id,
        "listen",
        "bash",
        json!({"script": "nc -l -p 8081 </dev/null >/dev/null 2>&1 & for i in $(seq 100); do netstat -ltn | grep -q ':8081 ' && exit 0; sleep 0.05; done; exit 1"}),
    );
    assert_eq!(r.state, State::Success, "listener: {}", r.data);
}

/// The ids of the node's spare containers (directories marked by `spare.json`).
fn spares(node: &Node) -> Vec<u64> {
    let root = node.data().join("containers");
    let mut ids: Vec<u64> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.path()
                        .join(core0::containers::runtime::SPARE_NAME)
                        .exists()
                })
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Waits for the spare core0 makes after it starts or after a create (no event announces it):
/// its directory, and its corex alone in its cgroups (the init process that forked it gone).
fn wait_spare(node: &Node, not: &[u64]) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(id) = spares(node).into_iter().find(|i| !not.contains(i))
            && procs_in(node, id).len() == 1
        {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spare container appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes in container `id`'s cgroups.
fn procs_in(node: &Node, id: u64) -> Vec<i32> {
    let mut out = Vec::new();
    for d in cgroup_dirs(node, id) {
        if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn corex_pid(list: &Value, id: u64) -> i32 {
    list[id.to_string()]["container"]["pid"]
        .as_i64()
        .expect("corex pid") as i32
}

fn cgroup_dirs(node: &Node, id: u64) -> Vec<PathBuf> {
    let layout = core0::containers::cgroups::Layout::detect(Path::new(
        core0::containers::cgroups::CGROUP_ROOT,
    ))
    .expect("cgroup layout");
    let parent = node.cgroup_parent();
    let mut out = Vec::new();
    let root = Path::new(core0::containers::cgroups::CGROUP_ROOT);
    let leaf = format!("{parent}/c{id}");
    if layout.is_v2() {
        out.push(root.join(&leaf));
    } else if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            out.push(e.path().join(&leaf));
        }
    }
    out
}

#[test]
fn container_lifecycle_dispatch_and_confinement() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let core0 = Core0::start(&node, &redis, None);
    let mut c = redis.conn();

    let id = create(
        &mut c,
        "create-1",
        json!({"root": image.url, "name": "box_1", "tags": ["grid:box_1", "grid-gen:1"]}),
    );
    let list = ok(&mut c, "list-1", "corex.list", Value::Null);
    let entry = &list[id.to_string()];
    assert_eq!(entry["container"]["state"], "running");
    assert_eq!(entry["container"]["name"], "box_1");
    assert_eq!(entry["container"]["arguments"]["tags"][0], "grid:box_1");
    let pid = corex_pid(&list, id);
    assert!(alive(pid));
    let found = ok(
        &mut c,
        "find-1",
        "corex.find",
        json!({"tags": ["grid:box_1"]}),
    );
    assert!(found.get(id.to_string()).is_some());
    let none = ok(
        &mut c,
        "find-2",
        "corex.find",
        json!({"tags": ["grid:other"]}),
    );
    assert_eq!(none, json!({}));

    // A process job: result with the container id, output, exit code, stream records.
    let r = dispatch(
        &mut c,
        id,
        json!({"id": "sh-1", "command": "core.system", "stream": true,
               "arguments": {"name": "sh", "args": ["-c", "echo hi; echo oops >&2; exit 3"]}}),
    );
    assert_eq!(r.state, State::Error);
    assert_eq!(r.code, Some(3));
    assert_eq!(r.container, id);
    assert_eq!(r.stdout(), "hi\n");
    assert_eq!(r.stderr(), "oops\n");
    let records: Vec<String> = redis::cmd("LRANGE")
        .arg("stream:sh-1")
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .expect("lrange");
    let records: Vec<StreamRecord> = records
        .iter()
        .map(|r| serde_json::from_str(r).expect("record json"))
        .collect();
    assert!(records.len() >= 3, "{records:?}");
    assert!(records.iter().all(|r| r.core == id));
    assert!(
        records
            .iter()
            .any(|r| r.message.message == "hi" && r.message.meta == meta::pack(1, meta::STREAM))
    );
    assert!(records.last().expect("records").message.is_exit());
    let r = inside(&mut c, id, "bash-1", "bash", json!({"script": "hostname"}));
    assert_eq!((r.state, r.stdout()), (State::Success, "box_1\n"));

    // max_time inside the container.
    let r = dispatch(
        &mut c,
        id,
        json!({"id": "slow-1", "command": "bash", "max_time": 1,
               "arguments": {"script": "sleep 30"}}),
    );
    assert_eq!(r.state, State::Timeout);

    // Processes: the container's pid namespace only, corex as pid 1.
    let r = inside(&mut c, id, "ps-1", "process.list", Value::Null);
    assert_eq!(r.state, State::Success, "{}", r.data);
    let procs: Vec<Value> = r.json_data().expect("process list");
    assert!(
        procs.iter().any(|p| p["pid"] == 1
            && p["cmdline"]
                .as_str()
                .is_some_and(|s| s.starts_with("corex "))),
        "{procs:?}"
    );
    assert!(procs.len() < 5, "host processes leaked: {procs:?}");
    assert!(!procs.iter().any(|p| {
        p["cmdline"]
            .as_str()
            .is_some_and(|s| s.contains("redis-server"))
    }));

    // Files: confined to the container root.
    let fd: String = inside(
        &mut c,
        id,
        "fo-1",
        "filesystem.open",
        json!({"file": "/tmp/keep", "mode": "w"}),
    )
    .json_data()
    .expect("fd");
    let r = inside(
        &mut c,
        id,
        "fw-1",
        "filesystem.write",
        json!({"fd": fd, "block": "a2VwdA=="}),
    );
    assert_eq!(r.state, State::Success, "{}", r.data);
    inside(&mut c, id, "fc-1", "filesystem.close", json!({"fd": fd}));
    let r = inside(
        &mut c,
        id,
        "cat-1",
        "bash",
        json!({"script": "cat /tmp/keep"}),
    );
    assert_eq!(r.stdout(), "kept\n");
    let fd: String = inside(
        &mut c,
        id,
        "fo-2",
        "filesystem.open",
        json!({"file": "/tmp/keep"}),
    )
    .json_data()
    .expect("fd");
    let block: String = inside(&mut c, id, "fr-1", "filesystem.read", json!({"fd": fd}))
        .json_data()
        .expect("block");
    assert_eq!(block, "a2VwdA==");
    let host_passwd = std::fs::read_to_string("/etc/passwd").expect("host passwd");
    let r = inside(
        &mut c,
        id,
        "fo-3",
        "filesystem.open",
        json!({"file": "../../../../etc/passwd"}),
    );
    if r.state == State::Success {
        let fd: String = r.json_data().expect("fd");
        let b: String = inside(&mut c, id, "fr-2", "filesystem.read", json!({"fd": fd}))
            .json_data()
            .expect("block");
        assert_ne!(b, base64_of(&host_passwd), "host file read through ..");
    }
    let r = inside(
        &mut c,
        id,
        "ln-1",
        "bash",
        json!({"script": "ln -s / /tmp/hostroot && ln -s ../../../../etc /tmp/etc"}),
    );
    assert_eq!(r.state, State::Success);
    let entries: Vec<Value> = inside(
        &mut c,
        id,
        "fl-1",
        "filesystem.list",
        json!({"path": "/tmp/hostroot/tmp"}),
    )
    .json_data()
    .expect("list");
    assert!(
        entries.iter().any(|e| e["name"] == "keep"),
        "symlink to / stays in the container: {entries:?}"
    );
    let exists: bool = inside(
        &mut c,
        id,
        "fe-1",
        "filesystem.exists",
        json!({"path": format!("/tmp/hostroot{}", node.data().display())}),
    )
    .json_data()
    .expect("bool");
    assert!(!exists, "host path reached through a symlink made inside");
    let r = inside(
        &mut c,
        id,
        "fm-1",
        "filesystem.mkdir",
        json!({"path": "/tmp/etc/made"}),
    );
    assert_eq!(r.state, State::Success);
    assert!(!Path::new("/etc/made").exists());

    // Unknown container and unknown command.
    let r = run(
        &mut c,
        "d-bad",
        "corex.dispatch",
        json!({"container": 9999, "command": {"id": "x", "command": "bash"}}),
    );
    assert_eq!(r.state, State::Error);
    let r = inside(&mut c, id, "nope-1", "no.such", Value::Null);
    assert_eq!(r.state, State::UnknownCmd);

    // Stop keeps the upper layer; start resumes it.
    ok(&mut c, "stop-1", "corex.stop", json!({"container": id}));
    assert!(!alive(pid));
    let list = ok(&mut c, "list-2", "corex.list", Value::Null);
    assert_eq!(list[id.to_string()]["container"]["state"], "halted");
    let r = run(&mut c, "stop-2", "corex.stop", json!({"container": id}));
    assert_eq!(
        r.json_data::<String>().expect("text"),
        format!("container {id} is already halted")
    );
    let r = run(
        &mut c,
        "d-halted",
        "corex.dispatch",
        json!({"container": id, "command": {"id": "y", "command": "bash", "arguments": {"script": "true"}}}),
    );
    assert_eq!(r.state, State::Error);
    ok(&mut c, "start-1", "corex.start", json!({"container": id}));
    let r = inside(
        &mut c,
        id,
        "cat-2",
        "bash",
        json!({"script": "cat /tmp/keep"}),
    );
    assert_eq!(r.stdout(), "kept\n");
    let list = ok(&mut c, "list-3", "corex.list", Value::Null);
    let pid = corex_pid(&list, id);

    // Terminate leaves nothing.
    ok(
        &mut c,
        "term-1",
        "corex.terminate",
        json!({"container": id}),
    );
    assert!(!alive(pid));
    assert!(!node.container_dir(id).exists());
    for d in cgroup_dirs(&node, id) {
        assert!(!d.exists(), "{} left", d.display());
    }
    let list = ok(&mut c, "list-4", "corex.list", Value::Null);
    assert_eq!(list, json!({}));
    let r = run(
        &mut c,
        "term-2",
        "corex.terminate",
        json!({"container": id}),
    );
    assert_eq!(
        r.json_data::<String>().expect("text"),
        format!("container {id} not found")
    );
    drop(core0);
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn bad_input_leaves_nothing_behind() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let _core0 = Core0::start(&node, &redis, None);
    let mut c = redis.conn();
    let err = |c: &mut redis::Connection, id: &str, args: Value| -> String {
        let r = run(c, id, "corex.create", args);
        assert_eq!(r.state, State::Error, "{id}: {}", r.data);
        r.json_data().expect("error text")
    };
    let e = err(
        &mut c,
        "b1",
        json!({"root": "file:///nonexistent/image.tar"}),
    );
    assert!(e.contains("nonexistent"), "{e}");
    let e = err(&mut c, "b2", json!({"root": "ftp://host/x.tar"}));
    assert!(!e.is_empty());
    let e = err(
        &mut c,
        "b3",
        json!({"root": image.url, "nics": [{"type": "vlan"}]}),
    );
    assert_eq!(e, "nic type vlan is not supported yet; supported: default");
    let e = err(
        &mut c,
        "b4",
        json!({"root": image.url, "filesystems": ["pool1:fs"]}),
    );
    assert_eq!(e, "storage pool pool1 not found");
    let e = err(
        &mut c,
        "b5",
        json!({"root": image.url, "nics": [{"type": "default"}], "port": {"x": 80}}),
    );
    assert!(e.contains("bad port"), "{e}");
    let id = create(&mut c, "ok-1", json!({"root": image.url, "name": "dup"}));
    let e = err(&mut c, "b6", json!({"root": image.url, "name": "dup"}));
    assert_eq!(e, "container dup already exists");
    // Only the container and the spare waiting for the next create have a directory.
    let spare = wait_spare(&node, &[]);
    let mut dirs: Vec<u64> = std::fs::read_dir(node.data().join("containers"))
        .expect("containers dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    dirs.sort_unstable();
    assert_eq!(dirs, vec![id, spare]);
    ok(&mut c, "t-1", "corex.terminate", json!({"container": id}));
}

#[test]
fn default_nic_gets_address_and_forward() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let ns = Netns::new("nic");
    let _core0 = Core0::start(&node, &redis, Some(&ns));
    let mut c = redis.conn();
    let id = create(
        &mut c,
        "n-1",
        json!({"root": image.url, "name": "web", "nics": [{"type": "default"}], "port": {"8080": 80}}),
    );
    let list = ok(&mut c, "nl-1", "corex.list", Value::Null);
    let ip = list[id.to_string()]["container"]["ip"]
        .as_str()
        .expect("an address")
        .to_string();
    let r = inside(
        &mut c,
        id,
        "ip-1",
        "bash",
        json!({"script": "ip -4 addr show eth0"}),
    );
    assert!(r.stdout().contains(&ip), "{}", r.stdout());
    // info.* in the container's view: its interfaces, its listening sockets with the pids seen
    // inside, its mounts.
    let nics = inside(&mut c, id, "in-nic", "info.nic", Value::Null);
    let nics: Value = nics.json_data().expect("nics");
    let names: Vec<&str> = nics
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, vec!["lo", "eth0"], "{nics}");
    assert!(nics.to_string().contains(&format!("{ip}/")), "{nics}");
    go_listen(&mut c, id);
    let ports: Value = inside(&mut c, id, "in-port", "info.port", Value::Null)
        .json_data()
        .expect("ports");
    let listener = ports
        .as_array()
        .expect("array")
        .iter()
        .find(|p| (p["network"] == "tcp" || p["network"] == "tcp6") && p["port"] == 8081)
        .cloned()
        .unwrap_or_else(|| panic!("port 8081 listed: {ports}"));
    let pid = listener["pid"].as_i64().expect("owner pid");
    assert!(pid > 1 && pid < 100, "a pid as seen inside: {listener}");
    // corex's control socket is the node's business, not the container's.
    assert!(!ports.to_string().contains("corex.sock"), "{ports}");
    let disks: Value = inside(&mut c, id, "in-disk", "info.disk", Value::Null)
        .json_data()
        .expect("disks");
    let root = disks
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["mountpoint"] == "/")
        .cloned()
        .unwrap_or_else(|| panic!("/ listed: {disks}"));
    assert_eq!(root["fstype"], "overlay", "{root}");
    assert!(root["size"].as_u64().is_some_and(|s| s > 0), "{root}");
    let table = format!("grid{}", node.idx);
    let rules = ns.out(&["nft", "list", "table", "inet", &table]);
    assert!(
        rules.contains("dport 8080") && rules.contains(&ip),
        "{rules}"
    );
    let veth = format!("gv{}c{id}n0", node.idx);
    assert!(ns.out(&["ip", "link", "show"]).contains(&veth));
    ok(&mut c, "nt-1", "corex.terminate", json!({"container": id}));
    let rules = ns.out(&["nft", "list", "table", "inet", &table]);
    assert!(!rules.contains("dport 8080"), "{rules}");
    assert!(!ns.out(&["ip", "link", "show"]).contains(&veth));
}

#[test]
fn core0_restart_adopts_containers_and_delivers_results() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let mut core0 = Core0::start(&node, &redis, None);
    let mut c = redis.conn();
    let id = create(&mut c, "a-1", json!({"root": image.url, "name": "keep"}));
    let go = |c: &mut redis::Connection, job: &str, script: &str| {
        let got = ok(
            c,
            &format!("d-{job}"),
            "corex.dispatch",
            json!({"container": id, "command": {"id": job, "command": "bash", "arguments": {"script": script}}}),
        );
        assert_eq!(got, json!(job));
    };
    // One job ends while core0 is down, one after it is back.
    go(&mut c, "early", "sleep 1; echo early");
    go(&mut c, "late", "sleep 4; echo late");
    // The spare made after the create waits in its own namespaces and cgroups.
    let spare = wait_spare(&node, &[]);
    let spare_pids = procs_in(&node, spare);
    assert_eq!(spare_pids.len(), 1, "{spare_pids:?}");
    let ns = |pid: i32, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
    for kind in ["net", "mnt", "uts", "ipc"] {
        assert_ne!(
            ns(spare_pids[0], kind),
            ns(core0.pid(), kind),
            "{kind} namespace"
        );
    }
    core0.sigkill();
    std::thread::sleep(Duration::from_secs(2));
    // Its pipe closed with core0: the spare ended by itself.
    assert!(!alive(spare_pids[0]), "spare corex outlived its core0");
    let _core0 = Core0::start(&node, &redis, None);
    // The next core0 removes it and makes its own.
    let fresh = wait_spare(&node, &[spare]);
    assert!(fresh > spare && fresh != id);
    assert!(!node.container_dir(spare).exists());
    for d in cgroup_dirs(&node, spare) {
        assert!(!d.exists(), "{} left", d.display());
    }
    let list = ok(&mut c, "a-2", "corex.list", Value::Null);
    assert_eq!(list[id.to_string()]["container"]["state"], "running");
    let r = result(&mut c, "early", 30);
    assert_eq!((r.state, r.container), (State::Success, id));
    let r = result(&mut c, "late", 30);
    assert_eq!(
        (r.state, r.container, r.stdout()),
        (State::Success, id, "late\n")
    );
    let r = inside(&mut c, id, "after", "bash", json!({"script": "echo again"}));
    assert_eq!(r.stdout(), "again\n");
    ok(&mut c, "a-3", "corex.terminate", json!({"container": id}));
}

#[test]
fn bind_mounts_show_host_paths_inside() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let _core0 = Core0::start(&node, &redis, None);
    let mut c = redis.conn();
    let host = tempfile::tempdir().expect("tempdir");
    let shared = host.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::write(shared.join("from-host"), "hello from the host\n").expect("write");
    let conf = host.path().join("extra.conf");
    std::fs::write(&conf, "key=value\n").expect("write");
    let id = create(
        &mut c,
        "m-1",
        json!({"root": image.url, "name": "binds", "mount": {
            shared.to_str().expect("utf-8"): "/mnt/shared",
            conf.to_str().expect("utf-8"): "/etc/extra.conf",
        }}),
    );
    let r = inside(
        &mut c,
        id,
        "m-2",
        "bash",
        json!({"script": "cat /mnt/shared/from-host /etc/extra.conf && echo written > /mnt/shared/from-inside"}),
    );
    assert_eq!(
        (r.state, r.stdout()),
        (State::Success, "hello from the host\nkey=value\n")
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("from-inside")).expect("written inside"),
        "written\n"
    );
    // The bind mounts live in the container's mount namespace only.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!host_mounts.contains("/mnt/shared"), "{host_mounts}");
    ok(&mut c, "m-3", "corex.terminate", json!({"container": id}));
    assert!(shared.join("from-host").exists(), "the host's files stay");

    let err = |c: &mut redis::Connection, id: &str, mount: Value| -> String {
        let r = run(
            c,
            id,
            "corex.create",
            json!({"root": image.url, "mount": mount}),
        );
        assert_eq!(r.state, State::Error, "{id}: {}", r.data);
        r.json_data().expect("error text")
    };
    let src = shared.to_str().expect("utf-8");
    let e = err(&mut c, "mb-1", json!({"/nonexistent/grid-src": "/x"}));
    assert!(e.contains("does not exist"), "{e}");
    let e = err(&mut c, "mb-2", json!({src: "relative/x"}));
    assert!(e.contains("mount target"), "{e}");
    let e = err(&mut c, "mb-3", json!({src: "/a/../../x"}));
    assert!(e.contains("mount target"), "{e}");
    let e = err(&mut c, "mb-4", json!({src: "/"}));
    assert!(e.contains("mount target"), "{e}");
    let e = err(&mut c, "mb-5", json!({"https://hub/x.flist": "/x"}));
    assert!(e.contains("image mounts are not supported"), "{e}");
}

#[test]
fn filesystem_chown_uses_the_containers_accounts() {
    let redis = Redis::start();
    let node = Node::new();
    let image = Image::build();
    let _core0 = Core0::start(&node, &redis, None);
    let mut c = redis.conn();
    let id = create(&mut c, "o-1", json!({"root": image.url, "name": "owners"}));
    let r = inside(
        &mut c,
        id,
        "o-2",
        "bash",
        json!({"script": "echo 'app:x:1234:1234::/:/bin/sh' > /etc/passwd && echo 'staff:x:4321:' > /etc/group && mkdir -p /tmp/owned/sub && touch /tmp/owned/sub/f && ln -s /etc/passwd /tmp/owned/link"}),
    );
    assert_eq!(r.state, State::Success, "{}", r.data);
    let chown = |c: &mut redis::Connection, job: &str, args: Value| {
        inside(c, id, job, "filesystem.chown", args)
    };
    let r = chown(
        &mut c,
        "o-3",
        json!({"path": "/tmp/owned", "user": "app", "group": "staff", "recursive": true}),
    );
    assert_eq!(r.state, State::Success, "{}", r.data);
    let r = inside(
        &mut c,
        id,
        "o-4",
        "bash",
        json!({"script": "stat -c %u:%g /tmp/owned /tmp/owned/sub/f /etc/passwd"}),
    );
    // The symlink's target (outside the tree) is left alone.
    assert_eq!(r.stdout(), "1234:4321\n1234:4321\n0:0\n");
    let r = chown(
        &mut c,
        "o-5",
        json!({"path": "/tmp/owned", "user": "ghost", "group": ""}),
    );
    assert_eq!(r.state, State::Error);
    assert!(r.data.contains("unknown user ghost"), "{}", r.data);
    let r = chown(
        &mut c,
        "o-6",
        json!({"path": "/tmp/owned", "user": "77", "group": ""}),
    );
    assert_eq!(r.state, State::Success, "{}", r.data);
    // chmod goes down the tree the same way, symlinks not followed.
    let r = inside(
        &mut c,
        id,
        "o-7",
        "filesystem.chmod",
        json!({"path": "/tmp/owned", "mode": 0o750, "recursive": true}),
    );
    assert_eq!(r.state, State::Success, "{}", r.data);
    let r = inside(
        &mut c,
        id,
        "o-8",
        "bash",
        json!({"script": "stat -c %a /tmp/owned/sub /tmp/owned/sub/f /etc/passwd"}),
    );
    assert_eq!(r.stdout(), "750\n750\n644\n");
    ok(&mut c, "o-9", "corex.terminate", json!({"container": id}));
}

#[test]
fn a_normal_stop_removes_the_spare() {
    let redis = Redis::start();
    let node = Node::new();
    let mut core0 = Core0::start(&node, &redis, None);
    let spare = wait_spare(&node, &[]);
    let pid = procs_in(&node, spare)[0];
    assert!(core0.stop().success());
    assert!(!alive(pid), "spare corex left running");
    assert!(!node.container_dir(spare).exists());
    for d in cgroup_dirs(&node, spare) {
        assert!(!d.exists(), "{} left", d.display());
    }
}
