//! The agent's life: startup (directories, Redis, job manager, consumer, registration with the
//! API), shutdown on SIGTERM/SIGINT (jobs and Redis keep running, DECISIONS "Lifetimes"), the
//! safe reboot (kill every job, flush Redis, stay halted, re-exec), and `core0 teardown`.
//! While it runs, the agent starts its own redis-server again whenever that one dies.

use crate::builtins::{self, Power, Registry};
use crate::config::RunConfig;
use crate::jobs::pgid::Record;
use crate::jobs::{CtxBase, JobManager, JobsConfig};
use crate::redis_server;
use crate::transport::{self, RedisPublisher};
use grid_proto::api::JoinRequest;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How often registration is re-checked.
const REJOIN_EVERY: Duration = Duration::from_secs(30);
/// Longest pause between registration attempts.
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest pause between attempts to start a new redis-server after the old one died.
const REDIS_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why the agent could not run (or teardown failed).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No `--node-id` and the default-route MAC could not be read.
    #[error("cannot determine the node id (give --node-id): {reason}")]
    NodeId {
        /// The identity error.
        reason: String,
    },
    /// A directory or file could not be made or used.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another core0 runs on this data directory.
    #[error("another core0 runs on {data_dir}")]
    Locked {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// `--redis-url` is not a usable Redis URL.
    #[error("bad --redis-url: {reason}")]
    RedisUrl {
        /// The client error.
        reason: String,
    },
    /// core0's redis-server could not be provided.
    #[error(transparent)]
    RedisServer(#[from] redis_server::RedisServerError),
    /// A background task failed.
    #[error("{what} task failed: {reason}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Installing a signal handler failed.
    #[error("cannot handle signals: {source}")]
    Signals {
        /// The OS error.
        source: std::io::Error,
    },
    /// Re-executing core0 (safe reboot) failed.
    #[error("cannot re-exec core0: {source}")]
    Exec {
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700; an existing directory is set to 0700.
fn private_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// The data directory of a node: `--data-dir`, or `/var/lib/core0/<node-id>`.
pub fn data_dir_of(cfg: &RunConfig, node_id: &str) -> PathBuf {
    cfg.data_dir
        .clone()
        .unwrap_or_else(|| Path::new("/var/lib/core0").join(node_id))
}

/// The run directory inside a data directory.
pub fn run_dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// The agent.
pub struct Agent;

/// How the agent's main wait ended.
enum Ending {
    Signal,
    Reboot(String),
}

impl Agent {
    /// Runs the agent until SIGTERM/SIGINT (returns `Ok`). A safe reboot re-executes the
    /// binary and does not return unless that fails.
    pub async fn run(cfg: RunConfig) -> Result<(), AgentError> {
        let instance_id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let node_id = match &cfg.node_id {
            Some(n) => n.clone(),
            None => crate::identity::default_route_mac().map_err(|e| AgentError::NodeId {
                reason: e.to_string(),
            })?,
        };
        let data_dir = data_dir_of(&cfg, &node_id);
        let run_dir = run_dir_of(&data_dir);
        private_dir(&data_dir)?;
        private_dir(&run_dir)?;
        private_dir(&run_dir.join("jobs"))?;
        let _lock = lock_data_dir(&data_dir, &run_dir)?;
        let pidf = run_dir.join("core0.pid");
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        crate::jobs::pgid::write(&pidf, me).map_err(io_err(&pidf))?;

        let mut own_redis = None;
        let (client, redis_addr, password) = match &cfg.redis_url {
            Some(url) => {
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| AgentError::RedisUrl {
                        reason: e.to_string(),
                    })?;
                let info = client.get_connection_info();
                let addr = match info.addr() {
                    redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
                    other => other.to_string(),
                };
                let password = info
                    .redis_settings()
                    .password()
                    .unwrap_or_default()
                    .to_string();
                (client, addr, password)
            }
            None => {
                let password = match &cfg.redis_password {
                    Some(p) => p.clone(),
                    None => redis_server::stored_password(&data_dir)?,
                };
                let own = OwnRedis {
                    listen: cfg.redis_listen.clone(),
                    password: password.clone(),
                    data_dir: data_dir.clone(),
                    run_dir: run_dir.clone(),
                    exited: mpsc::unbounded_channel(),
                };
                let server = own.ensure().await?;
                own_redis = Some(own);
                let client = redis::Client::open(server.connection_info()?).map_err(|e| {
                    AgentError::RedisUrl {
                        reason: e.to_string(),
                    }
                })?;
                (client, server.addr.clone(), password)
            }
        };
        let advertised = cfg.advertise.clone().unwrap_or_else(|| redis_addr.clone());

        let (reboot_tx, mut reboot_rx) = mpsc::unbounded_channel();
        let power = Arc::new(Power::new(cfg.allow_host_reboot, reboot_tx));
        let publisher = Arc::new(RedisPublisher::new(client.clone()));
        let mut registry = Registry::new();
        builtins::core::register(&mut registry);
        builtins::host::register(&mut registry);
        // One container manager per agent; it adopts the containers a previous core0 left.
        // Without one (no cgroups, say) the node runs without the corex.* commands.
        let containers = match crate::containers::manager::ManagerConfig::for_data_dir(&data_dir) {
            Ok(mut mcfg) => {
                mcfg.spare = !cfg.no_spare_container;
                match crate::containers::manager::ContainerManager::start(mcfg, publisher.clone())
                    .await
                {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::error!(error = %e, "containers are not available");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "containers are not available");
                None
            }
        };
        if let Some(m) = &containers {
            builtins::containers::register(&mut registry, m.clone(), publisher.clone());
        }
        let base = CtxBase {
            instance_id: instance_id.clone(),
            fs: Arc::new(crate::fs::FsTable::default()),
            cpu: Arc::new(crate::procs::CpuMeter::default()),
            power,
        };
        let jobs_cfg = JobsConfig {
            run_dir: Some(run_dir.clone()),
            ..JobsConfig::default()
        };
        let kill_grace = jobs_cfg.kill_grace;
        let jobs = JobManager::new(publisher.clone(), registry, base, jobs_cfg);

        let supervisor = own_redis.map(|own| tokio::spawn(own.supervise()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        // Jobs running in containers are this core0's too: the start-up sweep leaves their flags.
        let container_jobs: transport::Ours = match &containers {
            Some(m) => {
                let m = m.clone();
                Arc::new(move |id: &str| m.has_job(id))
            }
            None => Arc::new(|_: &str| false),
        };
        let consumer = tokio::spawn(transport::consume_with(
            client,
            jobs.clone(),
            container_jobs,
            stop_rx,
            Some(ready_tx),
        ));
        ready_rx.await.map_err(|_| AgentError::Task {
            what: "consumer",
            reason: "ended before ready".into(),
        })?;
        println!("core0 ready node={node_id} redis={advertised}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tracing::info!(node = %node_id, redis = %advertised, instance = %instance_id, "core0 ready");

        let joiner = match (&cfg.join, &cfg.join_token) {
            (Some(url), Some(token)) => {
                let req = JoinRequest {
                    id: node_id.clone(),
                    hostname: nix::unistd::gethostname()
                        .map(|h| h.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    redis_addr: advertised.clone(),
                    redis_password: password.clone(),
                    instance_id: instance_id.to_string(),
                    join_token: token.clone(),
                };
                Some(tokio::spawn(join_loop(url.clone(), req)))
            }
            _ => None,
        };

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| AgentError::Signals { source })?;
        let ending = tokio::select! {
            _ = term.recv() => Ending::Signal,
            r = tokio::signal::ctrl_c() => {
                r.map_err(|source| AgentError::Signals { source })?;
                Ending::Signal
            }
            Some(job) = reboot_rx.recv() => Ending::Reboot(job),
        };
        if let Some(j) = joiner {
            j.abort();
        }
        if let Some(s) = supervisor {
            s.abort();
        }
        match ending {
            Ending::Signal => {
                tracing::info!("stopping (jobs and redis keep running)");
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(3), consumer).await;
                if let Some(m) = &containers {
                    m.discard_spare().await;
                }
                let _ = std::fs::remove_file(&pidf);
                Ok(())
            }
            Ending::Reboot(job) => {
                // The reboot job's result goes out first.
                jobs.wait_gone(&job, Duration::from_secs(5)).await;
                tracing::warn!("safe reboot: stopping consumer and killing every job");
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(3), consumer).await;
                jobs.killall(None, true);
                if !jobs.wait_empty(kill_grace + Duration::from_secs(5)).await {
                    tracing::warn!(left = jobs.len(), "jobs still running at reboot");
                }
                // Containers stop too (files and records kept, halted): the API starts them again.
                if let Some(m) = &containers {
                    m.stop_all().await;
                }
                if let Err(e) = publisher.flushall().await {
                    tracing::error!(error = %e, "cannot flush redis");
                }
                tracing::warn!(secs = cfg.reboot_downtime, "safe reboot: halted");
                tokio::time::sleep(Duration::from_secs(cfg.reboot_downtime)).await;
                Err(reexec())
            }
        }
    }
}

/// core0's own redis-server: how to start it, and the channel its exit is reported on.
struct OwnRedis {
    listen: String,
    password: String,
    data_dir: PathBuf,
    run_dir: PathBuf,
    exited: (mpsc::UnboundedSender<i32>, mpsc::UnboundedReceiver<i32>),
}

impl OwnRedis {
    /// Adopts or starts the redis-server; its exit will be reported on `exited`.
    async fn ensure(&self) -> Result<redis_server::RedisServer, AgentError> {
        let (listen, pw, dd, rd) = (
            self.listen.clone(),
            self.password.clone(),
            self.data_dir.clone(),
            self.run_dir.clone(),
        );
        let tx = self.exited.0.clone();
        let hook: redis_server::ExitHook = Box::new(move |pid| {
            let _ = tx.send(pid);
        });
        let server = tokio::task::spawn_blocking(move || {
            redis_server::ensure(&listen, &pw, &dd, &rd, Some(hook))
        })
        .await
        .map_err(|e| AgentError::Task {
            what: "redis-server",
            reason: e.to_string(),
        })??;
        Ok(server)
    }

    /// Starts a new redis-server (same address and password) whenever the current one dies;
    /// the consumer and the publisher reconnect on their own. Runs until aborted.
    async fn supervise(mut self) {
        while let Some(pid) = self.exited.1.recv().await {
            tracing::error!(
                pid,
                addr = %self.listen,
                "core0's redis-server died; starting a new one (the queued commands, flags and results it held are lost)"
            );
            let mut delay = Duration::from_millis(200);
            loop {
                match self.ensure().await {
                    Ok(server) => {
                        tracing::warn!(pid = server.pid, adopted = server.adopted, addr = %self.listen, "redis-server is back");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a new redis-server, retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(REDIS_BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// Replaces this process with a fresh core0 with the same arguments (new instance id).
fn reexec() -> AgentError {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "core0".into());
    tracing::warn!("safe reboot: re-executing core0");
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    AgentError::Exec { source: err }
}

/// Holds an exclusive lock on `<run_dir>/core0.lock` while core0 runs.
fn lock_data_dir(
    data_dir: &Path,
    run_dir: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, AgentError> {
    let path = run_dir.join("core0.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        AgentError::Locked {
            data_dir: data_dir.to_path_buf(),
        }
    })
}

/// Registers with the API until accepted (or refused with a 4xx), and again whenever the
/// advertised address or instance id differ from the last accepted registration.
async fn join_loop(url: String, req: JoinRequest) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build http client; not joining");
            return;
        }
    };
    let endpoint = format!("{}/nodes/join", url.trim_end_matches('/'));
    let mut last: Option<(String, String)> = None;
    loop {
        let current = (req.redis_addr.clone(), req.instance_id.clone());
        if last.as_ref() != Some(&current) {
            register(&http, &endpoint, &req).await;
            last = Some(current);
        }
        tokio::time::sleep(REJOIN_EVERY).await;
    }
}

/// One registration: retried with backoff until a 2xx or a 4xx.
async fn register(http: &reqwest::Client, endpoint: &str, req: &JoinRequest) {
    let mut delay = Duration::from_secs(1);
    loop {
        match http.post(endpoint).json(req).send().await {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(endpoint, "joined the grid");
                return;
            }
            Ok(resp) if resp.status().is_client_error() => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                tracing::error!(endpoint, %status, body = %body, "join refused");
                return;
            }
            Ok(resp) => {
                tracing::warn!(endpoint, status = %resp.status(), "join failed, retrying");
            }
            Err(e) => tracing::warn!(endpoint, error = %e, "join failed, retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(JOIN_BACKOFF_MAX);
    }
}

/// What `core0 teardown` did.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Whether a core0 process of the data directory was killed.
    pub core0_killed: bool,
    /// Process groups that got SIGKILL.
    pub groups_killed: Vec<i32>,
    /// Whether a redis-server was stopped.
    pub redis_stopped: bool,
    /// How many containers whose corex still ran were killed.
    pub containers_stopped: usize,
}

fn argv0_is(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = first.rsplit(|b| *b == b'/').next().unwrap_or_default();
    base.starts_with(name.as_bytes())
}

/// Kills what a node left behind in `data_dir`: its core0 process (if one still runs), every
/// job process group recorded in `run/jobs/*.pgid`, and its redis-server. Each record is checked
/// against /proc first (starttime, see [`crate::jobs::pgid`]): a pid or group number reused by
/// another process is skipped and its stale record removed. The directory itself is left for
/// the caller to remove.
pub fn teardown(data_dir: &Path) -> Result<Teardown, AgentError> {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let run_dir = run_dir_of(data_dir);
    let mut report = Teardown::default();
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let core0_pid = run_dir.join("core0.pid");
    if let Some(rec) = Record::read(&core0_pid) {
        // The recorded starttime (when known) tells a reused pid from the recorded core0.
        if rec.pid != me && rec.is_same_process() && argv0_is(rec.pid, "core0") {
            report.core0_killed = kill(Pid::from_raw(rec.pid), Signal::SIGKILL).is_ok();
        }
        let _ = std::fs::remove_file(&core0_pid);
    }
    let jobs_dir = run_dir.join("jobs");
    match std::fs::read_dir(&jobs_dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("pgid") {
                    continue;
                }
                // A group whose number now belongs to someone else is skipped (see `pgid`).
                if let Some(rec) = Record::read(&path) {
                    if !rec.is_same_group() {
                        tracing::warn!(pgid = rec.pid, path = %path.display(), "stale job process group record: skipped");
                    } else if killpg(Pid::from_raw(rec.pid), Signal::SIGKILL).is_ok() {
                        report.groups_killed.push(rec.pid);
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(AgentError::Io {
                path: jobs_dir,
                source: e,
            });
        }
    }
    // SIGKILL is delivered asynchronously: return once the killed groups' leaders are gone.
    for pgid in &report.groups_killed {
        let fd = crate::containers::runtime::pidfd_open(*pgid);
        if !crate::containers::runtime::wait_exit(*pgid, fd.as_ref(), Duration::from_secs(5)) {
            tracing::warn!(pgid, "a killed job's process did not end within 5 s");
        }
    }
    report.containers_stopped = crate::containers::manager::teardown(data_dir);
    report.redis_stopped = redis_server::stop(&run_dir);
    Ok(report)
}
