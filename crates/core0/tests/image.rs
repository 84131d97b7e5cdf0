//! Image cache tests: real archives (made here with the `tar` crate, and by
//! `scripts/build-test-image.sh` when `/bin/busybox` exists), a real local HTTP server, real unpacking.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use core0::containers::image::{Image, ImageCache, ImageError, Phase, Progress};
use sha2::{Digest, Sha256};
use tar::EntryType;

const MTIME: u64 = 1_500_000_000;

// ---------------------------------------------------------------------------------------------
// Archives

/// Builds tar archives entry by entry, writing names verbatim (so hostile names can be made too).
struct TarMaker(tar::Builder<Vec<u8>>);

impl TarMaker {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    #[allow(clippy::too_many_arguments)]
    fn raw(
        &mut self,
        kind: EntryType,
        name: &str,
        link: &str,
        mode: u32,
        owner: (u64, u64),
        data: &[u8],
    ) -> &mut Self {
        let mut header = tar::Header::new_gnu();
        {
            let old = header.as_old_mut();
            assert!(
                name.len() <= old.name.len() && link.len() <= old.linkname.len(),
                "short names only"
            );
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(MTIME);
        header.set_uid(owner.0);
        header.set_gid(owner.1);
        header.set_cksum();
        self.0
            .append(&header, data)
            .expect("append to an in-memory tar");
        self
    }

    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(EntryType::Directory, name, "", mode, (0, 0), b"")
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(EntryType::Regular, name, "", mode, (0, 0), data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(EntryType::Symlink, name, target, 0o777, (0, 0), b"")
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(EntryType::Link, name, target, 0o644, (0, 0), b"")
    }

    /// A file whose name needs a GNU long-name entry.
    fn long_file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(MTIME);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(EntryType::Regular);
        self.0
            .append_data(&mut header, name, data)
            .expect("append a long name");
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        builder.into_inner().expect("finish an in-memory tar")
    }
}

/// A small root filesystem exercising every kind of entry.
fn rootfs_tar() -> Vec<u8> {
    let mut tar = TarMaker::new();
    tar.dir("./", 0o755)
        .dir("./bin/", 0o755)
        .file("./bin/busybox", 0o755, b"#!not really busybox\n")
        .symlink("./bin/sh", "/bin/busybox")
        .symlink("./bin/ls", "busybox")
        .dir("./etc/", 0o755)
        .file("./etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .hardlink("./etc/passwd.link", "./etc/passwd")
        .raw(
            EntryType::Regular,
            "./etc/owned",
            "",
            0o640,
            (1000, 2000),
            b"owned\n",
        )
        .dir("./usr/bin/", 0o755)
        .file("./usr/bin/su", 0o4755, b"setuid\n")
        .dir("./tmp/", 0o1777)
        .dir("./root/", 0o700)
        .dir("./readonly/", 0o555)
        .file("./readonly/inside", 0o444, b"x")
        .raw(EntryType::Fifo, "./dev/fifo", "", 0o644, (0, 0), b"")
        .raw(EntryType::Char, "./dev/null", "", 0o666, (0, 0), b"");
    tar.long_file(&format!("usr/share/{}/long", "d".repeat(120)), b"long\n");
    tar.finish()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("finish gzip")
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).expect("zstd into memory")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A temporary directory with a cache root and a place for archives; removed on drop.
struct Fixture {
    dir: tempfile::TempDir,
    cache: ImageCache,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(dir.path().join("images"));
        Self { dir, cache }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write archive");
        path
    }

    /// Everything in `rootfs/` and `tmp/`: must be empty after a refused image.
    fn leftovers(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for sub in ["rootfs", "tmp"] {
            if let Ok(entries) = std::fs::read_dir(self.cache.root().join(sub)) {
                found.extend(entries.flatten().map(|e| e.path()));
            }
        }
        found
    }

    async fn resolve(&self, url: &str) -> Result<Image, ImageError> {
        self.cache.resolve(url, &|_| {}).await
    }

    async fn resolve_recording(&self, url: &str) -> (Result<Image, ImageError>, Vec<Progress>) {
        let events = Mutex::new(Vec::new());
        let record = |p: Progress| events.lock().expect("progress lock").push(p);
        let result = self.cache.resolve(url, &record).await;
        (result, events.into_inner().expect("progress lock"))
    }
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 answering GETs from a fixed table; counts requests.
struct Server {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(routes: HashMap<String, (u16, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_hits, thread_stop) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &routes, &thread_hits);
                }
            }
        });
        Self {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, routes: &HashMap<String, (u16, Vec<u8>)>, hits: &AtomicUsize) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    hits.fetch_add(1, Ordering::SeqCst);
    let (status, body) = routes
        .get(&path)
        .cloned()
        .unwrap_or((404, b"not found".to_vec()));
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body));
}

// ---------------------------------------------------------------------------------------------
// Checks

fn check_rootfs_tree(image: &Image) {
    let root = &image.rootfs;
    assert_eq!(
        std::fs::read(root.join("bin/busybox")).expect("busybox"),
        b"#!not really busybox\n"
    );
    let sh = root.join("bin/sh");
    assert!(
        std::fs::symlink_metadata(&sh)
            .expect("bin/sh")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_link(&sh).expect("read bin/sh"),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/ls")).expect("bin/ls"),
        Path::new("busybox")
    );

    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/su"), 0o4755, "setuid bit kept");
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("root"), 0o700);
    assert_eq!(mode("readonly"), 0o555);
    assert_eq!(mode("readonly/inside"), 0o444);
    assert_eq!(mode("etc/passwd"), 0o644);

    let passwd = std::fs::metadata(root.join("etc/passwd")).expect("passwd");
    let link = std::fs::metadata(root.join("etc/passwd.link")).expect("passwd.link");
    assert_eq!(passwd.ino(), link.ino(), "hardlink shares the inode");
    assert_eq!(passwd.mtime(), MTIME as i64, "file mtime kept");
    assert_eq!(
        std::fs::metadata(root.join("bin")).expect("bin").mtime(),
        MTIME as i64,
        "dir mtime kept"
    );
    assert_eq!(
        std::fs::symlink_metadata(&sh).expect("sh").mtime(),
        MTIME as i64,
        "symlink mtime kept"
    );
    if nix::unistd::geteuid().is_root() {
        let owned = std::fs::metadata(root.join("etc/owned")).expect("owned");
        assert_eq!(
            (owned.uid(), owned.gid()),
            (1000, 2000),
            "numeric ownership kept"
        );
    }
    assert!(
        !root.join("dev/fifo").exists() && !root.join("dev/null").exists(),
        "device nodes and fifos skipped"
    );
    let long = root.join(format!("usr/share/{}/long", "d".repeat(120)));
    assert_eq!(std::fs::read(long).expect("long name"), b"long\n");
}

fn assert_no_leftovers(fx: &Fixture, case: &str) {
    let left = fx.leftovers();
    assert!(left.is_empty(), "{case}: left behind {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn plain_gzip_and_zstd_archives_unpack_to_the_same_tree() {
    let fx = Fixture::new();
    let tar = rootfs_tar();
    let variants = [
        ("image.tar", tar.clone()),
        ("image.tar.gz", gzip(&tar)),
        ("image.tar.zst", zstd(&tar)),
        // The name documents nothing: a gzip archive called .tar is still read as gzip.
        ("misnamed.tar", gzip(&tar)),
    ];
    let mut digests = Vec::new();
    for (name, bytes) in &variants {
        let path = fx.write(name, bytes);
        let image = fx
            .resolve(path.to_str().expect("utf-8 path"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            image.digest,
            sha256_hex(bytes),
            "{name}: digest of the archive bytes"
        );
        assert_eq!(
            image.rootfs,
            fx.cache.root().join("rootfs").join(&image.digest)
        );
        check_rootfs_tree(&image);
        digests.push(image.digest);
    }
    // misnamed.tar has the same bytes as image.tar.gz: one tree for both.
    assert_eq!(digests[1], digests[3]);
    let listed: Vec<String> = fx.cache.list().into_iter().map(|i| i.digest).collect();
    assert_eq!(listed.len(), 3);
    assert_no_leftovers_in_tmp(&fx);
}

fn assert_no_leftovers_in_tmp(fx: &Fixture) {
    let tmp: Vec<_> = std::fs::read_dir(fx.cache.root().join("tmp"))
        .expect("tmp")
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "tmp/ not empty: {tmp:?}");
}

#[tokio::test]
async fn http_downloads_once_and_identical_bytes_share_one_tree() {
    let fx = Fixture::new();
    let bytes = gzip(&rootfs_tar());
    let server = Server::start(HashMap::from([
        ("/a.tar.gz".to_owned(), (200, bytes.clone())),
        ("/b.flist".to_owned(), (200, bytes.clone())),
    ]));

    let (first, events) = fx.resolve_recording(&server.url("/a.tar.gz")).await;
    let first = first.expect("resolve over http");
    assert_eq!(server.hits(), 1);
    assert_eq!(first.digest, sha256_hex(&bytes));
    check_rootfs_tree(&first);
    let size = bytes.len() as u64;
    let last_download = events
        .iter()
        .rev()
        .find(|p| p.phase == Phase::Download)
        .expect("download progress");
    assert_eq!(
        (last_download.done_bytes, last_download.total_bytes),
        (size, Some(size))
    );
    let last = events.last().expect("progress");
    assert_eq!(last.phase, Phase::Unpack);
    assert_eq!(last.done_bytes, size);

    // The same URL again: no request, reported as cached.
    let (again, events) = fx.resolve_recording(&server.url("/a.tar.gz")).await;
    assert_eq!(again.expect("cached resolve"), first);
    assert_eq!(server.hits(), 1, "second resolve must not download");
    assert_eq!(
        events.iter().map(|p| p.phase).collect::<Vec<_>>(),
        vec![Phase::Cached]
    );

    // Another URL with the same bytes: downloaded (the cache cannot know) but not unpacked again.
    let (other, events) = fx.resolve_recording(&server.url("/b.flist")).await;
    assert_eq!(other.expect("second url"), first);
    assert_eq!(server.hits(), 2);
    assert!(
        events.iter().all(|p| p.phase != Phase::Unpack),
        "no second unpack: {events:?}"
    );

    // And the same bytes from a local file, by file:// URL and by path.
    let path = fx.write("copy.tgz", &bytes);
    let by_url = fx
        .resolve(&format!("file://{}", path.display()))
        .await
        .expect("file url");
    let by_path = fx
        .resolve(path.to_str().expect("utf-8 path"))
        .await
        .expect("bare path");
    assert_eq!(by_url, first);
    assert_eq!(by_path, first);
    assert_eq!(fx.cache.list(), vec![first]);
    assert_no_leftovers_in_tmp(&fx);
}

#[tokio::test]
async fn http_failures_leave_nothing_behind() {
    let fx = Fixture::new();
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR rest of a picture".repeat(40);
    let server = Server::start(HashMap::from([("/picture.tar".to_owned(), (200, png))]));

    match fx.resolve(&server.url("/missing.tar.gz")).await {
        Err(ImageError::Http { status: 404, url }) => assert!(url.ends_with("/missing.tar.gz")),
        other => panic!("expected a 404, got {other:?}"),
    }
    assert_no_leftovers(&fx, "404");

    match fx.resolve(&server.url("/picture.tar")).await {
        Err(e @ ImageError::UnsupportedFormat { .. }) => {
            let text = e.to_string();
            assert!(text.contains("png") && text.contains(".tar.zst"), "{text}");
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert_no_leftovers(&fx, "png over http");

    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    match fx.resolve(&format!("http://{closed}/x.tar")).await {
        Err(ImageError::Fetch { .. }) => {}
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_no_leftovers(&fx, "connection refused");
}

#[tokio::test]
async fn unsafe_archives_are_refused_without_leftovers() {
    let fx = Fixture::new();
    let evil_name = format!("grid-image-test-evil-{}", std::process::id());
    let host_evil = Path::new("/etc").join(&evil_name);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            TarMaker::new()
                .dir("bin/", 0o755)
                .file("../escape", 0o644, b"x")
                .finish(),
        ),
        (
            "dotdot-inside",
            TarMaker::new()
                .file("bin/../../escape", 0o644, b"x")
                .finish(),
        ),
        (
            "absolute",
            TarMaker::new()
                .file("/etc/absolute-entry", 0o644, b"x")
                .finish(),
        ),
        (
            "write-through-symlink",
            TarMaker::new()
                .dir("etc/", 0o755)
                .symlink("lnk", "/")
                .file(&format!("lnk/etc/{evil_name}"), 0o644, b"owned")
                .finish(),
        ),
        (
            "relative-symlink-escape",
            TarMaker::new()
                .symlink("up", "../../..")
                .file("up/x", 0o644, b"x")
                .finish(),
        ),
        (
            "dir-through-symlink",
            TarMaker::new()
                .symlink("lnk", "/tmp")
                .dir("lnk/sub/", 0o755)
                .finish(),
        ),
        (
            "hardlink-escape",
            TarMaker::new()
                .dir("etc/", 0o755)
                .hardlink("etc/passwd", "../../etc/passwd")
                .finish(),
        ),
        (
            "hardlink-absolute",
            TarMaker::new().hardlink("passwd", "/etc/passwd").finish(),
        ),
        (
            "hardlink-through-symlink",
            TarMaker::new()
                .symlink("lnk", "/")
                .hardlink("shadow", "lnk/etc/passwd")
                .finish(),
        ),
    ];
    for (case, bytes) in cases {
        for (suffix, data) in [("tar", bytes.clone()), ("tar.gz", gzip(&bytes))] {
            let path = fx.write(&format!("{case}.{suffix}"), &data);
            match fx.resolve(path.to_str().expect("utf-8 path")).await {
                Err(ImageError::UnsafeEntry { path, reason }) => {
                    assert!(!reason.is_empty(), "{case}: {path}");
                }
                other => panic!("{case}.{suffix}: expected UnsafeEntry, got {other:?}"),
            }
            assert_no_leftovers(&fx, case);
        }
    }
    assert!(
        !host_evil.exists(),
        "{} was written on the host",
        host_evil.display()
    );
    assert!(!Path::new("/etc/absolute-entry").exists());
    assert!(fx.cache.list().is_empty());
}

#[tokio::test]
async fn fuse_flists_and_non_archives_are_refused() {
    let fx = Fixture::new();
    let flist = TarMaker::new()
        .file("CURRENT", 0o644, b"MANIFEST-000001\n")
        .file("MANIFEST-000001", 0o644, b"manifest")
        .file("000003.sst", 0o644, b"table")
        .finish();
    let nested_flist = TarMaker::new()
        .dir("ubuntu1604/", 0o755)
        .file("ubuntu1604/CURRENT", 0o644, b"MANIFEST-000001\n")
        .file("ubuntu1604/MANIFEST-000001", 0o644, b"manifest")
        .file("ubuntu1604/LOCK", 0o644, b"")
        .finish();
    for (name, bytes) in [
        ("ubuntu1604.flist", gzip(&flist)),
        ("plain.flist", flist.clone()),
        ("nested.flist", gzip(&nested_flist)),
    ] {
        let path = fx.write(name, &bytes);
        match fx.resolve(path.to_str().expect("utf-8 path")).await {
            Err(e @ ImageError::FuseFlist { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("fuse flist") && text.contains("not supported"),
                    "{text}"
                );
                assert!(
                    text.contains(".tar.gz/.tgz/.flist") && text.contains(".tar.zst"),
                    "{text}"
                );
            }
            other => panic!("{name}: expected FuseFlist, got {other:?}"),
        }
        assert_no_leftovers(&fx, name);
    }

    let mut random = vec![0u8; 4096];
    for (i, b) in random.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80;
    }
    for (name, bytes) in [
        ("image.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec()),
        ("random.tar", random),
        ("empty.tar", Vec::new()),
        ("text.tar.gz", gzip(b"this is not a tar archive")),
        ("zeros.tar.zst", zstd(&[0u8; 10240])),
    ] {
        let path = fx.write(name, &bytes);
        match fx.resolve(path.to_str().expect("utf-8 path")).await {
            Err(ImageError::UnsupportedFormat { detected, .. }) => assert!(!detected.is_empty()),
            other => panic!("{name}: expected UnsupportedFormat, got {other:?}"),
        }
        assert_no_leftovers(&fx, name);
    }

    // A corrupt gzip stream is an archive error, not a half-made tree.
    let mut corrupt = gzip(&rootfs_tar());
    let middle = corrupt.len() / 2;
    corrupt.truncate(middle);
    let path = fx.write("truncated.tar.gz", &corrupt);
    match fx.resolve(path.to_str().expect("utf-8 path")).await {
        Err(ImageError::Archive { .. }) => {}
        other => panic!("truncated: expected an archive error, got {other:?}"),
    }
    assert_no_leftovers(&fx, "truncated");
}

#[tokio::test]
async fn bad_urls_and_missing_files_are_named() {
    let fx = Fixture::new();
    for url in [
        "",
        "relative/image.tar",
        "image.tar",
        "ftp://example.org/x.tar",
        "file://host/x.tar",
        "s3://b/x",
    ] {
        match fx.resolve(url).await {
            Err(e @ ImageError::BadUrl { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("file:///") && text.contains("https://"),
                    "{text}"
                );
            }
            other => panic!("{url:?}: expected BadUrl, got {other:?}"),
        }
    }
    for url in [
        "/nonexistent/grid/image.tar",
        "file:///nonexistent/grid/image.tar",
    ] {
        match fx.resolve(url).await {
            Err(ImageError::NotFound { path }) => {
                assert_eq!(path, Path::new("/nonexistent/grid/image.tar"))
            }
            other => panic!("{url:?}: expected NotFound, got {other:?}"),
        }
    }
    match fx
        .resolve(fx.dir.path().to_str().expect("utf-8 path"))
        .await
    {
        Err(ImageError::BadUrl { reason, .. }) => assert!(reason.contains("directory"), "{reason}"),
        other => panic!("a directory: expected BadUrl, got {other:?}"),
    }
    assert_no_leftovers(&fx, "bad urls");
}

#[tokio::test]
async fn a_changed_local_file_is_checksummed_again() {
    let fx = Fixture::new();
    let first_bytes = rootfs_tar();
    let path = fx.write("image.tar", &first_bytes);
    let url = path.to_str().expect("utf-8 path").to_owned();
    let first = fx.resolve(&url).await.expect("first");

    let (again, events) = fx.resolve_recording(&url).await;
    assert_eq!(again.expect("again"), first);
    assert_eq!(
        events.iter().map(|p| p.phase).collect::<Vec<_>>(),
        vec![Phase::Cached]
    );

    let second_bytes = TarMaker::new()
        .dir("bin/", 0o755)
        .file("bin/other", 0o755, b"new")
        .finish();
    std::fs::write(&path, &second_bytes).expect("rewrite");
    let file = std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_modified(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(MTIME + 7),
    )
    .expect("set mtime");
    let second = fx.resolve(&url).await.expect("after the change");
    assert_eq!(second.digest, sha256_hex(&second_bytes));
    assert_ne!(second.digest, first.digest);
    assert!(second.rootfs.join("bin/other").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_of_one_digest_unpack_once() {
    let fx = Fixture::new();
    let bytes = zstd(&rootfs_tar());
    let a = fx.write("a.tar.zst", &bytes);
    let b = fx.write("b.tar.zst", &bytes);
    let (ra, rb) = tokio::join!(
        fx.resolve_recording(a.to_str().expect("utf-8 path")),
        fx.resolve_recording(b.to_str().expect("utf-8 path")),
    );
    let (ia, ea) = (ra.0.expect("a"), ra.1);
    let (ib, eb) = (rb.0.expect("b"), rb.1);
    assert_eq!(ia, ib);
    let unpacks = [&ea, &eb]
        .iter()
        .filter(|events| events.iter().any(|p| p.phase == Phase::Unpack))
        .count();
    assert_eq!(unpacks, 1, "exactly one resolve unpacks: {ea:?} / {eb:?}");
    assert_eq!(fx.cache.list().len(), 1);
    check_rootfs_tree(&ia);
}

#[tokio::test]
async fn remove_unused_drops_trees_and_their_url_records() {
    let fx = Fixture::new();
    let keep = fx.write("keep.tar", &rootfs_tar());
    let drop_bytes = TarMaker::new()
        .dir("bin/", 0o755)
        .file("bin/x", 0o755, b"x")
        .finish();
    let dropped = fx.write("drop.tar", &drop_bytes);
    let kept = fx
        .resolve(keep.to_str().expect("utf-8 path"))
        .await
        .expect("keep");
    let gone = fx
        .resolve(dropped.to_str().expect("utf-8 path"))
        .await
        .expect("drop");

    let removed = fx
        .cache
        .remove_unused(std::slice::from_ref(&kept.digest))
        .await
        .expect("gc");
    assert_eq!(removed, vec![gone.digest.clone()]);
    assert_eq!(fx.cache.list(), vec![kept.clone()]);
    assert!(!gone.rootfs.exists());
    assert_no_leftovers_in_tmp(&fx);

    // Resolving the removed image again unpacks it again.
    let (back, events) = fx
        .resolve_recording(dropped.to_str().expect("utf-8 path"))
        .await;
    assert_eq!(back.expect("back"), gone);
    assert!(events.iter().any(|p| p.phase == Phase::Unpack));
    assert!(gone.rootfs.join("bin/x").is_file());
}

#[tokio::test]
async fn busybox_images_from_the_script() {
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: /bin/busybox is missing (apt-get install busybox-static)");
        return;
    }
    let fx = Fixture::new();
    let out = fx.dir.path().join("built");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-image.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .expect("run build-test-image.sh");
    assert!(
        output.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let archives: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(archives.len() >= 2, "{archives:?}");
    let mut digests = Vec::new();
    for archive in &archives {
        let image = fx
            .resolve(archive)
            .await
            .unwrap_or_else(|e| panic!("{archive}: {e}"));
        let root = &image.rootfs;
        let busybox = root.join("bin/busybox");
        assert!(
            std::fs::metadata(&busybox)
                .expect("busybox")
                .permissions()
                .mode()
                & 0o111
                != 0
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).expect("bin/sh"),
            Path::new("busybox")
        );
        assert_eq!(
            std::fs::read_link(root.join("sbin/ip")).expect("sbin/ip"),
            Path::new("../bin/busybox")
        );
        assert_eq!(
            std::fs::metadata(root.join("tmp"))
                .expect("tmp")
                .permissions()
                .mode()
                & 0o7777,
            0o1777
        );
        for dir in ["dev", "proc", "sys", "root", "usr/bin"] {
            assert!(root.join(dir).is_dir(), "{dir}");
        }
        assert!(
            std::fs::read_to_string(root.join("etc/passwd"))
                .expect("passwd")
                .starts_with("root:")
        );
        // The unpacked binary is intact: run it on the host.
        let echo = std::process::Command::new(&busybox)
            .args(["echo", "hello"])
            .output()
            .expect("run busybox");
        assert_eq!(String::from_utf8_lossy(&echo.stdout), "hello\n");
        digests.push(image.digest);
    }
    digests.sort();
    digests.dedup();
    assert_eq!(
        digests.len(),
        archives.len(),
        "each archive is its own cache entry"
    );
}

#[tokio::test]
async fn a_file_replacing_a_symlink_never_writes_through_it() {
    let fx = Fixture::new();
    let victim = fx.write("victim", b"host content");
    let victim_str = victim.to_str().expect("utf-8 path");
    let bytes = TarMaker::new()
        .symlink("target", victim_str)
        .file("target", 0o644, b"archive content")
        .symlink("link-again", victim_str)
        .hardlink("hard", "link-again")
        .finish();
    let path = fx.write("replace.tar", &bytes);
    let image = fx
        .resolve(path.to_str().expect("utf-8 path"))
        .await
        .expect("resolve");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"host content");
    let target = image.rootfs.join("target");
    assert!(
        std::fs::symlink_metadata(&target)
            .expect("target")
            .is_file()
    );
    assert_eq!(std::fs::read(&target).expect("target"), b"archive content");
    // A hardlink to a symlink links the symlink itself, not what it points to.
    let hard = std::fs::symlink_metadata(image.rootfs.join("hard")).expect("hard");
    assert!(hard.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(image.rootfs.join("hard")).expect("hard"),
        victim
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"host content");
}
