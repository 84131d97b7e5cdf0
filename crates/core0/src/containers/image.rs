//! Container images: download, digest-keyed read-only cache, safe unpacking.
//!
//! An image ("flist" in the original system) is a root filesystem archive — plain tar, gzip tar
//! (`.tar.gz`, `.tgz`, `.flist`) or zstd tar (`.tar.zst`), recognised by its content, never by its
//! name — named by `http(s)://`, `file:///abs/path` or an absolute path. The original g8os FUSE
//! flist (a RocksDB metadata database whose file contents live on a remote hub) is refused with a clear
//! error.
//!
//! One [`ImageCache`] per node, rooted at `<node data dir>/images`, shared by every container:
//!
//! ```text
//! <root>/rootfs/<sha256>/   unpacked trees, keyed by the sha256 of the archive bytes; never modified
//!                           after the atomic rename that creates them (an overlay's upper layer takes
//!                           a container's writes)
//! <root>/urls/<sha256(url)> which digest a URL or path gave last time (JSON)
//! <root>/tmp/               downloads and unpacks in progress; emptied by ImageCache::new
//! ```
//!
//! The cache root and its directories are mode 0700: the trees keep the archive's setuid binaries,
//! which no other host user may reach.
//!
//! Re-resolving a URL: for `http(s)` the remembered digest is trusted as long as its tree exists (an
//! image URL is expected to name fixed content; a new image needs a new URL, or the tree must be
//! garbage collected); for a local file the remembered digest is used only when the file's size and
//! mtime are unchanged, otherwise the file is checksummed again.

mod format;
mod unpack;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Progress is reported at most once per this many bytes …
const PROGRESS_BYTES: u64 = 1024 * 1024;
/// … or once per this interval, whichever comes first (and once at the end of each phase).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// How the supported image locations are named in errors.
const SUPPORTED_URLS: &str = "http://..., https://..., file:///absolute/path or an absolute path";

/// Errors of image resolution.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The URL is not one of the supported forms.
    #[error("bad image url {url:?}: {reason}; supported forms: {SUPPORTED_URLS}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local image file does not exist.
    #[error("image file {} not found", path.display())]
    NotFound {
        /// The local path.
        path: PathBuf,
    },
    /// The server answered with a non-success status.
    #[error("download of image {url} failed: http status {status}")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The server could not be reached, or the transfer broke off.
    #[error("download of image {url} failed: {source}")]
    Fetch {
        /// The URL.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The transfer ended before the announced length.
    #[error("download of image {url} is incomplete: {received} of {expected} bytes")]
    Incomplete {
        /// The URL.
        url: String,
        /// The announced `Content-Length`.
        expected: u64,
        /// What arrived.
        received: u64,
    },
    /// The HTTP client could not be set up.
    #[error("http client unavailable: {reason}")]
    HttpClient {
        /// Why it failed.
        reason: String,
    },
    /// The content is not a supported archive.
    #[error(
        "image {url} is {detected}, which is not supported; give {}",
        format::SUPPORTED
    )]
    UnsupportedFormat {
        /// The URL or path.
        url: String,
        /// What the content looks like.
        detected: String,
    },
    /// The archive is an original g8os FUSE flist (RocksDB metadata, contents on a remote hub).
    #[error(
        "image {url} is in the original fuse flist format with a remote content hub, which is not \
         supported; give a root filesystem archive: .tar, .tar.gz/.tgz/.flist, .tar.zst"
    )]
    FuseFlist {
        /// The URL or path.
        url: String,
    },
    /// An archive entry would escape the root or write through a symlink.
    #[error("unsafe image archive entry {path:?}: {reason}")]
    UnsafeEntry {
        /// The entry's path as stored in the archive.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// The archive (or its compression) is corrupt.
    #[error("corrupt image archive {url}: {source}")]
    Archive {
        /// The URL or path.
        url: String,
        /// The decoding error.
        #[source]
        source: io::Error,
    },
    /// A local image file changed while it was being read.
    #[error("image file {} changed while it was being read", path.display())]
    Changed {
        /// The local path.
        path: PathBuf,
    },
    /// A filesystem operation of the cache failed.
    #[error("image cache: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A blocking worker panicked or was cancelled.
    #[error("image worker failed: {reason}")]
    Task {
        /// The join error.
        reason: String,
    },
}

/// A resolved image: its digest and its read-only unpacked tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Image {
    /// sha256 (lowercase hex) of the archive bytes.
    pub digest: String,
    /// The unpacked root filesystem (`<root>/rootfs/<digest>`); never modify it.
    pub rootfs: PathBuf,
}

/// What [`ImageCache::resolve`] is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reading the archive: downloading it (http), or checksumming a local file.
    Download,
    /// Unpacking the archive into the cache.
    Unpack,
    /// The tree was already in the cache.
    Cached,
}

/// A progress report of [`ImageCache::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// The current phase.
    pub phase: Phase,
    /// Archive bytes handled so far in this phase.
    pub done_bytes: u64,
    /// Archive size, when known.
    pub total_bytes: Option<u64>,
}

/// Where an image comes from.
#[derive(Debug, Clone)]
enum Source {
    Http(reqwest::Url),
    File(PathBuf),
}

impl Source {
    /// Parses the supported URL forms.
    fn parse(url: &str) -> Result<Self, ImageError> {
        let bad = |reason: &str| ImageError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if url.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        if url.starts_with('/') {
            return Ok(Self::File(PathBuf::from(url)));
        }
        let parsed = match reqwest::Url::parse(url) {
            Ok(parsed) => parsed,
            Err(_) if !url.contains(':') => return Err(bad("relative paths are not supported")),
            Err(e) => return Err(bad(&format!("it does not parse ({e})"))),
        };
        match parsed.scheme() {
            "http" | "https" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(bad("it has no host"));
                }
                Ok(Self::Http(parsed))
            }
            "file" => {
                if parsed
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        "file urls must name a local path (file:///absolute/path)",
                    ));
                }
                parsed
                    .to_file_path()
                    .map(Self::File)
                    .map_err(|()| bad("file urls must name an absolute local path"))
            }
            other => Err(bad(&format!("the scheme {other:?} is not supported"))),
        }
    }

    /// The key under which the source's digest is remembered.
    fn key(&self) -> String {
        match self {
            Self::Http(url) => url.as_str().to_owned(),
            Self::File(path) => format!("file://{}", path.display()),
        }
    }
}

/// What `urls/<sha256(key)>` holds.
#[derive(Debug, Serialize, Deserialize)]
struct UrlRecord {
    key: String,
    digest: String,
    size: u64,
    /// For local files: `(mtime seconds, nanoseconds)` when checksummed.
    #[serde(default)]
    mtime: Option<(i64, i64)>,
}

/// Async mutexes by name, dropped when nobody holds or waits for them.
#[derive(Default)]
struct KeyedLocks {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.retain(|_, weak| weak.strong_count() > 0);
            match map.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
    }
}

/// Limits progress reports to one per [`PROGRESS_BYTES`] or [`PROGRESS_INTERVAL`].
struct Throttle {
    at: Instant,
    bytes: u64,
}

impl Throttle {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            bytes: 0,
        }
    }

    fn ready(&mut self, done: u64) -> bool {
        if done == self.bytes {
            return false;
        }
        if done.saturating_sub(self.bytes) >= PROGRESS_BYTES
            || self.at.elapsed() >= PROGRESS_INTERVAL
        {
            self.at = Instant::now();
            self.bytes = done;
            return true;
        }
        false
    }
}

/// Removes a file or a directory tree when dropped (unless disarmed).
struct Cleanup(Option<PathBuf>);

impl Cleanup {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(e) = remove_path(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "image cache: cannot remove temporary path");
        }
    }
}

/// The node's image cache. See the module documentation for the layout.
pub struct ImageCache {
    root: PathBuf,
    client: Result<reqwest::Client, String>,
    locks: Arc<KeyedLocks>,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ImageCache {
    /// A cache rooted at `root` (normally `<node data dir>/images`). Only one cache may use a root at
    /// a time: leftovers of an earlier run in `<root>/tmp` are removed here.
    pub fn new(root: PathBuf) -> Self {
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let path = entry.path();
                tracing::info!(path = %path.display(), "image cache: removing leftover of an earlier run");
                if let Err(e) = remove_path(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "image cache: cannot remove leftover");
                }
            }
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string());
        Self {
            root,
            client,
            locks: Arc::new(KeyedLocks::default()),
        }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves an image URL to an unpacked tree: downloads (or reads) and checksums the archive,
    /// unpacks it once per content digest, and remembers the URL's digest. `progress` is called at
    /// most once per MiB or 100 ms, and at the end of each phase.
    pub async fn resolve(
        &self,
        url: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Image, ImageError> {
        let source = Source::parse(url)?;
        let key = source.key();
        // One resolve per source at a time: a second one waits and then finds the cache filled.
        let _source_guard = self.locks.lock(format!("url:{key}")).await;
        self.make_dirs().await?;

        let local = match &source {
            Source::File(path) => Some(local_stat(url, path).await?),
            Source::Http(_) => None,
        };
        if let Some(record) = self.read_record(&key).await {
            let fresh = match &local {
                None => true,
                Some(meta) => record.size == meta.len() && record.mtime == Some(mtime_of(meta)),
            };
            let rootfs = self.rootfs_dir(&record.digest);
            if fresh && is_dir(&rootfs).await {
                tracing::debug!(url, digest = %record.digest, "image: cached");
                progress(Progress {
                    phase: Phase::Cached,
                    done_bytes: record.size,
                    total_bytes: Some(record.size),
                });
                return Ok(Image {
                    digest: record.digest,
                    rootfs,
                });
            }
        }

        let (archive, digest, size, temp) = match &source {
            Source::Http(parsed) => {
                let path = self
                    .root
                    .join("tmp")
                    .join(format!("{}.download", uuid::Uuid::new_v4().simple()));
                let temp = Cleanup(Some(path.clone()));
                let (digest, size) = self.download(url, parsed.clone(), &path, progress).await?;
                (path, digest, size, temp)
            }
            Source::File(path) => {
                let size = local.as_ref().map_or(0, std::fs::Metadata::len);
                let (archive, owned_url) = (path.clone(), url.to_owned());
                let digest = with_progress(Phase::Download, Some(size), progress, move |report| {
                    checksum_file(&archive, &owned_url, report)
                })
                .await?;
                (path.clone(), digest, size, Cleanup(None))
            }
        };

        let image = self
            .ensure_rootfs(url, &source, archive, &digest, size, temp, progress)
            .await?;
        let record = UrlRecord {
            key: key.clone(),
            digest: digest.clone(),
            size,
            mtime: local.as_ref().map(mtime_of),
        };
        self.write_record(&record).await?;
        tracing::info!(url, digest = %digest, "image: resolved");
        Ok(image)
    }

    /// The images in the cache (unpacked trees), sorted by digest.
    pub fn list(&self) -> Vec<Image> {
        let dir = self.root.join("rootfs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut images: Vec<Image> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let is_digest = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                (is_digest && is_dir).then(|| Image {
                    rootfs: entry.path(),
                    digest: name,
                })
            })
            .collect();
        images.sort_by(|a, b| a.digest.cmp(&b.digest));
        images
    }

    /// Removes every cached tree whose digest is not in `in_use`, and the URL records that point to
    /// them; returns the removed digests. The caller must know every digest that a container uses or
    /// is about to use.
    pub async fn remove_unused(&self, in_use: &[String]) -> Result<Vec<String>, ImageError> {
        let mut removed = Vec::new();
        for image in self.list() {
            if in_use.contains(&image.digest) {
                continue;
            }
            let _guard = self.locks.lock(format!("digest:{}", image.digest)).await;
            if !is_dir(&image.rootfs).await {
                continue;
            }
            // Take the tree out of rootfs/ atomically, then delete it at leisure.
            let doomed = self
                .root
                .join("tmp")
                .join(format!("{}.gc", uuid::Uuid::new_v4().simple()));
            tokio::fs::rename(&image.rootfs, &doomed)
                .await
                .map_err(|source| io_error("move away", &image.rootfs, source))?;
            let path = doomed.clone();
            tokio::task::spawn_blocking(move || remove_path(&path))
                .await
                .map_err(task_error)?
                .map_err(|source| io_error("remove", &doomed, source))?;
            tracing::info!(digest = %image.digest, "image: removed unused tree");
            removed.push(image.digest);
        }
        if !removed.is_empty() {
            self.forget_records(&removed).await;
        }
        Ok(removed)
    }

    /// Downloads `parsed` into `dest`, checksumming on the way; returns `(digest, size)`.
    async fn download(
        &self,
        url: &str,
        parsed: reqwest::Url,
        dest: &Path,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(String, u64), ImageError> {
        let client = self
            .client
            .as_ref()
            .map_err(|reason| ImageError::HttpClient {
                reason: reason.clone(),
            })?;
        let fetch = |source| ImageError::Fetch {
            url: url.to_owned(),
            source,
        };
        let mut response = client.get(parsed).send().await.map_err(fetch)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ImageError::Http {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let total = response.content_length();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .await
            .map_err(|source| io_error("create", dest, source))?;
        let mut hasher = Sha256::new();
        let mut head: Vec<u8> = Vec::with_capacity(format::HEADER_LEN);
        let mut checked = false;
        let mut done = 0u64;
        let mut throttle = Throttle::new();
        progress(Progress {
            phase: Phase::Download,
            done_bytes: 0,
            total_bytes: total,
        });
        while let Some(chunk) = response.chunk().await.map_err(fetch)? {
            if !checked {
                // Refuse a non-archive (an html error page, a picture) without downloading all of it.
                let want = format::HEADER_LEN - head.len();
                head.extend_from_slice(&chunk[..want.min(chunk.len())]);
                if head.len() == format::HEADER_LEN {
                    check_format(url, &head)?;
                    checked = true;
                }
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|source| io_error("write", dest, source))?;
            done += chunk.len() as u64;
            if throttle.ready(done) {
                progress(Progress {
                    phase: Phase::Download,
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        }
        if !checked {
            check_format(url, &head)?;
        }
        file.flush()
            .await
            .map_err(|source| io_error("write", dest, source))?;
        drop(file);
        if let Some(expected) = total
            && expected != done
        {
            return Err(ImageError::Incomplete {
                url: url.to_owned(),
                expected,
                received: done,
            });
        }
        progress(Progress {
            phase: Phase::Download,
            done_bytes: done,
            total_bytes: Some(done),
        });
        Ok((hex::encode(hasher.finalize()), done))
    }

    /// Makes sure `rootfs/<digest>` exists, unpacking `archive` if needed (once per digest, even with
    /// concurrent callers). `temp` is the downloaded archive to delete afterwards.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_rootfs(
        &self,
        url: &str,
        source: &Source,
        archive: PathBuf,
        digest: &str,
        size: u64,
        temp: Cleanup,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Image, ImageError> {
        let rootfs = self.rootfs_dir(digest);
        let guard = self.locks.lock(format!("digest:{digest}")).await;
        if is_dir(&rootfs).await {
            progress(Progress {
                phase: Phase::Cached,
                done_bytes: size,
                total_bytes: Some(size),
            });
            return Ok(Image {
                digest: digest.to_owned(),
                rootfs,
            });
        }
        let work = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let (target, owned_url, expected) = (rootfs.clone(), url.to_owned(), digest.to_owned());
        let local = match source {
            Source::File(path) => Some(path.clone()),
            Source::Http(_) => None,
        };
        // Everything up to the rename runs in the blocking task, which also holds the digest lock and
        // the temporary paths: a cancelled resolve still finishes or cleans up, never half-makes.
        with_progress(Phase::Unpack, Some(size), progress, move |report| {
            let _guard = guard;
            let _temp = temp;
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&work)
                .map_err(|source| io_error("create", &work, source))?;
            let mut work_dir = Cleanup(Some(work.clone()));
            let read = unpack::unpack(&archive, &owned_url, &work, report)?;
            if read != expected {
                return Err(match local {
                    Some(path) => ImageError::Changed { path },
                    None => ImageError::Changed { path: archive },
                });
            }
            match std::fs::rename(&work, &target) {
                Ok(()) => work_dir.disarm(),
                // Someone else (another process) made it meanwhile: keep theirs, ours goes.
                Err(_) if target.is_dir() => {}
                Err(source) => return Err(io_error("rename", &work, source)),
            }
            Ok(())
        })
        .await?;
        Ok(Image {
            digest: digest.to_owned(),
            rootfs,
        })
    }

    fn rootfs_dir(&self, digest: &str) -> PathBuf {
        self.root.join("rootfs").join(digest)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root
            .join("urls")
            .join(hex::encode(Sha256::digest(key.as_bytes())))
    }

    async fn make_dirs(&self) -> Result<(), ImageError> {
        for dir in [
            self.root.clone(),
            self.root.join("rootfs"),
            self.root.join("urls"),
            self.root.join("tmp"),
        ] {
            if is_dir(&dir).await {
                continue;
            }
            let path = dir.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
            })
            .await
            .map_err(task_error)?
            .map_err(|source| io_error("create", &dir, source))?;
        }
        Ok(())
    }

    async fn read_record(&self, key: &str) -> Option<UrlRecord> {
        let bytes = tokio::fs::read(self.record_path(key)).await.ok()?;
        let record: UrlRecord = serde_json::from_slice(&bytes).ok()?;
        (record.key == key).then_some(record)
    }

    async fn write_record(&self, record: &UrlRecord) -> Result<(), ImageError> {
        let path = self.record_path(&record.key);
        let temp = self
            .root
            .join("tmp")
            .join(format!("{}.url", uuid::Uuid::new_v4().simple()));
        let mut cleanup = Cleanup(Some(temp.clone()));
        let bytes = serde_json::to_vec(record)
            .map_err(|e| io_error("encode", &path, io::Error::other(e)))?;
        tokio::fs::write(&temp, bytes)
            .await
            .map_err(|source| io_error("write", &temp, source))?;
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(|source| io_error("rename", &temp, source))?;
        cleanup.disarm();
        Ok(())
    }

    /// Removes the URL records that point to one of `digests` (best effort).
    async fn forget_records(&self, digests: &[String]) {
        let Ok(mut entries) = tokio::fs::read_dir(self.root.join("urls")).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Ok(bytes) = tokio::fs::read(entry.path()).await else {
                continue;
            };
            let stale = serde_json::from_slice::<UrlRecord>(&bytes)
                .is_ok_and(|r| digests.contains(&r.digest));
            if stale && let Err(e) = tokio::fs::remove_file(entry.path()).await {
                tracing::warn!(path = %entry.path().display(), error = %e, "image cache: cannot remove url record");
            }
        }
    }
}

/// Runs blocking `work`, which reports bytes done, and forwards throttled [`Progress`] of `phase`.
async fn with_progress<T, F>(
    phase: Phase,
    total: Option<u64>,
    progress: &(dyn Fn(Progress) + Send + Sync),
    work: F,
) -> Result<T, ImageError>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn FnMut(u64)) -> Result<T, ImageError> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let mut handle = tokio::task::spawn_blocking(move || {
        let mut report = |done: u64| {
            tx.send_replace(done);
        };
        work(&mut report)
    });
    progress(Progress {
        phase,
        done_bytes: 0,
        total_bytes: total,
    });
    let mut throttle = Throttle::new();
    let joined = loop {
        tokio::select! {
            joined = &mut handle => break joined,
            changed = rx.changed() => {
                if changed.is_err() {
                    break (&mut handle).await;
                }
                let done = *rx.borrow_and_update();
                if throttle.ready(done) {
                    progress(Progress { phase, done_bytes: done, total_bytes: total });
                }
            }
        }
    };
    let value = joined.map_err(task_error)??;
    let done = *rx.borrow();
    progress(Progress {
        phase,
        done_bytes: total.unwrap_or(done),
        total_bytes: total.or(Some(done)),
    });
    Ok(value)
}

/// Checksums a local archive (after a look at its first bytes); blocking.
fn checksum_file(
    path: &Path,
    url: &str,
    report: &mut dyn FnMut(u64),
) -> Result<String, ImageError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|source| local_error(path, source))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|source| io_error("read", path, source))?;
        if done == 0 {
            check_format(url, &buf[..n.min(format::HEADER_LEN)])?;
        }
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        report(done);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn check_format(url: &str, head: &[u8]) -> Result<(), ImageError> {
    format::detect(head)
        .map(|_| ())
        .map_err(|detected| ImageError::UnsupportedFormat {
            url: url.to_owned(),
            detected,
        })
}

/// The metadata of a local image file; missing → [`ImageError::NotFound`], a directory →
/// [`ImageError::BadUrl`].
async fn local_stat(url: &str, path: &Path) -> Result<std::fs::Metadata, ImageError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|source| local_error(path, source))?;
    if meta.is_dir() {
        return Err(ImageError::BadUrl {
            url: url.to_owned(),
            reason: format!("{} is a directory, not an archive", path.display()),
        });
    }
    Ok(meta)
}

fn local_error(path: &Path, source: io::Error) -> ImageError {
    if source.kind() == io::ErrorKind::NotFound {
        ImageError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        io_error("read", path, source)
    }
}

fn mtime_of(meta: &std::fs::Metadata) -> (i64, i64) {
    (meta.mtime(), meta.mtime_nsec())
}

async fn is_dir(path: &Path) -> bool {
    tokio::fs::symlink_metadata(path)
        .await
        .is_ok_and(|m| m.is_dir())
}

/// Removes a file or a whole tree, making directories writable first if a plain removal is refused
/// (a tree unpacked by an unprivileged user may hold read-only directories). Blocking.
fn remove_path(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            std::fs::remove_dir_all(path)
        }
        other => other,
    }
}

fn make_writable(dir: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        // Best effort: what cannot be fixed shows up in the retried removal's error.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> ImageError {
    ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn task_error(e: tokio::task::JoinError) -> ImageError {
    ImageError::Task {
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_urls() {
        assert!(matches!(
            Source::parse("https://hub.example/x.flist"),
            Ok(Source::Http(_))
        ));
        assert!(matches!(
            Source::parse("http://127.0.0.1:8080/x.tar"),
            Ok(Source::Http(_))
        ));
        assert!(
            matches!(Source::parse("/srv/x.tar"), Ok(Source::File(p)) if p == Path::new("/srv/x.tar"))
        );
        assert!(matches!(
            Source::parse("file:///srv/a%20b.tar"),
            Ok(Source::File(p)) if p == Path::new("/srv/a b.tar")
        ));
        assert_eq!(
            Source::parse("file:///x.tar").map(|s| s.key()).ok(),
            Source::parse("/x.tar").map(|s| s.key()).ok()
        );
    }

    #[test]
    fn refuses_other_urls() {
        for url in [
            "",
            "  ",
            "x.tar",
            "./x.tar",
            "ftp://h/x.tar",
            "file://host/x.tar",
            "s3://b/x",
            "http://",
        ] {
            match Source::parse(url) {
                Err(ImageError::BadUrl { reason, .. }) => assert!(!reason.is_empty(), "{url}"),
                other => panic!("{url:?}: expected BadUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn throttles_progress() {
        let mut throttle = Throttle::new();
        assert!(!throttle.ready(0));
        assert!(!throttle.ready(10));
        assert!(throttle.ready(PROGRESS_BYTES + 10));
        assert!(!throttle.ready(PROGRESS_BYTES + 20));
    }
}
