//! `filesystem.*`: open-file table and path operations.
//!
//! Everything here blocks on file I/O: the builtins call it from `tokio::task::spawn_blocking`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use grid_proto::args::FsOpenArgs;
use grid_proto::info::FsEntry;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest block `filesystem.read` returns.
pub const READ_BLOCK: usize = 512 * 1024;

/// How long an open file may stay unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Files `filesystem.open` keeps open at once; more are refused until some are closed.
pub const MAX_OPEN_FILES: usize = 1024;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The `mode` of `filesystem.open` is not one of r/w/a/x with an optional `+`.
    #[error("invalid mode {mode:?}: want one of r, w, a, x, optionally followed by +")]
    BadMode {
        /// The mode given.
        mode: String,
    },
    /// [`MAX_OPEN_FILES`] (or the table's own limit) files are open already.
    #[error("too many open files ({max}): close some with filesystem.close first")]
    TooManyOpen {
        /// The limit.
        max: usize,
    },
    /// No open file has this fd (never opened, closed, or idle too long).
    #[error("unknown fd {fd}")]
    UnknownFd {
        /// The fd given.
        fd: String,
    },
    /// The `block` of `filesystem.write` is not base64.
    #[error("block for fd {fd} is not valid base64: {source}")]
    BadBlock {
        /// The fd given.
        fd: String,
        /// The decoding error.
        source: base64::DecodeError,
    },
    /// The path does not exist.
    #[error("{path}: no such file or directory")]
    NotFound {
        /// The path given.
        path: String,
    },
    /// The user of `filesystem.chown` is unknown.
    #[error("unknown user {user:?}")]
    UnknownUser {
        /// The user name given.
        user: String,
    },
    /// The group of `filesystem.chown` is unknown.
    #[error("unknown group {group:?}")]
    UnknownGroup {
        /// The group name given.
        group: String,
    },
    /// The user or group database could not be read.
    #[error("cannot look up {name:?}: {source}")]
    Lookup {
        /// The user or group name given.
        name: String,
        /// The cause.
        source: nix::Error,
    },
    /// An I/O operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `read`, `chmod`, …).
        op: &'static str,
        /// The path (or fd) concerned.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Maps an `io::Error` of `op` on `path`, turning "not found" into [`FsError::NotFound`].
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| {
        let path = path.display().to_string();
        if source.kind() == io::ErrorKind::NotFound {
            FsError::NotFound { path }
        } else {
            FsError::Io { op, path, source }
        }
    }
}

/// One open file.
#[derive(Debug)]
struct OpenFile {
    file: Arc<Mutex<File>>,
    last_used: Instant,
}

/// Files opened by `filesystem.open`, keyed by fd (a UUID), closed after 5 idle minutes; at
/// most [`MAX_OPEN_FILES`] at once.
#[derive(Debug)]
pub struct FsTable {
    files: Mutex<HashMap<String, OpenFile>>,
    idle: Duration,
    max_open: usize,
}

impl Default for FsTable {
    fn default() -> Self {
        Self::with_idle_timeout(IDLE_TIMEOUT)
    }
}

/// Locks a mutex, carrying on after a panic elsewhere (the data stays consistent: every critical
/// section here is a single map or file operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FsTable {
    /// A table whose files close after `idle` without use.
    pub fn with_idle_timeout(idle: Duration) -> Self {
        Self {
            files: Mutex::new(HashMap::new()),
            idle,
            max_open: MAX_OPEN_FILES,
        }
    }

    /// The same table with at most `max_open` files open at once (at least one).
    pub fn with_max_open(mut self, max_open: usize) -> Self {
        self.max_open = max_open.max(1);
        self
    }

    /// Locks the table and closes the files idle for too long (checked lazily on every call).
    fn table(&self) -> MutexGuard<'_, HashMap<String, OpenFile>> {
        let mut files = lock(&self.files);
        let idle = self.idle;
        files.retain(|_, f| f.last_used.elapsed() < idle);
        files
    }

    /// The file of `fd`, marking it used.
    fn get(&self, fd: &str) -> Result<Arc<Mutex<File>>, FsError> {
        let mut files = self.table();
        let f = files
            .get_mut(fd)
            .ok_or_else(|| FsError::UnknownFd { fd: fd.to_string() })?;
        f.last_used = Instant::now();
        Ok(Arc::clone(&f.file))
    }

    /// `filesystem.open`: opens `args.file` and returns its new fd. Refused while the table is
    /// full.
    pub fn open(&self, args: &FsOpenArgs) -> Result<String, FsError> {
        let opts = open_options(&args.mode, args.perm)?;
        let full = || FsError::TooManyOpen { max: self.max_open };
        // Checked before opening (a refused "w" must not truncate) and again when inserting
        // (the open runs unlocked: it may block, on a FIFO say).
        if self.table().len() >= self.max_open {
            return Err(full());
        }
        let path = Path::new(&args.file);
        let file = opts.open(path).map_err(io_err("open", path))?;
        let fd = uuid::Uuid::new_v4().to_string();
        let mut files = self.table();
        if files.len() >= self.max_open {
            return Err(full());
        }
        files.insert(
            fd.clone(),
            OpenFile {
                file: Arc::new(Mutex::new(file)),
                last_used: Instant::now(),
            },
        );
        Ok(fd)
    }

    /// `filesystem.read`: base64 of the next (up to) 512 KiB, `""` at end of file.
    pub fn read(&self, fd: &str) -> Result<String, FsError> {
        let file = self.get(fd)?;
        let mut file = lock(&file);
        let mut buf = vec![0u8; READ_BLOCK];
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FsError::Io {
                        op: "read",
                        path: format!("fd {fd}"),
                        source,
                    });
                }
            }
        }
        Ok(B64.encode(&buf[..n]))
    }

    /// `filesystem.write`: writes the bytes of the base64 `block`.
    pub fn write(&self, fd: &str, block_b64: &str) -> Result<(), FsError> {
        let bytes = B64.decode(block_b64).map_err(|source| FsError::BadBlock {
            fd: fd.to_string(),
            source,
        })?;
        let file = self.get(fd)?;
        lock(&file).write_all(&bytes).map_err(|source| FsError::Io {
            op: "write",
            path: format!("fd {fd}"),
            source,
        })
    }

    /// `filesystem.close`: closes `fd`.
    pub fn close(&self, fd: &str) -> Result<(), FsError> {
        self.table()
            .remove(fd)
            .map(drop)
            .ok_or_else(|| FsError::UnknownFd { fd: fd.to_string() })
    }

    /// Number of open files (after closing idle ones).
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no file is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open options of a mode: one of `r`, `w`, `a`, `x`, optionally followed by `+` (read and write).
fn open_options(mode: &str, perm: u32) -> Result<OpenOptions, FsError> {
    let bad = || FsError::BadMode {
        mode: mode.to_string(),
    };
    let (letter, plus) = match mode.as_bytes() {
        [l] => (*l, false),
        [l, b'+'] => (*l, true),
        _ => return Err(bad()),
    };
    let mut o = OpenOptions::new();
    o.mode(perm);
    match letter {
        b'r' => o.read(true).write(plus),
        b'w' => o.write(true).read(plus).create(true).truncate(true),
        b'a' => o.append(true).read(plus).create(true),
        b'x' => o.write(true).read(plus).create_new(true),
        _ => return Err(bad()),
    };
    Ok(o)
}

/// `filesystem.exists`: whether `path` exists (following symlinks).
pub fn exists(path: &str) -> Result<bool, FsError> {
    let p = Path::new(path);
    std::fs::exists(p).map_err(|source| FsError::Io {
        op: "stat",
        path: path.to_string(),
        source,
    })
}

/// `filesystem.list`: the entries of a directory, sorted by name (symlinks not followed).
pub fn list(path: &str) -> Result<Vec<FsEntry>, FsError> {
    let p = Path::new(path);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(p).map_err(io_err("list", p))? {
        let entry = entry.map_err(io_err("list", p))?;
        // An entry removed between readdir and stat is simply not listed.
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

/// `filesystem.mkdir`: creates `path` and its missing parents with mode 0755.
pub fn mkdir(path: &str) -> Result<(), FsError> {
    let p = Path::new(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .map_err(io_err("mkdir", p))
}

/// `filesystem.remove`: removes a file, or a directory with its contents. Missing is an error.
pub fn remove(path: &str) -> Result<(), FsError> {
    let p = Path::new(path);
    let md = std::fs::symlink_metadata(p).map_err(io_err("remove", p))?;
    if md.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
    .map_err(io_err("remove", p))
}

/// `filesystem.move`: renames `path` to `destination`.
pub fn rename(path: &str, destination: &str) -> Result<(), FsError> {
    let p = Path::new(path);
    std::fs::rename(p, destination).map_err(io_err("move", p))
}

/// Calls `f` on every path below directory `root` (not `root` itself), without following
/// symlinks; `f` is told whether the path is a symlink.
fn walk_below(
    root: &Path,
    f: &mut dyn FnMut(&Path, bool) -> Result<(), FsError>,
) -> Result<(), FsError> {
    for entry in std::fs::read_dir(root).map_err(io_err("list", root))? {
        let entry = entry.map_err(io_err("list", root))?;
        let path: PathBuf = entry.path();
        let ft = entry.file_type().map_err(io_err("stat", &path))?;
        f(&path, ft.is_symlink())?;
        if ft.is_dir() {
            walk_below(&path, f)?;
        }
    }
    Ok(())
}

/// `filesystem.chmod`: sets the permission bits of `path` (and everything below it when
/// `recursive`; symlinks below are skipped, as Linux has no mode on symlinks).
pub fn chmod(path: &str, mode: u32, recursive: bool) -> Result<(), FsError> {
    let p = Path::new(path);
    let set = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", p))
    };
    set(p)?;
    if recursive && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        walk_below(p, &mut |q, is_link| if is_link { Ok(()) } else { set(q) })?;
    }
    Ok(())
}

/// `filesystem.chown`: sets the owner of `path` (and everything below it when `recursive`;
/// symlinks below are changed themselves, not their targets). An empty user or group is left
/// unchanged; an unknown one is an error.
pub fn chown(path: &str, user: &str, group: &str, recursive: bool) -> Result<(), FsError> {
    use nix::unistd::{Group, User};
    let uid = if user.is_empty() {
        None
    } else {
        let u = User::from_name(user).map_err(|source| FsError::Lookup {
            name: user.to_string(),
            source,
        })?;
        Some(
            u.ok_or_else(|| FsError::UnknownUser {
                user: user.to_string(),
            })?
            .uid
            .as_raw(),
        )
    };
    let gid = if group.is_empty() {
        None
    } else {
        let g = Group::from_name(group).map_err(|source| FsError::Lookup {
            name: group.to_string(),
            source,
        })?;
        Some(
            g.ok_or_else(|| FsError::UnknownGroup {
                group: group.to_string(),
            })?
            .gid
            .as_raw(),
        )
    };
    let p = Path::new(path);
    std::os::unix::fs::chown(p, uid, gid).map_err(io_err("chown", p))?;
    if recursive && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        walk_below(p, &mut |q, _| {
            std::os::unix::fs::lchown(q, uid, gid).map_err(io_err("chown", q))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_args(file: &Path, mode: &str) -> FsOpenArgs {
        FsOpenArgs {
            file: file.display().to_string(),
            mode: mode.to_string(),
            perm: 0o640,
        }
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn open_files_are_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(FsTable::default().max_open, MAX_OPEN_FILES);
        let table = FsTable::default().with_max_open(3);
        let mut fds: Vec<String> = (0..3)
            .map(|i| {
                table
                    .open(&open_args(&dir.path().join(format!("f{i}")), "w"))
                    .expect("open below the cap")
            })
            .collect();
        let refused = dir.path().join("refused");
        let err = table
            .open(&open_args(&refused, "w"))
            .expect_err("the fourth file is refused");
        assert!(matches!(err, FsError::TooManyOpen { max: 3 }), "{err}");
        assert!(err.to_string().contains("too many open files"), "{err}");
        assert!(!refused.exists(), "a refused open creates nothing");
        table.close(&fds.pop().expect("an fd")).expect("close");
        table
            .open(&open_args(&refused, "w"))
            .expect("a slot is free again");
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn modes_are_validated() {
        for good in ["r", "r+", "w", "w+", "a", "a+", "x", "x+"] {
            assert!(open_options(good, 0o644).is_ok(), "{good}");
        }
        for bad in ["", "rw", "+", "r++", "q", "wx", "R"] {
            assert!(
                matches!(open_options(bad, 0o644), Err(FsError::BadMode { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn round_trip_in_a_tempdir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = FsTable::default();
        let file = dir.path().join("data.bin");
        // Bigger than one read block, so reading takes several calls.
        let data: Vec<u8> = (0..READ_BLOCK * 2 + 1234)
            .map(|i| (i % 251) as u8)
            .collect();

        let fd = table.open(&open_args(&file, "w")).expect("open w");
        assert!(uuid::Uuid::parse_str(&fd).is_ok());
        for chunk in data.chunks(100_000) {
            table.write(&fd, &B64.encode(chunk)).expect("write");
        }
        assert!(matches!(
            table.write(&fd, "!!not base64"),
            Err(FsError::BadBlock { .. })
        ));
        table.close(&fd).expect("close");
        assert!(matches!(table.close(&fd), Err(FsError::UnknownFd { .. })));

        let fd = table.open(&open_args(&file, "r")).expect("open r");
        let mut back = Vec::new();
        loop {
            let block = table.read(&fd).expect("read");
            if block.is_empty() {
                break;
            }
            let bytes = B64.decode(block).expect("read returns base64");
            assert!(bytes.len() <= READ_BLOCK);
            back.extend(bytes);
        }
        assert_eq!(back, data);
        table.close(&fd).expect("close");
        assert!(table.is_empty());

        // x refuses an existing file; a appends.
        assert!(table.open(&open_args(&file, "x")).is_err());
        let fd = table.open(&open_args(&file, "a")).expect("open a");
        table.write(&fd, &B64.encode(b"tail")).expect("append");
        table.close(&fd).expect("close");
        let content = std::fs::read(&file).expect("read back");
        assert_eq!(content.len(), data.len() + 4);
        assert!(content.ends_with(b"tail"));

        assert!(exists(&s(&file)).expect("exists"));
        mkdir(&s(&dir.path().join("sub/deeper"))).expect("mkdir -p");
        let entries = list(&s(dir.path())).expect("list");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["data.bin", "sub"]);
        assert_eq!(entries[0].size, content.len() as u64);
        assert!(!entries[0].is_dir);
        assert!(entries[1].is_dir);
        assert_eq!(entries[1].mode & 0o777, 0o755 & !current_umask());

        chmod(&s(dir.path()), 0o700, true).expect("chmod -R");
        let entries = list(&s(dir.path())).expect("list");
        assert!(entries.iter().all(|e| e.mode == 0o700), "{entries:?}");

        let moved = dir.path().join("sub/moved.bin");
        rename(&s(&file), &s(&moved)).expect("move");
        assert!(!exists(&s(&file)).expect("exists"));
        assert!(exists(&s(&moved)).expect("exists"));

        // Chown to the owner we already are, which needs no privilege.
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())
            .expect("passwd readable")
            .expect("test user has a passwd entry");
        let my_group = nix::unistd::Group::from_gid(nix::unistd::getgid())
            .expect("group readable")
            .expect("test group has an entry");
        chown(&s(dir.path()), &me.name, &my_group.name, true).expect("chown -R to self");
        assert!(matches!(
            chown(&s(dir.path()), "no-such-user-xyz", "", false),
            Err(FsError::UnknownUser { .. })
        ));
        assert!(matches!(
            chown(&s(dir.path()), "", "no-such-group-xyz", false),
            Err(FsError::UnknownGroup { .. })
        ));

        remove(&s(&dir.path().join("sub"))).expect("remove -r");
        assert!(!exists(&s(&moved)).expect("exists"));
        assert!(matches!(
            remove(&s(&dir.path().join("sub"))),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            list(&s(&dir.path().join("sub"))),
            Err(FsError::NotFound { .. })
        ));
    }

    #[test]
    fn idle_files_are_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = FsTable::with_idle_timeout(Duration::ZERO);
        let fd = table
            .open(&open_args(&dir.path().join("f"), "w"))
            .expect("open");
        assert!(matches!(table.read(&fd), Err(FsError::UnknownFd { .. })));
        assert!(table.is_empty());
    }

    #[test]
    fn unknown_fd_is_an_error() {
        let table = FsTable::default();
        assert!(matches!(table.read("nope"), Err(FsError::UnknownFd { .. })));
        assert!(matches!(
            table.write("nope", ""),
            Err(FsError::UnknownFd { .. })
        ));
    }

    /// The process umask (read without changing it, from /proc/self/status).
    fn current_umask() -> u32 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    }
}
