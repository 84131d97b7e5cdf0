//! corex, the in-container agent: PID 1 of every container.
//!
//! corex is the core0 binary started as `core0 __corex-init <dir>` (from a sealed memfd copy, see
//! [`super::runtime`]) with fresh mount, uts, ipc and (unless host networking) net namespaces and a
//! pending pid namespace. [`init_main`] then:
//! 1. joins the container's cgroups, so that everything after runs limited;
//! 2. forks: the child is PID 1 of the new pid namespace; the parent prints `pid <host pid>` on
//!    its stdout (a pipe to core0) and exits;
//! 3. in the child: makes the mount tree private, mounts the overlay root, opens and listens on
//!    `<dir>/corex.sock` (the host side, kept as an fd), `pivot_root`s into the overlay, mounts
//!    `/proc`, `/sys`, a minimal `/dev`, sets the hostname, `/etc/hostname`, `/etc/hosts`, brings
//!    `lo` up, drops capabilities (unless privileged), prints `ready` and serves.
//!
//! The service is a single-threaded `poll(2)` loop: it reaps every zombie of the container, answers
//! the JSON-lines protocol of [`wire`] on the socket and streams the output of the jobs it runs.
//! SIGTERM from outside the container (core0) kills every process of the container and ends corex;
//! signals sent from inside the container are ignored.

use super::runtime::ContainerSpec;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The file name of the listening socket in the container directory.
pub const SOCKET_NAME: &str = "corex.sock";
/// The hidden subcommand of the core0 binary that starts corex.
pub const INIT_SUBCOMMAND: &str = "__corex-init";
/// `argv[0]` of corex, which [`super::runtime::find_running`] checks.
pub const ARGV0: &str = "corex";
/// The flag of `__corex-init` that makes a spare ([`super::runtime::Runtime::prepare_spare`]).
pub const SPARE_FLAG: &str = "--spare";

/// The JSON-lines protocol between core0 and corex: one JSON object per line, both ways.
pub mod wire {
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    /// Output levels of [`Event::Line`] (the core0 protocol's stdout/stderr levels).
    pub const LEVEL_STDOUT: u16 = 1;
    /// See [`LEVEL_STDOUT`].
    pub const LEVEL_STDERR: u16 = 2;

    /// A request from core0 to corex.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    pub enum Request {
        /// Liveness: answered by [`Event::Pong`].
        Ping,
        /// Receive the events of every job on this connection (and those that happened while no
        /// connection was attached). `exec` attaches too; `ping` does not.
        Attach,
        /// Run a process in the container.
        Exec(Exec),
        /// Send a signal to a job's process group.
        Kill {
            /// The job id.
            id: String,
            /// The signal number.
            signal: i32,
        },
    }

    /// Arguments of [`Request::Exec`].
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct Exec {
        /// The job id, unique among the running jobs of the container.
        pub id: String,
        /// The program (searched in `PATH` when it has no `/`).
        pub name: String,
        /// Its arguments.
        #[serde(default)]
        pub args: Vec<String>,
        /// Environment added to the container's.
        #[serde(default)]
        pub env: BTreeMap<String, String>,
        /// Working directory (default `/`).
        #[serde(default)]
        pub dir: Option<String>,
        /// Data written to its stdin (otherwise stdin is `/dev/null`).
        #[serde(default)]
        pub stdin: Option<String>,
    }

    /// A message from corex to core0.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "lowercase")]
    pub enum Event {
        /// Answer to [`Request::Ping`].
        Pong {
            /// corex's pid in the container: 1.
            pid: i32,
            /// The container's hostname.
            hostname: String,
        },
        /// One line of a job's output, without its newline.
        Line {
            /// The job id.
            id: String,
            /// [`LEVEL_STDOUT`] or [`LEVEL_STDERR`].
            level: u16,
            /// The text (invalid UTF-8 replaced).
            text: String,
        },
        /// A job ended; always its last event.
        Exit {
            /// The job id.
            id: String,
            /// Exit status, when it exited.
            code: Option<i32>,
            /// The signal that killed it, when one did.
            signal: Option<i32>,
            /// Why it could not run, when it never started.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            error: Option<String>,
        },
        /// A request was refused (bad JSON, unknown job, duplicate id).
        Error {
            /// The job the request named, if any.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            id: Option<String>,
            /// What was wrong.
            message: String,
        },
    }
}

/// Errors of corex's setup and of its client.
#[derive(Debug, thiserror::Error)]
pub enum CorexError {
    /// The container spec could not be read.
    #[error("cannot read the container spec {path}: {message}")]
    Spec {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A setup step failed.
    #[error("{step}: {source}")]
    Setup {
        /// What was being done.
        step: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A cgroup step failed.
    #[error("cgroups: {0}")]
    Cgroup(#[from] super::cgroups::CgroupError),
    /// Talking to corex failed.
    #[error("corex socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// corex sent something that is not a protocol event.
    #[error("bad message from corex: {0}")]
    BadMessage(String),
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> CorexError {
    let step = what.into();
    move |e| CorexError::Setup {
        step,
        source: std::io::Error::from(e),
    }
}

fn io_step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CorexError {
    let step = what.into();
    move |source| CorexError::Setup { step, source }
}

/// A blocking client of the corex protocol (adoption checks, tests, tools). core0's job manager
/// can use [`wire`] with its own async transport.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: std::io::BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to a corex socket.
    pub fn connect(path: &Path) -> Result<Self, CorexError> {
        let err = |source| CorexError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let s = UnixStream::connect(path).map_err(err)?;
        let w = s.try_clone().map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: std::io::BufReader::new(s),
            writer: w,
        })
    }

    fn err(&self, source: std::io::Error) -> CorexError {
        CorexError::Socket {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends one request.
    pub fn send(&mut self, req: &wire::Request) -> Result<(), CorexError> {
        let mut line =
            serde_json::to_vec(req).map_err(|e| CorexError::BadMessage(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.err(e))
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv(&mut self, timeout: Duration) -> Result<wire::Event, CorexError> {
        use std::io::BufRead;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| self.err(e))?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(self.err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line).map_err(|e| CorexError::BadMessage(format!("{e}: {line}")))
    }

    /// Sends a ping and waits for the pong: `(pid, hostname)`.
    pub fn ping(&mut self, timeout: Duration) -> Result<(i32, String), CorexError> {
        self.send(&wire::Request::Ping)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let wire::Event::Pong { pid, hostname } = self.recv(left)? {
                return Ok((pid, hostname));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// init: the code of `core0 __corex-init <dir>`
// ---------------------------------------------------------------------------------------------

/// Entry point of `core0 __corex-init <dir> [--spare]`; returns the process exit code. Reports
/// `pid <n>`, then `ready` or `error <message>` on stdout. A spare joins the cgroups its
/// `spare.json` names, and its PID 1 waits for a `go` line on stdin before it reads the spec
/// (end of input: it exits quietly).
pub fn init_main(dir: &Path, spare: bool) -> u8 {
    let (spec, cgroup_parent, id) = if spare {
        match read_spare(dir) {
            Ok(s) => (None, s.cgroup_parent, s.id),
            Err(e) => return report_error(&e),
        }
    } else {
        match read_spec(dir) {
            Ok(s) => {
                let (p, id) = (s.cgroup_parent.clone(), s.id);
                (Some(s), p, id)
            }
            Err(e) => return report_error(&e),
        }
    };
    // Join the cgroups before the fork: corex and all it starts are limited from the start.
    let joined = super::cgroups::Layout::detect(Path::new(super::cgroups::CGROUP_ROOT))
        .and_then(|l| super::cgroups::CgroupSet::open(&l, &cgroup_parent, id))
        .and_then(|set| set.add(std::process::id() as i32));
    if let Err(e) = joined {
        return report_error(&CorexError::Cgroup(e));
    }
    // SAFETY: this process is a fresh exec of core0 that has started no thread.
    match unsafe { nix::unistd::fork() } {
        Err(e) => report_error(&step("fork")(e)),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "pid {child}");
            let _ = out.flush();
            0
        }
        Ok(nix::unistd::ForkResult::Child) => {
            let spec = match spec {
                Some(s) => Ok(Some(s)),
                None => wait_go(dir, &cgroup_parent, id),
            };
            let code = match spec.and_then(|s| match s {
                Some(s) => pid1(&s).map(|()| 0),
                None => Ok(0),
            }) {
                Ok(c) => c,
                Err(e) => report_error(&e),
            };
            // SAFETY: _exit(2) ends the process without running the parent's atexit handlers.
            unsafe { libc::_exit(i32::from(code)) }
        }
    }
}

fn read_spare(dir: &Path) -> Result<super::runtime::SpareSpec, CorexError> {
    read_json(&dir.join(super::runtime::SPARE_NAME))
}

/// A spare's PID 1: waits for `go` on stdin, then reads the spec, which must be for the cgroups
/// it joined and must not ask for the host's network (it has its own). `None`: stdin ended.
fn wait_go(dir: &Path, cgroup_parent: &str, id: u32) -> Result<Option<ContainerSpec>, CorexError> {
    // Read byte by byte from fd 0 itself: `std::io::stdin()` would keep a buffer for good.
    let mut line = Vec::new();
    loop {
        let mut byte = 0u8;
        // SAFETY: read(2) of one byte into a local.
        let n = unsafe { libc::read(0, std::ptr::addr_of_mut!(byte).cast(), 1) };
        match n {
            0 => return Ok(None),
            1 if byte == b'\n' => break,
            1 => line.push(byte),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io_step("read go")(e));
                }
            }
        }
    }
    if line != b"go" {
        return Err(CorexError::Spec {
            path: dir.to_path_buf(),
            message: format!(
                "spare got {:?} instead of go",
                String::from_utf8_lossy(&line)
            ),
        });
    }
    let spec = read_spec(dir)?;
    if spec.id != id || spec.cgroup_parent != cgroup_parent || spec.host_network {
        return Err(CorexError::Spec {
            path: dir.to_path_buf(),
            message: "the spec does not fit this spare (id, cgroups or host network)".into(),
        });
    }
    Ok(Some(spec))
}

fn report_error(e: &CorexError) -> u8 {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "error {}", e.to_string().replace('\n', " "));
    let _ = out.flush();
    1
}

fn read_spec(dir: &Path) -> Result<ContainerSpec, CorexError> {
    read_json(&dir.join(super::runtime::SPEC_NAME))
}

/// A JSON file of the container directory (the spec, a spare's marker).
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CorexError> {
    let path = path.to_path_buf();
    let data = std::fs::read(&path).map_err(|e| CorexError::Spec {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_slice(&data).map_err(|e| CorexError::Spec {
        path,
        message: e.to_string(),
    })
}

/// PID 1: set the container up, report `ready`, serve until SIGTERM.
fn pid1(spec: &ContainerSpec) -> Result<(), CorexError> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(step("block signals"))?;
    let sfd = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(step("signalfd"))?;
    // Let the OOM killer pick a job, never the container's PID 1. Jobs reset it to 0.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-999");
    let listener = setup(spec)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    drop(out);
    // Nothing more goes to core0's pipe; stdin/stdout become the container's /dev/null.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2(2) onto the standard descriptors; `null` stays owned by us.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    let server = Server::new(spec, listener, sfd);
    release_setup_memory();
    server.run();
    Ok(())
}

/// Gives back the memory the setup used and the idle loop does not need: freed heap, and the
/// stack pages below the current frame (the command line parsing and the setup went deeper than
/// the loop does; a page the loop needs again comes back as a zero page on demand).
fn release_setup_memory() {
    // SAFETY: malloc_trim(3) only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    let marker = 0u8;
    let sp = std::ptr::addr_of!(marker) as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let Some(range) = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|l| l.split_whitespace().next())
    else {
        return;
    };
    let mut it = range
        .split('-')
        .filter_map(|x| usize::from_str_radix(x, 16).ok());
    let (Some(start), Some(end)) = (it.next(), it.next()) else {
        return;
    };
    // Keep a margin under the current frame for the calls made from here on.
    let keep_below = 32 * 1024;
    let top = (sp.saturating_sub(keep_below)) & !4095;
    if sp < start || sp > end || top <= start {
        return;
    }
    // SAFETY: the range lies in this thread's stack strictly below every live frame (the
    // current one minus a margin); MADV_DONTNEED turns it into zero pages on the next touch.
    unsafe { libc::madvise(start as *mut libc::c_void, top - start, libc::MADV_DONTNEED) };
}

fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> Result<(), CorexError> {
    nix::mount::mount(src, target, fstype, flags, data).map_err(step(format!("mount {target}")))
}

/// Everything between the fork and `ready`; returns the listening socket.
fn setup(spec: &ContainerSpec) -> Result<UnixListener, CorexError> {
    use nix::mount::MsFlags as F;
    mount(None, "/", None, F::MS_REC | F::MS_PRIVATE, None)?;
    let dir = &spec.dir;
    let path_str = |p: PathBuf| -> Result<String, CorexError> {
        p.into_os_string()
            .into_string()
            .map_err(|_| CorexError::Spec {
                path: dir.clone(),
                message: "non-UTF-8 path".into(),
            })
    };
    let merged = path_str(dir.join("merged"))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        path_str(spec.rootfs_lower.clone())?,
        path_str(dir.join("upper"))?,
        path_str(dir.join("work"))?
    );
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        F::empty(),
        Some(&opts),
    )?;

    // The socket lives on the host side: bound before pivot_root, invisible after it.
    let sock = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(io_step(format!("bind {}", sock.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io_step("socket nonblocking"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(io_step("chmod socket"))?;

    // With the host's network, the host's resolver configuration applies too.
    let resolv = if spec.host_network {
        std::fs::read("/etc/resolv.conf").ok()
    } else {
        None
    };

    // Bind mounts: the host trees are taken now, while the host's paths are visible, and put in
    // place after pivot_root, where their targets resolve inside the container's root.
    let trees = spec
        .mounts
        .iter()
        .map(|m| open_tree(&m.source).map(|(fd, dir)| (fd, dir, m.target.clone())))
        .collect::<Result<Vec<_>, _>>()?;

    enter_root(&merged)?;

    let nosuid_nodev_noexec = F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC;
    mkdirs(&["/proc", "/sys", "/dev", "/etc", "/tmp"])?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nosuid_nodev_noexec,
        None,
    )?;
    let sys_flags = if spec.privileged {
        nosuid_nodev_noexec
    } else {
        nosuid_nodev_noexec | F::MS_RDONLY
    };
    mount(Some("sysfs"), "/sys", Some("sysfs"), sys_flags, None)?;
    setup_dev()?;
    for (fd, dir, target) in trees {
        attach_tree(fd, dir, &target)?;
    }
    if !spec.privileged {
        mask_proc();
    }

    nix::unistd::sethostname(&spec.hostname).map_err(step("sethostname"))?;
    std::fs::write("/etc/hostname", format!("{}\n", spec.hostname))
        .map_err(io_step("write /etc/hostname"))?;
    std::fs::write(
        "/etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
            spec.hostname
        ),
    )
    .map_err(io_step("write /etc/hosts"))?;
    if let Some(r) = resolv {
        std::fs::write("/etc/resolv.conf", r).map_err(io_step("write /etc/resolv.conf"))?;
    }
    if !spec.host_network {
        loopback_up()?;
    }
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    if !spec.privileged {
        drop_capabilities()?;
        nix::sys::prctl::set_no_new_privs().map_err(step("no_new_privs"))?;
    }
    Ok(listener)
}

/// A detached copy of the mount tree at host path `source` (`open_tree(2)`, recursive), and
/// whether it is a directory.
fn open_tree(source: &Path) -> Result<(OwnedFd, bool), CorexError> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let what = format!("open_tree {}", source.display());
    let dir = std::fs::metadata(source)
        .map_err(io_step(what.clone()))?
        .is_dir();
    let c = std::ffi::CString::new(source.as_os_str().as_encoded_bytes())
        .map_err(|_| io_step(what.clone())(std::io::ErrorKind::InvalidInput.into()))?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree(2) with a NUL-terminated path we own; the fd is owned right away.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io_step(what)(std::io::Error::last_os_error()));
    }
    // SAFETY: a non-negative return is a new fd nothing else owns.
    Ok((unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, dir))
}

/// Puts a tree from [`open_tree`] at `target` in the (new) root, making the directory, or an
/// empty file for a file, where none is.
fn attach_tree(tree: OwnedFd, dir: bool, target: &str) -> Result<(), CorexError> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let what = format!("mount {target}");
    if dir {
        std::fs::create_dir_all(target).map_err(io_step(what.clone()))?;
    } else {
        if let Some(parent) = Path::new(target).parent() {
            std::fs::create_dir_all(parent).map_err(io_step(what.clone()))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .map_err(io_step(what.clone()))?;
    }
    let c = std::ffi::CString::new(target)
        .map_err(|_| io_step(what.clone())(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: move_mount(2) of a tree fd we own onto a NUL-terminated path we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io_step(what)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn mkdirs(dirs: &[&str]) -> Result<(), CorexError> {
    for d in dirs {
        std::fs::create_dir_all(d).map_err(io_step(format!("mkdir {d}")))?;
    }
    Ok(())
}

/// `pivot_root` into `new_root` and detach the old root; on an initramfs root (where
/// `pivot_root` is refused) move the mount onto `/` and chroot instead.
fn enter_root(new_root: &str) -> Result<(), CorexError> {
    use nix::mount::{MntFlags, MsFlags};
    nix::unistd::chdir(new_root).map_err(step(format!("chdir {new_root}")))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked under the new one at `/`: detach it.
            nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(step("detach old root"))?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some(new_root), "/", None, MsFlags::MS_MOVE, None)?;
            nix::unistd::chroot(".").map_err(step("chroot"))?;
        }
        Err(e) => return Err(step("pivot_root")(e)),
    }
    nix::unistd::chdir("/").map_err(step("chdir /"))
}

fn setup_dev() -> Result<(), CorexError> {
    use nix::mount::MsFlags as F;
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        F::MS_NOSUID | F::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = format!("/dev/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(step(format!("mknod {path}")))?;
        // mknod honours the umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(io_step(format!("chmod {path}")))?;
    }
    mkdirs(&["/dev/pts", "/dev/shm", "/dev/mqueue"])?;
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        F::MS_NOSUID | F::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount(
        Some("shm"),
        "/dev/shm",
        Some("tmpfs"),
        F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    // Optional: a kernel without POSIX message queues still runs containers.
    let _ = mount(
        Some("mqueue"),
        "/dev/mqueue",
        Some("mqueue"),
        F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC,
        None,
    );
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, link).map_err(io_step(format!("symlink {link}")))?;
    }
    Ok(())
}

/// Hides the host-wide knobs of `/proc` from an unprivileged container, as Docker does. Best
/// effort: a kernel without one of these files just has less to hide.
fn mask_proc() {
    use nix::mount::MsFlags as F;
    for p in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ] {
        if Path::new(p).exists() {
            let _ = mount(Some("/dev/null"), p, None, F::MS_BIND, None);
        }
    }
    for p in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/irq",
        "/proc/bus",
        "/proc/fs",
    ] {
        if Path::new(p).exists() && mount(Some(p), p, None, F::MS_BIND | F::MS_REC, None).is_ok() {
            let _ = mount(
                None,
                p,
                None,
                F::MS_BIND | F::MS_REMOUNT | F::MS_RDONLY | F::MS_NOSUID | F::MS_NODEV,
                None,
            );
        }
    }
}

/// `ip link set lo up` without `ip`: SIOCSIFFLAGS on a socket. The kernel gives lo its
/// 127.0.0.1/8 and ::1 when it comes up.
fn loopback_up() -> Result<(), CorexError> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_step("socket for lo")(std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a new, valid fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io_step("get lo flags")(std::io::Error::last_os_error()));
    }
    // SAFETY: ifru_flags is the member SIOCGIFFLAGS filled in.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io_step("set lo up")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The capabilities an unprivileged container keeps (Docker's default set).
pub const DEFAULT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// The capability mask of [`DEFAULT_CAPS`].
pub fn default_cap_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0u64, |m, c| m | (1u64 << c))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability outside [`DEFAULT_CAPS`] from the bounding set (what jobs can ever
/// have) and from corex's own sets.
fn drop_capabilities() -> Result<(), CorexError> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let keep = default_cap_mask();
    for cap in 0..=last.min(63) {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(2) with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(io_step(format!("drop capability {cap}"))(e));
            }
        }
    }
    let hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) reads the header and the two v3 data structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    if rc < 0 {
        return Err(io_step("capset")(std::io::Error::last_os_error()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The service loop
// ---------------------------------------------------------------------------------------------

/// A line longer than this is cut (the rest follows as further lines).
const MAX_LINE: usize = 64 * 1024;
/// A request line longer than this drops the client.
const MAX_REQUEST: usize = 1 << 20;
/// Events kept while no client is attached.
const MAX_PENDING: usize = 4096;
/// Stop reading job output while a client has this much unsent.
const MAX_UNSENT: usize = 1 << 20;
/// How long a job's pipes may stay open after the job exited (background children holding them).
const EOF_GRACE: Duration = Duration::from_millis(200);

struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    attached: bool,
    closed: bool,
}

struct Out {
    fd: OwnedFd,
    level: u16,
    buf: Vec<u8>,
}

struct Job {
    id: String,
    pid: i32,
    outs: Vec<Out>,
    stdin: Option<(OwnedFd, Vec<u8>)>,
    status: Option<(Option<i32>, Option<i32>)>,
    exited_at: Option<Instant>,
}

struct Server {
    hostname: String,
    env: Vec<(String, String)>,
    listener: UnixListener,
    sfd: nix::sys::signalfd::SignalFd,
    conns: Vec<Conn>,
    jobs: Vec<Job>,
    pending: VecDeque<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Slot {
    Signal,
    Listener,
    Conn(usize),
    Out(usize, usize),
    Stdin(usize),
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl(2) on an fd this process owns.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

fn into_owned<T: IntoRawFd>(t: T) -> OwnedFd {
    // SAFETY: the fd comes from into_raw_fd, so we are its only owner.
    unsafe { OwnedFd::from_raw_fd(t.into_raw_fd()) }
}

impl Server {
    fn new(
        spec: &ContainerSpec,
        listener: UnixListener,
        sfd: nix::sys::signalfd::SignalFd,
    ) -> Self {
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
            ("HOSTNAME".to_string(), spec.hostname.clone()),
        ];
        for (k, v) in &spec.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        Self {
            hostname: spec.hostname.clone(),
            env,
            listener,
            sfd,
            conns: Vec::new(),
            jobs: Vec::new(),
            pending: VecDeque::new(),
        }
    }

    fn run(mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        loop {
            fds.clear();
            slots.clear();
            let mut add = |fds: &mut Vec<libc::pollfd>, fd: RawFd, events: i16, slot: Slot| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                slots.push(slot);
            };
            add(&mut fds, self.sfd.as_raw_fd(), libc::POLLIN, Slot::Signal);
            add(
                &mut fds,
                self.listener.as_raw_fd(),
                libc::POLLIN,
                Slot::Listener,
            );
            for (i, c) in self.conns.iter().enumerate() {
                let mut ev = libc::POLLIN;
                if !c.wbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                add(&mut fds, c.stream.as_raw_fd(), ev, Slot::Conn(i));
            }
            let backpressure = self.conns.iter().any(|c| c.wbuf.len() > MAX_UNSENT);
            let mut timeout = -1i32;
            for (j, job) in self.jobs.iter().enumerate() {
                if !backpressure {
                    for (o, out) in job.outs.iter().enumerate() {
                        add(&mut fds, out.fd.as_raw_fd(), libc::POLLIN, Slot::Out(j, o));
                    }
                }
                if let Some((fd, _)) = &job.stdin {
                    add(&mut fds, fd.as_raw_fd(), libc::POLLOUT, Slot::Stdin(j));
                }
                if let Some(t) = job.exited_at {
                    let left = EOF_GRACE.saturating_sub(t.elapsed()).as_millis() as i32 + 1;
                    timeout = if timeout < 0 { left } else { timeout.min(left) };
                }
            }
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Nothing sensible is left to do without poll: end the container.
                self.terminate();
            }
            for (pfd, slot) in fds.iter().zip(slots.iter()) {
                if pfd.revents == 0 {
                    continue;
                }
                match *slot {
                    Slot::Signal => self.on_signal(),
                    Slot::Listener => self.accept(),
                    Slot::Conn(i) => self.on_conn(i, pfd.revents),
                    Slot::Out(j, o) => self.on_output(j, o),
                    Slot::Stdin(j) => self.on_stdin(j),
                }
            }
            self.conns.retain(|c| !c.closed);
            self.finish_jobs();
            self.flush_all();
        }
    }

    fn terminate(&mut self) -> ! {
        // From PID 1 of the namespace, kill(-1) reaches every other process in it.
        // SAFETY: kill(2) with integer arguments only.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        while nix::sys::wait::waitpid(None, None).is_ok() {}
        // SAFETY: ends corex; the kernel tears the namespaces and mounts down with it.
        unsafe { libc::_exit(0) }
    }

    fn on_signal(&mut self) {
        while let Ok(Some(info)) = self.sfd.read_signal() {
            let sig = info.ssi_signo as i32;
            // ssi_pid is 0 for a sender outside the container's pid namespace (core0, the host);
            // a process inside the container cannot stop it.
            if (sig == libc::SIGTERM || sig == libc::SIGINT) && info.ssi_pid == 0 {
                self.terminate();
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) => (p.as_raw(), (Some(c), None)),
                Ok(WaitStatus::Signaled(p, s, _)) => (p.as_raw(), (None, Some(s as i32))),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(job) = self.jobs.iter_mut().find(|j| j.pid == pid) {
                job.status = Some(status);
                job.exited_at = Some(Instant::now());
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.conns.push(Conn {
                stream,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                attached: false,
                closed: false,
            });
        }
    }

    fn on_conn(&mut self, i: usize, revents: i16) {
        if revents & libc::POLLOUT != 0 {
            flush(&mut self.conns[i]);
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            return;
        }
        let mut buf = [0u8; 8192];
        loop {
            match self.conns[i].stream.read(&mut buf) {
                Ok(0) => {
                    self.conns[i].closed = true;
                    break;
                }
                Ok(n) => self.conns[i].rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns[i].closed = true;
                    break;
                }
            }
        }
        while let Some(pos) = self.conns[i].rbuf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.conns[i].rbuf.drain(..=pos).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<wire::Request>(&line) {
                Ok(req) => self.handle(i, req),
                Err(e) => self.reply(
                    i,
                    &wire::Event::Error {
                        id: None,
                        message: format!("bad request: {e}"),
                    },
                ),
            }
        }
        if self.conns[i].rbuf.len() > MAX_REQUEST {
            self.conns[i].closed = true;
        }
    }

    fn reply(&mut self, i: usize, ev: &wire::Event) {
        if let Ok(mut line) = serde_json::to_vec(ev) {
            line.push(b'\n');
            self.conns[i].wbuf.extend_from_slice(&line);
        }
    }

    fn attach(&mut self, i: usize) {
        if !self.conns[i].attached {
            self.conns[i].attached = true;
            while let Some(ev) = self.pending.pop_front() {
                self.conns[i].wbuf.extend_from_slice(&ev);
            }
        }
    }

    fn handle(&mut self, i: usize, req: wire::Request) {
        match req {
            wire::Request::Ping => {
                let ev = wire::Event::Pong {
                    pid: std::process::id() as i32,
                    hostname: self.hostname.clone(),
                };
                self.reply(i, &ev);
            }
            wire::Request::Attach => self.attach(i),
            wire::Request::Exec(exec) => {
                self.attach(i);
                if self.jobs.iter().any(|j| j.id == exec.id) {
                    let ev = wire::Event::Error {
                        id: Some(exec.id.clone()),
                        message: format!("a job with id {} is running", exec.id),
                    };
                    self.reply(i, &ev);
                    return;
                }
                if let Err(e) = self.spawn(&exec) {
                    let ev = wire::Event::Exit {
                        id: exec.id.clone(),
                        code: None,
                        signal: None,
                        error: Some(format!("cannot start {}: {e}", exec.name)),
                    };
                    self.broadcast(&ev);
                }
            }
            wire::Request::Kill { id, signal } => {
                let job = self.jobs.iter().find(|j| j.id == id && j.status.is_none());
                let rc = match job {
                    // SAFETY: kill(2) on the process group of a job of ours (it is its own
                    // session leader), with integer arguments only.
                    Some(j) => unsafe { libc::kill(-j.pid, signal) },
                    None => {
                        let ev = wire::Event::Error {
                            id: Some(id.clone()),
                            message: format!("no running job {id}"),
                        };
                        self.reply(i, &ev);
                        return;
                    }
                };
                if rc < 0 {
                    let ev = wire::Event::Error {
                        id: Some(id),
                        message: format!("kill: {}", std::io::Error::last_os_error()),
                    };
                    self.reply(i, &ev);
                }
            }
        }
    }

    fn spawn(&mut self, exec: &wire::Exec) -> std::io::Result<()> {
        let mut cmd = Command::new(&exec.name);
        cmd.args(&exec.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(&exec.env)
            .current_dir(exec.dir.as_deref().filter(|d| !d.is_empty()).unwrap_or("/"))
            .stdin(if exec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        static OOM_ADJ: &[u8] = b"/proc/self/oom_score_adj\0";
        // SAFETY: runs in the forked child before exec and calls only async-signal-safe
        // functions (setsid, open, write, close) on static data.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(OOM_ADJ.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let mut outs = Vec::new();
        if let Some(o) = child.stdout.take() {
            outs.push(Out {
                fd: into_owned(o),
                level: wire::LEVEL_STDOUT,
                buf: Vec::new(),
            });
        }
        if let Some(e) = child.stderr.take() {
            outs.push(Out {
                fd: into_owned(e),
                level: wire::LEVEL_STDERR,
                buf: Vec::new(),
            });
        }
        for o in &outs {
            set_nonblocking(o.fd.as_raw_fd());
        }
        let stdin = match (child.stdin.take(), &exec.stdin) {
            (Some(s), Some(data)) => {
                let fd = into_owned(s);
                set_nonblocking(fd.as_raw_fd());
                Some((fd, data.as_bytes().to_vec()))
            }
            _ => None,
        };
        // The Child is dropped without waiting: the SIGCHLD loop reaps every process.
        drop(child);
        self.jobs.push(Job {
            id: exec.id.clone(),
            pid,
            outs,
            stdin,
            status: None,
            exited_at: None,
        });
        Ok(())
    }

    fn on_stdin(&mut self, j: usize) {
        let job = &mut self.jobs[j];
        let Some((fd, data)) = &mut job.stdin else {
            return;
        };
        while !data.is_empty() {
            // SAFETY: write(2) from a buffer we own to an fd we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return;
                }
                // EPIPE: the process does not read its stdin.
                break;
            }
            data.drain(..n as usize);
        }
        job.stdin = None;
    }

    fn on_output(&mut self, j: usize, o: usize) {
        let mut lines: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut buf = [0u8; 8192];
        let out = &mut self.jobs[j].outs[o];
        let mut eof = false;
        loop {
            // SAFETY: read(2) into a stack buffer we own from an fd we own.
            let n = unsafe { libc::read(out.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                eof = true;
                break;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        eof = true;
                        break;
                    }
                }
            }
            out.buf.extend_from_slice(&buf[..n as usize]);
            while let Some(pos) = out.buf.iter().position(|b| *b == b'\n') {
                let mut l: Vec<u8> = out.buf.drain(..=pos).collect();
                l.pop();
                lines.push((out.level, l));
            }
            while out.buf.len() >= MAX_LINE {
                lines.push((out.level, out.buf.drain(..MAX_LINE).collect()));
            }
            if lines.len() > 256 {
                break;
            }
        }
        if eof && !out.buf.is_empty() {
            lines.push((out.level, std::mem::take(&mut out.buf)));
        }
        let id = self.jobs[j].id.clone();
        if eof {
            // Marked by an invalid level and dropped in finish_jobs.
            self.jobs[j].outs[o].level = 0;
        }
        for (level, l) in lines {
            let ev = wire::Event::Line {
                id: id.clone(),
                level,
                text: String::from_utf8_lossy(&l).into_owned(),
            };
            self.broadcast(&ev);
        }
    }

    /// Sends the exit of every job that ended and whose output is drained (or whose grace for
    /// background children holding its pipes ran out).
    fn finish_jobs(&mut self) {
        for job in &mut self.jobs {
            job.outs.retain(|o| o.level != 0);
        }
        let mut done = Vec::new();
        self.jobs.retain_mut(|job| {
            let Some((code, signal)) = job.status else {
                return true;
            };
            let grace_over = job.exited_at.is_some_and(|t| t.elapsed() >= EOF_GRACE);
            if !job.outs.is_empty() && !grace_over {
                return true;
            }
            let mut ev = Vec::new();
            for out in job.outs.drain(..) {
                if !out.buf.is_empty() {
                    ev.push(wire::Event::Line {
                        id: job.id.clone(),
                        level: out.level,
                        text: String::from_utf8_lossy(&out.buf).into_owned(),
                    });
                }
            }
            ev.push(wire::Event::Exit {
                id: job.id.clone(),
                code,
                signal,
                error: None,
            });
            done.push(ev);
            false
        });
        for evs in done {
            for ev in evs {
                self.broadcast(&ev);
            }
        }
    }

    fn broadcast(&mut self, ev: &wire::Event) {
        let Ok(mut line) = serde_json::to_vec(ev) else {
            return;
        };
        line.push(b'\n');
        let mut sent = false;
        for c in self.conns.iter_mut().filter(|c| c.attached && !c.closed) {
            c.wbuf.extend_from_slice(&line);
            sent = true;
        }
        if !sent {
            if self.pending.len() >= MAX_PENDING {
                // Keep exits, drop the oldest output line.
                if let Some(pos) = self
                    .pending
                    .iter()
                    .position(|l| l.starts_with(b"{\"op\":\"line\""))
                {
                    self.pending.remove(pos);
                }
            }
            self.pending.push_back(line);
        }
    }

    fn flush_all(&mut self) {
        for c in &mut self.conns {
            flush(c);
        }
        self.conns.retain(|c| !c.closed);
    }
}

fn flush(c: &mut Conn) {
    while !c.wbuf.is_empty() && !c.closed {
        match c.stream.write(&c.wbuf) {
            Ok(0) => c.closed = true,
            Ok(n) => {
                c.wbuf.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => c.closed = true,
        }
    }
    if c.wbuf.capacity() > 64 * 1024 && c.wbuf.is_empty() {
        c.wbuf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;

    #[test]
    fn wire_shapes() {
        let r: Request = serde_json::from_str(
            r#"{"op":"exec","id":"j1","name":"sh","args":["-c","echo hi"],"env":{"A":"b"}}"#,
        )
        .expect("exec parses");
        let Request::Exec(e) = r else {
            panic!("exec expected")
        };
        assert_eq!(e.args, ["-c", "echo hi"]);
        assert_eq!(e.env.get("A").map(String::as_str), Some("b"));
        assert_eq!(e.dir, None);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"ping"}"#).expect("ping"),
            Request::Ping
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"kill","id":"x","signal":9}"#).expect("kill"),
            Request::Kill {
                id: "x".into(),
                signal: 9
            }
        );
        let ev = Event::Exit {
            id: "j1".into(),
            code: Some(0),
            signal: None,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&ev).expect("json"),
            r#"{"op":"exit","id":"j1","code":0,"signal":null}"#
        );
        let ev = Event::Line {
            id: "j".into(),
            level: LEVEL_STDERR,
            text: "t".into(),
        };
        assert_eq!(
            serde_json::to_string(&ev).expect("json"),
            r#"{"op":"line","id":"j","level":2,"text":"t"}"#
        );
    }

    #[test]
    fn default_caps_mask() {
        let m = super::default_cap_mask();
        assert_eq!(m & (1 << 21), 0, "no CAP_SYS_ADMIN");
        assert_ne!(m & (1 << 5), 0, "CAP_KILL");
        assert_eq!(m.count_ones() as usize, super::DEFAULT_CAPS.len());
    }
}
