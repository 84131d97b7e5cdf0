//! Test support: start the real binaries (`grid-api`, `core0`) and a real `redis-server` on free
//! ports, in a per-run directory, and remove everything they made even when a test fails.
//!
//! Every object carries the run's name (`grid-tests/run-<pid>`); the first test of a run removes
//! leftovers of earlier runs whose process is gone (never a live run's, never a `grid dev`'s).

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory holding every run's directory.
pub fn runs_root() -> PathBuf {
    std::env::temp_dir().join("grid-tests")
}

/// This run's directory, created (after cleaning leftovers of dead runs) on first use.
pub fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        clean_leftovers();
        let dir = runs_root().join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the temp dir is writable");
        dir
    })
}

/// A fresh directory for one test inside the run's directory.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = run_dir().join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("the run dir is writable");
    dir
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what runs whose test process is gone left behind: their processes (agents, APIs,
/// redis servers, jobs) and their directories.
pub fn clean_leftovers() {
    let Ok(entries) = std::fs::read_dir(runs_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let dir = entry.path();
        kill_processes_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kills every process whose command line or pid file points into `dir`.
pub fn kill_processes_under(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    // Pid files first: redis-server rewrites its title, and jobs run in their own groups.
    for pidfile in find_files(dir, &["redis.pid", ".pgid"]) {
        if let Ok(text) = std::fs::read_to_string(&pidfile)
            && let Ok(pid) = text.trim().parse::<i32>()
            && pid > 1
        {
            let group = pidfile.to_string_lossy().ends_with(".pgid");
            // SAFETY: kill(2) with a pid read from our own pid file; a stale pid is at worst ESRCH.
            unsafe {
                libc::kill(if group { -pid } else { pid }, libc::SIGKILL);
            }
        }
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&needle)
        {
            // SAFETY: kill(2) on a process that names our run directory in its command line.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn find_files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) => {
                    let name = path.to_string_lossy();
                    if suffixes.iter().any(|s| name.ends_with(s)) {
                        out.push(path);
                    }
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// Path of a workspace binary built next to the test executable (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// Polls `check` every 10 ms until it is true or `timeout` passes (for readiness signals that
/// can only be polled, such as a port starting to answer).
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{what} did not happen within {timeout:?}")
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Pid of the child.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGKILLs and reaps the child now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server started by a test (with a password, no persistence).
#[derive(Debug)]
pub struct Redis {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The password.
    pub password: String,
    /// The process.
    pub proc: Proc,
}

impl Redis {
    /// Starts a redis-server in `dir` on a free port and waits until it answers.
    pub fn start(dir: &Path) -> Result<Self> {
        let port = free_port();
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--requirepass",
                &password,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (is it installed? run scripts/setup.sh)")?;
        let redis = Self {
            addr: format!("127.0.0.1:{port}"),
            password,
            proc: Proc {
                child,
                name: "redis-server".into(),
            },
        };
        let url = redis.url();
        wait_until("redis-server answers PING", Duration::from_secs(10), || {
            redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        })?;
        Ok(redis)
    }

    /// `redis://:<password>@<addr>/`.
    pub fn url(&self) -> String {
        format!("redis://:{}@{}/", self.password, self.addr)
    }

    /// A blocking connection (no project code involved).
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("test redis answers")
    }
}

/// Options of a core0 started by a test.
#[derive(Debug, Clone, Default)]
pub struct Core0Opts {
    /// `--node-id` (default: a random test id).
    pub node_id: Option<String>,
    /// Use this Redis (`--redis-url`) instead of core0's own.
    pub redis_url: Option<String>,
    /// `--join <url> --join-token <token>`.
    pub join: Option<(String, String)>,
    /// `--reboot-downtime`.
    pub reboot_downtime: Option<u64>,
    /// The data dir (default: a fresh test dir).
    pub data_dir: Option<PathBuf>,
    /// The redis listen port for core0's own redis (default: a free port).
    pub redis_port: Option<u16>,
}

/// A running core0.
#[derive(Debug)]
pub struct Core0 {
    /// Node id.
    pub node_id: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// `host:port` of its Redis (its own, or the one it was given).
    pub redis_addr: String,
    /// The process.
    pub proc: Proc,
    /// The options it was started with (to restart it).
    pub opts: Core0Opts,
}

impl Core0 {
    /// Starts core0 and waits for its `core0 ready` line.
    pub fn start(opts: Core0Opts) -> Result<Self> {
        let mut opts = opts;
        let node_id = opts
            .node_id
            .get_or_insert_with(|| format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..11]))
            .clone();
        let data_dir = opts
            .data_dir
            .get_or_insert_with(|| test_dir("node"))
            .clone();
        let port = *opts.redis_port.get_or_insert_with(free_port);
        let mut cmd = Command::new(bin("core0"));
        cmd.arg("run")
            .arg("--node-id")
            .arg(&node_id)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--redis-listen")
            .arg(format!("127.0.0.1:{port}"));
        if let Some(url) = &opts.redis_url {
            cmd.arg("--redis-url").arg(url);
        }
        if let Some((url, token)) = &opts.join {
            cmd.arg("--join").arg(url).arg("--join-token").arg(token);
        }
        if let Some(d) = opts.reboot_downtime {
            cmd.arg("--reboot-downtime").arg(d.to_string());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("start core0")?;
        let stdout = child.stdout.take().context("core0 stdout is piped")?;
        let mut proc = Proc {
            child,
            name: format!("core0 {node_id}"),
        };
        let redis_addr = wait_ready_line(stdout, "core0 ready", Duration::from_secs(20))
            .with_context(|| format!("core0 {node_id} did not get ready"))
            .inspect_err(|_| proc.kill())?;
        let redis_addr = redis_addr
            .split_whitespace()
            .find_map(|w| w.strip_prefix("redis="))
            .map(str::to_string)
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        Ok(Self {
            node_id,
            data_dir,
            redis_addr,
            proc,
            opts,
        })
    }

    /// The password of core0's own redis.
    pub fn redis_password(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("redis.password"))
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for Core0 {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = Command::new(bin("core0"))
            .arg("teardown")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Reads `stdout` lines until one starts with `prefix`; then keeps draining it in a thread.
pub fn wait_ready_line(
    stdout: std::process::ChildStdout,
    prefix: &str,
    timeout: Duration,
) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !sent && line.starts_with(&wanted) {
                        let _ = tx.send(line.trim().to_string());
                        sent = true;
                    }
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("no line starting with {prefix:?} within {timeout:?}"))
}

/// Options of a grid-api started by a test.
#[derive(Debug, Clone, Default)]
pub struct ApiOpts {
    /// Extra TOML configuration.
    pub config_toml: Option<String>,
    /// The data dir (default: a fresh test dir).
    pub data_dir: Option<PathBuf>,
    /// The port (default: a free one).
    pub port: Option<u16>,
}

/// A running grid-api.
#[derive(Debug)]
pub struct Api {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Admin token.
    pub token: String,
    /// Join token.
    pub join_token: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// The process.
    pub proc: Proc,
    /// Options it was started with.
    pub opts: ApiOpts,
}

impl Api {
    /// Starts grid-api and waits until `/health` answers.
    pub fn start(opts: ApiOpts) -> Result<Self> {
        let mut opts = opts;
        let data_dir = opts.data_dir.get_or_insert_with(|| test_dir("api")).clone();
        let port = *opts.port.get_or_insert_with(free_port);
        let token = "admin-test-token".to_string();
        let join_token = "join-test-token".to_string();
        let mut cmd = Command::new(bin("grid-api"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--admin-token")
            .arg(&token)
            .arg("--join-token")
            .arg(&join_token);
        if let Some(toml) = &opts.config_toml {
            let path = data_dir.join("grid-api.toml");
            std::fs::write(&path, toml)?;
            cmd.arg("--config").arg(path);
        }
        // grid-api logs to stdout: shown with GRID_TEST_API_LOG set (RUST_LOG picks the level).
        let log = if std::env::var_os("GRID_TEST_API_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        cmd.stdout(log).stderr(Stdio::inherit());
        let child = cmd.spawn().context("start grid-api")?;
        let api = Self {
            url: format!("http://127.0.0.1:{port}"),
            token,
            join_token,
            data_dir,
            proc: Proc {
                child,
                name: "grid-api".into(),
            },
            opts,
        };
        let health = format!("{}/health", api.url);
        wait_until("grid-api answers /health", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && blocking_get_status(&health) == Some(200)
        })?;
        Ok(api)
    }

    /// Restarts the API with the same options and data dir.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        let again = Api::start(self.opts.clone())?;
        *self = again;
        Ok(())
    }

    /// An HTTP client sending the admin token.
    pub fn client(&self) -> Http {
        Http {
            base: self.url.clone(),
            token: Some(self.token.clone()),
            inner: reqwest::Client::new(),
        }
    }
}

fn blocking_get_status(url: &str) -> Option<u16> {
    // A tiny HTTP/1.0 GET so readiness checks need no runtime.
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// A thin JSON-over-HTTP client for tests.
#[derive(Debug, Clone)]
pub struct Http {
    /// Base URL.
    pub base: String,
    /// Bearer token.
    pub token: Option<String>,
    /// The reqwest client.
    pub inner: reqwest::Client,
}

/// A response: status, headers and the body parsed as JSON (Null when empty).
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body as JSON (Value::Null when empty; a string when not JSON).
    pub json: serde_json::Value,
    /// Raw body.
    pub text: String,
}

impl Http {
    /// Same client with another token (None = no Authorization header).
    pub fn with_token(&self, token: Option<&str>) -> Http {
        Http {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    /// Sends a request with an optional JSON body.
    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Resp> {
        let mut rb = self.inner.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await?;
        Self::read(r).await
    }

    /// Reads a response.
    pub async fn read(r: reqwest::Response) -> Result<Resp> {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await?;
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()))
        };
        Ok(Resp {
            status,
            headers,
            json,
            text,
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.req(reqwest::Method::GET, path, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> Result<Resp> {
        self.req(reqwest::Method::POST, path, Some(body)).await
    }

    /// POST without a body.
    pub async fn post_empty(&self, path: &str) -> Result<Resp> {
        self.req(reqwest::Method::POST, path, None).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Resp> {
        self.req(reqwest::Method::DELETE, path, None).await
    }
}

/// An API with `n` nodes joined to it.
#[derive(Debug)]
pub struct Grid {
    /// The API.
    pub api: Api,
    /// The nodes.
    pub nodes: Vec<Core0>,
}

impl Grid {
    /// Starts an API and `n` core0 nodes joined to it, and waits until every node is `running`.
    pub async fn start(n: usize) -> Result<Self> {
        let api = Api::start(ApiOpts::default())?;
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(Core0::start(Core0Opts {
                join: Some((api.url.clone(), api.join_token.clone())),
                ..Core0Opts::default()
            })?);
        }
        let grid = Self { api, nodes };
        for n in &grid.nodes {
            grid.wait_status(&n.node_id, "running", Duration::from_secs(20))
                .await?;
        }
        Ok(grid)
    }

    /// Polls `GET /nodes/{id}` until its status is `status`.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        let http = self.api.client();
        let start = Instant::now();
        loop {
            let r = http.get(&format!("/nodes/{id}")).await?;
            if r.status == 200 && r.json["status"] == status {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "node {id} not {status} within {timeout:?}: last answer {} {}",
                    r.status,
                    r.text
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/nodes/<id of node i>`.
    pub fn node_path(&self, i: usize) -> String {
        format!("/nodes/{}", self.nodes[i].node_id)
    }
}

/// A child that is asked to stop (SIGTERM, up to 30 s) before it is killed, on drop — for
/// supervisors such as `grid dev` that must clean up what they started.
#[derive(Debug)]
pub struct GracefulProc(pub Proc);

impl GracefulProc {
    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL after that.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.0.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.0.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.0.kill();
        None
    }
}

impl Drop for GracefulProc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.child.try_wait() {
            self.stop(Duration::from_secs(30));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Containers: a grid in a network namespace of the test's own, a busybox image, API helpers.

/// Runs `test` on this thread, moved first into a new network namespace with `lo` up. Every
/// process the test starts (redis-server, grid-api, core0, its containers) inherits it, and the
/// runtime is single-threaded so every socket the test opens is made there too; the namespace
/// disappears with the last of them. The NAT bridge, veths and nftables table of a default nic
/// land there, never on the host.
pub fn in_own_netns(test: impl std::future::Future<Output = ()>) {
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

/// A node index of its own for each container test of this test binary (900 to 999, apart from
/// the ones core0's own tests use): the node's cgroups (`grid/n<idx>`) are shared by the whole
/// host, so two tests at once must not both be node 0.
pub fn node_idx() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 900 + u16::try_from(std::process::id() % 20).expect("below 20") * 5;
    base + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 5
}

/// The grid of one container test (an API and one node with its own node index); on drop,
/// after the node's teardown, the node's cgroup parent `grid/n<idx>` is removed from the host.
#[derive(Debug)]
pub struct TestGrid {
    grid: Option<Grid>,
    /// The node's index (its cgroups are `grid/n<idx>`).
    pub idx: u16,
}

impl TestGrid {
    /// Starts grid-api and one core0 joined to it, and waits until the node runs.
    pub async fn start() -> Self {
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

    /// The node's cgroup directories on the host (`<hierarchy>/grid/n<idx>` that exist).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(controllers.flatten().map(|c| c.path()));
        }
        for r in roots {
            let d = r.join("grid").join(format!("n{}", self.idx));
            if d.is_dir() {
                out.push(d);
            }
        }
        out
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
        for d in self.cgroup_dirs() {
            // Empty by now (core0's terminate or teardown removed the containers' cgroups).
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A header with every numeric field set (an all-zero header is not a valid tar header).
fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The `/etc/passwd` of [`busybox_image`] (tests compare it with what they read back).
pub const IMAGE_PASSWD: &str = "root:x:0:0:container root:/root:/bin/sh\n";

/// Writes a root filesystem image (plain tar) holding `/bin/busybox` with a symlink per applet
/// it lists, `/etc/hosts` and `/etc/passwd` ([`IMAGE_PASSWD`]); returns its path (an absolute
/// path on the node, which is this host).
pub fn busybox_image() -> PathBuf {
    let dir = test_dir("image");
    let path = dir.join("busybox.tar");
    let file = std::fs::File::create(&path).expect("create image file");
    let mut tar = tar::Builder::new(file);
    for d in ["bin", "etc", "tmp", "proc", "dev", "sys", "root"] {
        let mut h = tar_header(
            tar::EntryType::Directory,
            if d == "tmp" { 0o1777 } else { 0o755 },
            0,
        );
        tar.append_data(&mut h, d, std::io::empty())
            .expect("directory entry");
    }
    tar.append_path_with_name("/bin/busybox", "bin/busybox")
        .expect("busybox entry");
    let listed = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("run busybox --list");
    let mut applets: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .filter(|a| !a.is_empty() && a != "busybox" && !a.contains('/'))
        .collect();
    for must in ["sh", "echo", "cat", "sleep", "ls", "true"] {
        if !applets.iter().any(|a| a == must) {
            applets.push(must.to_string());
        }
    }
    applets.sort();
    applets.dedup();
    for applet in applets {
        let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("applet link");
    }
    for (name, body) in [
        ("etc/hosts", "127.0.0.1 localhost\n"),
        ("etc/passwd", IMAGE_PASSWD),
    ] {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, body.len() as u64);
        tar.append_data(&mut h, name, body.as_bytes())
            .expect("etc entry");
    }
    tar.finish().expect("finish image");
    path
}

/// The API's create body for a container `name` from `image` with one default nic.
pub fn create_body(name: &str, image: &Path) -> serde_json::Value {
    serde_json::json!({"id": name, "hostname": name, "flist": image.to_str().expect("utf-8 path"),
        "hostNetworking": false, "filesystems": [], "initprocesses": [], "ports": [],
        "nics": [{"type": "default"}]})
}

/// Creates a container with `body` and checks the seed's answer: 204 with a Location.
pub async fn create_container(http: &Http, node: &str, body: serde_json::Value) {
    let name = body["id"]
        .as_str()
        .expect("the body names the container")
        .to_string();
    let r = http
        .post(&format!("{node}/containers"), body)
        .await
        .expect("POST containers");
    assert_eq!(r.status, 204, "create {name}: {}", r.text);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("{node}/containers/{name}").as_str())
    );
}

/// Deletes a container through the API and checks the 204 (core0's teardown, when the node is
/// dropped, removes what a failed test left).
pub async fn remove_container(http: &Http, node: &str, name: &str) {
    let r = http
        .delete(&format!("{node}/containers/{name}"))
        .await
        .expect("DELETE container");
    assert_eq!(r.status, 204, "delete {name}: {}", r.text);
}

/// Starts a process on the node or in the container at `base`; returns the job id from the
/// 202's Location.
pub async fn start_process(http: &Http, base: &str, body: serde_json::Value) -> String {
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

/// Polls a job of the node or container at `base` until it is no longer running (30 s at most);
/// returns its result.
pub async fn wait_job(http: &Http, base: &str, id: &str) -> serde_json::Value {
    wait_job_within(http, base, id, Duration::from_secs(30)).await
}

/// [`wait_job`] with a time limit of its own.
pub async fn wait_job_within(
    http: &Http,
    base: &str,
    id: &str,
    timeout: Duration,
) -> serde_json::Value {
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
        assert!(
            start.elapsed() < timeout,
            "job {id} still running after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A multipart body with one field `file`: (content type, body).
pub fn multipart(content: &[u8]) -> (String, Vec<u8>) {
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

/// Percent-encodes a query value (everything but unreserved characters and `/`).
pub fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Uploads `content` to `path` in the container at `base`; returns the status.
pub async fn upload(http: &Http, base: &str, path: &str, content: &[u8]) -> u16 {
    let (ct, body) = multipart(content);
    let r = http
        .inner
        .post(format!(
            "{}{base}/filesystem?path={}",
            http.base,
            query_escape(path)
        ))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("upload");
    r.status().as_u16()
}

/// Downloads `path` from the container at `base`: (status, body).
pub async fn download(http: &Http, base: &str, path: &str) -> (u16, Vec<u8>) {
    let r = http
        .inner
        .get(format!(
            "{}{base}/filesystem?path={}",
            http.base,
            query_escape(path)
        ))
        .bearer_auth(http.token.as_deref().unwrap_or(""))
        .send()
        .await
        .expect("download");
    let status = r.status().as_u16();
    (status, r.bytes().await.expect("body").to_vec())
}
