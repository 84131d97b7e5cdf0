//! core0's own `redis-server`: started as a child in its own session (so it outlives a core0
//! crash), adopted by the next core0 through `<run_dir>/redis.pid`, stopped by `core0 teardown`.
//!
//! `redis.pid` holds its pid (a plain number, as redis itself writes pid files) and
//! `redis.addr` the `host:port` it was started on. A process is taken as this node's
//! redis-server only if it is a redis-server, its working directory is the node's
//! `<data_dir>/redis`, and its title (redis rewrites it to `redis-server <host>:<port>`) names
//! the node's address: a reused pid is never adopted or signalled. The password reaches redis
//! through a 0600 config file in the run directory, never through its command line. Whoever
//! calls [`ensure`] can ask to be told when that redis-server exits (see [`ExitHook`]).

use crate::config::split_host_port;
use crate::jobs::pgid::Record;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Time a new redis-server gets to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(5);
/// Interval of the readiness poll.
const READY_POLL: Duration = Duration::from_millis(20);
/// Interval of the exit check of an adopted redis-server when pidfds are not available.
const EXIT_POLL: Duration = Duration::from_secs(1);

/// Called with the pid once the redis-server [`ensure`] provided has exited.
pub type ExitHook = Box<dyn FnOnce(i32) + Send>;

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

fn addr_file(run_dir: &Path) -> PathBuf {
    run_dir.join("redis.addr")
}

fn conf_file(run_dir: &Path) -> PathBuf {
    run_dir.join("redis.conf")
}

/// The recorded pid (first word of `redis.pid`) and address (`redis.addr`, absent when an
/// older core0 started the server).
fn recorded(run_dir: &Path) -> Option<(i32, Option<String>)> {
    let text = std::fs::read_to_string(pid_file(run_dir)).ok()?;
    let pid = Record::parse(text.split_whitespace().next()?)?.pid;
    let addr = std::fs::read_to_string(addr_file(run_dir))
        .ok()
        .and_then(|a| a.split_whitespace().next().map(str::to_string));
    Some((pid, addr))
}

/// Records `pid` and `addr` in the run directory.
fn record(run_dir: &Path, pid: i32, addr: &str) -> Result<(), RedisServerError> {
    let (pidf, addrf) = (pid_file(run_dir), addr_file(run_dir));
    std::fs::write(&addrf, format!("{addr}\n")).map_err(io_err(&addrf))?;
    std::fs::write(&pidf, format!("{pid}\n")).map_err(io_err(&pidf))
}

/// Removes the records of the run directory.
fn forget(run_dir: &Path) {
    let _ = std::fs::remove_file(pid_file(run_dir));
    let _ = std::fs::remove_file(addr_file(run_dir));
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

/// Whether the command line (title) of `pid` has `addr` (`host:port`) as a whole word.
fn title_names(pid: i32, addr: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|b| *b == 0 || *b == b' ')
            .any(|word| word == addr.as_bytes())
    })
}

/// The address a redis-server bound to `host` and `port` shows in its title.
fn title_addr(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// Whether `pid` is this node's redis-server: a redis-server working in `redis_dir` (the
/// node's `<data_dir>/redis`) whose title names `addr` (when one is known).
fn is_node_redis(pid: i32, redis_dir: &Path, addr: Option<&str>) -> bool {
    is_redis_server(pid)
        && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == redis_dir)
        && addr.is_none_or(|a| title_names(pid, a))
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

fn wait_gone(rec: &Record, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if !rec.is_same_process() || !is_redis_server(rec.pid) {
            return true;
        }
        std::thread::sleep(READY_POLL);
    }
    false
}

/// SIGTERM, then SIGKILL after 3 s.
fn terminate(rec: &Record) {
    signal(rec.pid, nix::sys::signal::Signal::SIGTERM);
    if !wait_gone(rec, Duration::from_secs(3)) {
        signal(rec.pid, nix::sys::signal::Signal::SIGKILL);
        wait_gone(rec, Duration::from_secs(2));
    }
}

/// Writes the 0600 config file holding `requirepass` (quoted, every byte but letters and
/// digits as `\xHH`).
fn write_conf(path: &Path, password: &str) -> Result<(), RedisServerError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut text = String::from("# Written by core0 at every start of its redis-server.\n");
    if !password.is_empty() {
        text.push_str("requirepass \"");
        for b in password.bytes() {
            if b.is_ascii_alphanumeric() {
                text.push(char::from(b));
            } else {
                text.push_str(&format!("\\x{b:02x}"));
            }
        }
        text.push_str("\"\n");
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

/// Adopts the node's live redis-server, or starts one bound to `listen` with `password`.
/// `on_exit`, if given, is called (on a thread of its own) when that redis-server exits.
/// Blocking: call from `spawn_blocking` or before the runtime starts.
pub fn ensure(
    listen: &str,
    password: &str,
    data_dir: &Path,
    run_dir: &Path,
    on_exit: Option<ExitHook>,
) -> Result<RedisServer, RedisServerError> {
    let (host, port) = split_host_port(listen).ok_or_else(|| RedisServerError::BadAddress {
        addr: listen.to_string(),
    })?;
    let title = title_addr(&host, port);
    let dir = data_dir.join("redis");
    if let Some((pid, old_addr)) = recorded(run_dir) {
        let here = is_node_redis(pid, &dir, Some(&title));
        if here && answers(listen, password) {
            tracing::info!(pid, addr = listen, "adopted running redis-server");
            // An older core0 did not record the address.
            record(run_dir, pid, &title)?;
            if let Some(hook) = on_exit {
                watch_adopted(Record::of(pid), hook);
            }
            return Ok(RedisServer {
                pid,
                addr: listen.to_string(),
                password: password.to_string(),
                adopted: true,
            });
        }
        let elsewhere = old_addr
            .as_deref()
            .is_some_and(|a| a != title && is_node_redis(pid, &dir, Some(a)));
        if here || elsewhere {
            tracing::warn!(
                pid,
                "redis-server of this node does not answer on {listen}; restarting it"
            );
            terminate(&Record::of(pid));
        } else if is_redis_server(pid) {
            tracing::warn!(
                pid,
                "redis.pid names a redis-server that is not this node's; leaving it alone"
            );
        }
        forget(run_dir);
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let log = dir.join("redis.log");
    let conf = conf_file(run_dir);
    write_conf(&conf, password)?;
    let mut cmd = Command::new("redis-server");
    // The config file must come first; it holds the password.
    cmd.arg(&conf)
        .arg("--bind")
        .arg(&host)
        .arg("--port")
        .arg(port.to_string())
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
    let ready =
        record(run_dir, pid, &title).and_then(|()| wait_ready(&mut child, listen, password, &log));
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        forget(run_dir);
        return Err(e);
    }
    // Reap it if it ever exits while this process lives, and tell the caller.
    std::thread::spawn(move || {
        let status = child.wait();
        tracing::warn!(pid, ?status, "redis-server exited");
        if let Some(hook) = on_exit {
            hook(pid);
        }
    });
    tracing::info!(pid, addr = listen, "started redis-server");
    Ok(RedisServer {
        pid,
        addr: listen.to_string(),
        password: password.to_string(),
        adopted: false,
    })
}

/// Calls `hook` (on a thread of its own) once the adopted redis-server `rec` has exited.
fn watch_adopted(rec: Record, hook: ExitHook) {
    std::thread::spawn(move || {
        wait_exit(&rec);
        tracing::warn!(pid = rec.pid, "adopted redis-server exited");
        // It is this process's child after a re-exec (safe reboot): reap it. Otherwise
        // waitpid fails with ECHILD, harmlessly.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(rec.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        hook(rec.pid);
    });
}

/// Blocks until the process `rec` has exited (a zombie counts as exited).
fn wait_exit(rec: &Record) {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, rec.pid, 0) };
    if let Ok(raw) = i32::try_from(raw)
        && raw >= 0
    {
        // SAFETY: the descriptor was just returned by pidfd_open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The pid may have been reused between the caller's check and the open.
        if !rec.is_same_process() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, which outlives the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc > 0 {
                return;
            }
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
    }
    // No pidfd (kernel before 5.3): look now and then.
    while rec.is_same_process() && is_redis_server(rec.pid) {
        std::thread::sleep(EXIT_POLL);
    }
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
/// 3 s), if that process is still it (see the module doc; without a recorded address, its
/// working directory alone must be the node's `<data_dir>/redis`). Returns whether it was
/// running. The records are removed either way.
pub fn stop(run_dir: &Path) -> bool {
    let Some((pid, addr)) = recorded(run_dir) else {
        return false;
    };
    let ours = run_dir
        .parent()
        .is_some_and(|data_dir| is_node_redis(pid, &data_dir.join("redis"), addr.as_deref()));
    if ours {
        terminate(&Record::of(pid));
    } else if Path::new(&format!("/proc/{pid}")).exists() {
        tracing::warn!(
            pid,
            "redis.pid names a process that is not this node's redis-server; leaving it alone"
        );
    }
    forget(run_dir);
    let _ = std::fs::remove_file(conf_file(run_dir));
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_file_is_private_and_quotes_the_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("redis.conf");
        std::fs::write(&f, "old").expect("stale file");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_conf(&f, "a b\"c").expect("write");
        let text = std::fs::read_to_string(&f).expect("read");
        assert!(text.contains("requirepass \"a\\x20b\\x22c\"\n"), "{text}");
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Runs `ensure` on a free port in a temp dir; stops the server on drop.
    struct Node {
        dir: tempfile::TempDir,
        listen: String,
        password: String,
    }

    impl Node {
        fn new() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("run")).expect("run dir");
            Node {
                dir,
                listen: format!("127.0.0.1:{port}"),
                password: "pw with space".into(),
            }
        }

        fn run_dir(&self) -> PathBuf {
            self.dir.path().join("run")
        }

        fn ensure(&self, hook: Option<ExitHook>) -> RedisServer {
            ensure(
                &self.listen,
                &self.password,
                self.dir.path(),
                &self.run_dir(),
                hook,
            )
            .expect("ensure")
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            stop(&self.run_dir());
        }
    }

    #[test]
    fn password_stays_off_the_command_line_and_adoption_checks_identity() {
        let node = Node::new();
        let first = node.ensure(None);
        assert!(!first.adopted);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", first.pid)).expect("cmdline");
        let shown = String::from_utf8_lossy(&cmdline);
        assert!(!shown.contains("pw"), "{shown}");
        assert!(title_names(first.pid, &node.listen), "{shown}");
        assert!(answers(&node.listen, &node.password));
        let pidf = pid_file(&node.run_dir());
        assert_eq!(
            std::fs::read_to_string(&pidf).expect("pid file"),
            format!("{}\n", first.pid),
            "a plain pid file"
        );

        // Same node again: adopted.
        let again = node.ensure(None);
        assert!(again.adopted && again.pid == first.pid);

        // Another node whose pid file names the first node's redis-server (a reused pid, as
        // far as it can tell): it neither adopts nor stops it.
        let other = Node::new();
        std::fs::write(pid_file(&other.run_dir()), format!("{}\n", first.pid))
            .expect("forge pid file");
        assert!(!stop(&other.run_dir()), "a stranger is not stopped");
        assert!(is_redis_server(first.pid), "the process was left alone");
        assert!(
            !pid_file(&other.run_dir()).exists(),
            "the stale record is removed"
        );
        std::fs::write(pid_file(&other.run_dir()), format!("{}\n", first.pid))
            .expect("forge pid file");
        let own = other.ensure(None);
        assert!(!own.adopted && own.pid != first.pid);
        assert!(is_redis_server(first.pid), "the process was left alone");

        // An older core0's layout (no address record): adopted through title and directory.
        std::fs::remove_file(addr_file(&node.run_dir())).expect("remove addr record");
        let adopted = node.ensure(None);
        assert!(adopted.adopted && adopted.pid == first.pid);
        assert_eq!(
            recorded(&node.run_dir()),
            Some((first.pid, Some(node.listen.clone())))
        );
        let rec = Record::of(first.pid);
        assert!(stop(&node.run_dir()));
        // Gone, or a zombie its parent (this test) has not reaped yet: no redis-server any more.
        assert!(
            !rec.is_same_process() || !is_redis_server(rec.pid),
            "stopped"
        );
        assert!(!pidf.exists());
    }

    #[test]
    fn exit_hooks_fire_for_a_started_and_an_adopted_server() {
        let node = Node::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let t1 = tx.clone();
        let started = node.ensure(Some(Box::new(move |pid| {
            let _ = t1.send(("started", pid));
        })));
        let t2 = tx.clone();
        let adopted = node.ensure(Some(Box::new(move |pid| {
            let _ = t2.send(("adopted", pid));
        })));
        assert_eq!(started.pid, adopted.pid);
        signal(started.pid, nix::sys::signal::Signal::SIGKILL);
        let mut got = vec![
            rx.recv_timeout(Duration::from_secs(5)).expect("first hook"),
            rx.recv_timeout(Duration::from_secs(5))
                .expect("second hook"),
        ];
        got.sort();
        assert_eq!(
            got,
            vec![("adopted", started.pid), ("started", started.pid)]
        );
    }
}
