//! Unit tests of the job manager against an in-memory publisher (real processes).

use super::*;
use crate::builtins::Power;
use serde_json::json;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Flag(String),
    Result(CommandResult),
    Replace(CommandResult),
    Duplicate(CommandResult),
    Stream(Vec<StreamRecord>),
}

#[derive(Default)]
struct Memory {
    events: std::sync::Mutex<Vec<Event>>,
    changed: Notify,
}

impl Memory {
    fn push(&self, e: Event) {
        self.events.lock().expect("test lock").push(e);
        self.changed.notify_waiters();
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().expect("test lock").clone()
    }

    fn final_of(&self, id: &str) -> Option<CommandResult> {
        self.events().into_iter().find_map(|e| match e {
            Event::Result(r) | Event::Replace(r) if r.id == id => Some(r),
            _ => None,
        })
    }

    async fn wait_final(&self, id: &str) -> CommandResult {
        let wait = async {
            loop {
                let n = self.changed.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if let Some(r) = self.final_of(id) {
                    return r;
                }
                n.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("result in time")
    }
}

impl Publish for Memory {
    fn flag<'a>(&'a self, id: &'a str) -> PublishFuture<'a> {
        Box::pin(async move {
            self.push(Event::Flag(id.to_string()));
            Ok(())
        })
    }
    fn result<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move {
            self.push(Event::Result(r.clone()));
            Ok(())
        })
    }
    fn replace_result<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move {
            self.push(Event::Replace(r.clone()));
            Ok(())
        })
    }
    fn duplicate<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move {
            self.push(Event::Duplicate(r.clone()));
            Ok(())
        })
    }
    fn stream<'a>(&'a self, _id: &'a str, records: &'a [StreamRecord]) -> PublishFuture<'a> {
        Box::pin(async move {
            self.push(Event::Stream(records.to_vec()));
            Ok(())
        })
    }
}

fn manager() -> (Arc<JobManager>, Arc<Memory>) {
    manager_with(|_| {})
}

fn manager_with(tune: impl FnOnce(&mut JobsConfig)) -> (Arc<JobManager>, Arc<Memory>) {
    let mem = Arc::new(Memory::default());
    let mut reg = Registry::new();
    crate::builtins::core::register(&mut reg);
    reg.add("test.fail", |_ctx, _args| async move {
        Err::<serde_json::Value, _>("no luck".to_string())
    });
    reg.add("test.panic", |_ctx, _args| async move {
        if true {
            panic!("kaboom");
        }
        Ok(serde_json::Value::Null)
    });
    reg.add("test.sleep", |_ctx, _args| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(serde_json::Value::Null)
    });
    let base = CtxBase {
        instance_id: Arc::from("inst"),
        fs: Arc::new(crate::fs::FsTable::default()),
        cpu: Arc::new(crate::procs::CpuMeter::default()),
        power: Arc::new(Power::detached()),
    };
    let mut cfg = JobsConfig {
        kill_grace: Duration::from_millis(500),
        ..JobsConfig::default()
    };
    tune(&mut cfg);
    (JobManager::new(mem.clone(), reg, base, cfg), mem)
}

fn bash(id: &str, script: &str) -> Command {
    Command::new(id, "bash", json!({ "script": script }))
}

#[tokio::test]
async fn builtins_succeed_fail_and_panic() {
    let (m, mem) = manager();
    assert_eq!(
        m.submit(Command::new("p", "core.ping", json!({}))).await,
        Submitted::Started
    );
    m.submit(Command::new("f", "test.fail", json!(null))).await;
    m.submit(Command::new("x", "test.panic", json!(null))).await;
    let p = mem.wait_final("p").await;
    assert_eq!((p.state, p.level), (State::Success, 20));
    let pong: String = p.json_data().expect("json string");
    assert!(pong.starts_with("PONG Version: "), "{pong}");
    let f = mem.wait_final("f").await;
    assert_eq!((f.state, f.data.as_str()), (State::Error, "\"no luck\""));
    let x = mem.wait_final("x").await;
    assert_eq!(x.state, State::Error);
    assert_eq!(x.critical, "PANIC(kaboom)");
    assert!(mem.events().contains(&Event::Flag("p".into())));
}

#[tokio::test]
async fn admission_rules() {
    let (m, mem) = manager();
    assert_eq!(
        m.submit(Command::new("", "core.ping", json!({}))).await,
        Submitted::Dropped
    );
    let mut late = Command::new("late", "core.ping", json!({}));
    late.deadline = Some(1);
    assert_eq!(m.submit(late).await, Submitted::Dropped);
    assert_eq!(
        m.submit(Command::new("u", "no.such", json!({}))).await,
        Submitted::Unknown
    );
    let u = mem.wait_final("u").await;
    assert_eq!(
        (u.state, u.starttime, u.streams.is_none()),
        (State::UnknownCmd, 0, true)
    );
    let ev = mem.events();
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::Flag(id) if id.is_empty() || id == "late"))
    );
}

#[tokio::test]
async fn process_output_levels_and_code() {
    let (m, mem) = manager();
    let script = "echo out; echo err >&2; echo '20::{\"a\":1}'; echo '9::bad'; \
                  printf '21:::\\nx: 1\\n:::\\n'; exit 3";
    m.submit(bash("s", script)).await;
    let r = mem.wait_final("s").await;
    assert_eq!((r.state, r.code), (State::Error, Some(3)));
    assert_eq!((r.stdout(), r.stderr()), ("out\n", "err\n"));
    assert_eq!((r.data.as_str(), r.level), ("\nx: 1", 21));
    assert_eq!(r.critical, "bad");
}

#[tokio::test]
async fn system_env_dir_stdin_and_spawn_error() {
    let (m, mem) = manager();
    let dir = tempfile::tempdir().expect("tempdir");
    m.submit(Command::new(
        "sys",
        "core.system",
        json!({"name": "sh", "args": ["-c", "echo $FOO; pwd; cat"], "dir": dir.path(),
               "env": {"FOO": "bar"}, "stdin": "in"}),
    ))
    .await;
    m.submit(Command::new(
        "bad",
        "core.system",
        json!({"name": "/no/such/binary"}),
    ))
    .await;
    let r = mem.wait_final("sys").await;
    assert_eq!(r.state, State::Success, "{r:?}");
    let canon = dir.path().canonicalize().expect("canonical");
    assert_eq!(r.stdout(), format!("bar\n{}\nin\n", canon.display()));
    let b = mem.wait_final("bad").await;
    assert_eq!(
        (b.state, b.streams.is_none(), b.code),
        (State::Error, true, None)
    );
    assert!(b.data.contains("/no/such/binary"), "{}", b.data);
}

#[tokio::test]
async fn restarts_count_runs_and_publish_once() {
    let (m, mem) = manager();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("runs");
    let mut c = bash("r", &format!("echo x >> {}; exit 1", f.display()));
    c.max_restart = 3;
    m.submit(c).await;
    let r = mem.wait_final("r").await;
    assert_eq!(r.state, State::Error);
    let runs = std::fs::read_to_string(&f).expect("runs file");
    assert_eq!(runs.lines().count(), 3);
    let results = mem
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Result(_)))
        .count();
    assert_eq!(results, 1);
}

#[tokio::test]
async fn recurring_job_ends_killed_with_one_result() {
    let (m, mem) = manager();
    let mut c = bash("rec", "echo tick");
    c.recurring_period = 1;
    m.submit(c).await;
    m.wait_until(Duration::from_secs(5), |m| {
        m.list(Some("rec")).is_ok_and(|l| l[0].debug.is_empty())
    })
    .await;
    assert!(m.kill("rec", 0).expect("kill"));
    let r = mem.wait_final("rec").await;
    assert_eq!((r.state, r.code), (State::Killed, None));
    assert!(!m.contains("rec"));
}

#[tokio::test]
async fn kill_builtin_list_and_killall_spares_caller() {
    let (m, mem) = manager();
    m.submit(Command::new("s1", "test.sleep", json!(null)))
        .await;
    m.submit(bash("s2", "sleep 30")).await;
    let listed = m.list(None).expect("list");
    assert_eq!(listed.len(), 2);
    assert!(matches!(
        m.list(Some("nope")),
        Err(JobError::NotFound { .. })
    ));
    assert!(!m.kill("nope", 0).expect("kill unknown"));
    assert!(matches!(
        m.kill("s1", 12345),
        Err(JobError::BadSignal { .. })
    ));
    assert_eq!(m.killall(Some("s1"), false), 1);
    let s2 = mem.wait_final("s2").await;
    assert_eq!(s2.state, State::Killed);
    assert!(m.contains("s1"));
    assert!(m.kill("s1", 9).expect("kill"));
    assert_eq!(mem.wait_final("s1").await.state, State::Killed);
    assert!(m.wait_empty(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn duplicate_is_pushed_then_replaced() {
    let (m, mem) = manager();
    m.submit(bash("d", "sleep 0.5; echo done")).await;
    assert_eq!(
        m.submit(bash("d", "echo other")).await,
        Submitted::Duplicate
    );
    let r = mem.wait_final("d").await;
    assert_eq!(r.stdout(), "done\n");
    let ev = mem.events();
    let dup = ev
        .iter()
        .position(|e| matches!(e, Event::Duplicate(r) if r.data == DUPLICATE_DATA));
    let rep = ev.iter().position(|e| matches!(e, Event::Replace(_)));
    assert!(dup.is_some() && rep.is_some() && dup < rep, "{ev:?}");
    assert_eq!(ev.iter().filter(|e| matches!(e, Event::Flag(_))).count(), 1);
}

#[tokio::test]
async fn queue_kill_while_waiting_passes_turn() {
    let (m, mem) = manager();
    let mut a = bash("qa", "sleep 0.5");
    a.queue = Some("q".into());
    let mut b = bash("qb", "echo b");
    b.queue = Some("q".into());
    let mut c = bash("qc", "echo c");
    c.queue = Some("q".into());
    m.submit(a).await;
    m.submit(b).await;
    m.submit(c).await;
    assert!(m.kill("qb", 0).expect("kill"));
    let rb = mem.wait_final("qb").await;
    assert_eq!(rb.state, State::Killed);
    let rc = mem.wait_final("qc").await;
    let ra = mem.wait_final("qa").await;
    assert_eq!(rc.state, State::Success);
    assert!(rc.starttime >= ra.starttime + ra.time, "{ra:?} {rc:?}");
    assert!(m.queues.is_empty() || m.wait_empty(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn timeout_kills_the_group() {
    let (m, mem) = manager();
    let mut c = bash("t", "sleep 30 & sleep 30");
    c.max_time = 1;
    m.submit(c).await;
    let r = mem.wait_final("t").await;
    assert_eq!((r.state, r.code), (State::Timeout, None));
    assert!(r.time < 3000, "{}", r.time);
}

#[tokio::test]
async fn deadline_is_checked_again_after_waiting_for_a_slot() {
    let (m, mem) = manager_with(|c| c.max_jobs = 1);
    m.submit(Command::new("hog", "test.sleep", json!(null)))
        .await;
    let mut late = Command::new("late", "core.ping", json!({}));
    late.deadline = Some(u64::try_from(now_ms() + 300).expect("positive time"));
    let waiter = {
        let m = m.clone();
        tokio::spawn(async move { m.submit(late).await })
    };
    // The deadline passes while "late" waits for the only slot.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!waiter.is_finished(), "a full table holds the submitter");
    assert!(m.kill("hog", 0).expect("kill"));
    assert_eq!(waiter.await.expect("submit task"), Submitted::Dropped);
    assert!(!m.contains("late"));
    assert!(
        !mem.events()
            .iter()
            .any(|e| matches!(e, Event::Flag(id) if id == "late"))
    );
}

/// Kills a test's process group on drop, even when the test fails.
struct GroupGuard(i32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0 > 1 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `job.list` for `id` until `done` holds for its `debug` (the pid, or "").
async fn wait_debug(m: &JobManager, id: &str, done: impl Fn(&str) -> bool) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = m.list(Some(id)).expect("job listed");
        if done(&listed[0].debug) {
            return listed[0].debug.clone();
        }
        assert!(tokio::time::Instant::now() < until, "job {id}: {listed:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn kill_after_the_exit_leaves_the_outcome_and_signals_nothing() {
    let (m, mem) = manager();
    let dir = tempfile::tempdir().expect("tempdir");
    let pidf = dir.path().join("pid");
    // The background sleep keeps stdout open: the job stays in the table while its output
    // drains, after its process exited 0 and was reaped.
    let script = format!("sleep 5 & echo $$ > {}; exit 0", pidf.display());
    m.submit(bash("natural", &script)).await;
    // The pid leaves the listing as soon as the shell has been reaped (it is also empty
    // before the spawn: the pid file tells the two apart).
    wait_debug(&m, "natural", |d| d.is_empty() && pidf.exists()).await;
    let pid: i32 = std::fs::read_to_string(&pidf)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let group = GroupGuard(pid);
    assert!(
        m.contains("natural"),
        "the job is still draining its output"
    );
    assert!(m.kill("natural", 0).expect("kill"));
    let r = mem.wait_final("natural").await;
    assert_eq!((r.state, r.code), (State::Success, Some(0)), "{r:?}");
    assert!(
        super::pgid::group_exists(pid),
        "the late kill signalled nothing"
    );
    drop(group);
}
