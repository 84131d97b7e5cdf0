//! End-to-end tests of the core0 binary, driven only with raw Redis commands, as a 2017 client
//! would: a real redis-server on a free port, the real `core0` binary, real processes.

mod common;

use common::{push, result};
use grid_proto::wire::{CommandResult, State, StreamRecord, meta};
use serde_json::{Value, json};
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

fn connect(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("redis url");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        // Readiness poll: the server accepts connections once it is up.
        let err = match client.get_connection_with_timeout(Duration::from_millis(200)) {
            Ok(mut c) => match redis::cmd("PING").query::<String>(&mut c) {
                Ok(_) => return c,
                Err(e) => e,
            },
            Err(e) => e,
        };
        assert!(
            Instant::now() < until,
            "redis at {url} does not answer: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of the test, killed on drop.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("/usr/bin/redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let url = format!("redis://127.0.0.1:{port}");
        let r = Redis { child, url };
        drop(connect(&r.url));
        r
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A core0 process with its own data directory; on drop it is killed and torn down.
struct Core0 {
    child: Child,
    lines: mpsc::Receiver<String>,
    data: PathBuf,
    teardown: bool,
    _dir: Option<tempfile::TempDir>,
}

fn core0_bin() -> &'static str {
    env!("CARGO_BIN_EXE_core0")
}

impl Core0 {
    fn start(data: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(core0_bin());
        cmd.args(["--node-id", "testnode", "--data-dir"])
            .arg(data)
            .args(extra);
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        if std::env::var_os("CORE0_TEST_LOG").is_none() {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd.spawn().expect("start core0");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut c = Core0 {
            child,
            lines,
            data: data.to_path_buf(),
            teardown: true,
            _dir: None,
        };
        c.wait_ready();
        c
    }

    fn with_redis(redis: &Redis) -> Self {
        Self::with_redis_args(redis, &[])
    }

    fn with_redis_args(redis: &Redis, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = vec!["--redis-url", redis.url.as_str()];
        args.extend_from_slice(extra);
        let mut c = Core0::start(dir.path(), &args);
        c._dir = Some(dir);
        c
    }

    fn wait_ready(&mut self) -> String {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("core0 ready line");
        assert!(
            line.starts_with("core0 ready node=testnode redis="),
            "{line}"
        );
        line
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }
}

impl Drop for Core0 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.teardown {
            return;
        }
        let _ = Command::new(core0_bin())
            .args(["teardown", "--data-dir"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .status();
    }
}

fn wait_flag(c: &mut redis::Connection, id: &str) {
    let key = format!("result:{id}:flag");
    let got: Option<String> = redis::cmd("BRPOPLPUSH")
        .arg(&key)
        .arg(&key)
        .arg(10)
        .query(c)
        .expect("flag wait");
    assert!(got.is_some(), "job {id} was never flagged");
}

fn run(c: &mut redis::Connection, id: &str, command: &str, args: Value) -> CommandResult {
    push(c, json!({"id": id, "command": command, "arguments": args}));
    result(c, id, 15)
}

/// The pid of running job `id` from `job.list` (a flagged job gets its pid when its process
/// has been spawned, just after the flag).
fn job_pid(c: &mut redis::Connection, id: &str) -> i32 {
    let until = Instant::now() + Duration::from_secs(5);
    for n in 0.. {
        let list = run(c, &format!("list-{id}-{n}"), "job.list", json!({"id": id}));
        let jobs: Vec<Value> = list.json_data().expect("job list");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0]["cmd"]["id"], id);
        if let Some(pid) = jobs[0]["debug"].as_str().and_then(|p| p.parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < until, "job {id} has no pid");
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!("the loop returns or panics")
}

#[test]
fn ping_system_errors_unknown_and_ttl() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);

    let pong = run(&mut c, "ping", "core.ping", json!({}));
    assert_eq!((pong.state, pong.level), (State::Success, 20));
    let text: String = pong.json_data().expect("string data");
    assert!(text.starts_with("PONG Version: "), "{text}");

    let echo = run(
        &mut c,
        "echo",
        "core.system",
        json!({"name": "echo", "args": ["hi"]}),
    );
    assert_eq!(
        (echo.state, echo.code, echo.stdout()),
        (State::Success, Some(0), "hi\n")
    );
    assert!(echo.starttime > 0);

    let three = run(
        &mut c,
        "three",
        "bash",
        json!({"script": "echo oops >&2; exit 3"}),
    );
    assert_eq!(
        (three.state, three.code, three.stderr()),
        (State::Error, Some(3), "oops\n")
    );

    let unknown = run(&mut c, "unk", "no.such.command", json!({}));
    assert_eq!(
        (unknown.state, unknown.starttime, unknown.streams),
        (State::UnknownCmd, 0, None)
    );

    for key in ["result:echo", "result:echo:flag"] {
        let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut c).expect("ttl");
        assert!(ttl > 290 && ttl <= 300, "{key} ttl {ttl}");
    }

    let state = run(&mut c, "state", "core.state", json!({}));
    let v: Value = state.json_data().expect("state json");
    assert!(
        v["instanceId"].as_str().is_some_and(|s| !s.is_empty()),
        "{v}"
    );
    assert!(v["rss"].as_u64().is_some_and(|r| r > 0), "{v}");
}

#[test]
fn max_time_gives_timeout() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);
    let t0 = Instant::now();
    push(
        &mut c,
        json!({"id": "slow", "command": "bash", "arguments": {"script": "sleep 30"}, "max_time": 1}),
    );
    let r = result(&mut c, "slow", 10);
    assert_eq!((r.state, r.code), (State::Timeout, None));
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn job_kill_and_list() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);
    push(
        &mut c,
        json!({"id": "long", "command": "core.system", "arguments": {"name": "sleep", "args": ["30"]}}),
    );
    wait_flag(&mut c, "long");
    let pid = job_pid(&mut c, "long");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let missing = run(&mut c, "list2", "job.list", json!({"id": "nope"}));
    assert_eq!(
        (missing.state, missing.data.as_str()),
        (State::Error, "\"job not found\"")
    );

    let kill = run(&mut c, "kill", "job.kill", json!({"id": "long"}));
    assert_eq!((kill.state, kill.data.as_str()), (State::Success, "true"));
    let r = result(&mut c, "long", 10);
    assert_eq!((r.state, r.code), (State::Killed, None));
    let none = run(&mut c, "kill2", "job.kill", json!({"id": "long"}));
    assert_eq!(none.data, "false");
}

#[test]
fn stream_records_in_order_then_exit_marker() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);
    let script = "echo one; echo two; sleep 0.2; echo three >&2; sleep 0.2; echo four";
    push(
        &mut c,
        json!({"id": "st", "command": "bash", "arguments": {"script": script}, "stream": true}),
    );
    let mut got = Vec::new();
    loop {
        let item: Option<(String, String)> = redis::cmd("BLPOP")
            .arg("stream:st")
            .arg(10)
            .query(&mut c)
            .expect("blpop");
        let (_, text) = item.expect("stream record within 10 s");
        let rec: StreamRecord = serde_json::from_str(&text).expect("record json");
        assert_eq!((rec.core, rec.command.as_str()), (0, "st"));
        let exit = rec.message.is_exit();
        got.push((
            rec.message.level(),
            rec.message.meta & 0xffff,
            rec.message.message,
        ));
        if exit {
            break;
        }
    }
    let s = meta::STREAM;
    assert_eq!(
        got,
        vec![
            (1, s, "one".to_string()),
            (1, s, "two".to_string()),
            (2, s, "three".to_string()),
            (1, s, "four".to_string()),
            (1, s | meta::EXIT_SUCCESS, String::new()),
        ]
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg("stream:st")
        .query(&mut c)
        .expect("ttl");
    assert!(ttl == -2 || (ttl > 0 && ttl <= 60), "stream ttl {ttl}");
    assert_eq!(result(&mut c, "st", 5).state, State::Success);
}

#[test]
fn duplicate_id_then_real_result_replaces_it() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);
    push(
        &mut c,
        json!({"id": "dup", "command": "bash", "arguments": {"script": "sleep 1; echo real"}}),
    );
    wait_flag(&mut c, "dup");
    push(
        &mut c,
        json!({"id": "dup", "command": "bash", "arguments": {"script": "echo other"}}),
    );
    let first = result(&mut c, "dup", 5);
    assert_eq!(
        (first.state, first.data.as_str()),
        (State::DuplicateId, "duplicate job id")
    );
    let flag_ttl: i64 = redis::cmd("TTL")
        .arg("result:dup:flag")
        .query(&mut c)
        .expect("ttl");
    assert_eq!(flag_ttl, -1, "running job's flag untouched");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg("result:dup")
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .expect("lrange");
        let parsed: Vec<CommandResult> = items
            .iter()
            .map(|t| serde_json::from_str(t).expect("result json"))
            .collect();
        if parsed.len() == 1 && parsed[0].state == State::Success {
            assert_eq!(parsed[0].stdout(), "real\n");
            break;
        }
        assert!(
            Instant::now() < until,
            "real result never replaced the list: {parsed:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn queue_runs_serially_and_deadline_drops() {
    let redis = Redis::start();
    let _core = Core0::with_redis(&redis);
    let mut c = connect(&redis.url);
    for id in ["q1", "q2"] {
        push(
            &mut c,
            json!({"id": id, "command": "bash", "arguments": {"script": "sleep 0.5"}, "queue": "serial"}),
        );
    }
    let (r1, r2) = (result(&mut c, "q1", 10), result(&mut c, "q2", 10));
    assert!(
        r2.starttime >= r1.starttime + r1.time,
        "q2 started before q1 ended: {r1:?} {r2:?}"
    );

    push(
        &mut c,
        json!({"id": "late", "command": "core.ping", "arguments": {}, "deadline": 1000}),
    );
    // Commands are consumed in order: once this one is answered, "late" was seen.
    run(&mut c, "after", "core.ping", json!({}));
    let exists: i64 = redis::cmd("EXISTS")
        .arg("result:late:flag")
        .arg("result:late")
        .query(&mut c)
        .expect("exists");
    assert_eq!(exists, 0);
}

/// The pid in `run/redis.pid`.
fn redis_pid(data: &Path) -> i32 {
    std::fs::read_to_string(data.join("run/redis.pid"))
        .expect("redis pid file")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid")
}

#[test]
fn own_redis_is_adopted_after_crash_and_teardown_cleans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--redis-listen", listen.as_str()];
    let first = Core0::start(dir.path(), &args);
    let password = std::fs::read_to_string(dir.path().join("redis.password")).expect("password");
    let url = format!("redis://:{}@{listen}", password.trim());
    let mut c = connect(&url);
    assert_eq!(
        run(&mut c, "before", "core.ping", json!({})).state,
        State::Success
    );
    push(
        &mut c,
        json!({"id": "orphan", "command": "bash", "arguments": {"script": "sleep 300"}}),
    );
    wait_flag(&mut c, "orphan");
    let orphan = job_pid(&mut c, "orphan");
    let pid1 = redis_pid(dir.path());
    let core_pid = first.pid();

    // Crash: the redis-server and the job survive core0.
    let mut first = first;
    first.child.kill().expect("sigkill core0");
    first.child.wait().expect("reap core0");
    assert!(!is_alive(core_pid));
    assert!(is_alive(pid1) && is_alive(orphan));
    // From here on the second core0's guard cleans up.
    first.teardown = false;
    drop(first);

    let second = Core0::start(dir.path(), &args);
    assert_eq!(redis_pid(dir.path()), pid1, "redis-server adopted");
    let before = result(&mut c, "before", 5);
    assert_eq!(before.state, State::Success);
    assert_eq!(
        run(&mut c, "again", "core.ping", json!({})).state,
        State::Success
    );
    drop(second); // kills core0 and runs teardown
    assert!(!is_alive(pid1), "redis stopped by teardown");
    assert!(!is_alive(orphan), "orphan job killed by teardown");
}

fn is_alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn safe_reboot_flushes_and_restarts_with_new_instance() {
    let redis = Redis::start();
    // The re-executed core0 is the same process, still under this guard.
    let mut core = Core0::with_redis_args(&redis, &["--reboot-downtime", "1"]);
    let mut c = connect(&redis.url);
    let s1: Value = run(&mut c, "s1", "core.state", json!({}))
        .json_data()
        .expect("state");
    push(
        &mut c,
        json!({"id": "victim", "command": "bash", "arguments": {"script": "sleep 300"}}),
    );
    wait_flag(&mut c, "victim");
    let victim = job_pid(&mut c, "victim");
    let reboot = run(&mut c, "rb", "core.reboot", json!({}));
    assert_eq!(
        (reboot.state, reboot.data.as_str()),
        (State::Success, "null")
    );
    core.wait_ready();
    assert!(!is_alive(victim), "jobs are killed by a safe reboot");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("result:s1")
        .query(&mut c)
        .expect("exists");
    assert_eq!(exists, 0, "redis was flushed");
    let s2: Value = run(&mut c, "s2", "core.state", json!({}))
        .json_data()
        .expect("state");
    assert_ne!(s1["instanceId"], s2["instanceId"]);
}

#[test]
fn sigterm_stops_core0_only_and_bad_args_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut core = Core0::start(dir.path(), &["--redis-listen", listen.as_str()]);
    let password = std::fs::read_to_string(dir.path().join("redis.password")).expect("password");
    let mut c = connect(&format!("redis://:{}@{listen}", password.trim()));
    push(
        &mut c,
        json!({"id": "keep", "command": "bash", "arguments": {"script": "sleep 300"}}),
    );
    wait_flag(&mut c, "keep");
    let job = job_pid(&mut c, "keep");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(core.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm core0");
    let status = core.child.wait().expect("wait core0");
    assert_eq!(status.code(), Some(0));
    assert!(is_alive(job), "jobs outlive core0");
    assert!(is_alive(redis_pid(dir.path())), "redis outlives core0");
    drop(core); // teardown kills both
    assert!(!is_alive(job));

    let bad = Command::new(core0_bin())
        .arg("--no-such-flag")
        .stderr(Stdio::null())
        .status()
        .expect("run");
    assert_eq!(bad.code(), Some(2));
}

#[test]
fn restart_ends_the_flags_of_lost_jobs_with_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--redis-listen", listen.as_str()];
    let mut first = Core0::start(dir.path(), &args);
    let password = std::fs::read_to_string(dir.path().join("redis.password")).expect("password");
    let mut c = connect(&format!("redis://:{}@{listen}", password.trim()));
    push(
        &mut c,
        json!({"id": "lost", "command": "bash", "arguments": {"script": "sleep 300"}}),
    );
    wait_flag(&mut c, "lost");
    let job = job_pid(&mut c, "lost");
    first.child.kill().expect("sigkill core0");
    first.child.wait().expect("reap core0");
    first.teardown = false; // the second core0's guard cleans up
    drop(first);
    let ttl: i64 = redis::cmd("TTL")
        .arg("result:lost:flag")
        .query(&mut c)
        .expect("ttl");
    assert_eq!(ttl, -1, "the lost job looks as if it ran for ever");

    let _second = Core0::start(dir.path(), &args);
    // The sweep runs before core0 reports ready.
    let r = result(&mut c, "lost", 5);
    assert_eq!((r.state, r.level, r.starttime), (State::Error, 20, 0));
    let data: String = r.json_data().expect("json string data");
    assert_eq!(
        data,
        "core0 restarted while the job was running; its output is lost"
    );
    assert_eq!(r.streams, Some([String::new(), String::new()]));
    for key in ["result:lost:flag", "result:lost"] {
        let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut c).expect("ttl");
        assert!(ttl > 290 && ttl <= 300, "{key} ttl {ttl}");
    }
    assert!(
        is_alive(job),
        "host jobs are not adopted, but not killed either"
    );
}

#[test]
fn own_redis_is_started_again_when_it_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let _core = Core0::start(dir.path(), &["--redis-listen", listen.as_str()]);
    let password = std::fs::read_to_string(dir.path().join("redis.password")).expect("password");
    let url = format!("redis://:{}@{listen}", password.trim());
    let old = redis_pid(dir.path());
    let cmdline = std::fs::read(format!("/proc/{old}/cmdline")).expect("redis cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(password.trim()),
        "the password is not on redis-server's command line"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("sigkill redis-server");
    // core0 starts a new one on the same address: once it answers, commands run again.
    let until = Instant::now() + Duration::from_secs(15);
    let mut c = loop {
        let client = redis::Client::open(url.as_str()).expect("redis url");
        if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200))
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            break c;
        }
        assert!(Instant::now() < until, "no redis-server came back");
        std::thread::sleep(Duration::from_millis(50));
    };
    let new = redis_pid(dir.path());
    assert_ne!(new, old);
    assert!(is_alive(new));
    push(
        &mut c,
        json!({"id": "after", "command": "core.ping", "arguments": {}}),
    );
    assert_eq!(result(&mut c, "after", 15).state, State::Success);
}
