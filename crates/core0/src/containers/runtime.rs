//! The container runtime: overlay root, namespaces, cgroups, corex as PID 1.
//!
//! What `runc init` does, written on nix/libc. [`Runtime::start`] writes the container's
//! [`ContainerSpec`] to `<dir>/spec.json`, makes its cgroups ([`super::cgroups`]) and runs the
//! core0 binary as `corex __corex-init <dir>` from a sealed memfd copy (runc's fix for
//! CVE-2019-5736: a container can never write to the binary it runs from), in new mount, uts, ipc,
//! pid and (unless host networking) net namespaces. The rest happens in [`super::corex`]; this side
//! waits for its `pid <n>` and `ready` lines.
//!
//! A container directory holds `upper/`, `work/` and `merged/` (the overlay), `spec.json`,
//! `corex.pid` (`<host pid> <start time>`), `corex.log` (corex's stderr) and, while it runs,
//! `corex.sock`. The overlay is mounted in the container's own mount namespace, so it goes away
//! with the container; [`Runtime::stop`] keeps `upper/`, [`destroy`] removes the directory.
//!
//! corex is not a child of core0 (its parent, the init process, exits right after the fork), so a
//! container outlives core0; [`find_running`] and [`Runtime::adopt`] find it again.

pub use super::cgroups::Limits;
use super::cgroups::{CgroupError, CgroupSet, Layout};
use super::corex;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The spec file in the container directory.
pub const SPEC_NAME: &str = "spec.json";
/// The pid file in the container directory.
pub const PID_NAME: &str = "corex.pid";
/// corex's stderr in the container directory.
pub const LOG_NAME: &str = "corex.log";
/// How long [`Runtime::start`] waits for corex to be ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec is not usable.
    #[error("invalid container spec: {0}")]
    InvalidSpec(String),
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The cgroups could not be made or removed.
    #[error("container cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    /// The sealed copy of the binary could not be made.
    #[error("cannot make the sealed corex binary from {path}: {source}")]
    Exe {
        /// The binary copied.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// corex could not be started.
    #[error("cannot start corex: {0}")]
    Spawn(std::io::Error),
    /// corex failed while setting the container up.
    #[error("container setup failed: {message}")]
    Setup {
        /// What corex reported (and the tail of its log).
        message: String,
    },
    /// corex did not report ready in time.
    #[error("corex was not ready after {0:?}")]
    Timeout(Duration),
    /// A container already runs in this directory.
    #[error("container {dir} already runs (corex pid {pid})")]
    AlreadyRunning {
        /// The container directory.
        dir: PathBuf,
        /// Its corex.
        pid: i32,
    },
    /// corex did not end after SIGKILL.
    #[error("corex pid {0} did not exit")]
    StopTimeout(i32),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { what, path, source }
}

impl RuntimeError {
    /// A setup error with the tail of corex's log added.
    fn with_log(self, log: &Path) -> Self {
        match self {
            Self::Setup { message } => Self::Setup {
                message: with_log_tail(message, log),
            },
            e => e,
        }
    }
}

/// The marker file of a spare container's directory: the cgroups its init joins.
pub const SPARE_NAME: &str = "spare.json";

/// What a spare's init reads from [`SPARE_NAME`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpareSpec {
    /// The id its cgroups are named after (`c<id>`).
    pub id: u32,
    /// The cgroup parent.
    pub cgroup_parent: String,
}

/// A container made ahead of need ([`Runtime::prepare_spare`]): its namespaces and cgroups
/// exist and corex waits as their PID 1, outside any root filesystem yet, for the spec of the
/// container that takes it over. Give it to [`Runtime::start_spare`] or
/// [`Runtime::discard_spare`]; dropped otherwise, its corex sees its pipe close and exits,
/// leaving the directory and cgroups to [`Runtime::remove_spare_dir`].
#[derive(Debug)]
pub struct Spare {
    id: u32,
    dir: PathBuf,
    cgroup_parent: String,
    pid: i32,
    start_time: u64,
    cgroups: CgroupSet,
    go: std::process::ChildStdin,
    status: std::process::ChildStdout,
}

impl Spare {
    /// The id it was made for.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether its corex still waits (same pid and start time, not a zombie).
    pub fn is_alive(&self) -> bool {
        is_same_live_process(self.pid, self.start_time)
    }
}

/// What a container is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Numeric id, never reused on a node; names the cgroups (`c<id>`).
    pub id: u32,
    /// The container's name (Grid's).
    pub name: String,
    /// The read-only image tree (overlay lower dir).
    pub rootfs_lower: PathBuf,
    /// `<node data>/containers/<id>`: holds `upper/`, `work/`, `merged/`, `corex.sock`, `spec.json`.
    pub dir: PathBuf,
    /// The hostname.
    pub hostname: String,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// Keep all capabilities, a writable `/sys` and unrestricted devices.
    pub privileged: bool,
    /// cpu, memory and pids limits.
    pub limits: Limits,
    /// The cgroup parent, relative to each hierarchy (`grid/n0`).
    pub cgroup_parent: String,
    /// Environment of every job.
    pub env: Vec<(String, String)>,
    /// Bind mounts: an absolute host path and where it appears in the container (absolute).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<BindMount>,
}

/// A host file or directory bind-mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// The absolute host path.
    pub source: PathBuf,
    /// The absolute path in the container.
    pub target: String,
}

impl BindMount {
    /// Checks both paths: absolute, plain components, the target not `/`.
    pub fn validate(&self) -> Result<(), String> {
        // `Path::components` drops inner `.`: look at the text itself.
        let plain = |p: &Path| {
            p.is_absolute()
                && !p
                    .to_string_lossy()
                    .split('/')
                    .any(|seg| seg == "." || seg == "..")
        };
        if !plain(&self.source) || self.source.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(format!(
                "mount source {} must be an absolute host path without . or ..",
                self.source.display()
            ));
        }
        let target = Path::new(&self.target);
        if !plain(target) || self.target.contains('\0') || target.parent().is_none() {
            return Err(format!(
                "mount target {:?} must be an absolute container path without . or .., not /",
                self.target
            ));
        }
        Ok(())
    }
}

impl ContainerSpec {
    /// Checks what the kernel and the overlay options need.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::InvalidSpec(m));
        for (what, p) in [("rootfs_lower", &self.rootfs_lower), ("dir", &self.dir)] {
            let Some(s) = p.to_str() else {
                return bad(format!("{what} is not UTF-8"));
            };
            if !p.is_absolute() {
                return bad(format!("{what} {s} is not absolute"));
            }
            // overlayfs splits its options on ',' and lower dirs on ':'.
            if s.contains([',', ':', '\n', '\\']) {
                return bad(format!("{what} {s} contains ',', ':' or '\\'"));
            }
        }
        if !self.rootfs_lower.is_dir() {
            return bad(format!(
                "rootfs_lower {} is not a directory",
                self.rootfs_lower.display()
            ));
        }
        let sock = self.dir.join(corex::SOCKET_NAME);
        if sock.as_os_str().len() >= 108 {
            return bad(format!("socket path {} is too long", sock.display()));
        }
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return bad(format!("hostname {h:?}: want 1-64 of [A-Za-z0-9_.-]"));
        }
        super::cgroups::check_parent(&self.cgroup_parent)?;
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return bad(format!("environment variable {k:?}"));
            }
        }
        for m in &self.mounts {
            m.validate().map_err(RuntimeError::InvalidSpec)?;
        }
        Ok(())
    }
}

/// A running container.
#[derive(Debug, Clone)]
pub struct Running {
    /// Host pid of corex (PID 1 of the container).
    pub pid: i32,
    /// corex's start time (clock ticks since boot, `/proc/<pid>/stat` field 22): tells it from a
    /// later process with the same pid.
    pub start_time: u64,
    /// The container directory.
    pub dir: PathBuf,
    /// The container's cgroups.
    pub cgroups: CgroupSet,
}

impl Running {
    /// The host path of corex's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(corex::SOCKET_NAME)
    }

    /// Whether this corex still runs (same pid and start time, not a zombie).
    pub fn is_alive(&self) -> bool {
        is_same_live_process(self.pid, self.start_time)
    }
}

/// Whether `pid` is still the process that started at `start_time` and is not a zombie.
fn is_same_live_process(pid: i32, start_time: u64) -> bool {
    proc_start_time(pid).is_some_and(|(t, zombie)| t == start_time && !zombie)
}

/// Records corex's pid and start time in `<dir>/corex.pid` ([`find_running`] reads it).
fn write_pid_file(dir: &Path, pid: i32, start_time: u64) -> Result<(), RuntimeError> {
    let path = dir.join(PID_NAME);
    std::fs::write(&path, format!("{pid} {start_time}\n")).map_err(io_err("cannot write", &path))
}

/// Reads the init process's status lines ([`read_status`]) and reaps it (it exits right after
/// its fork; killed first when it failed before naming corex's pid).
fn await_init(
    child: &mut std::process::Child,
    stdout: &mut std::process::ChildStdout,
    pid: &mut Option<i32>,
    want_ready: bool,
) -> Result<i32, RuntimeError> {
    let status = read_status(stdout, START_TIMEOUT, pid, want_ready);
    if status.is_err() && pid.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    status
}

/// `(start time, is zombie)` of a process.
fn proc_start_time(pid: i32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); start time is field 22.
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, *state == "Z" || *state == "X"))
}

/// The length of the part of a 64-bit little-endian ELF file that its program headers cover
/// (the headers themselves and every segment's bytes in the file); `None` when `f` is not such a
/// file.
fn loadable_len(f: &mut impl std::io::Read) -> Option<u64> {
    let mut head = [0u8; 64];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(&head, 0x20)?;
    let phentsize = u64::from(u16_at(&head, 0x36)?);
    let phnum = u64::from(u16_at(&head, 0x38)?);
    if phentsize < 56 || phnum == 0 || phoff < 64 {
        return None;
    }
    // The program headers follow the ELF header in every binary rustc and ld make.
    let mut table = vec![0u8; usize::try_from(phoff - 64 + phentsize * phnum).ok()?];
    f.read_exact(&mut table).ok()?;
    let mut end = phoff + phentsize * phnum;
    for i in 0..phnum {
        let at = usize::try_from(phoff - 64 + i * phentsize).ok()?;
        let offset = u64_at(&table, at + 8)?;
        let filesz = u64_at(&table, at + 32)?;
        end = end.max(offset.checked_add(filesz)?);
    }
    Some(end)
}

/// Makes a sealed, read-only memfd copy of `path`.
fn sealed_copy(path: &Path) -> Result<OwnedFd, RuntimeError> {
    let err = |source| RuntimeError::Exe {
        path: path.to_path_buf(),
        source,
    };
    let name = c"corex";
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // MFD_EXEC (Linux 6.3) keeps the copy executable where vm.memfd_noexec is set; older
    // kernels refuse the flag.
    // SAFETY: memfd_create(2) with a static name; the fd is owned right away.
    let mut raw = unsafe { libc::memfd_create(name.as_ptr(), base | libc::MFD_EXEC) };
    if raw < 0 {
        // SAFETY: as above.
        raw = unsafe { libc::memfd_create(name.as_ptr(), base) };
    }
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a new fd that nothing else owns.
    let rw = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut dst = std::fs::File::from(rw);
    let mut src = std::fs::File::open(path).map_err(err)?;
    // Only what exec and the dynamic loader read: the debug sections and symbol tables after
    // the segments (six times the code here) would sit in memory for nothing.
    let len = loadable_len(&mut src).unwrap_or(u64::MAX);
    use std::io::{Read as _, Seek as _};
    src.rewind().map_err(err)?;
    std::io::copy(&mut (&mut src).take(len), &mut dst).map_err(err)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl(2) on an fd we own.
    if unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // exec refuses a file open for writing (ETXTBSY): keep a read-only descriptor only.
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", dst.as_raw_fd())).map_err(err)?;
    drop(dst);
    Ok(OwnedFd::from(ro))
}

/// Starts and stops containers. Make one per core0 process: it holds the sealed copy of the
/// binary that every corex runs from.
#[derive(Debug)]
pub struct Runtime {
    exe: OwnedFd,
    layout: Layout,
}

impl Runtime {
    /// A runtime running corex from a sealed copy of the current executable.
    pub fn new() -> Result<Self, RuntimeError> {
        Self::with_exe(Path::new("/proc/self/exe"))
    }

    /// A runtime running corex from a sealed copy of `exe`, a core0 binary (tests use the built
    /// binary; the test harness itself is not core0).
    pub fn with_exe(exe: &Path) -> Result<Self, RuntimeError> {
        let layout = Layout::detect(Path::new(super::cgroups::CGROUP_ROOT))?;
        Ok(Self {
            exe: sealed_copy(exe)?,
            layout,
        })
    }

    /// The host's cgroup layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Starts the container and returns once corex is ready (its socket listens). Blocks: call it
    /// from a blocking task.
    pub fn start(&self, spec: &ContainerSpec) -> Result<Running, RuntimeError> {
        spec.validate()?;
        if let Some(pid) = find_running(&spec.dir) {
            return Err(RuntimeError::AlreadyRunning {
                dir: spec.dir.clone(),
                pid,
            });
        }
        for d in ["upper", "work", "merged"] {
            let p = spec.dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        let spec_path = spec.dir.join(SPEC_NAME);
        let json = serde_json::to_vec_pretty(spec)
            .map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?;
        std::fs::write(&spec_path, json).map_err(io_err("cannot write", &spec_path))?;
        for f in [corex::SOCKET_NAME, PID_NAME] {
            let _ = std::fs::remove_file(spec.dir.join(f));
        }
        let cgroups = CgroupSet::create(
            &self.layout,
            &spec.cgroup_parent,
            spec.id,
            &spec.limits,
            spec.privileged,
        )?;
        let mut pid = None;
        match self.spawn(spec, &mut pid) {
            Ok(running_pid) => {
                let start_time = proc_start_time(running_pid).map(|(t, _)| t).ok_or_else(|| {
                    RuntimeError::Setup {
                        message: format!("corex pid {running_pid} vanished after start"),
                    }
                });
                let start_time = match start_time {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = cgroups.remove(Duration::from_secs(2));
                        return Err(e);
                    }
                };
                if let Err(e) = write_pid_file(&spec.dir, running_pid, start_time) {
                    kill_pid(running_pid, libc::SIGKILL);
                    let _ = cgroups.remove(Duration::from_secs(2));
                    return Err(e);
                }
                Ok(Running {
                    pid: running_pid,
                    start_time,
                    dir: spec.dir.clone(),
                    cgroups,
                })
            }
            Err(e) => {
                if let Some(p) = pid {
                    kill_pid(p, libc::SIGKILL);
                }
                let _ = cgroups.remove(Duration::from_secs(2));
                let _ = std::fs::remove_file(spec.dir.join(corex::SOCKET_NAME));
                Err(e)
            }
        }
    }

    /// Runs the init process and reads its status lines; `pid` is set as soon as it is known.
    fn spawn(&self, spec: &ContainerSpec, pid: &mut Option<i32>) -> Result<i32, RuntimeError> {
        let log_path = spec.dir.join(LOG_NAME);
        let (mut child, mut stdout) = self.spawn_init(&spec.dir, spec.host_network, false)?;
        await_init(&mut child, &mut stdout, pid, true).map_err(|e| e.with_log(&log_path))
    }

    /// Starts `core0 __corex-init <dir> [--spare]` in its new namespaces; returns the init
    /// process (which exits after its fork) and the pipe of its status lines. A spare's stdin is
    /// a pipe too: its PID 1 waits there for `go`.
    fn spawn_init(
        &self,
        dir: &Path,
        host_network: bool,
        spare: bool,
    ) -> Result<(std::process::Child, std::process::ChildStdout), RuntimeError> {
        let log_path = dir.join(LOG_NAME);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot open", &log_path))?;
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID;
        if !host_network {
            flags |= libc::CLONE_NEWNET;
        }
        let mut cmd = Command::new(format!("/proc/self/fd/{}", self.exe.as_raw_fd()));
        cmd.arg0(corex::ARGV0).arg(corex::INIT_SUBCOMMAND).arg(dir);
        if spare {
            cmd.arg(corex::SPARE_FLAG);
        }
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .current_dir("/")
            .stdin(if spare { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // SAFETY: runs in the forked child before exec and calls only unshare(2) and setsid(2),
        // which are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(flags) < 0 || libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(RuntimeError::Spawn)?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RuntimeError::Spawn(std::io::Error::other("no stdout pipe")));
        };
        Ok((child, stdout))
    }

    /// Makes a spare container in `dir` (a fresh container directory) with cgroups named after
    /// `id` under `cgroup_parent`: new namespaces (a network namespace included), cgroups
    /// without limits, and corex waiting as PID 1 for the spec of the container that takes it
    /// ([`Runtime::start_spare`]). Moving a process into a cgroup waits for an RCU grace period
    /// (4-15 ms measured here); a spare pays it before a create asks. Blocks.
    pub fn prepare_spare(
        &self,
        id: u32,
        dir: &Path,
        cgroup_parent: &str,
    ) -> Result<Spare, RuntimeError> {
        super::cgroups::check_parent(cgroup_parent)?;
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        let marker = SpareSpec {
            id,
            cgroup_parent: cgroup_parent.to_string(),
        };
        let path = dir.join(SPARE_NAME);
        let json =
            serde_json::to_vec(&marker).map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?;
        std::fs::write(&path, json).map_err(io_err("cannot write", &path))?;
        let cgroups =
            CgroupSet::create(&self.layout, cgroup_parent, id, &Limits::default(), false)?;
        let fail = |pid: Option<i32>, e: RuntimeError| {
            if let Some(p) = pid {
                kill_pid(p, libc::SIGKILL);
            }
            let _ = cgroups.remove(Duration::from_secs(2));
            e.with_log(&dir.join(LOG_NAME))
        };
        let (mut child, mut stdout) = match self.spawn_init(dir, false, true) {
            Ok(c) => c,
            Err(e) => return Err(fail(None, e)),
        };
        let Some(go) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(
                None,
                RuntimeError::Spawn(std::io::Error::other("no stdin pipe")),
            ));
        };
        let mut pid = None;
        let pid = match await_init(&mut child, &mut stdout, &mut pid, false) {
            Ok(p) => p,
            Err(e) => return Err(fail(pid, e)),
        };
        let Some((start_time, false)) = proc_start_time(pid) else {
            return Err(fail(
                Some(pid),
                RuntimeError::Setup {
                    message: format!("spare corex pid {pid} vanished"),
                },
            ));
        };
        Ok(Spare {
            id,
            dir: dir.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
            pid,
            start_time,
            cgroups,
            go,
            status: stdout,
        })
    }

    /// Starts the container of `spec` in `spare` (made for the same id, directory and cgroup
    /// parent, and without host networking): writes the spec, gives the cgroups their limits
    /// and tells the waiting corex to go on; returns once it is ready. On error the spare is
    /// gone (its process and cgroups; the directory is the caller's). Blocks.
    pub fn start_spare(
        &self,
        mut spare: Spare,
        spec: &ContainerSpec,
    ) -> Result<Running, RuntimeError> {
        let fits = spec.id == spare.id
            && spec.dir == spare.dir
            && spec.cgroup_parent == spare.cgroup_parent
            && !spec.host_network;
        let checked = spec.validate().and_then(|()| {
            if !fits {
                return Err(RuntimeError::InvalidSpec(format!(
                    "spare {} does not fit container {} (id, directory, cgroups or network)",
                    spare.id, spec.id
                )));
            }
            if !spare.is_alive() {
                return Err(RuntimeError::Setup {
                    message: format!("spare corex pid {} is gone", spare.pid),
                });
            }
            Ok(())
        });
        let fail = |spare: &Spare, e: RuntimeError| {
            kill_pid(spare.pid, libc::SIGKILL);
            let _ = spare.cgroups.remove(Duration::from_secs(2));
            let _ = std::fs::remove_file(spare.dir.join(corex::SOCKET_NAME));
            e.with_log(&spare.dir.join(LOG_NAME))
        };
        if let Err(e) = checked {
            return Err(fail(&spare, e));
        }
        let spec_path = spec.dir.join(SPEC_NAME);
        let prepared = serde_json::to_vec_pretty(spec)
            .map_err(|e| RuntimeError::InvalidSpec(e.to_string()))
            .and_then(|json| {
                std::fs::write(&spec_path, json).map_err(io_err("cannot write", &spec_path))
            })
            .and_then(|()| Ok(spare.cgroups.take_over(&spec.limits, spec.privileged)?))
            .and_then(|()| {
                use std::io::Write;
                spare
                    .go
                    .write_all(b"go\n")
                    .map_err(|e| RuntimeError::Setup {
                        message: format!("cannot wake the spare corex: {e}"),
                    })
            });
        if let Err(e) = prepared {
            return Err(fail(&spare, e));
        }
        let mut pid = Some(spare.pid);
        if let Err(e) = read_status(&mut spare.status, START_TIMEOUT, &mut pid, true) {
            return Err(fail(&spare, e));
        }
        let _ = std::fs::remove_file(spare.dir.join(SPARE_NAME));
        if let Err(e) = write_pid_file(&spec.dir, spare.pid, spare.start_time) {
            return Err(fail(&spare, e));
        }
        Ok(Running {
            pid: spare.pid,
            start_time: spare.start_time,
            dir: spare.dir.clone(),
            cgroups: spare.cgroups.clone(),
        })
    }

    /// Removes a spare nobody took: its process, its cgroups and its directory. Blocks.
    pub fn discard_spare(&self, spare: Spare) {
        if spare.is_alive() {
            let pidfd = pidfd_open(spare.pid);
            if spare.is_alive() {
                kill_pid(spare.pid, libc::SIGKILL);
                wait_exit(spare.pid, pidfd.as_ref(), Duration::from_secs(5));
            }
        }
        if let Err(e) = spare.cgroups.remove(Duration::from_secs(5)) {
            tracing::warn!(spare = spare.id, error = %e, "cannot remove a spare's cgroups");
        }
        let _ = std::fs::remove_dir_all(&spare.dir);
    }

    /// Removes what a spare left in `dir` (`spare.json` says it is one) after its core0 ended
    /// without using it: whatever still runs in its cgroups, the cgroups and the directory.
    /// Returns false (and touches nothing) when `dir` is no spare's: the caller checks first
    /// that no container took it over. Blocks.
    pub fn remove_spare_dir(&self, dir: &Path) -> bool {
        let Some(marker) = std::fs::read(dir.join(SPARE_NAME))
            .ok()
            .and_then(|d| serde_json::from_slice::<SpareSpec>(&d).ok())
        else {
            return false;
        };
        if let Ok(set) = CgroupSet::open(&self.layout, &marker.cgroup_parent, marker.id)
            && let Err(e) = set.remove(Duration::from_secs(5))
        {
            tracing::warn!(spare = marker.id, error = %e, "cannot remove a spare's cgroups");
        }
        if host_mounts().iter().any(|m| m.starts_with(dir)) {
            return false;
        }
        std::fs::remove_dir_all(dir).is_ok()
    }

    /// Stops a container: SIGTERM to corex (which kills every process of the container), SIGKILL
    /// after `timeout`; then removes its cgroups and socket. Keeps the directory (and `upper/`).
    pub fn stop(&self, running: &Running, timeout: Duration) -> Result<(), RuntimeError> {
        if running.is_alive() {
            let pidfd = pidfd_open(running.pid);
            // Opened after the check: make sure the pid still is our corex.
            if running.is_alive() {
                kill_pid(running.pid, libc::SIGTERM);
                if !wait_exit(running.pid, pidfd.as_ref(), timeout) {
                    kill_pid(running.pid, libc::SIGKILL);
                    if !wait_exit(running.pid, pidfd.as_ref(), Duration::from_secs(5)) {
                        return Err(RuntimeError::StopTimeout(running.pid));
                    }
                }
            }
        }
        running.cgroups.remove(Duration::from_secs(5))?;
        // The overlay lives in the container's mount namespace; should a host mount remain
        // (someone held the namespace), detach it.
        let merged = running.dir.join("merged");
        if host_mounts().iter().any(|m| m == &merged) {
            let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        }
        for f in [corex::SOCKET_NAME, PID_NAME] {
            let _ = std::fs::remove_file(running.dir.join(f));
        }
        Ok(())
    }

    /// The running container of `dir` (after a core0 restart), checked as [`find_running`] does.
    pub fn adopt(&self, dir: &Path) -> Option<Running> {
        let pid = find_running(dir)?;
        let (start_time, _) = proc_start_time(pid)?;
        let data = std::fs::read(dir.join(SPEC_NAME)).ok()?;
        let spec: ContainerSpec = serde_json::from_slice(&data).ok()?;
        let cgroups = CgroupSet::open(&self.layout, &spec.cgroup_parent, spec.id).ok()?;
        Some(Running {
            pid,
            start_time,
            dir: dir.to_path_buf(),
            cgroups,
        })
    }
}

/// The host mount points (from `/proc/self/mountinfo`).
pub fn host_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

fn kill_pid(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) with integer arguments only.
        unsafe { libc::kill(pid, sig) };
    }
}

pub(crate) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) with integer arguments; the fd is owned right away.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative return is a new fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process exits (or is a zombie): on its pidfd, or by polling `/proc`.
pub(crate) fn wait_exit(pid: i32, pidfd: Option<&OwnedFd>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let gone = || proc_start_time(pid).is_none_or(|(_, zombie)| zombie);
    loop {
        if gone() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one pollfd we own.
                unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32 + 1) };
            }
            None => std::thread::sleep(Duration::from_millis(10).min(left)),
        }
    }
}

/// Reads `pid <n>` and, when `want_ready`, `ready` (in any order), or `error <message>`, from
/// the init process.
fn read_status(
    out: &mut std::process::ChildStdout,
    timeout: Duration,
    pid: &mut Option<i32>,
    want_ready: bool,
) -> Result<i32, RuntimeError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut ready = false;
    let mut chunk = [0u8; 512];
    loop {
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if let Some(p) = line.strip_prefix("pid ") {
                *pid = p.parse().ok();
            } else if line == "ready" {
                ready = true;
            } else if let Some(m) = line.strip_prefix("error ") {
                return Err(RuntimeError::Setup {
                    message: m.to_string(),
                });
            }
        }
        if let (true, Some(p)) = (ready || !want_ready, *pid) {
            return Ok(p);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RuntimeError::Timeout(timeout));
        }
        let mut p = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(60_000) as i32 + 1) };
        if n <= 0 {
            continue;
        }
        match out.read(&mut chunk) {
            Ok(0) => {
                return Err(RuntimeError::Setup {
                    message: "corex exited before it was ready".into(),
                });
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RuntimeError::Spawn(e)),
        }
    }
}

fn with_log_tail(message: String, log: &Path) -> String {
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
    if tail.is_empty() {
        message
    } else {
        let lines: Vec<&str> = tail.into_iter().rev().collect();
        format!("{message} (corex log: {})", lines.join(" | "))
    }
}

/// The corex of `dir`, if it runs: its recorded pid is alive with the recorded start time, its
/// command line is corex's and it answers a ping on `corex.sock`.
pub fn find_running(dir: &Path) -> Option<i32> {
    let rec = std::fs::read_to_string(dir.join(PID_NAME)).ok()?;
    let mut it = rec.split_whitespace();
    let pid: i32 = it.next()?.parse().ok()?;
    let recorded_start: Option<u64> = it.next().and_then(|s| s.parse().ok());
    let (start, zombie) = proc_start_time(pid)?;
    if zombie || recorded_start.is_some_and(|r| r != start) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    if args.next()? != corex::ARGV0.as_bytes() || args.next()? != corex::INIT_SUBCOMMAND.as_bytes()
    {
        return None;
    }
    let mut client = corex::Client::connect(&dir.join(corex::SOCKET_NAME)).ok()?;
    let (inner, _) = client.ping(Duration::from_secs(2)).ok()?;
    (inner == 1).then_some(pid)
}

/// Removes a stopped container's directory (its overlay upper layer included). Refuses while it
/// runs.
pub fn destroy(dir: &Path) -> Result<(), RuntimeError> {
    if let Some(pid) = find_running(dir) {
        return Err(RuntimeError::AlreadyRunning {
            dir: dir.to_path_buf(),
            pid,
        });
    }
    if host_mounts().iter().any(|m| m.starts_with(dir)) {
        return Err(RuntimeError::InvalidSpec(format!(
            "{} still has mounts: not removing it",
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> ContainerSpec {
        ContainerSpec {
            id: 1,
            name: "c".into(),
            rootfs_lower: dir.to_path_buf(),
            dir: dir.join("c1"),
            hostname: "box-1".into(),
            host_network: false,
            privileged: false,
            limits: Limits::default(),
            cgroup_parent: "grid/n0".into(),
            env: vec![],
            mounts: vec![],
        }
    }

    #[test]
    fn validates_specs() {
        let t = tempfile::tempdir().expect("tempdir");
        assert!(spec(t.path()).validate().is_ok());
        let mut s = spec(t.path());
        s.hostname = "a b".into();
        assert!(s.validate().is_err());
        let mut s = spec(t.path());
        s.dir = PathBuf::from("/x,y");
        assert!(s.validate().is_err());
        let mut s = spec(t.path());
        s.cgroup_parent = "/abs".into();
        assert!(s.validate().is_err());
        let mut s = spec(t.path());
        s.env = vec![("A=B".into(), "c".into())];
        assert!(s.validate().is_err());
        let mut s = spec(t.path());
        s.dir = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(s.validate().is_err());
        let bind = |source: &str, target: &str| BindMount {
            source: PathBuf::from(source),
            target: target.into(),
        };
        let mut s = spec(t.path());
        s.mounts = vec![
            bind("/srv/data", "/data"),
            bind("/etc/x.conf", "/etc/x.conf"),
        ];
        assert!(s.validate().is_ok());
        for (src, dst) in [
            ("srv", "/data"),
            ("/srv/../etc", "/data"),
            ("/srv", "data"),
            ("/srv", "/"),
            ("/srv", "/a/../../b"),
            ("/srv", "/a/./b"),
            ("/srv", "/a\0b"),
        ] {
            let mut s = spec(t.path());
            s.mounts = vec![bind(src, dst)];
            assert!(s.validate().is_err(), "{src} -> {dst:?}");
        }
    }

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id() as i32;
        let (t, zombie) = proc_start_time(me).expect("own stat");
        assert!(t > 0);
        assert!(!zombie);
    }

    #[test]
    fn loadable_part_of_an_elf_file() {
        let exe = std::fs::read("/proc/self/exe").expect("own binary");
        let len = loadable_len(&mut exe.as_slice()).expect("an ELF file") as usize;
        assert!(len > 64 && len <= exe.len());
        // Every segment lies inside the part kept.
        let phoff = u64::from_le_bytes(exe[0x20..0x28].try_into().expect("8 bytes")) as usize;
        let phnum = u16::from_le_bytes(exe[0x38..0x3a].try_into().expect("2 bytes")) as usize;
        for i in 0..phnum {
            let ph = &exe[phoff + i * 56..];
            let off = u64::from_le_bytes(ph[8..16].try_into().expect("8 bytes")) as usize;
            let size = u64::from_le_bytes(ph[32..40].try_into().expect("8 bytes")) as usize;
            assert!(off + size <= len);
        }
        assert_eq!(loadable_len(&mut &b"#!/bin/sh\n"[..]), None);
        assert_eq!(loadable_len(&mut &exe[..40]), None);
    }

    #[test]
    fn sealed_copy_is_sealed_and_read_only() {
        let fd = sealed_copy(Path::new("/proc/self/exe")).expect("sealed copy");
        // SAFETY: fcntl(2) on an fd we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_WRITE, 0);
        assert_ne!(seals & libc::F_SEAL_SEAL, 0);
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        // Opening for writing may succeed; writing never does.
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
            use std::io::Write;
            assert!(f.write_all(b"x").is_err(), "sealed copy is writable");
        }
        let mut ro = std::fs::File::open(&path).expect("reopen");
        use std::io::Write;
        assert!(ro.write_all(b"x").is_err());
    }
}
