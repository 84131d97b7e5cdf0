//! core0's own `redis-server`: started as a child in its own session (so it outlives a core0
//! crash), adopted by the next core0 through `<run_dir>/redis.pid`, stopped by `core0 teardown`.

use crate::config::split_host_port;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Time a new redis-server gets to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(5);
/// Interval of the readiness poll.
const READY_POLL: Duration = Duration::from_millis(20);

/// Why core0's redis-server could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum RedisServerError {
    /// The listen address is not `host:port`.
    #[error("bad redis listen address {addr:?}: expected host:port")]
    BadAddress {
        /// The address given.
        addr: String,
    },
    /// A file of the data or run directory could not be used.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `redis-server` could not be started.
    #[error("cannot start redis-server: {source}")]
    Spawn {
        /// The OS error.
        source: std::io::Error,
    },
    /// It started but exited.
    #[error("redis-server exited at start ({status}); see {log}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// It did not answer PING in time.
    #[error("redis-server on {addr} did not answer within {READY_WITHIN:?}")]
    NotReady {
        /// The address.
        addr: String,
    },
}

/// A running redis-server of this node.
#[derive(Debug, Clone)]
pub struct RedisServer {
    /// Its pid.
    pub pid: i32,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its `requirepass`.
    pub password: String,
    /// Whether it was already running (adopted) rather than started now.
    pub adopted: bool,
}

impl RedisServer {
    /// Connection settings for it.
    pub fn connection_info(&self) -> Result<ConnectionInfo, RedisServerError> {
        connection_info(&self.addr, &self.password)
    }
}

/// Connection settings for `addr` (`host:port`) with `password`.
pub fn connection_info(addr: &str, password: &str) -> Result<ConnectionInfo, RedisServerError> {
    let (host, port) = split_host_port(addr).ok_or_else(|| RedisServerError::BadAddress {
        addr: addr.to_string(),
    })?;
    let info = ConnectionAddr::Tcp(host, port)
        .into_connection_info()
        .map_err(|_| RedisServerError::BadAddress {
            addr: addr.to_string(),
        })?;
    let mut settings = RedisConnectionInfo::default();
    if !password.is_empty() {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RedisServerError + '_ {
    move |source| RedisServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The password kept in `<data_dir>/redis.password`, generated (32 random bytes, hex) and
/// stored with mode 0600 on first use.
pub fn stored_password(data_dir: &Path) -> Result<String, RedisServerError> {
    let path = data_dir.join("redis.password");
    match std::fs::read_to_string(&path) {
        Ok(p) if !p.trim().is_empty() => return Ok(p.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let password = hex::encode(rand::random::<[u8; 32]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(password.as_bytes()).map_err(io_err(&path))?;
    Ok(password)
}

fn pid_file(run_dir: &Path) -> PathBuf {
    run_dir.join("redis.pid")
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
}

/// Whether `pid` is a live redis-server (its title or argv[0] says so).
pub fn is_redis_server(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let first = cmdline
        .split(|b| *b == 0 || *b == b' ')
        .next()
        .unwrap_or_default();
    let name = first.rsplit(|b| *b == b'/').next().unwrap_or_default();
    name.starts_with(b"redis-server")
}

/// Whether a redis at `addr` answers PING with `password`.
fn answers(addr: &str, password: &str) -> bool {
    let Ok(info) = connection_info(addr, password) else {
        return false;
    };
    let Ok(client) = redis::Client::open(info) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    redis::cmd("PING")
        .query::<String>(&mut conn)
        .map(|p| p == "PONG")
        .unwrap_or(false)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok()
}

fn wait_gone(pid: i32, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if !Path::new(&format!("/proc/{pid}")).exists() || !is_redis_server(pid) {
            return true;
        }
        std::thread::sleep(READY_POLL);
    }
    false
}

/// Adopts the node's live redis-server, or starts one bound to `listen` with `password`.
/// Blocking: call from `spawn_blocking` or before the runtime starts.
pub fn ensure(
    listen: &str,
    password: &str,
    data_dir: &Path,
    run_dir: &Path,
) -> Result<RedisServer, RedisServerError> {
    let (host, port) = split_host_port(listen).ok_or_else(|| RedisServerError::BadAddress {
        addr: listen.to_string(),
    })?;
    let pidf = pid_file(run_dir);
    if let Some(pid) = read_pid(&pidf) {
        if is_redis_server(pid) {
            if answers(listen, password) {
                tracing::info!(pid, addr = listen, "adopted running redis-server");
                return Ok(RedisServer {
                    pid,
                    addr: listen.to_string(),
                    password: password.to_string(),
                    adopted: true,
                });
            }
            // Ours (its pid file is in our run dir) but unusable: replace it.
            tracing::warn!(
                pid,
                "redis-server of this node does not answer; restarting it"
            );
            signal(pid, nix::sys::signal::Signal::SIGTERM);
            if !wait_gone(pid, Duration::from_secs(3)) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                wait_gone(pid, Duration::from_secs(2));
            }
        }
        let _ = std::fs::remove_file(&pidf);
    }
    let dir = data_dir.join("redis");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let log = dir.join("redis.log");
    let mut cmd = Command::new("redis-server");
    cmd.arg("--bind")
        .arg(&host)
        .arg("--port")
        .arg(port.to_string())
        .arg("--requirepass")
        .arg(password)
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ])
        .arg("--pidfile")
        .arg(&pidf)
        .arg("--dir")
        .arg(&dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec; setsid(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| RedisServerError::Spawn { source })?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    std::fs::write(&pidf, format!("{pid}\n")).map_err(io_err(&pidf))?;
    let ready = wait_ready(&mut child, listen, password, &log);
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&pidf);
        return Err(e);
    }
    // Reap it if it ever exits while this process lives.
    std::thread::spawn(move || {
        let status = child.wait();
        tracing::warn!(?status, "redis-server exited");
    });
    tracing::info!(pid, addr = listen, "started redis-server");
    Ok(RedisServer {
        pid,
        addr: listen.to_string(),
        password: password.to_string(),
        adopted: false,
    })
}

fn wait_ready(
    child: &mut Child,
    addr: &str,
    password: &str,
    log: &Path,
) -> Result<(), RedisServerError> {
    let until = Instant::now() + READY_WITHIN;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(RedisServerError::Exited {
                status,
                log: log.to_path_buf(),
            });
        }
        if answers(addr, password) {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(RedisServerError::NotReady {
                addr: addr.to_string(),
            });
        }
        std::thread::sleep(READY_POLL);
    }
}

/// Stops the node's redis-server named by `<run_dir>/redis.pid` (SIGTERM, then SIGKILL after
/// 3 s). Returns whether one was running.
pub fn stop(run_dir: &Path) -> bool {
    let pidf = pid_file(run_dir);
    let Some(pid) = read_pid(&pidf) else {
        return false;
    };
    let running = is_redis_server(pid);
    if running {
        signal(pid, nix::sys::signal::Signal::SIGTERM);
        if !wait_gone(pid, Duration::from_secs(3)) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
            wait_gone(pid, Duration::from_secs(2));
        }
    }
    let _ = std::fs::remove_file(&pidf);
    running
}
