//! Safe unpacking of an image archive into a private directory (blocking; run it in
//! `spawn_blocking`).
//!
//! The archive is untrusted and we run as root, so every entry is checked before it touches the disk:
//! - entry paths are normalised; `..` components and absolute paths are refused;
//! - nothing is ever written *through* a symlink: every parent component of an entry is checked with
//!   `symlink_metadata` (never followed) and must be a real directory; files are opened with
//!   `O_NOFOLLOW | O_EXCL` after the old name (if any) is unlinked;
//! - hardlink targets must stay inside the root and may not pass through a symlink;
//! - symlinks themselves, absolute ones included, are kept verbatim: they are resolved inside the
//!   container later, never by us;
//! - device nodes and fifos are skipped (corex makes `/dev`).
//!
//! Modes (setuid included), mtimes and, when running as root, numeric ownership are kept. Directory
//! metadata is applied after the last entry so that read-only directories can still be filled and
//! their mtimes are not disturbed by later entries.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::ImageError;
use super::format::{self, Format};

/// Top-level names of a root filesystem: an archive holding any of them is not a FUSE flist.
const ROOTFS_DIRS: &[&str] = &[
    "bin", "sbin", "etc", "usr", "lib", "lib32", "lib64", "libx32", "var", "root", "home", "opt",
    "dev", "proc", "sys", "tmp", "run", "srv", "mnt", "media",
];

/// Unpacks the archive at `archive` into the existing, empty directory `dest`; returns the sha256
/// (hex) of every byte of the archive file as read here, so the caller can check that the file did
/// not change after it was checksummed.
///
/// `url` is only used in errors. `progress` is called with the number of archive bytes read so far
/// (compressed bytes for a compressed archive) and should throttle itself. On error `dest` may hold a
/// partial tree: the caller removes it.
pub(crate) fn unpack(
    archive: &Path,
    url: &str,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<String, ImageError> {
    let io_err = |op: &'static str| {
        move |source| ImageError::Io {
            op,
            path: archive.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(archive).map_err(io_err("open archive"))?;
    let head = read_head(&mut file, format::HEADER_LEN).map_err(io_err("read archive"))?;
    let kind = format::detect(&head).map_err(|detected| ImageError::UnsupportedFormat {
        url: url.to_owned(),
        detected,
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("read archive"))?;
    let state = ReadState::default();
    let is_fuse_flist = {
        let counted = io::BufReader::with_capacity(
            256 * 1024,
            Counting {
                inner: &mut file,
                state: &state,
                progress,
            },
        );
        let archive_err = |source| archive_error(url, source);
        let mut decoded: Box<dyn Read + '_> = match kind {
            Format::Tar => Box::new(counted),
            Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(counted)),
            Format::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(counted).map_err(archive_err)?)
            }
        };
        if kind != Format::Tar {
            // A compressed stream must hold a tar archive: look at its first block before trusting it.
            let head = read_head(&mut decoded, format::HEADER_LEN).map_err(archive_err)?;
            if !format::is_tar_header(&head) {
                let what = if kind == Format::Gzip { "gzip" } else { "zstd" };
                return Err(ImageError::UnsupportedFormat {
                    url: url.to_owned(),
                    detected: format!("{what}-compressed data that is not a tar archive"),
                });
            }
            decoded = Box::new(Cursor::new(head).chain(decoded));
        }
        let mut unpacker = Unpacker::new(dest);
        let mut tar = tar::Archive::new(decoded);
        for entry in tar.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            unpacker.entry(url, &mut entry)?;
        }
        let is_fuse_flist = unpacker.looks_like_fuse_flist();
        if !is_fuse_flist {
            unpacker.finish()?;
        }
        is_fuse_flist
    };
    if is_fuse_flist {
        return Err(ImageError::FuseFlist {
            url: url.to_owned(),
        });
    }
    // The tar reader stops at the end-of-archive blocks: checksum the rest of the file too.
    let mut hasher = state.hasher.into_inner();
    file.seek(SeekFrom::Start(state.done.get()))
        .and_then(|_| io::copy(&mut file, &mut hasher))
        .map_err(io_err("read archive"))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Reads up to `len` bytes (fewer only at the end of the stream).
fn read_head(reader: &mut dyn Read, len: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(len);
    reader.take(len as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// What [`Counting`] saw: the bytes read from the file and their checksum.
#[derive(Default)]
struct ReadState {
    hasher: RefCell<Sha256>,
    done: Cell<u64>,
}

/// A reader of the archive file that checksums and counts what goes through it.
struct Counting<'a, R> {
    inner: R,
    state: &'a ReadState,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.borrow_mut().update(&buf[..n]);
        let done = self.state.done.get() + n as u64;
        self.state.done.set(done);
        (self.progress)(done);
        Ok(n)
    }
}

/// Metadata applied to a directory once every entry is in place.
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: SystemTime,
    owner: Option<(u32, u32)>,
}

/// The state of one unpack: the root and what is left to do at the end.
struct Unpacker<'a> {
    root: &'a Path,
    as_root: bool,
    /// Directory metadata by path relative to the root (`""` is the root itself).
    dirs: BTreeMap<PathBuf, DirMeta>,
    /// First components of all entry paths.
    top: BTreeSet<String>,
    /// Second components, by first component.
    second: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Unpacker<'a> {
    fn new(root: &'a Path) -> Self {
        Self {
            root,
            as_root: nix::unistd::geteuid().is_root(),
            dirs: BTreeMap::new(),
            top: BTreeSet::new(),
            second: BTreeMap::new(),
        }
    }

    /// Unpacks one entry.
    fn entry<R: Read>(
        &mut self,
        url: &str,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        let header = entry.header();
        let mut kind = header.entry_type();
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            return Ok(());
        }
        // Old v7 archives mark directories only by a trailing slash.
        if kind == tar::EntryType::Regular && raw_path.ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            path: shown.clone(),
            reason,
        };
        let rel = normalize(&raw_path).map_err(unsafe_entry)?;
        self.note_name(&rel);
        let meta = DirMeta {
            mode: header.mode().map_err(|e| archive_error(url, e))? & 0o7777,
            mtime: UNIX_EPOCH + Duration::from_secs(header.mtime().unwrap_or(0)),
            owner: if self.as_root {
                let uid = header.uid().map_err(|e| archive_error(url, e))?;
                let gid = header.gid().map_err(|e| archive_error(url, e))?;
                Some((to_id(uid, &shown)?, to_id(gid, &shown)?))
            } else {
                None
            },
        };
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                self.dirs.insert(rel, meta);
                return Ok(());
            }
            return Err(unsafe_entry(
                "a non-directory entry names the root itself".to_owned(),
            ));
        }
        self.prepare_parents(&rel, &shown)?;
        let target = self.root.join(&rel);
        match kind {
            k if k.is_dir() => self.make_dir(rel, &target, meta, &shown),
            k if k.is_file() || k.is_contiguous() || k.is_gnu_sparse() => {
                self.make_file(url, entry, &target, meta, &shown)
            }
            k if k.is_symlink() => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                if link.is_empty() {
                    return Err(unsafe_entry("symlink without a target".to_owned()));
                }
                self.clear_slot(&target, false, &shown)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(|source| io_error("create symlink", &target, source))?;
                self.set_link_meta(&target, meta)
            }
            k if k.is_hard_link() => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                self.make_hardlink(&link, &target, &shown)
            }
            k if k.is_character_special() || k.is_block_special() || k.is_fifo() => {
                tracing::debug!(entry = %shown, "image: skipping device node or fifo (corex makes /dev)");
                Ok(())
            }
            other => {
                tracing::debug!(entry = %shown, kind = ?other, "image: skipping entry of unsupported type");
                Ok(())
            }
        }
    }

    /// Remembers the first two components of an entry path (for the FUSE flist check).
    fn note_name(&mut self, rel: &Path) {
        let mut parts = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if let Some(first) = parts.next() {
            if let Some(second) = parts.next() {
                self.second.entry(first.clone()).or_default().insert(second);
            }
            self.top.insert(first);
        }
    }

    /// True when the archive's names look like a RocksDB database (an original g8os FUSE flist) and
    /// not like a root filesystem — at the top level, or inside a single top-level directory.
    fn looks_like_fuse_flist(&self) -> bool {
        if looks_like_rocksdb(&self.top) {
            return true;
        }
        match (self.top.len(), self.top.iter().next()) {
            (1, Some(only)) => self.second.get(only).is_some_and(looks_like_rocksdb),
            _ => false,
        }
    }

    /// Makes sure every parent directory of `rel` exists as a real directory (not a symlink), creating
    /// the missing ones.
    fn prepare_parents(&self, rel: &Path, shown: &str) -> Result<(), ImageError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut current = self.root.to_path_buf();
        let mut walked = PathBuf::new();
        for component in parent.components() {
            current.push(component);
            walked.push(component);
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ImageError::UnsafeEntry {
                        path: shown.to_owned(),
                        reason: format!(
                            "its parent {} is a symlink; writing through a symlink is refused",
                            walked.display()
                        ),
                    });
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(ImageError::UnsafeEntry {
                        path: shown.to_owned(),
                        reason: format!("its parent {} is not a directory", walked.display()),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&current)
                    .map_err(|source| io_error("create directory", &current, source))?,
                Err(source) => return Err(io_error("inspect", &current, source)),
            }
        }
        Ok(())
    }

    /// Frees the name `target` for a new entry: removes an old non-directory (a symlink is unlinked,
    /// never followed). Returns true when a directory is there and `keep_dir` allowed it to stay.
    fn clear_slot(&self, target: &Path, keep_dir: bool, shown: &str) -> Result<bool, ImageError> {
        match fs::symlink_metadata(target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(io_error("inspect", target, source)),
            Ok(meta) if meta.is_dir() => {
                if keep_dir {
                    Ok(true)
                } else {
                    Err(ImageError::UnsafeEntry {
                        path: shown.to_owned(),
                        reason: "it would replace a directory of the archive".to_owned(),
                    })
                }
            }
            Ok(meta) if keep_dir && meta.file_type().is_symlink() => Err(ImageError::UnsafeEntry {
                path: shown.to_owned(),
                reason: "a directory entry would replace a symlink".to_owned(),
            }),
            Ok(_) => fs::remove_file(target)
                .map(|()| false)
                .map_err(|source| io_error("remove", target, source)),
        }
    }

    fn make_dir(
        &mut self,
        rel: PathBuf,
        target: &Path,
        meta: DirMeta,
        shown: &str,
    ) -> Result<(), ImageError> {
        if !self.clear_slot(target, true, shown)? {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(target)
                .map_err(|source| io_error("create directory", target, source))?;
        }
        self.dirs.insert(rel, meta);
        Ok(())
    }

    fn make_file<R: Read>(
        &self,
        url: &str,
        entry: &mut tar::Entry<'_, R>,
        target: &Path,
        meta: DirMeta,
        shown: &str,
    ) -> Result<(), ImageError> {
        self.clear_slot(target, false, shown)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map_err(|source| io_error("create file", target, source))?;
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = entry.read(&mut buf).map_err(|e| archive_error(url, e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(|source| io_error("write file", target, source))?;
        }
        // Owner before mode: chown clears the setuid and setgid bits.
        if let Some((uid, gid)) = meta.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|source| io_error("chown file", target, source))?;
        }
        file.set_permissions(Permissions::from_mode(meta.mode))
            .map_err(|source| io_error("chmod file", target, source))?;
        file.set_times(
            FileTimes::new()
                .set_accessed(meta.mtime)
                .set_modified(meta.mtime),
        )
        .map_err(|source| io_error("set file times", target, source))
    }

    fn make_hardlink(&self, link: &[u8], target: &Path, shown: &str) -> Result<(), ImageError> {
        let refuse = |reason: String| ImageError::UnsafeEntry {
            path: shown.to_owned(),
            reason,
        };
        let link_shown = String::from_utf8_lossy(link).into_owned();
        let rel = resolve_hardlink(link)
            .map_err(|why| refuse(format!("hardlink target {link_shown:?} {why}")))?;
        // The target's parents must be real directories of the archive, or the link could reach a
        // file outside the root through a symlink.
        let mut current = self.root.to_path_buf();
        let parts: Vec<_> = rel.components().collect();
        for (i, component) in parts.iter().enumerate() {
            current.push(component);
            let meta = match fs::symlink_metadata(&current) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(refuse(format!(
                        "hardlink target {link_shown:?} is not in the archive before it"
                    )));
                }
                Err(source) => return Err(io_error("inspect", &current, source)),
            };
            let last = i + 1 == parts.len();
            if !last && !meta.is_dir() {
                return Err(refuse(format!(
                    "hardlink target {link_shown:?} passes through a symlink or a non-directory"
                )));
            }
            if last && meta.is_dir() {
                return Err(refuse(format!(
                    "hardlink target {link_shown:?} is a directory"
                )));
            }
        }
        if current == target {
            return Ok(());
        }
        self.clear_slot(target, false, shown)?;
        // std's hard_link uses linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&current, target)
            .map_err(|source| io_error("create hardlink", target, source))
    }

    fn set_link_meta(&self, target: &Path, meta: DirMeta) -> Result<(), ImageError> {
        if let Some((uid, gid)) = meta.owner {
            std::os::unix::fs::lchown(target, Some(uid), Some(gid))
                .map_err(|source| io_error("chown symlink", target, source))?;
        }
        let secs = meta
            .mtime
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let time = nix::sys::time::TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            target,
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|errno| io_error("set symlink times", target, io::Error::from(errno)))
    }

    /// Applies directory metadata, deepest first.
    fn finish(self) -> Result<(), ImageError> {
        for (rel, meta) in self.dirs.iter().rev() {
            let path = self.root.join(rel);
            let is_dir = fs::symlink_metadata(&path)
                .map_err(|source| io_error("inspect", &path, source))?
                .is_dir();
            if !is_dir {
                // Unreachable by construction (a directory is never replaced); never follow a link.
                continue;
            }
            if let Some((uid, gid)) = meta.owner {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                    .map_err(|source| io_error("chown directory", &path, source))?;
            }
            fs::set_permissions(&path, Permissions::from_mode(meta.mode))
                .map_err(|source| io_error("chmod directory", &path, source))?;
            let times = FileTimes::new()
                .set_accessed(meta.mtime)
                .set_modified(meta.mtime);
            File::open(&path)
                .and_then(|dir| dir.set_times(times))
                .map_err(|source| io_error("set directory times", &path, source))?;
        }
        Ok(())
    }
}

/// Normalises an entry path: drops `.` components and repeated slashes; refuses absolute paths and
/// `..` components. The empty result names the root itself.
pub(crate) fn normalize(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.starts_with(b"/") {
        return Err("absolute entry paths are refused".to_owned());
    }
    if raw.contains(&0) {
        return Err("entry path contains a nul byte".to_owned());
    }
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` components are refused".to_owned()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute entry paths are refused".to_owned());
            }
        }
    }
    Ok(out)
}

/// Resolves a hardlink target inside the root: absolute targets are refused, `..` may not climb above
/// the root.
pub(crate) fn resolve_hardlink(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.is_empty() {
        return Err("is empty");
    }
    if raw.starts_with(b"/") {
        return Err("is absolute");
    }
    let mut parts: Vec<&OsStr> = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err("escapes the root");
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err("is absolute"),
        }
    }
    if parts.is_empty() {
        return Err("names the root itself");
    }
    Ok(parts.iter().collect())
}

/// True when `names` look like the files of a RocksDB database and none is a root filesystem
/// directory.
fn looks_like_rocksdb(names: &BTreeSet<String>) -> bool {
    if names.iter().any(|n| ROOTFS_DIRS.contains(&n.as_str())) {
        return false;
    }
    let is_rocks = |n: &str| {
        matches!(n, "CURRENT" | "IDENTITY" | "LOCK" | "LOG")
            || n.starts_with("LOG.old")
            || n.starts_with("MANIFEST-")
            || n.starts_with("OPTIONS-")
            || n.ends_with(".sst")
            || n.ends_with(".ldb")
            || n.ends_with(".log")
    };
    let anchored = names
        .iter()
        .any(|n| n == "CURRENT" || n.starts_with("MANIFEST-"));
    anchored && names.iter().filter(|n| is_rocks(n)).count() >= 2
}

fn to_id(value: u64, shown: &str) -> Result<u32, ImageError> {
    u32::try_from(value).map_err(|_| ImageError::UnsafeEntry {
        path: shown.to_owned(),
        reason: format!("owner id {value} is out of range"),
    })
}

fn archive_error(url: &str, source: io::Error) -> ImageError {
    ImageError::Archive {
        url: url.to_owned(),
        source,
    }
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> ImageError {
    ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_entry_paths() {
        assert_eq!(normalize(b"./bin//sh"), Ok(PathBuf::from("bin/sh")));
        assert_eq!(normalize(b"./"), Ok(PathBuf::new()));
        assert_eq!(normalize(b"a/./b/"), Ok(PathBuf::from("a/b")));
        assert!(normalize(b"../escape").is_err());
        assert!(normalize(b"a/../../b").is_err());
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a\0b").is_err());
    }

    #[test]
    fn resolves_hardlinks_inside_the_root() {
        assert_eq!(
            resolve_hardlink(b"./bin/busybox"),
            Ok(PathBuf::from("bin/busybox"))
        );
        assert_eq!(
            resolve_hardlink(b"usr/../bin/x"),
            Ok(PathBuf::from("bin/x"))
        );
        assert_eq!(
            resolve_hardlink(b"../../etc/passwd"),
            Err("escapes the root")
        );
        assert_eq!(resolve_hardlink(b"/etc/passwd"), Err("is absolute"));
        assert_eq!(resolve_hardlink(b"a/.."), Err("names the root itself"));
    }

    #[test]
    fn recognises_rocksdb_names() {
        let set = |names: &[&str]| {
            names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<BTreeSet<_>>()
        };
        assert!(looks_like_rocksdb(&set(&[
            "CURRENT",
            "MANIFEST-000001",
            "000003.sst"
        ])));
        assert!(looks_like_rocksdb(&set(&[
            "CURRENT",
            "000004.log",
            "LOCK",
            "IDENTITY"
        ])));
        assert!(!looks_like_rocksdb(&set(&[
            "CURRENT",
            "MANIFEST-000001",
            "etc"
        ])));
        assert!(!looks_like_rocksdb(&set(&["bin", "usr"])));
        assert!(!looks_like_rocksdb(&set(&["000003.sst", "x.log"])));
    }
}
