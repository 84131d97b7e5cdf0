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
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
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
