//! The container manager: one per node, behind the `corex.*` built-ins.
//!
//! Every container lives in `<data dir>/containers/<id>/` (the [`super::runtime`] directory) plus
//! `args.json` ([`Record`]: the create arguments, the name, the numeric id and `running` or
//! `halted`). Ids come from `<data dir>/containers/next-id` and are never reused. Images come
//! from an [`ImageCache`] at `<data dir>/images`. A container with a `default` nic gets an address
//! from the node's [`Ipam`] on the node's [`NatBridge`] (made on first use), a veth into its
//! network namespace and its port forwards; whatever fails on the way is undone, so a failed
//! create leaves nothing behind.
//!
//! Jobs dispatched into a container (`core.system`, `bash`) run through corex's socket: one
//! [`Link`] per running container, whose reader thread routes `line` and `exit` events to the
//! job's task by job id. Each such job is recorded in `<dir>/jobs/` until its result is
//! published, so that a core0 that restarts (and re-attaches, [`ContainerManager::start`]) still
//! publishes the result of a job that ended while no core0 ran.

use super::cgroups::{CgroupSet, Limits};
use super::corex::{self, wire};
use super::image::{ImageCache, Progress};
use super::runtime::{self, ContainerSpec, Running, Runtime, Spare};
use crate::jobs::{Capture, LineParser, Publish};
use crate::net::{
    self, BridgeConfig, ContainerNic, HostOps, Ipam, NatBridge, NetnsRef, PortForward,
};
use grid_proto::args::{BashArgs, SystemArgs};
use grid_proto::commands::{BASH, CORE_SYSTEM};
use grid_proto::info::{CoreState, JobInfo};
use grid_proto::wire::{Command, CommandResult, State, StreamMessage, StreamRecord, level, meta};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// The file in a container directory that holds its [`Record`].
pub const ARGS_NAME: &str = "args.json";
/// The counter file of container ids in `<data dir>/containers`.
pub const NEXT_ID_NAME: &str = "next-id";
/// The file in the data directory that holds the node's short index (default 0).
pub const NODE_INDEX_NAME: &str = "node-index";
/// How long a stop waits between SIGTERM and SIGKILL of corex.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a job killed with SIGTERM gets before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long a job waits for its exit after a timeout kill before it is reported anyway.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// Bind mounts a container may have.
const MAX_MOUNTS: usize = 64;
/// How long a create waits for the spare container being made.
const SPARE_WAIT: Duration = Duration::from_secs(2);

/// The bind mounts of `mount` (`{host path: container path}`), checked; an image URL as the
/// source (the original's flist mounts) is refused.
fn bind_mounts(args: &CreateArgs) -> Result<Vec<runtime::BindMount>, ManagerError> {
    let Some(map) = &args.mount else {
        return Ok(Vec::new());
    };
    if map.len() > MAX_MOUNTS {
        return Err(ManagerError::Invalid(format!(
            "at most {MAX_MOUNTS} mounts, not {}",
            map.len()
        )));
    }
    map.iter()
        .map(|(src, dst)| {
            if src.contains("://") {
                return Err(ManagerError::Invalid(format!(
                    "mount source {src}: image mounts are not supported; give a host path"
                )));
            }
            let m = runtime::BindMount {
                source: PathBuf::from(src),
                target: dst.clone(),
            };
            m.validate().map_err(ManagerError::Invalid)?;
            Ok(m)
        })
        .collect()
}

/// Why a container operation failed; the text is what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The arguments are not usable.
    #[error("{0}")]
    Invalid(String),
    /// No container has this id.
    #[error("container {id} not found")]
    NotFound {
        /// The id asked for.
        id: u32,
    },
    /// Another container has this name.
    #[error("container {name} already exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// The container is not in the state the operation needs.
    #[error("container {id} is already {state}")]
    WrongState {
        /// The container.
        id: u32,
        /// `running` or `halted`.
        state: &'static str,
    },
    /// `filesystems` named a storage pool (none exist yet).
    #[error("storage pool {pool} not found")]
    NoPool {
        /// The pool.
        pool: String,
    },
    /// The image could not be had.
    #[error("{0}")]
    Image(#[from] super::image::ImageError),
    /// The runtime failed.
    #[error("{0}")]
    Runtime(#[from] runtime::RuntimeError),
    /// Networking failed.
    #[error("{0}")]
    Net(String),
    /// corex did not answer.
    #[error("{0}")]
    Corex(#[from] corex::CorexError),
    /// A state file could not be used.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A blocking task failed.
    #[error("container task failed: {0}")]
    Task(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| ManagerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One nic of `corex.create`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NicArgs {
    /// Only `default` is supported.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Whatever else the client sent (ignored).
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

/// One init process of `corex.create`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitProcess {
    /// The program.
    pub name: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory ("" = `/`).
    #[serde(default)]
    pub dir: String,
    /// Environment added.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Written to its stdin.
    #[serde(default)]
    pub stdin: String,
}

/// The arguments of `corex.create` (see docs/CONTAINERS-CONTRACT.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateArgs {
    /// The image URL.
    pub root: String,
    /// Bind mounts: host path → container path.
    pub mount: Option<BTreeMap<String, String>>,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// Nics (only `default`).
    pub nics: Vec<NicArgs>,
    /// Host port (`8080`, `53/udp`) → container port.
    pub port: Option<BTreeMap<String, u16>>,
    /// Keep all capabilities.
    pub privileged: bool,
    /// The hostname (default: the name).
    pub hostname: String,
    /// Ignored.
    pub storage: Value,
    /// Tags (`grid:<name>`, `grid-gen:<n>`).
    pub tags: Vec<String>,
    /// The container's name, unique on the node.
    pub name: String,
    /// Resource limits.
    pub limits: Option<Limits>,
    /// Processes started in the container once it runs.
    pub init_processes: Vec<InitProcess>,
    /// `pool:fs` file systems (no pools exist yet).
    pub filesystems: Vec<String>,
}

/// The persisted state of a container (`args.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The numeric id.
    pub id: u32,
    /// The name.
    pub name: String,
    /// `running` or `halted`.
    pub state: String,
    /// The create arguments as the client sent them.
    pub arguments: Value,
}

/// What `corex.list` shows of one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// CPU percent of its processes.
    pub cpu: f64,
    /// Resident bytes.
    pub rss: u64,
    /// Virtual bytes.
    pub vms: u64,
    /// Swapped bytes.
    pub swap: u64,
    /// corex's host pid as text ("" when halted).
    pub debug: String,
    /// The container.
    pub container: ContainerDetail,
}

/// The `container` object of [`ContainerInfo`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerDetail {
    /// The create arguments.
    pub arguments: Value,
    /// The merged root directory.
    pub root: String,
    /// corex's host pid (0 when halted).
    pub pid: i32,
    /// `running` or `halted`.
    pub state: String,
    /// The name.
    pub name: String,
    /// The address on the node's bridge.
    pub ip: Option<String>,
}

/// Settings of a [`ContainerManager`].
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// The node's short index (bridge, table and veth names).
    pub node_idx: u16,
    /// The cgroup parent of the node's containers (`grid/n<idx>`).
    pub cgroup_parent: String,
    /// The core0 binary corex runs from (`None`: this process's).
    pub exe: Option<PathBuf>,
    /// Keep a spare container ready for the next create ([`Runtime::prepare_spare`]).
    pub spare: bool,
}

impl ManagerConfig {
    /// The defaults for `data_dir`: the node index from `<data_dir>/node-index` (0 when the
    /// file is missing) and cgroup parent `grid/n<idx>`.
    pub fn for_data_dir(data_dir: &Path) -> Result<Self, ManagerError> {
        let node_idx = node_index(data_dir)?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            node_idx,
            cgroup_parent: format!("grid/n{node_idx}"),
            exe: None,
            spare: true,
        })
    }
}

/// The node index stored in `<data_dir>/node-index`; 0 when there is none.
pub fn node_index(data_dir: &Path) -> Result<u16, ManagerError> {
    let path = data_dir.join(NODE_INDEX_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|i| *i <= net::MAX_NODE_IDX)
            .ok_or_else(|| {
                ManagerError::Invalid(format!(
                    "{}: want a number from 0 to {}",
                    path.display(),
                    net::MAX_NODE_IDX
                ))
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// `core0 teardown`: stops every container of `data_dir` whose corex still runs (SIGKILL to
/// corex, pid 1 of the container, ends all of its processes), then removes the node's cgroup
/// parent (`grid/n<idx>`) and, when the node ever made them (a container with a default nic),
/// the node's NAT bridge and nftables table. The directories are left for the caller. Returns how many containers were
/// stopped; failures are logged.
pub fn teardown(data_dir: &Path) -> usize {
    let Ok(cfg) = ManagerConfig::for_data_dir(data_dir) else {
        return 0;
    };
    let mut stopped = 0;
    let mut had_nic = false;
    let entries = std::fs::read_dir(data_dir.join("containers"));
    for e in entries.into_iter().flatten().flatten() {
        let dir = e.path();
        if e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let args = std::fs::read(dir.join(ARGS_NAME))
            .ok()
            .and_then(|d| serde_json::from_slice::<Record>(&d).ok())
            .and_then(|r| serde_json::from_value::<CreateArgs>(r.arguments).ok());
        had_nic |=
            args.is_some_and(|a| !a.host_network && a.nics.iter().any(|n| n.kind == "default"));
        // find_running checked the pid's start time, command line and socket: it is our corex.
        if let Some(pid) = runtime::find_running(&dir)
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            stopped += 1;
        }
    }
    match super::cgroups::Layout::detect(Path::new(super::cgroups::CGROUP_ROOT)) {
        Ok(layout) => {
            if let Err(e) =
                super::cgroups::remove_parent(&layout, &cfg.cgroup_parent, Duration::from_secs(5))
            {
                tracing::warn!(error = %e, "cannot remove the node's cgroups");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the cgroup layout"),
    }
    // The address book is made with the bridge: its file says the node made the bridge once.
    had_nic |= Ipam::default_path(data_dir).exists();
    if had_nic && let Err(e) = NatBridge::remove(&HostOps, &BridgeConfig::for_index(cfg.node_idx)) {
        tracing::warn!(error = %e, "cannot remove the node's bridge");
    }
    stopped
}

/// An event of one container job, as its task sees it.
#[derive(Debug)]
enum JobEvent {
    Line(u16, String),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
    },
    Refused(String),
    Lost,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<JobEvent>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a plain map or value update: a poisoned lock is consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection to one container's corex: requests go out on `writer`; a reader thread routes
/// events to the job tasks by id.
#[derive(Debug)]
struct Link {
    writer: Mutex<UnixStream>,
    routes: Routes,
}

impl Link {
    /// Connects, registers nothing, starts the reader. Blocking.
    fn connect(sock: &Path, routes: Routes) -> Result<Arc<Self>, ManagerError> {
        let stream = UnixStream::connect(sock).map_err(|source| corex::CorexError::Socket {
            path: sock.to_path_buf(),
            source,
        })?;
        let reader = stream.try_clone().map_err(io_err(sock))?;
        let link = Arc::new(Self {
            writer: Mutex::new(stream),
            routes: routes.clone(),
        });
        std::thread::Builder::new()
            .name("corex-link".into())
            .spawn(move || read_events(reader, routes))
            .map_err(io_err(sock))?;
        Ok(link)
    }

    fn send(&self, req: &wire::Request) -> Result<(), String> {
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        lock(&self.writer)
            .write_all(&line)
            .map_err(|e| format!("cannot reach corex: {e}"))
    }

    fn close(&self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
    }
}

/// The reader thread of a [`Link`]: ends every routed job with `Lost` when the socket closes.
fn read_events(stream: UnixStream, routes: Routes) {
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let ev: wire::Event = match serde_json::from_str(&line) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "bad event from corex");
                continue;
            }
        };
        let (id, jev, last) = match ev {
            wire::Event::Line { id, level, text } => (id, JobEvent::Line(level, text), false),
            wire::Event::Exit {
                id,
                code,
                signal,
                error,
            } => (
                id,
                JobEvent::Exit {
                    code,
                    signal,
                    error,
                },
                true,
            ),
            wire::Event::Error {
                id: Some(id),
                message,
            } => (id, JobEvent::Refused(message), true),
            wire::Event::Error { id: None, message } => {
                tracing::warn!(%message, "corex refused a request");
                continue;
            }
            wire::Event::Pong { .. } => continue,
        };
        let mut map = lock(&routes);
        let tx = if last {
            map.remove(&id)
        } else {
            map.get(&id).cloned()
        };
        match tx {
            Some(tx) => {
                let _ = tx.send(jev);
            }
            None => tracing::debug!(job = %id, "event of an unknown container job"),
        }
    }
    for (_, tx) in lock(&routes).drain() {
        let _ = tx.send(JobEvent::Lost);
    }
}

/// One job running in a container.
#[derive(Debug)]
struct CJob {
    cmd: Command,
    starttime: i64,
    killed: AtomicBool,
}

/// The persisted form of a [`CJob`] (`<dir>/jobs/<id>.json`).
#[derive(Debug, Serialize, Deserialize)]
struct JobFile {
    cmd: Command,
    starttime: i64,
}

/// One container in the table.
#[derive(Debug)]
struct Container {
    record: Record,
    args: CreateArgs,
    dir: PathBuf,
    running: Option<Running>,
    link: Option<Arc<Link>>,
    routes: Routes,
    jobs: Arc<Mutex<HashMap<String, Arc<CJob>>>>,
    ip: Option<Ipv4Addr>,
}

#[derive(Debug, Default)]
struct Table {
    by_id: BTreeMap<u32, Container>,
    names: HashMap<String, u32>,
}

/// The node's bridge and address book, made on the first container with a default nic.
#[derive(Debug)]
struct Net {
    bridge: NatBridge,
    ipam: Ipam,
}

/// What `list` copies out of the table: id, record, corex, address, tags, directory.
type Snapshot = (
    u32,
    Record,
    Option<Running>,
    Option<Ipv4Addr>,
    Vec<String>,
    PathBuf,
);

/// The containers of one node.
pub struct ContainerManager {
    me: Weak<ContainerManager>,
    cfg: ManagerConfig,
    root: PathBuf,
    runtime: Runtime,
    images: ImageCache,
    publish: Arc<dyn Publish>,
    table: Mutex<Table>,
    net: Mutex<Option<Net>>,
    /// Serializes create, start, stop and terminate.
    ops: tokio::sync::Mutex<()>,
    /// The spare container the next create takes, when one is ready.
    spare: Mutex<Option<Spare>>,
    /// A spare is being made.
    refilling: AtomicBool,
    /// Wakes creates waiting for the spare being made.
    spare_ready: tokio::sync::Notify,
    /// Serializes id allocation ([`ContainerManager::next_id`]).
    ids: Mutex<()>,
    /// The agent is stopping: no more spares.
    closing: AtomicBool,
}

impl std::fmt::Debug for ContainerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerManager")
            .field("root", &self.root)
            .field("node_idx", &self.cfg.node_idx)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn epoch_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The container's hostname: the given one (or the name) as is — `vfw_22` stays `vfw_22`, as
/// in the seed — with any other character outside `[A-Za-z0-9_.-]` replaced by `-`.
fn hostname_of(args: &CreateArgs, id: u32) -> String {
    let base = if args.hostname.is_empty() {
        &args.name
    } else {
        &args.hostname
    };
    let h: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if h.is_empty() { format!("c{id}") } else { h }
}

fn parse_ports(ports: &BTreeMap<String, u16>) -> Result<Vec<PortForward>, ManagerError> {
    ports
        .iter()
        .map(|(host, cport)| {
            let (hp, proto) = host.split_once('/').unwrap_or((host.as_str(), "tcp"));
            format!("{hp}:{cport}/{proto}")
                .parse::<PortForward>()
                .map_err(|e| ManagerError::Invalid(format!("bad port {host}: {e}")))
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ManagerError> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ManagerError::Task(e.to_string()))?
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), ManagerError> {
    let data = serde_json::to_vec_pretty(v)
        .map_err(|e| ManagerError::Invalid(format!("cannot encode {}: {e}", path.display())))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// What a dispatched process runs: `(program, args, dir, env, stdin)`.
fn exec_of(id: &str, cmd: &Command) -> Result<wire::Exec, String> {
    // Refused rather than ignored: the job would run once, at once, whatever the client asked.
    let unsupported: Vec<&str> = [
        ("queue", cmd.queue.as_deref().is_some_and(|q| !q.is_empty())),
        ("max_restart", cmd.max_restart > 0),
        ("recurring_period", cmd.recurring_period > 0),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !unsupported.is_empty() {
        return Err(format!(
            "{} not supported for jobs in a container yet",
            unsupported.join(", ")
        ));
    }
    if cmd.command == BASH {
        let a: BashArgs = crate::builtins::decode(cmd.arguments.clone())?;
        Ok(wire::Exec {
            id: id.to_string(),
            name: "sh".into(),
            args: vec!["-c".into(), a.script],
            env: BTreeMap::new(),
            dir: None,
            stdin: (!a.stdin.is_empty()).then_some(a.stdin),
        })
    } else {
        let a: SystemArgs = crate::builtins::decode(cmd.arguments.clone())?;
        if a.name.is_empty() {
            return Err("bad arguments: name is empty".into());
        }
        Ok(wire::Exec {
            id: id.to_string(),
            name: a.name,
            args: a.args,
            env: a.env.unwrap_or_default(),
            dir: (!a.dir.is_empty()).then_some(a.dir),
            stdin: (!a.stdin.is_empty()).then_some(a.stdin),
        })
    }
}

/// Whether `name` runs as a process in the container.
pub fn is_process(name: &str) -> bool {
    name == CORE_SYSTEM || name == BASH
}

impl ContainerManager {
    /// Makes the manager and adopts the containers a previous core0 left: a running one is
    /// re-attached (results of its jobs that ended meanwhile are published), a dead one is
    /// marked halted and its network undone.
    pub async fn start(
        cfg: ManagerConfig,
        publish: Arc<dyn Publish>,
    ) -> Result<Arc<Self>, ManagerError> {
        let root = cfg.data_dir.join("containers");
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let runtime = match &cfg.exe {
            Some(exe) => Runtime::with_exe(exe)?,
            None => Runtime::new()?,
        };
        let images = ImageCache::new(cfg.data_dir.join("images"));
        let me = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cfg,
            root,
            runtime,
            images,
            publish,
            table: Mutex::new(Table::default()),
            net: Mutex::new(None),
            ops: tokio::sync::Mutex::new(()),
            spare: Mutex::new(None),
            refilling: AtomicBool::new(false),
            spare_ready: tokio::sync::Notify::new(),
            ids: Mutex::new(()),
            closing: AtomicBool::new(false),
        });
        me.adopt_all().await;
        me.refill_spare();
        Ok(me)
    }

    /// The node index.
    pub fn node_idx(&self) -> u16 {
        self.cfg.node_idx
    }

    fn dir_of(&self, id: u32) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Whether `id` is a job running in one of the containers.
    pub fn has_job(&self, id: &str) -> bool {
        lock(&self.table)
            .by_id
            .values()
            .any(|c| lock(&c.jobs).contains_key(id))
    }

    async fn adopt_all(&self) {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the containers directory");
                return;
            }
        };
        let mut ids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        for id in ids {
            let dir = self.dir_of(id);
            let path = dir.join(ARGS_NAME);
            let record: Record = match std::fs::read(&path)
                .ok()
                .and_then(|d| serde_json::from_slice(&d).ok())
            {
                Some(r) => r,
                None => {
                    // A spare an earlier core0 made and never used (its corex exited when that
                    // core0's pipe closed).
                    if !path.exists() && self.runtime.remove_spare_dir(&dir) {
                        tracing::info!(dir = %dir.display(), "removed an unused spare container");
                        continue;
                    }
                    tracing::warn!(dir = %dir.display(), "container directory without a usable args.json: skipped");
                    continue;
                }
            };
            if let Err(e) = self.adopt(record, dir).await {
                tracing::error!(container = id, error = %e, "cannot adopt container");
            }
        }
    }

    async fn adopt(&self, mut record: Record, dir: PathBuf) -> Result<(), ManagerError> {
        let id = record.id;
        let args: CreateArgs = serde_json::from_value(record.arguments.clone())
            .map_err(|e| ManagerError::Invalid(format!("bad stored arguments: {e}")))?;
        let mut c = Container {
            record: record.clone(),
            args,
            dir: dir.clone(),
            running: None,
            link: None,
            routes: Arc::default(),
            jobs: Arc::default(),
            ip: None,
        };
        let has_nic = self.wants_nic(&c.args);
        if has_nic {
            let name = record.name.clone();
            let me = self.arc()?;
            c.ip = blocking(move || {
                let mut net = me.net()?;
                Ok(net.as_mut().and_then(|n| n.ipam.get(&name)))
            })
            .await?;
        }
        let stored_jobs = read_job_files(&dir);
        let running = if record.state == "running" {
            let d = dir.clone();
            let me = self.arc()?;
            tokio::task::spawn_blocking(move || me.runtime.adopt(&d))
                .await
                .map_err(|e| ManagerError::Task(e.to_string()))?
        } else {
            None
        };
        match running {
            Some(r) => {
                tracing::info!(container = id, pid = r.pid, "adopted running container");
                let sock = r.socket();
                c.running = Some(r);
                // Register the stored jobs before attaching: held events go to them.
                let mut tasks = Vec::new();
                for jf in stored_jobs {
                    let job = Arc::new(CJob {
                        cmd: jf.cmd,
                        starttime: jf.starttime,
                        killed: AtomicBool::new(false),
                    });
                    let (tx, rx) = mpsc::unbounded_channel();
                    lock(&c.routes).insert(job.cmd.id.clone(), tx);
                    lock(&c.jobs).insert(job.cmd.id.clone(), job.clone());
                    tasks.push((job, rx));
                }
                let routes = c.routes.clone();
                let link = blocking(move || Link::connect(&sock, routes)).await?;
                c.link = Some(link.clone());
                let jobs = c.jobs.clone();
                let dir2 = dir.clone();
                self.insert(c);
                for (job, rx) in tasks {
                    self.spawn_job_task(id, dir2.clone(), jobs.clone(), link.clone(), job, rx);
                }
                let l = link.clone();
                blocking(move || {
                    l.send(&wire::Request::Attach)
                        .map_err(ManagerError::Invalid)
                })
                .await?;
            }
            None => {
                if record.state == "running" {
                    tracing::warn!(
                        container = id,
                        "container died while core0 was down: halted"
                    );
                    let me = self.arc()?;
                    let (name, d) = (record.name.clone(), dir.clone());
                    let parent = self.cfg.cgroup_parent.clone();
                    blocking(move || {
                        me.undo_network(id, &name, false);
                        if let Ok(set) = CgroupSet::open(me.runtime.layout(), &parent, id)
                            && let Err(e) = set.remove(Duration::from_secs(2))
                        {
                            tracing::warn!(container = id, error = %e, "cannot remove cgroups");
                        }
                        for f in [corex::SOCKET_NAME, runtime::PID_NAME] {
                            let _ = std::fs::remove_file(d.join(f));
                        }
                        Ok(())
                    })
                    .await?;
                    record.state = "halted".into();
                    write_json(&dir.join(ARGS_NAME), &record)?;
                    c.record = record;
                }
                for jf in stored_jobs {
                    let r = self.lost_result(id, &jf.cmd, jf.starttime);
                    self.publish_final(&jf.cmd, &r).await;
                    remove_job_file(&dir, &jf.cmd.id);
                }
                self.insert(c);
            }
        }
        Ok(())
    }

    fn arc(&self) -> Result<Arc<Self>, ManagerError> {
        self.me
            .upgrade()
            .ok_or_else(|| ManagerError::Task("container manager is shutting down".into()))
    }

    fn insert(&self, c: Container) {
        let mut t = lock(&self.table);
        t.names.insert(c.record.name.clone(), c.record.id);
        t.by_id.insert(c.record.id, c);
    }

    fn wants_nic(&self, args: &CreateArgs) -> bool {
        !args.host_network && args.nics.iter().any(|n| n.kind == "default")
    }

    /// The node's bridge and address book, made on first use. Blocking.
    fn net(&self) -> Result<MutexGuard<'_, Option<Net>>, ManagerError> {
        let mut guard = lock(&self.net);
        if guard.is_none() {
            let bridge = NatBridge::ensure(&HostOps, BridgeConfig::for_index(self.cfg.node_idx))
                .map_err(|e| ManagerError::Net(e.to_string()))?;
            let ipam = Ipam::open(Ipam::default_path(&self.cfg.data_dir), bridge.subnet())
                .map_err(|e| ManagerError::Net(e.to_string()))?;
            *guard = Some(Net { bridge, ipam });
        }
        Ok(guard)
    }

    /// Removes a container's veth and forwards; with `release`, its address too. Blocking;
    /// failures are logged.
    fn undo_network(&self, id: u32, name: &str, release: bool) {
        let mut guard = lock(&self.net);
        let Some(net) = guard.as_mut() else {
            // Nothing was ever made in this process; the bridge may exist from an earlier one.
            drop(guard);
            let Ok(mut guard) = self.net() else {
                return;
            };
            if let Some(net) = guard.as_mut() {
                Self::undo_on(net, id, name, release);
            }
            return;
        };
        Self::undo_on(net, id, name, release);
    }

    fn undo_on(net: &mut Net, id: u32, name: &str, release: bool) {
        if let Err(e) = net::remove_forwards(&HostOps, &net.bridge, name) {
            tracing::warn!(container = id, error = %e, "cannot remove port forwards");
        }
        if let Err(e) = net::detach_container(&HostOps, &net.bridge, id, 0) {
            tracing::warn!(container = id, error = %e, "cannot remove veth");
        }
        if release && let Err(e) = net.ipam.release(name) {
            tracing::warn!(container = id, error = %e, "cannot release address");
        }
    }

    /// Gives the running container its address, veth and forwards. Blocking.
    fn setup_network(
        &self,
        id: u32,
        name: &str,
        pid: i32,
        forwards: &[PortForward],
    ) -> Result<Ipv4Addr, ManagerError> {
        let mut guard = self.net()?;
        let Some(net) = guard.as_mut() else {
            return Err(ManagerError::Net("node network is not set up".into()));
        };
        let fresh = net.ipam.get(name).is_none();
        let ip = net
            .ipam
            .allocate(name)
            .map_err(|e| ManagerError::Net(e.to_string()))?;
        let nic = ContainerNic {
            container_idx: id,
            nic_idx: 0,
            netns: NetnsRef::Pid(pid),
            ip,
            prefix: net.bridge.subnet().prefix(),
            gateway: Some(net.bridge.gateway()),
            hwaddr: None,
            name_inside: "eth0".into(),
        };
        let done = net::attach_container(&HostOps, &net.bridge, &nic)
            .map_err(|e| ManagerError::Net(e.to_string()))
            .and_then(|_| {
                net::add_forwards(&HostOps, &net.bridge, name, ip, forwards)
                    .map_err(|e| ManagerError::Net(e.to_string()))
            });
        if let Err(e) = done {
            Self::undo_on(net, id, name, fresh);
            return Err(e);
        }
        Ok(ip)
    }

    /// A new container id, never used on this node (a container or spare directory).
    fn next_id(&self) -> Result<u32, ManagerError> {
        let _ids = lock(&self.ids);
        let path = self.root.join(NEXT_ID_NAME);
        let stored: u32 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1);
        let max_dir = lock(&self.table).by_id.keys().max().copied().unwrap_or(0);
        let mut id = stored.max(max_dir + 1).max(1);
        while self.dir_of(id).exists() {
            id += 1;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", id + 1)).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(id)
    }

    /// `corex.create`: makes and starts a container; returns its id once corex answers.
    /// `progress` gets the image download's progress.
    pub async fn create(
        &self,
        raw: Value,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<u32, ManagerError> {
        let args: CreateArgs = serde_json::from_value(raw.clone())
            .map_err(|e| ManagerError::Invalid(format!("bad arguments: {e}")))?;
        if let Some(fs) = args.filesystems.first() {
            let pool = fs.split_once(':').map_or(fs.as_str(), |(p, _)| p);
            return Err(ManagerError::NoPool {
                pool: pool.to_string(),
            });
        }
        if args.root.is_empty() {
            return Err(ManagerError::Invalid(
                "root (the image URL) is required".into(),
            ));
        }
        for m in bind_mounts(&args)? {
            if !m.source.exists() {
                return Err(ManagerError::Invalid(format!(
                    "mount source {} does not exist on the node",
                    m.source.display()
                )));
            }
        }
        if !args.host_network {
            for n in &args.nics {
                if n.kind != "default" {
                    return Err(ManagerError::Invalid(format!(
                        "nic type {} is not supported yet; supported: default",
                        n.kind
                    )));
                }
            }
            if args.nics.len() > 1 {
                return Err(ManagerError::Invalid(
                    "only one default nic is supported".into(),
                ));
            }
        }
        let forwards = match (&args.port, args.host_network) {
            (Some(p), false) if !p.is_empty() => {
                if !self.wants_nic(&args) {
                    return Err(ManagerError::Invalid(
                        "port forwards need a default nic".into(),
                    ));
                }
                parse_ports(p)?
            }
            _ => Vec::new(),
        };
        if !args.name.is_empty()
            && !args
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(ManagerError::Invalid(format!(
                "bad container name {:?}: want letters, digits, '_', '.' and '-'",
                args.name
            )));
        }
        let taken =
            |m: &Self| !args.name.is_empty() && lock(&m.table).names.contains_key(&args.name);
        if taken(self) {
            return Err(ManagerError::Exists {
                name: args.name.clone(),
            });
        }
        // Downloads run outside the lock: other containers are not held up.
        let image = self.images.resolve(&args.root, progress).await?;
        let _op = self.ops.lock().await;
        if taken(self) {
            return Err(ManagerError::Exists {
                name: args.name.clone(),
            });
        }
        // A spare has its own network namespace: host networking makes its namespaces itself.
        let spare = if args.host_network {
            None
        } else {
            self.take_spare().await
        };
        let id = match &spare {
            Some(s) => s.id(),
            None => {
                let me = self.arc()?;
                blocking(move || me.next_id()).await?
            }
        };
        let name = if args.name.is_empty() {
            format!("c{id}")
        } else {
            args.name.clone()
        };
        let dir = self.dir_of(id);
        let record = Record {
            id,
            name: name.clone(),
            state: "running".into(),
            arguments: raw,
        };
        let c = Container {
            record,
            args,
            dir: dir.clone(),
            running: None,
            link: None,
            routes: Arc::default(),
            jobs: Arc::default(),
            ip: None,
        };
        let booted = self.boot(c, image.rootfs, &forwards, true, spare).await;
        self.refill_spare();
        match booted {
            Ok(()) => Ok(id),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The ready spare, if there is one and its corex still waits (a dead one is discarded).
    /// While one is being made, waits for it (up to [`SPARE_WAIT`]): it is ready sooner than a
    /// container made from nothing.
    async fn take_spare(&self) -> Option<Spare> {
        let deadline = tokio::time::Instant::now() + SPARE_WAIT;
        let s = loop {
            let ready = self.spare_ready.notified();
            if let Some(s) = lock(&self.spare).take() {
                break s;
            }
            if !self.refilling.load(Ordering::SeqCst) {
                return None;
            }
            if tokio::time::timeout_at(deadline, ready).await.is_err() {
                return None;
            }
        };
        if s.is_alive() {
            return Some(s);
        }
        tracing::warn!(spare = s.id(), "the spare container died: discarded");
        self.discard(s).await;
        None
    }

    /// Removes spare `s` (its process, cgroups and directory) on a blocking thread.
    async fn discard(&self, s: Spare) {
        let Ok(me) = self.arc() else {
            return;
        };
        let _ = blocking(move || {
            me.runtime.discard_spare(s);
            Ok(())
        })
        .await;
    }

    /// Makes a spare container in the background unless one is ready or being made, or spares
    /// are off. Its id comes from the same counter as containers' ids; the ops lock is not
    /// taken, so creates, stops and deletes go on while it is made (the slow part: the
    /// namespaces, and moving corex into its cgroups, which waits for an RCU grace period).
    fn refill_spare(&self) {
        if !self.cfg.spare
            || self.closing.load(Ordering::SeqCst)
            || lock(&self.spare).is_some()
            || self.refilling.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.refilling.store(false, Ordering::SeqCst);
            return;
        };
        tokio::spawn(async move {
            let m = me.clone();
            let id = blocking(move || m.next_id()).await;
            let made = match id {
                Ok(id) => {
                    let m = me.clone();
                    blocking(move || {
                        let dir = m.dir_of(id);
                        m.runtime
                            .prepare_spare(id, &dir, &m.cfg.cgroup_parent)
                            .map_err(|e| {
                                let _ = std::fs::remove_dir_all(&dir);
                                ManagerError::from(e)
                            })
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            match made {
                Ok(s) if me.closing.load(Ordering::SeqCst) => me.discard(s).await,
                Ok(s) => {
                    tracing::debug!(spare = s.id(), "spare container ready");
                    *lock(&me.spare) = Some(s);
                }
                Err(e) => tracing::warn!(error = %e, "cannot make a spare container"),
            }
            me.refilling.store(false, Ordering::SeqCst);
            me.spare_ready.notify_waiters();
        });
    }

    /// Removes the spare container and makes no more (the agent stops).
    pub async fn discard_spare(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let s = lock(&self.spare).take();
        if let Some(s) = s {
            self.discard(s).await;
        }
    }

    /// Starts container `c` (new or halted), its network and link, records it as running, puts
    /// it in the table and starts its init processes. On error everything it made is undone
    /// (a new container's address is released).
    async fn boot(
        &self,
        mut c: Container,
        rootfs: PathBuf,
        forwards: &[PortForward],
        fresh: bool,
        spare: Option<Spare>,
    ) -> Result<(), ManagerError> {
        let id = c.record.id;
        let name = c.record.name.clone();
        let spec = ContainerSpec {
            id,
            name: name.clone(),
            rootfs_lower: rootfs,
            dir: c.dir.clone(),
            hostname: hostname_of(&c.args, id),
            host_network: c.args.host_network,
            privileged: c.args.privileged,
            limits: c.args.limits.clone().unwrap_or_default(),
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            env: vec![],
            mounts: bind_mounts(&c.args)?,
        };
        std::fs::create_dir_all(&c.dir).map_err(io_err(&c.dir))?;
        c.record.state = "running".into();
        write_json(&c.dir.join(ARGS_NAME), &c.record)?;
        let me = self.arc()?;
        let started = blocking(move || {
            Ok(match spare {
                Some(s) => me.runtime.start_spare(s, &spec)?,
                None => me.runtime.start(&spec)?,
            })
        });
        let running = match started.await {
            Ok(r) => r,
            Err(e) => {
                if !fresh {
                    // A halted container stays halted (and listed).
                    c.record.state = "halted".into();
                    let _ = write_json(&c.dir.join(ARGS_NAME), &c.record);
                    self.insert(c);
                }
                return Err(e);
            }
        };
        let with_nic = self.wants_nic(&c.args);
        let me = self.arc()?;
        let (r2, n2, fw) = (running.clone(), name.clone(), forwards.to_vec());
        let setup = blocking(move || {
            let ip = if with_nic {
                Some(me.setup_network(id, &n2, r2.pid, &fw)?)
            } else {
                None
            };
            let link = Link::connect(&r2.socket(), Default::default());
            match link {
                Ok(l) => Ok((ip, l)),
                Err(e) => {
                    if with_nic {
                        me.undo_network(id, &n2, false);
                    }
                    Err(e)
                }
            }
        })
        .await;
        let (ip, link) = match setup {
            Ok(v) => v,
            Err(e) => {
                let me = self.arc()?;
                let (r2, n2) = (running.clone(), name.clone());
                let _ = blocking(move || {
                    if let Err(e) = me.runtime.stop(&r2, STOP_TIMEOUT) {
                        tracing::error!(container = id, error = %e, "cannot stop a container that failed to start");
                    }
                    if fresh && with_nic {
                        me.undo_network(id, &n2, true);
                    }
                    Ok(())
                })
                .await;
                if !fresh {
                    c.record.state = "halted".into();
                    let _ = write_json(&c.dir.join(ARGS_NAME), &c.record);
                    c.running = None;
                    c.link = None;
                    self.insert(c);
                }
                return Err(e);
            }
        };
        c.routes = link.routes.clone();
        c.running = Some(running);
        c.link = Some(link);
        c.ip = ip;
        let inits = c.args.init_processes.clone();
        self.insert(c);
        tracing::info!(container = id, %name, ip = ?ip, "container running");
        for (i, p) in inits.into_iter().enumerate() {
            let cmd = Command {
                id: format!("init-{name}-{i}"),
                command: CORE_SYSTEM.into(),
                arguments: serde_json::json!({
                    "name": p.name, "args": p.args, "dir": p.dir, "env": p.env, "stdin": p.stdin,
                }),
                ..Command::new("", CORE_SYSTEM, Value::Null)
            };
            if let Err(e) = self.run_process(id, cmd).await {
                tracing::warn!(container = id, error = %e, "cannot start init process");
            }
        }
        Ok(())
    }

    /// The id of the container named `name`.
    pub fn find_name(&self, name: &str) -> Option<u32> {
        lock(&self.table).names.get(name).copied()
    }

    /// `corex.stop`: stops a running container, keeping its upper layer, id and address.
    pub async fn stop(&self, id: u32) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        self.stop_locked(id).await
    }

    async fn stop_locked(&self, id: u32) -> Result<(), ManagerError> {
        let (running, link, jobs, name, with_nic, dir) = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            let Some(r) = c.running.clone() else {
                return Err(ManagerError::WrongState {
                    id,
                    state: "halted",
                });
            };
            (
                r,
                c.link.clone(),
                c.jobs.clone(),
                c.record.name.clone(),
                self.wants_nic(&c.args),
                c.dir.clone(),
            )
        };
        for j in lock(&jobs).values() {
            j.killed.store(true, Ordering::SeqCst);
        }
        let me = self.arc()?;
        blocking(move || {
            me.runtime.stop(&running, STOP_TIMEOUT)?;
            if with_nic {
                me.undo_network(id, &name, false);
            }
            Ok(())
        })
        .await?;
        if let Some(l) = link {
            l.close();
        }
        let mut t = lock(&self.table);
        if let Some(c) = t.by_id.get_mut(&id) {
            c.running = None;
            c.link = None;
            c.record.state = "halted".into();
            write_json(&dir.join(ARGS_NAME), &c.record)?;
        }
        Ok(())
    }

    /// Safe reboot: stops every running container (each keeps its upper layer, id, address and
    /// record, now `halted`, so the next core0 knows it as halted and `corex.start` resumes it),
    /// then removes the node's NAT bridge and nftables table (made again on first use). Failures
    /// are logged; the rest goes on.
    pub async fn stop_all(&self) {
        self.discard_spare().await;
        let _op = self.ops.lock().await;
        let ids: Vec<u32> = lock(&self.table)
            .by_id
            .iter()
            .filter(|(_, c)| c.running.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            match self.stop_locked(id).await {
                Ok(()) => tracing::info!(container = id, "container stopped for the reboot"),
                Err(e) => tracing::error!(container = id, error = %e, "cannot stop container"),
            }
        }
        // Only a node that has (or had) containers with a nic owns the bridge of its index.
        let owns_bridge = lock(&self.net).is_some()
            || lock(&self.table)
                .by_id
                .values()
                .any(|c| self.wants_nic(&c.args));
        if !owns_bridge {
            return;
        }
        let cfg = BridgeConfig::for_index(self.cfg.node_idx);
        let me = self.me.clone();
        let removed = blocking(move || {
            if let Some(me) = me.upgrade() {
                *lock(&me.net) = None;
            }
            NatBridge::remove(&HostOps, &cfg).map_err(|e| ManagerError::Net(e.to_string()))
        })
        .await;
        if let Err(e) = removed {
            tracing::error!(error = %e, "cannot remove the node's bridge");
        }
    }

    /// `corex.start`: boots a halted container again from its arguments and upper layer.
    pub async fn start_container(&self, id: u32) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        let (args, c) = {
            let mut t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            if c.running.is_some() {
                return Err(ManagerError::WrongState {
                    id,
                    state: "running",
                });
            }
            let c = t.by_id.remove(&id).ok_or(ManagerError::NotFound { id })?;
            (c.args.clone(), c)
        };
        let restore = |c: Container| self.insert(c);
        let image = match self.images.resolve(&args.root, &|_| {}).await {
            Ok(i) => i,
            Err(e) => {
                restore(c);
                return Err(e.into());
            }
        };
        let forwards = match args.port.as_ref().filter(|_| !args.host_network) {
            Some(p) => match parse_ports(p) {
                Ok(f) => f,
                Err(e) => {
                    restore(c);
                    return Err(e);
                }
            },
            None => Vec::new(),
        };
        let c = Container {
            running: None,
            link: None,
            routes: Arc::default(),
            jobs: Arc::default(),
            ..c
        };
        self.boot(c, image.rootfs, &forwards, false, None).await
    }

    /// `corex.terminate`: stops the container and removes everything it had.
    pub async fn terminate(&self, id: u32) -> Result<(), ManagerError> {
        let _op = self.ops.lock().await;
        let running = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            c.running.is_some()
        };
        if running {
            self.stop_locked(id).await?;
        }
        let (name, dir, with_nic) = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            (
                c.record.name.clone(),
                c.dir.clone(),
                self.wants_nic(&c.args),
            )
        };
        let me = self.arc()?;
        let n2 = name.clone();
        blocking(move || {
            if with_nic {
                me.undo_network(id, &n2, true);
            }
            runtime::destroy(&dir)?;
            Ok(())
        })
        .await?;
        let mut t = lock(&self.table);
        t.by_id.remove(&id);
        if t.names.get(&name) == Some(&id) {
            t.names.remove(&name);
        }
        tracing::info!(container = id, %name, "container terminated");
        Ok(())
    }

    /// `corex.list` / `corex.find`: the containers (with all of `tags`, when given).
    pub fn list(
        &self,
        tags: &[String],
        cpu: &crate::procs::CpuMeter,
    ) -> BTreeMap<String, ContainerInfo> {
        let snapshot: Vec<Snapshot> = {
            let t = lock(&self.table);
            t.by_id
                .values()
                .map(|c| {
                    (
                        c.record.id,
                        c.record.clone(),
                        c.running.clone(),
                        c.ip,
                        c.args.tags.clone(),
                        c.dir.clone(),
                    )
                })
                .collect()
        };
        let mut out = BTreeMap::new();
        for (id, record, running, ip, ctags, dir) in snapshot {
            if !tags.iter().all(|t| ctags.contains(t)) {
                continue;
            }
            let mut usage = CoreState::default();
            if let Some(r) = &running {
                for pid in r.cgroups.pids() {
                    if let Some(s) = cpu.sample(pid) {
                        usage.cpu += s.cpu;
                        usage.rss += s.rss;
                        usage.vms += s.vms;
                        usage.swap += s.swap;
                    }
                }
            }
            let pid = running.as_ref().map_or(0, |r| r.pid);
            out.insert(
                id.to_string(),
                ContainerInfo {
                    cpu: usage.cpu,
                    rss: usage.rss,
                    vms: usage.vms,
                    swap: usage.swap,
                    debug: if pid > 0 {
                        pid.to_string()
                    } else {
                        String::new()
                    },
                    container: ContainerDetail {
                        arguments: record.arguments,
                        root: dir.join("merged").display().to_string(),
                        pid,
                        state: record.state,
                        name: record.name,
                        ip: ip.map(|i| i.to_string()),
                    },
                },
            );
        }
        out
    }

    /// The host pid of container `id`'s corex, if it runs.
    pub fn corex_pid(&self, id: u32) -> Result<i32, ManagerError> {
        let t = lock(&self.table);
        let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
        c.running
            .as_ref()
            .map(|r| r.pid)
            .ok_or(ManagerError::WrongState {
                id,
                state: "halted",
            })
    }

    /// The hostname of container `id`.
    pub fn hostname(&self, id: u32) -> Result<String, ManagerError> {
        let t = lock(&self.table);
        let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
        Ok(hostname_of(&c.args, id))
    }

    /// Runs a `core.system`/`bash` command in running container `id` as a job: flags it,
    /// execs it through corex and publishes its result (with `container: id`) when it ends.
    pub async fn run_process(&self, id: u32, cmd: Command) -> Result<(), ManagerError> {
        let exec = exec_of(&cmd.id, &cmd).map_err(ManagerError::Invalid)?;
        let (link, jobs, routes, dir) = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            let Some(link) = c.link.clone() else {
                return Err(ManagerError::Invalid(format!("container {id} is halted")));
            };
            (link, c.jobs.clone(), c.routes.clone(), c.dir.clone())
        };
        let job = Arc::new(CJob {
            cmd: cmd.clone(),
            starttime: now_ms(),
            killed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut j = lock(&jobs);
            if j.contains_key(&cmd.id) {
                return Err(ManagerError::Invalid(format!(
                    "a job with id {} runs in container {id}",
                    cmd.id
                )));
            }
            j.insert(cmd.id.clone(), job.clone());
            lock(&routes).insert(cmd.id.clone(), tx);
        }
        let jobs_dir = dir.join("jobs");
        let jf = JobFile {
            cmd: cmd.clone(),
            starttime: job.starttime,
        };
        let stored = std::fs::create_dir_all(&jobs_dir)
            .map_err(io_err(&jobs_dir))
            .and_then(|()| {
                write_json(
                    &jobs_dir.join(format!("{}.json", crate::jobs::safe_name(&cmd.id))),
                    &jf,
                )
            });
        if let Err(e) = stored {
            lock(&jobs).remove(&cmd.id);
            lock(&routes).remove(&cmd.id);
            return Err(e);
        }
        if let Err(e) = self.publish.flag(&cmd.id).await {
            tracing::error!(id = %cmd.id, error = %e, "cannot flag container job");
        }
        let l2 = link.clone();
        let sent = tokio::task::spawn_blocking(move || l2.send(&wire::Request::Exec(exec)))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        if let Err(e) = sent
            && let Some(tx) = lock(&routes).remove(&cmd.id)
        {
            let _ = tx.send(JobEvent::Refused(e));
        }
        self.spawn_job_task(id, dir, jobs, link, job, rx);
        Ok(())
    }

    fn spawn_job_task(
        &self,
        cid: u32,
        dir: PathBuf,
        jobs: Arc<Mutex<HashMap<String, Arc<CJob>>>>,
        link: Arc<Link>,
        job: Arc<CJob>,
        rx: mpsc::UnboundedReceiver<JobEvent>,
    ) {
        let publish = self.publish.clone();
        tokio::spawn(async move {
            let result = follow(cid, &job, rx, &link, &publish).await;
            let cmd = &job.cmd;
            if cmd.stream {
                let m = if result.state == State::Success {
                    meta::pack(level::STDOUT, meta::STREAM | meta::EXIT_SUCCESS)
                } else {
                    meta::pack(level::STDERR, meta::STREAM | meta::EXIT_ERROR)
                };
                let marker = [record(cid, &cmd.id, String::new(), m)];
                if let Err(e) = publish.stream(&cmd.id, &marker).await {
                    tracing::warn!(id = %cmd.id, error = %e, "cannot push stream exit marker");
                }
            }
            if let Err(e) = publish.result(&result).await {
                tracing::error!(id = %cmd.id, error = %e, "cannot publish container job result");
            }
            lock(&jobs).remove(&cmd.id);
            remove_job_file(&dir, &cmd.id);
        });
    }

    async fn publish_final(&self, cmd: &Command, r: &CommandResult) {
        if let Err(e) = self.publish.result(r).await {
            tracing::error!(id = %cmd.id, error = %e, "cannot publish container job result");
        }
    }

    fn lost_result(&self, cid: u32, cmd: &Command, starttime: i64) -> CommandResult {
        let mut r = CommandResult::bare(cmd, State::Error);
        r.data = Value::String(format!("container {cid} stopped while the job ran")).to_string();
        r.level = level::RESULT_JSON;
        r.streams = Some([String::new(), String::new()]);
        r.starttime = starttime;
        r.container = u64::from(cid);
        r
    }

    /// The jobs of container `id` (`job.list` inside it).
    pub fn jobs(&self, id: u32, only: Option<&str>) -> Result<Vec<JobInfo>, ManagerError> {
        let jobs = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            c.jobs.clone()
        };
        let list: Vec<JobInfo> = lock(&jobs)
            .values()
            .filter(|j| only.is_none_or(|o| o.is_empty() || j.cmd.id == o))
            .map(|j| JobInfo {
                cpu: 0.0,
                rss: 0,
                vms: 0,
                swap: 0,
                debug: String::new(),
                starttime: j.starttime,
                cmd: j.cmd.clone(),
            })
            .collect();
        if only.is_some_and(|o| !o.is_empty()) && list.is_empty() {
            return Err(ManagerError::Invalid("job not found".into()));
        }
        Ok(list)
    }

    /// Signals job `job` of container `id`; `false` when it does not run there. Signal 0 means
    /// SIGTERM; SIGTERM and SIGKILL end it as KILLED (SIGKILL follows after a grace time).
    pub fn kill_job(&self, id: u32, job: &str, signal: i32) -> Result<bool, ManagerError> {
        let (link, jobs) = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            (c.link.clone(), c.jobs.clone())
        };
        let Some(j) = lock(&jobs).get(job).cloned() else {
            return Ok(false);
        };
        let Some(link) = link else {
            return Ok(false);
        };
        let sig = if signal == 0 { libc::SIGTERM } else { signal };
        if !(1..=libc::SIGRTMAX()).contains(&sig) {
            return Err(ManagerError::Invalid(format!("invalid signal {signal}")));
        }
        if sig == libc::SIGTERM || sig == libc::SIGKILL {
            j.killed.store(true, Ordering::SeqCst);
        }
        link.send(&wire::Request::Kill {
            id: job.to_string(),
            signal: sig,
        })
        .map_err(ManagerError::Invalid)?;
        if sig == libc::SIGTERM {
            let (jid, l) = (job.to_string(), link.clone());
            tokio::spawn(async move {
                tokio::time::sleep(KILL_GRACE).await;
                if lock(&jobs).contains_key(&jid) {
                    let _ = l.send(&wire::Request::Kill {
                        id: jid,
                        signal: libc::SIGKILL,
                    });
                }
            });
        }
        Ok(true)
    }

    /// Kills every job of container `id` except `except`; returns how many were signalled.
    pub fn kill_all_jobs(&self, id: u32, except: Option<&str>) -> Result<usize, ManagerError> {
        let ids: Vec<String> = {
            let t = lock(&self.table);
            let c = t.by_id.get(&id).ok_or(ManagerError::NotFound { id })?;
            lock(&c.jobs).keys().cloned().collect()
        };
        let mut n = 0;
        for j in ids.iter().filter(|j| Some(j.as_str()) != except) {
            if self.kill_job(id, j, 0)? {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn record(cid: u32, id: &str, text: String, meta: u32) -> StreamRecord {
    StreamRecord {
        core: u64::from(cid),
        command: id.to_string(),
        message: StreamMessage {
            message: text,
            epoch: epoch_ns(),
            meta,
        },
    }
}

/// Follows one container job to its end: feeds its lines into the shared output parser and
/// capture, streams them when asked, kills it at `max_time`; returns its Result.
async fn follow(
    cid: u32,
    job: &CJob,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    link: &Arc<Link>,
    publish: &Arc<dyn Publish>,
) -> CommandResult {
    let cmd = &job.cmd;
    let mut capture = Capture::default();
    let mut parsers = [LineParser::default(), LineParser::default()];
    let mut timed_out = false;
    let started = std::time::Instant::now();
    let limit = (cmd.max_time > 0).then(|| {
        let elapsed = u64::try_from(now_ms().saturating_sub(job.starttime)).unwrap_or(0);
        tokio::time::Instant::now()
            + Duration::from_secs(cmd.max_time).saturating_sub(Duration::from_millis(elapsed))
    });
    let mut exit_deadline: Option<tokio::time::Instant> = None;
    let mut batch: Vec<StreamRecord> = Vec::new();
    let (state, code, error) = loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev.unwrap_or(JobEvent::Lost),
            _ = async {
                match (limit, timed_out) {
                    (Some(t), false) => tokio::time::sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            } => {
                timed_out = true;
                let l = link.clone();
                let id = cmd.id.clone();
                let _ = tokio::task::spawn_blocking(move || l.send(&wire::Request::Kill { id, signal: libc::SIGKILL })).await;
                exit_deadline = Some(tokio::time::Instant::now() + EXIT_WAIT);
                continue;
            }
            _ = async {
                match exit_deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => JobEvent::Lost,
        };
        match ev {
            JobEvent::Line(lvl, text) => {
                let plain = if lvl == level::STDERR {
                    level::STDERR
                } else {
                    level::STDOUT
                };
                let parser = &mut parsers[usize::from(plain == level::STDERR)];
                if let Some((l, t)) = parser.feed(&text, plain) {
                    capture.add(l, &t);
                    if cmd.stream && (l == level::STDOUT || l == level::STDERR) {
                        batch.push(record(cid, &cmd.id, t, meta::pack(l, meta::STREAM)));
                    }
                }
                // Batch what is already queued, then push.
                if batch.len() < 500 && !rx.is_empty() {
                    continue;
                }
                if !batch.is_empty() {
                    if let Err(e) = publish.stream(&cmd.id, &batch).await {
                        tracing::warn!(id = %cmd.id, error = %e, "cannot push job output stream");
                    }
                    batch.clear();
                }
            }
            JobEvent::Exit {
                code,
                signal,
                error,
            } => {
                if let Some(e) = error {
                    break (State::Error, None, Some(e));
                }
                let killed = job.killed.load(Ordering::SeqCst);
                break match (code, signal) {
                    _ if timed_out => (State::Timeout, None, None),
                    _ if killed => (State::Killed, None, None),
                    (Some(0), _) => (State::Success, Some(0), None),
                    (Some(c), _) => (State::Error, Some(c), None),
                    (None, Some(s)) => (State::Error, Some(128 + s), None),
                    (None, None) => (State::Error, None, None),
                };
            }
            JobEvent::Refused(m) => break (State::Error, None, Some(m)),
            JobEvent::Lost => {
                break if timed_out {
                    (State::Timeout, None, None)
                } else if job.killed.load(Ordering::SeqCst) {
                    (State::Killed, None, None)
                } else {
                    (
                        State::Error,
                        None,
                        Some(format!("container {cid} stopped while the job ran")),
                    )
                };
            }
        }
    };
    if !batch.is_empty()
        && let Err(e) = publish.stream(&cmd.id, &batch).await
    {
        tracing::warn!(id = %cmd.id, error = %e, "cannot push job output stream");
    }
    let (data, lvl) = match error {
        Some(e) => (Value::String(e).to_string(), level::RESULT_JSON),
        None => (capture.data.clone(), capture.level),
    };
    CommandResult {
        id: cmd.id.clone(),
        command: cmd.command.clone(),
        data,
        streams: Some(capture.streams()),
        critical: capture.critical.clone(),
        level: lvl,
        state,
        starttime: job.starttime,
        time: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
        tags: cmd.tags.clone(),
        container: u64::from(cid),
        code,
    }
}

fn read_job_files(dir: &Path) -> Vec<JobFile> {
    let Ok(entries) = std::fs::read_dir(dir.join("jobs")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

fn remove_job_file(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(
        dir.join("jobs")
            .join(format!("{}.json", crate::jobs::safe_name(id))),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_and_ports() {
        let mut a = CreateArgs {
            name: "vfw_22".into(),
            ..CreateArgs::default()
        };
        assert_eq!(hostname_of(&a, 3), "vfw_22");
        a.hostname = "a b".into();
        assert_eq!(hostname_of(&a, 3), "a-b");
        a.hostname.clear();
        a.name.clear();
        assert_eq!(hostname_of(&a, 3), "c3");
        let p: BTreeMap<String, u16> =
            [("8080".to_string(), 80), ("53/udp".to_string(), 53)].into();
        let f = parse_ports(&p).expect("ports parse");
        assert_eq!(f.len(), 2);
        assert!(
            f.iter()
                .any(|f| f.host_port == 53 && f.proto == net::Proto::Udp)
        );
        let bad: BTreeMap<String, u16> = [("x".to_string(), 80)].into();
        assert!(parse_ports(&bad).is_err());
        let zero: BTreeMap<String, u16> = [("80".to_string(), 0)].into();
        assert!(parse_ports(&zero).is_err());
    }

    #[test]
    fn container_jobs_refuse_what_they_would_ignore() {
        let mut cmd = Command::new("j1", CORE_SYSTEM, serde_json::json!({"name": "true"}));
        assert!(exec_of("j1", &cmd).is_ok());
        cmd.max_restart = 2;
        cmd.queue = Some("q".into());
        let e = exec_of("j1", &cmd).expect_err("refused");
        assert_eq!(
            e,
            "queue, max_restart not supported for jobs in a container yet"
        );
        cmd.max_restart = 0;
        cmd.queue = None;
        cmd.recurring_period = 5;
        assert!(exec_of("j1", &cmd).is_err());
    }

    #[test]
    fn create_args_decode() {
        let a: CreateArgs = serde_json::from_value(serde_json::json!({
            "root": "file:///x.tar", "nics": [{"type": "default"}], "port": {"8080": 80},
            "limits": {"cpu": 0.5}, "tags": ["grid:a"], "name": "a", "storage": null,
            "init_processes": [{"name": "/bin/sh", "args": ["-c", "true"]}]
        }))
        .expect("decodes");
        assert_eq!(a.nics[0].kind, "default");
        assert_eq!(a.limits.and_then(|l| l.cpu), Some(0.5));
        assert_eq!(a.init_processes[0].args, ["-c", "true"]);
    }
}
