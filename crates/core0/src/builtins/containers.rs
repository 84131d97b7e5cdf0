//! Container built-ins: `corex.create`, `corex.list`, `corex.find`, `corex.terminate`,
//! `corex.stop`, `corex.start` and `corex.dispatch` (docs/CONTAINERS-CONTRACT.md), registered by
//! [`register`] around the node's [`ContainerManager`].
//!
//! `corex.dispatch` runs `core.system` and `bash` through corex ([`ContainerManager::run_process`]);
//! the other commands it knows are answered here in the container's view: its jobs, the processes
//! of its pid namespace (pids as seen inside), its hostname, and file operations confined to its
//! root with `openat2(RESOLVE_IN_ROOT)` on `/proc/<corex pid>/root`.

use super::{Ctx, Registry, decode, encode};
use crate::containers::image::{Phase, Progress};
use crate::containers::manager::{ContainerManager, is_process};
use crate::jobs::Publish;
use grid_proto::args::{
    FsChmodArgs, FsChownArgs, FsFdArgs, FsMoveArgs, FsOpenArgs, FsPathArgs, FsWriteArgs,
    JobKillArgs, JobListArgs, ProcessKillArgs, ProcessListArgs,
};
use grid_proto::commands as cmd;
use grid_proto::info::{CoreState, FsEntry, ProcessInfo};
use grid_proto::wire::{Command, CommandResult, State, StreamMessage, StreamRecord, level, meta};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// `corex.create`.
pub const COREX_CREATE: &str = "corex.create";
/// `corex.list`.
pub const COREX_LIST: &str = "corex.list";
/// `corex.find`.
pub const COREX_FIND: &str = "corex.find";
/// `corex.terminate`.
pub const COREX_TERMINATE: &str = "corex.terminate";
/// `corex.stop` (Grid).
pub const COREX_STOP: &str = "corex.stop";
/// `corex.start` (Grid).
pub const COREX_START: &str = "corex.start";
/// `corex.dispatch`.
pub const COREX_DISPATCH: &str = "corex.dispatch";

/// `{container: <id>}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerArgs {
    /// The container id.
    pub container: u32,
}

/// `corex.find {tags}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FindArgs {
    /// Every one of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `corex.dispatch {container, command}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DispatchArgs {
    /// The container id.
    pub container: u32,
    /// The command to run inside.
    pub command: Command,
}

/// Registers the container built-ins around `mgr`.
pub fn register(reg: &mut Registry, mgr: Arc<ContainerManager>, publish: Arc<dyn Publish>) {
    let m = mgr.clone();
    let p = publish.clone();
    reg.add(COREX_CREATE, move |ctx: Ctx, args| {
        let (m, p) = (m.clone(), p.clone());
        async move { create(m, p, ctx, args).await }
    });
    let m = mgr.clone();
    reg.add(COREX_LIST, move |ctx: Ctx, _args| {
        let m = m.clone();
        async move {
            let list = tokio::task::spawn_blocking(move || m.list(&[], &ctx.cpu))
                .await
                .map_err(|e| format!("task failed: {e}"))?;
            encode(list)
        }
    });
    let m = mgr.clone();
    reg.add(COREX_FIND, move |ctx: Ctx, args| {
        let m = m.clone();
        async move {
            let a: FindArgs = decode(args)?;
            let list = tokio::task::spawn_blocking(move || m.list(&a.tags, &ctx.cpu))
                .await
                .map_err(|e| format!("task failed: {e}"))?;
            encode(list)
        }
    });
    let m = mgr.clone();
    reg.add(COREX_TERMINATE, move |_ctx, args| {
        let m = m.clone();
        async move {
            let a: ContainerArgs = decode(args)?;
            m.terminate(a.container).await.map_err(|e| e.to_string())?;
            Ok(Value::Null)
        }
    });
    let m = mgr.clone();
    reg.add(COREX_STOP, move |_ctx, args| {
        let m = m.clone();
        async move {
            let a: ContainerArgs = decode(args)?;
            m.stop(a.container).await.map_err(|e| e.to_string())?;
            Ok(Value::Null)
        }
    });
    let m = mgr.clone();
    reg.add(COREX_START, move |_ctx, args| {
        let m = m.clone();
        async move {
            let a: ContainerArgs = decode(args)?;
            m.start_container(a.container)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Value::Null)
        }
    });
    let m = mgr;
    reg.add(COREX_DISPATCH, move |ctx: Ctx, args| {
        let (m, p) = (m.clone(), publish.clone());
        async move { dispatch(m, p, ctx, args).await }
    });
}

fn epoch_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    epoch_ns() / 1_000_000
}

fn progress_line(p: Progress) -> String {
    let phase = match p.phase {
        Phase::Download => "download",
        Phase::Unpack => "unpack",
        Phase::Cached => "cached",
    };
    match p.total_bytes {
        Some(t) => format!("{phase} {}/{t}", p.done_bytes),
        None => format!("{phase} {}", p.done_bytes),
    }
}

async fn create(
    m: Arc<ContainerManager>,
    publish: Arc<dyn Publish>,
    ctx: Ctx,
    args: Value,
) -> Result<Value, String> {
    // The create job's own command tells whether its output is streamed.
    let stream = ctx
        .jobs
        .list(Some(&ctx.job_id))
        .ok()
        .and_then(|l| l.into_iter().next())
        .is_some_and(|j| j.cmd.stream);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let job_id = ctx.job_id.to_string();
    let forwarder = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            let rec = [StreamRecord {
                core: 0,
                command: job_id.clone(),
                message: StreamMessage {
                    message: line,
                    epoch: epoch_ns(),
                    meta: meta::pack(level::STDOUT, meta::STREAM),
                },
            }];
            if let Err(e) = publish.stream(&job_id, &rec).await {
                tracing::warn!(id = %job_id, error = %e, "cannot push create progress");
            }
        }
    });
    let report = move |p: Progress| {
        if stream {
            let _ = tx.send(progress_line(p));
        }
    };
    let created = m.create(args, &report).await;
    drop(report);
    let _ = forwarder.await;
    let id = created.map_err(|e| e.to_string())?;
    encode(id)
}

async fn dispatch(
    m: Arc<ContainerManager>,
    publish: Arc<dyn Publish>,
    ctx: Ctx,
    args: Value,
) -> Result<Value, String> {
    let a: DispatchArgs = decode(args)?;
    let cid = a.container;
    m.corex_pid(cid).map_err(|e| e.to_string())?;
    let mut command = a.command;
    if command.id.is_empty() {
        command.id = uuid::Uuid::new_v4().to_string();
    }
    let id = command.id.clone();
    if is_process(&command.command) {
        m.run_process(cid, command)
            .await
            .map_err(|e| e.to_string())?;
        return encode(id);
    }
    if let Err(e) = publish.flag(&id).await {
        tracing::error!(id = %id, error = %e, "cannot flag container job");
    }
    tokio::spawn(async move {
        let start = now_ms();
        let timer = std::time::Instant::now();
        let name = command.command.clone();
        let args = command.arguments.clone();
        let (m2, c2) = (m.clone(), ctx.clone());
        let outcome = tokio::task::spawn_blocking(move || inside(&m2, &c2, cid, &name, args))
            .await
            .unwrap_or_else(|e| Some(Err(format!("task failed: {e}"))));
        let mut r = CommandResult::bare(&command, State::Success);
        match outcome {
            None => r.state = State::UnknownCmd,
            Some(Ok(v)) => {
                r.data = v.to_string();
                r.level = level::RESULT_JSON;
            }
            Some(Err(e)) => {
                r.state = State::Error;
                r.data = Value::String(e).to_string();
                r.level = level::RESULT_JSON;
            }
        }
        r.starttime = start;
        r.time = i64::try_from(timer.elapsed().as_millis()).unwrap_or(i64::MAX);
        r.container = u64::from(cid);
        if command.stream {
            let m = if r.state == State::Success {
                meta::pack(level::STDOUT, meta::STREAM | meta::EXIT_SUCCESS)
            } else {
                meta::pack(level::STDERR, meta::STREAM | meta::EXIT_ERROR)
            };
            let rec = [StreamRecord {
                core: u64::from(cid),
                command: command.id.clone(),
                message: StreamMessage {
                    message: String::new(),
                    epoch: epoch_ns(),
                    meta: m,
                },
            }];
            let _ = publish.stream(&command.id, &rec).await;
        }
        if let Err(e) = publish.result(&r).await {
            tracing::error!(id = %command.id, error = %e, "cannot publish container job result");
        }
    });
    encode(id)
}

/// Answers a built-in in container `cid`'s view; `None` for a command it does not know there.
/// Blocking.
fn inside(
    m: &ContainerManager,
    ctx: &Ctx,
    cid: u32,
    name: &str,
    args: Value,
) -> Option<Result<Value, String>> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let r = (|| -> Result<Value, String> {
        let pid = m.corex_pid(cid).map_err(|x| e(&x))?;
        match name {
            cmd::CORE_PING => encode(format!("PONG {}", super::core::version())),
            cmd::CORE_STATE => {
                let mut total = CoreState::default();
                for p in ns_pids(pid) {
                    if let Some(s) = ctx.cpu.sample(p.0) {
                        total.cpu += s.cpu;
                        total.rss += s.rss;
                        total.vms += s.vms;
                        total.swap += s.swap;
                    }
                }
                encode(total)
            }
            cmd::JOB_LIST => {
                let a: JobListArgs = decode(args)?;
                encode(m.jobs(cid, a.id.as_deref()).map_err(|x| e(&x))?)
            }
            cmd::JOB_KILL => {
                let a: JobKillArgs = decode(args)?;
                encode(m.kill_job(cid, &a.id, a.signal).map_err(|x| e(&x))?)
            }
            cmd::JOB_KILLALL => {
                m.kill_all_jobs(cid, None).map_err(|x| e(&x))?;
                encode(true)
            }
            cmd::PROCESS_LIST => {
                let a: ProcessListArgs = decode(args)?;
                encode(process_list(pid, a.pid.filter(|p| *p != 0))?)
            }
            cmd::PROCESS_KILL => {
                let a: ProcessKillArgs = decode(args)?;
                if a.pid <= 1 {
                    return Err(format!("invalid pid {}: must be greater than 1", a.pid));
                }
                let host = ns_pids(pid)
                    .into_iter()
                    .find(|(_, inner)| i64::from(*inner) == a.pid)
                    .ok_or_else(|| format!("process {} not found", a.pid))?;
                crate::procs::kill(i64::from(host.0), a.signal).map_err(|x| e(&x))?;
                Ok(Value::Null)
            }
            cmd::INFO_OS => {
                let mut os = crate::info::os(&ctx.instance_id).map_err(|x| e(&x))?;
                os.hostname = m.hostname(cid).map_err(|x| e(&x))?;
                os.procs = ns_pids(pid).len() as u64;
                encode(os)
            }
            cmd::INFO_CPU => encode(crate::info::cpus().map_err(|x| e(&x))?),
            cmd::INFO_MEM => encode(crate::info::mem().map_err(|x| e(&x))?),
            cmd::INFO_DISK => encode(crate::info::disks_of(Some(pid)).map_err(|x| e(&x))?),
            cmd::INFO_NIC => encode(crate::info::nics_of(pid).map_err(|x| e(&x))?),
            cmd::INFO_PORT => {
                let net = std::path::PathBuf::from(format!("/proc/{pid}/net"));
                let owners = ns_pids(pid);
                let mut ports = crate::info::ports_in(&net, Some(&owners)).map_err(|x| e(&x))?;
                // corex's control socket (bound on the host side) is not the container's.
                ports.retain(|p| {
                    !(p.pid == 1
                        && p.unix
                            .as_deref()
                            .is_some_and(|u| u.ends_with(crate::containers::corex::SOCKET_NAME)))
                });
                encode(ports)
            }
            cmd::INFO_VERSION => encode(crate::info::version()),
            cmd::FS_OPEN => {
                let a: FsOpenArgs = decode(args)?;
                encode(fs_open(ctx, pid, &a)?)
            }
            cmd::FS_READ => {
                let a: FsFdArgs = decode(args)?;
                encode(ctx.fs.read(&a.fd).map_err(|x| e(&x))?)
            }
            cmd::FS_WRITE => {
                let a: FsWriteArgs = decode(args)?;
                ctx.fs.write(&a.fd, &a.block).map_err(|x| e(&x))?;
                Ok(Value::Null)
            }
            cmd::FS_CLOSE => {
                let a: FsFdArgs = decode(args)?;
                ctx.fs.close(&a.fd).map_err(|x| e(&x))?;
                Ok(Value::Null)
            }
            cmd::FS_EXISTS => {
                let a: FsPathArgs = decode(args)?;
                let root = Root::open(pid)?;
                match root.resolve(&a.path, libc::O_PATH) {
                    Ok(_) => encode(true),
                    Err(x) if x.raw_os_error() == Some(libc::ENOENT) => encode(false),
                    Err(x) => Err(format!("{}: {x}", a.path)),
                }
            }
            cmd::FS_LIST => {
                let a: FsPathArgs = decode(args)?;
                encode(Root::open(pid)?.list(&a.path)?)
            }
            cmd::FS_MKDIR => {
                let a: FsPathArgs = decode(args)?;
                Root::open(pid)?.mkdir(&a.path)?;
                Ok(Value::Null)
            }
            cmd::FS_REMOVE => {
                let a: FsPathArgs = decode(args)?;
                Root::open(pid)?.remove(&a.path)?;
                Ok(Value::Null)
            }
            cmd::FS_MOVE => {
                let a: FsMoveArgs = decode(args)?;
                Root::open(pid)?.rename(&a.path, &a.destination)?;
                Ok(Value::Null)
            }
            cmd::FS_CHMOD => {
                let a: FsChmodArgs = decode(args)?;
                Root::open(pid)?.chmod(&a.path, a.mode, a.recursive)?;
                Ok(Value::Null)
            }
            cmd::FS_CHOWN => {
                let a: FsChownArgs = decode(args)?;
                let root = Root::open(pid)?;
                let uid = root.account_id("/etc/passwd", "user", &a.user)?;
                let gid = root.account_id("/etc/group", "group", &a.group)?;
                root.chown(&a.path, uid, gid, a.recursive)?;
                Ok(Value::Null)
            }
            _ => Err(String::new()),
        }
    })();
    match r {
        Err(s) if s.is_empty() => None,
        other => Some(other),
    }
}

/// The pid namespace of a process (`/proc/<pid>/ns/pid` link text).
fn pid_ns(pid: i32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// The innermost pid of a process (last `NSpid` value).
fn inner_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// `(host pid, pid inside)` of every process in corex's pid namespace.
fn ns_pids(corex: i32) -> Vec<(i32, i32)> {
    let Some(ns) = pid_ns(corex) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| pid_ns(*p).as_ref() == Some(&ns))
        .filter_map(|p| Some((p, inner_pid(p)?)))
        .collect();
    out.sort_by_key(|(_, inner)| *inner);
    out
}

/// `process.list` in the container: its processes with the pids they have inside.
fn process_list(corex: i32, only: Option<i64>) -> Result<Vec<ProcessInfo>, String> {
    let pids = ns_pids(corex);
    let mut out = Vec::new();
    for (host, inner) in &pids {
        if only.is_some_and(|o| o != i64::from(*inner)) {
            continue;
        }
        let Ok(mut list) = crate::procs::list(Some(i64::from(*host))) else {
            continue;
        };
        let Some(mut p) = list.pop() else {
            continue;
        };
        p.pid = i64::from(*inner);
        p.ppid = if *inner == 1 {
            0
        } else {
            pids.iter()
                .find(|(h, _)| i64::from(*h) == p.ppid)
                .map_or(0, |(_, i)| i64::from(*i))
        };
        out.push(p);
    }
    if let Some(o) = only
        && out.is_empty()
    {
        return Err(format!("process {o} not found"));
    }
    Ok(out)
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A container's root directory, for confined path resolution.
struct Root {
    fd: OwnedFd,
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?}: path contains a NUL byte"))
}

fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Whether `fd` (which may be an `O_PATH` descriptor) is a directory.
fn is_dir(fd: &OwnedFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// `(parent, last component)` of a path; the root itself has no last component.
fn split(path: &str) -> Result<(String, String), String> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some((p, n)) => (if p.is_empty() { "/" } else { p }, n),
        None => (".", trimmed),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("{path}: not a usable file name"));
    }
    Ok((parent.to_string(), name.to_string()))
}

impl Root {
    fn open(corex: i32) -> Result<Self, String> {
        let p = cstr(&format!("/proc/{corex}/root"))?;
        // SAFETY: open(2) of a NUL-terminated path; the fd is owned right away.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!(
                "cannot open the container root: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Opens `path` inside the root: `..`, absolute paths and symlinks never leave it.
    fn resolve_mode(&self, path: &str, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
        let p = CString::new(if path.is_empty() { "." } else { path })
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: if flags & libc::O_CREAT != 0 {
                u64::from(mode)
            } else {
                0
            },
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2(2) with a dirfd we own, a NUL-terminated path and an open_how of the
        // size passed; the returned fd is owned right away.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                p.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a non-negative return is a new descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn resolve(&self, path: &str, flags: i32) -> std::io::Result<OwnedFd> {
        self.resolve_mode(path, flags, 0)
    }

    fn parent(&self, path: &str) -> Result<(OwnedFd, CString), String> {
        let (parent, name) = split(path)?;
        let fd = self
            .resolve(&parent, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| format!("{path}: {e}"))?;
        Ok((fd, cstr(&name)?))
    }

    fn list(&self, path: &str) -> Result<Vec<FsEntry>, String> {
        let dir = self
            .resolve(path, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| format!("{path}: {e}"))?;
        let base = fd_path(&dir);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&base).map_err(|e| format!("{path}: {e}"))? {
            let entry = entry.map_err(|e| format!("{path}: {e}"))?;
            let Ok(md) = entry.metadata() else {
                continue;
            };
            out.push(FsEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                size: md.len(),
                mode: md.mode() & 0o7777,
                is_dir: md.is_dir(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn mkdir(&self, path: &str) -> Result<(), String> {
        let mut prefix = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            prefix.push('/');
            prefix.push_str(comp);
            if comp == ".." {
                continue;
            }
            let (parent, name) = self.parent(&prefix)?;
            // SAFETY: mkdirat(2) with a dirfd we own and a NUL-terminated name.
            let rc = unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EEXIST) {
                    return Err(format!("{path}: {err}"));
                }
            }
        }
        Ok(())
    }

    fn remove(&self, path: &str) -> Result<(), String> {
        let (parent, name) = self.parent(path)?;
        // SAFETY: unlinkat(2) with a dirfd we own and a NUL-terminated name.
        let rc = unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EISDIR) {
            return Err(format!("{path}: {err}"));
        }
        // A directory: the last component is not followed, the walk does not follow symlinks.
        let p = format!("{}/{}", fd_path(&parent), name.to_string_lossy());
        std::fs::remove_dir_all(p).map_err(|e| format!("{path}: {e}"))
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), String> {
        let (p1, n1) = self.parent(from)?;
        let (p2, n2) = self.parent(to)?;
        // SAFETY: renameat(2) with dirfds we own and NUL-terminated names.
        let rc =
            unsafe { libc::renameat(p1.as_raw_fd(), n1.as_ptr(), p2.as_raw_fd(), n2.as_ptr()) };
        if rc < 0 {
            return Err(format!("{from}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The id of user or group `name` in the container's own `/etc/passwd` or `/etc/group`
    /// (`kind` names which in errors); a number is taken as it is; empty: unchanged (`None`).
    fn account_id(&self, file: &str, kind: &str, name: &str) -> Result<Option<u32>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Ok(n) = name.parse::<u32>() {
            return Ok(Some(n));
        }
        let text = self
            .resolve(file, libc::O_RDONLY)
            .and_then(|fd| std::fs::read_to_string(fd_path(&fd)))
            .map_err(|e| format!("{file} in the container: {e}"))?;
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                Some((f.next()?, f.nth(1)?))
            })
            .find(|(n, _)| *n == name)
            .and_then(|(_, id)| id.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("unknown {kind} {name} in the container"))
    }

    /// `chown` inside the root; symlinks are neither followed nor changed.
    fn chown(
        &self,
        path: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        recursive: bool,
    ) -> Result<(), String> {
        let fd = self
            .resolve(path, libc::O_PATH)
            .map_err(|e| format!("{path}: {e}"))?;
        let p = fd_path(&fd);
        std::os::unix::fs::chown(&p, uid, gid).map_err(|e| format!("{path}: {e}"))?;
        if recursive && is_dir(&fd) {
            for child in self.children_not_symlinks(path)? {
                self.chown(&child, uid, gid, true)?;
            }
        }
        Ok(())
    }

    fn chmod(&self, path: &str, mode: u32, recursive: bool) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let fd = self
            .resolve(path, libc::O_PATH)
            .map_err(|e| format!("{path}: {e}"))?;
        let p = fd_path(&fd);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{path}: {e}"))?;
        if recursive && is_dir(&fd) {
            for child in self.children_not_symlinks(path)? {
                self.chmod(&child, mode, true)?;
            }
        }
        Ok(())
    }

    /// The paths of the entries of directory `path` that are not symlinks (a recursive change
    /// does not follow them).
    fn children_not_symlinks(&self, path: &str) -> Result<Vec<String>, String> {
        Ok(self
            .list(path)?
            .into_iter()
            .map(|e| format!("{}/{}", path.trim_end_matches('/'), e.name))
            .filter(|child| {
                // fstat of an O_PATH|O_NOFOLLOW descriptor describes the link itself; a stat of
                // its /proc/self/fd path would describe the magic link instead.
                self.resolve(child, libc::O_PATH | libc::O_NOFOLLOW)
                    .ok()
                    .and_then(|f| nix::sys::stat::fstat(&f).ok())
                    .is_some_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFLNK)
            })
            .collect())
    }
}

/// `filesystem.open` in the container: the file is opened (created) confined to its root, and
/// the open file goes into the node's table through its `/proc/self/fd` link.
fn fs_open(ctx: &Ctx, corex: i32, a: &FsOpenArgs) -> Result<String, String> {
    let root = Root::open(corex)?;
    let base = a.mode.trim_end_matches('+');
    let (flags, mode) = match base {
        "r" => (libc::O_PATH, a.mode.clone()),
        "w" | "a" => (libc::O_WRONLY | libc::O_CREAT, a.mode.clone()),
        // Created here; the table's open must not refuse the file it now finds.
        "x" => (
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            a.mode.replacen('x', "w", 1),
        ),
        _ => {
            return Err(format!(
                "invalid mode {:?}: want one of r, w, a, x, optionally followed by +",
                a.mode
            ));
        }
    };
    let fd = root
        .resolve_mode(&a.file, flags, a.perm)
        .map_err(|e| format!("{}: {e}", a.file))?;
    let args = FsOpenArgs {
        file: fd_path(&fd),
        mode,
        perm: a.perm,
    };
    ctx.fs.open(&args).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(split("/a/b").expect("ok"), ("/a".into(), "b".into()));
        assert_eq!(split("/a").expect("ok"), ("/".into(), "a".into()));
        assert_eq!(split("a").expect("ok"), (".".into(), "a".into()));
        assert!(split("/").is_err());
        assert!(split("/a/..").is_err());
    }

    #[test]
    fn own_namespace_has_own_pids() {
        let me = std::process::id() as i32;
        let pids = ns_pids(me);
        assert!(pids.iter().any(|(h, _)| *h == me));
        assert!(inner_pid(me).is_some());
    }

    #[test]
    fn progress_lines() {
        let p = Progress {
            phase: Phase::Download,
            done_bytes: 1,
            total_bytes: Some(4),
        };
        assert_eq!(progress_line(p), "download 1/4");
    }
}
