//! `grid dev`: a whole grid in the foreground — one `grid-api` and N `core0` nodes as child
//! processes, ready when every node is `running`, torn down on SIGINT/SIGTERM/SIGHUP.
//!
//! Ephemeral by default (a temporary data directory removed at exit). With `--data-dir` the
//! data is kept and `dev.json` there remembers each node's id and Redis port so the next start
//! resumes the same nodes. Either way the workloads end when `grid dev` does (DECISIONS.md,
//! "Lifetimes"): jobs are killed through the API, each core0 is stopped and then torn down
//! (`core0 teardown`, which ends leftover jobs and the node's Redis), then the API is stopped.

pub mod children;
pub mod identity;
pub mod state;

use crate::api_client::{ApiClient, ApiError, segment};
use children::{ChildError, Children, Exit};
use grid_proto::api::{Node, NodeStatus};
use rand::Rng;
use reqwest::Method;
use state::{DevState, NodePlan, StateError};
use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

const API_READY_TIMEOUT: Duration = Duration::from_secs(30);
const API_POLL: Duration = Duration::from_millis(50);
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(60);
const NODES_POLL: Duration = Duration::from_millis(100);
const STOP_GRACE: Duration = Duration::from_secs(10);
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `grid dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Address the API listens on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Number of local nodes.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Keep state in this directory and resume it on the next start (default: a temporary
    /// directory removed at exit).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin token of the API (default: a random one, printed).
    #[arg(long)]
    pub token: Option<String>,
}

/// What can go wrong in `grid dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A binary is neither next to `grid` nor on PATH.
    #[error("cannot find {name}: not next to {beside} and not on PATH")]
    BinaryNotFound {
        /// Binary name.
        name: &'static str,
        /// The directory of the running `grid`.
        beside: String,
    },
    /// The data directory could not be made.
    #[error("cannot create {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The temporary data directory could not be made.
    #[error("cannot create a temporary data directory")]
    TempDir(#[source] std::io::Error),
    /// `--listen` is not `ip:port`.
    #[error("--listen {addr:?} is not an ip:port address")]
    BadListen {
        /// The value given.
        addr: String,
    },
    /// The API's address is taken.
    #[error("cannot listen on {addr} (is another grid dev running?)")]
    ListenBusy {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The node plan could not be read, made or saved.
    #[error(transparent)]
    State(#[from] StateError),
    /// A child could not be started.
    #[error(transparent)]
    Child(#[from] ChildError),
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    /// An API call failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The API did not become healthy in time.
    #[error("grid-api did not answer GET {url}/health within {}s (last: {last})", API_READY_TIMEOUT.as_secs())]
    ApiNotReady {
        /// The API's URL.
        url: String,
        /// The last failure seen.
        last: String,
    },
    /// Not every node was `running` in time.
    #[error("nodes {missing:?} were not running within {}s (last: {last})", NODES_READY_TIMEOUT.as_secs())]
    NodesNotReady {
        /// Nodes not listed as running.
        missing: Vec<String>,
        /// The last failure seen, or the last listing.
        last: String,
    },
    /// A child exited while the grid was running.
    #[error("{name} exited unexpectedly ({status})")]
    ChildExited {
        /// Our name for the child.
        name: String,
        /// How it ended.
        status: String,
    },
    /// Our stdout could not be written.
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
}

/// Random bytes as lowercase hex.
fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// `name` in `beside` if it is an executable file there, else the first on PATH.
fn find_binary(name: &'static str) -> Result<PathBuf, DevError> {
    use std::os::unix::fs::PermissionsExt;
    let is_exe = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    if let Some(dir) = &beside {
        let candidate = dir.join(name);
        if is_exe(&candidate) {
            return Ok(candidate);
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| is_exe(p))
        .ok_or_else(|| DevError::BinaryNotFound {
            name,
            beside: beside.map_or_else(|| "grid".into(), |d| d.display().to_string()),
        })
}

/// The address to listen on (port 0 replaced by a free port), checked to be free.
fn resolve_listen(listen: &str) -> Result<SocketAddr, DevError> {
    let mut addr: SocketAddr = listen.parse().map_err(|_| DevError::BadListen {
        addr: listen.to_string(),
    })?;
    let probe = TcpListener::bind(addr).map_err(|source| DevError::ListenBusy { addr, source })?;
    if addr.port() == 0 {
        let port = probe
            .local_addr()
            .map_err(|source| DevError::ListenBusy { addr, source })?
            .port();
        addr.set_port(port);
    }
    Ok(addr)
}

/// The address a client connects to for a listen address (the unspecified address becomes the
/// loopback address).
fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

fn create_dir(path: &Path) -> Result<(), DevError> {
    std::fs::create_dir_all(path).map_err(|source| DevError::DataDir {
        path: path.to_path_buf(),
        source,
    })
}

/// SIGINT, SIGTERM and SIGHUP, installed before any child starts.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, DevError> {
        let make = |kind| signal(kind).map_err(DevError::Signals);
        Ok(Self {
            int: make(SignalKind::interrupt())?,
            term: make(SignalKind::terminate())?,
            hup: make(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Arguments and environment of the `grid-api` child. The tokens go in the environment
/// (`GRID_API_ADMIN_TOKEN`, `GRID_API_JOIN_TOKEN`), never on the command line.
fn api_command(
    listen: SocketAddr,
    api_dir: &Path,
    token: &str,
    join_token: &str,
) -> (Vec<OsString>, [(&'static str, String); 2]) {
    let args = vec![
        "--listen".into(),
        listen.to_string().into(),
        "--data-dir".into(),
        api_dir.into(),
    ];
    let envs = [
        ("GRID_API_ADMIN_TOKEN", token.to_string()),
        ("GRID_API_JOIN_TOKEN", join_token.to_string()),
    ];
    (args, envs)
}

/// Arguments and environment of a `core0` child; the join token goes in `CORE0_JOIN_TOKEN`.
fn node_command(
    dir: &Path,
    node: &NodePlan,
    api_url: &str,
    join_token: &str,
) -> (Vec<OsString>, [(&'static str, String); 1]) {
    let args = vec![
        "run".into(),
        "--data-dir".into(),
        dir.into(),
        "--redis-listen".into(),
        format!("127.0.0.1:{}", node.redis_port).into(),
        "--join".into(),
        api_url.into(),
        "--node-id".into(),
        node.id.clone().into(),
    ];
    (args, [("CORE0_JOIN_TOKEN", join_token.to_string())])
}

/// The running grid: what must be stopped, in which order.
struct Grid {
    children: Children,
    core0: PathBuf,
    client: ApiClient,
    /// Nodes whose core0 was started: (child name, plan, data dir).
    started: Vec<(String, NodePlan, PathBuf)>,
}

const API: &str = "grid-api";

impl Grid {
    /// Starts the API and the nodes and waits until all are ready.
    async fn start(
        &mut self,
        grid_api: &Path,
        data: &Path,
        listen: SocketAddr,
        token: &str,
        join_token: &str,
        plan: &[NodePlan],
    ) -> Result<(), DevError> {
        let api_dir = data.join("api");
        create_dir(&api_dir)?;
        let (args, envs) = api_command(listen, &api_dir, token, join_token);
        self.children.spawn_with_env(API, grid_api, args, envs)?;
        self.wait_api().await?;

        for (i, node) in plan.iter().enumerate() {
            let dir = data.join("nodes").join(i.to_string());
            create_dir(&dir)?;
            // Each local node names its kernel objects (bridge, veths, cgroups, nft table) with
            // its own index, so that several nodes on one machine never collide.
            let index_file = dir.join("node-index");
            if !index_file.exists() {
                std::fs::write(&index_file, format!("{i}\n")).map_err(|source| {
                    DevError::DataDir {
                        path: index_file.clone(),
                        source,
                    }
                })?;
            }
            let name = format!("node{i}");
            let (args, envs) = node_command(&dir, node, self.client.base(), join_token);
            self.children
                .spawn_with_env(&name, &self.core0, args, envs)?;
            self.started.push((name, node.clone(), dir));
        }
        self.wait_nodes(plan).await
    }

    async fn wait_api(&self) -> Result<(), DevError> {
        let deadline = Instant::now() + API_READY_TIMEOUT;
        loop {
            let last = match self
                .client
                .send::<()>(Method::GET, "/health", None, Some(Duration::from_secs(2)))
                .await
            {
                Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(resp) => format!("HTTP {}", resp.status().as_u16()),
                Err(e) => error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(DevError::ApiNotReady {
                    url: self.client.base().to_string(),
                    last,
                });
            }
            tokio::time::sleep(API_POLL).await;
        }
    }

    async fn wait_nodes(&self, plan: &[NodePlan]) -> Result<(), DevError> {
        let deadline = Instant::now() + NODES_READY_TIMEOUT;
        loop {
            let mut missing: Vec<String> = plan.iter().map(|p| p.id.clone()).collect();
            let last = match self.list_nodes().await {
                Ok(nodes) => {
                    missing.retain(|id| {
                        !nodes
                            .iter()
                            .any(|n| &n.id == id && n.status == NodeStatus::Running)
                    });
                    if missing.is_empty() {
                        return Ok(());
                    }
                    format!("{} nodes listed", nodes.len())
                }
                Err(e) => error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(DevError::NodesNotReady { missing, last });
            }
            tokio::time::sleep(NODES_POLL).await;
        }
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, ApiError> {
        let resp = self
            .client
            .send::<()>(Method::GET, "/nodes", None, Some(Duration::from_secs(5)))
            .await?;
        let bytes = resp.bytes().await.map_err(|source| ApiError::Request {
            method: Method::GET,
            url: format!("{}/nodes", self.client.base()),
            source,
        })?;
        self.client.decode(Method::GET, "/nodes", &bytes)
    }

    /// Ends everything, in order; every step is best effort so that the next one still runs.
    async fn shutdown(&mut self) {
        if self.children.is_running(API) {
            for (name, node, _) in &self.started {
                if !self.children.is_running(name) {
                    continue;
                }
                let path = format!("/nodes/{}/jobs", segment(&node.id));
                if let Err(e) = self
                    .client
                    .delete(&path, Some(Duration::from_secs(5)))
                    .await
                {
                    eprintln!(
                        "grid dev: cannot kill the jobs of node {}: {}",
                        node.id,
                        error_chain(&e)
                    );
                }
            }
        }
        for (name, _, _) in &self.started {
            self.children.terminate(name);
        }
        for (name, _, _) in &self.started {
            self.children.wait_or_kill(name, STOP_GRACE).await;
        }
        for (name, _, dir) in &self.started {
            let args: Vec<OsString> = vec!["teardown".into(), "--data-dir".into(), dir.into()];
            let label = format!("{name} teardown");
            match children::run_to_end(&label, &self.core0, args, TEARDOWN_TIMEOUT).await {
                Ok(status) if status.success() => {}
                Ok(status) => eprintln!("grid dev: {label} failed ({status})"),
                Err(e) => eprintln!("grid dev: {label} failed: {e}"),
            }
        }
        self.children.stop(API, STOP_GRACE).await;
    }
}

/// An error and its sources, joined with `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn print_line(line: &str) -> Result<(), DevError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(DevError::Stdout)
}

/// Runs `grid dev` until a signal (`Ok`) or a failure (`Err`, after the same cleanup).
pub async fn run(args: DevArgs) -> Result<(), DevError> {
    let mut signals = Signals::install()?;
    let grid_api = find_binary("grid-api")?;
    let core0 = find_binary("core0")?;
    let listen = resolve_listen(&args.listen)?;
    let url = format!("http://{}", connect_addr(listen));

    // The temporary directory is removed when `temp` drops, on every path out of here.
    let (data, temp) = match &args.data_dir {
        Some(dir) => {
            let dir = std::path::absolute(dir).map_err(|source| DevError::DataDir {
                path: dir.clone(),
                source,
            })?;
            create_dir(&dir)?;
            (dir, None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("grid-dev-")
                .tempdir()
                .map_err(DevError::TempDir)?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };

    let base_mac = identity::host_mac().unwrap_or_else(|| {
        // A locally administered address, so it cannot be a real NIC's.
        let mac = (rand::rng().random::<u64>() & 0x00ff_ffff_ffff) | 0x0200_0000_0000;
        eprintln!("grid dev: no network interface with a MAC; using node ids from {mac:012x}");
        mac
    });
    let plan = if args.data_dir.is_some() {
        let mut saved = DevState::load(&data)?;
        let plan = saved.plan(args.nodes, base_mac, state::port_is_free)?;
        saved.save(&data)?;
        plan
    } else {
        DevState::default().plan(args.nodes, base_mac, state::port_is_free)?
    };

    let token = match args.token {
        Some(t) => t,
        None => {
            let t = random_hex(16);
            print_line(&format!("token: {t}"))?;
            t
        }
    };
    let join_token = random_hex(16);

    let (exit_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    let mut grid = Grid {
        children: Children::new(exit_tx),
        core0,
        client: ApiClient::new(&url, Some(token.clone()))?,
        started: Vec::new(),
    };

    let outcome = tokio::select! {
        r = grid.start(&grid_api, &data, listen, &token, &join_token, &plan) => r.map(|()| None),
        Some(exit) = exits.recv() => Err(exited(exit)),
        sig = signals.recv() => Ok(Some(sig)),
    };
    let outcome = match outcome {
        Ok(None) => {
            let ready = print_line(&format!("ready: {url}"));
            eprintln!(
                "grid dev: {} node(s) ready; data in {}{}\n  export GRID_URL={url} GRID_TOKEN={token}",
                plan.len(),
                data.display(),
                if temp.is_some() {
                    " (removed at exit)"
                } else {
                    ""
                },
            );
            match ready {
                Err(e) => Err(e),
                Ok(()) => tokio::select! {
                    Some(exit) = exits.recv() => Err(exited(exit)),
                    sig = signals.recv() => Ok(Some(sig)),
                },
            }
        }
        other => other,
    };
    if let Ok(Some(sig)) = &outcome {
        eprintln!("grid dev: {sig}, stopping");
    }
    grid.shutdown().await;
    drop(grid);
    if let Some(temp) = temp {
        let path = temp.path().to_path_buf();
        if let Err(e) = temp.close() {
            eprintln!("grid dev: cannot remove {}: {e}", path.display());
        }
    }
    outcome.map(drop)
}

fn exited(exit: Exit) -> DevError {
    DevError::ChildExited {
        name: exit.name,
        status: exit.status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_go_in_the_environment_not_on_command_lines() {
        let listen: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let (args, envs) = api_command(listen, Path::new("/d/api"), "admin-secret", "join-secret");
        let on_line = |args: &[OsString], secret: &str| {
            args.iter().any(|a| a.to_string_lossy().contains(secret))
        };
        assert!(!on_line(&args, "admin-secret") && !on_line(&args, "join-secret"));
        assert!(!on_line(&args, "--admin-token") && !on_line(&args, "--join-token"));
        assert_eq!(
            envs,
            [
                ("GRID_API_ADMIN_TOKEN", "admin-secret".to_string()),
                ("GRID_API_JOIN_TOKEN", "join-secret".to_string()),
            ]
        );
        let plan = NodePlan {
            id: "0123456789ab".into(),
            redis_port: 7000,
        };
        let (args, envs) = node_command(Path::new("/d/n0"), &plan, "http://a", "join-secret");
        assert!(!on_line(&args, "join-secret") && !on_line(&args, "--join-token"));
        assert!(on_line(&args, "--join"));
        assert_eq!(envs, [("CORE0_JOIN_TOKEN", "join-secret".to_string())]);
    }

    #[test]
    fn random_hex_has_the_length_asked() {
        let t = random_hex(16);
        assert_eq!(t.len(), 32);
        assert!(
            t.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(t, random_hex(16));
    }

    #[test]
    fn listen_addresses() {
        let a = resolve_listen("127.0.0.1:0").expect("free port");
        assert_ne!(a.port(), 0);
        assert!(matches!(
            resolve_listen("localhost"),
            Err(DevError::BadListen { .. })
        ));
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = held.local_addr().expect("addr").to_string();
        assert!(matches!(
            resolve_listen(&busy),
            Err(DevError::ListenBusy { .. })
        ));
        assert_eq!(
            connect_addr("0.0.0.0:9".parse().expect("addr")).to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(
            connect_addr("[::]:9".parse().expect("addr")).to_string(),
            "[::1]:9"
        );
    }

    #[test]
    fn missing_binaries_are_named() {
        let e = find_binary("grid-no-such-binary").expect_err("absent");
        assert!(e.to_string().contains("grid-no-such-binary"), "{e}");
        assert!(find_binary("sh").is_ok());
    }
}
