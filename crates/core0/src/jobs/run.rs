//! One job's life: wait for its queue turn, run (a process or a built-in) as often as §2.6 says,
//! publish the one Result, leave the table.

use super::output::{Capture, LineParser};
use super::queue::{self, Turn};
use super::{Job, JobManager, now_ms};
use crate::builtins::{Ctx, decode};
use grid_proto::args::{BashArgs, SystemArgs};
use grid_proto::commands::{BASH, CORE_SYSTEM};
use grid_proto::wire::{CommandResult, State, StreamMessage, StreamRecord, level, meta};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

/// Longest line kept whole; longer lines are split.
const MAX_LINE: u64 = 64 * 1024;
/// Time the readers get to drain the pipes after the process exited (a background child may
/// keep them open).
const DRAIN: Duration = Duration::from_secs(1);
/// Pause before a failed run is restarted (`max_restart`) or a protected job restarts.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// The outcome of one run.
#[derive(Debug, Clone)]
struct Outcome {
    state: State,
    data: String,
    level: u16,
    critical: String,
    streams: Option<[String; 2]>,
    code: Option<i32>,
    starttime: i64,
    time: i64,
}

impl Outcome {
    fn empty(state: State) -> Self {
        Self {
            state,
            data: String::new(),
            level: 0,
            critical: String::new(),
            streams: None,
            code: None,
            starttime: 0,
            time: 0,
        }
    }

    /// This run's outcome, ended as KILLED (no exit code).
    fn killed(self) -> Self {
        Self {
            state: State::Killed,
            code: None,
            ..self
        }
    }

    fn error(text: String, starttime: i64) -> Self {
        Self {
            data: text,
            starttime,
            ..Self::empty(State::Error)
        }
    }
}

/// What a process is started as.
struct Spec {
    program: String,
    args: Vec<String>,
    dir: String,
    env: Option<BTreeMap<String, String>>,
    stdin: String,
}

fn spec_of(name: &str, args: serde_json::Value) -> Result<Spec, String> {
    if name == BASH {
        let a: BashArgs = decode(args)?;
        Ok(Spec {
            program: "sh".into(),
            args: vec!["-c".into(), a.script],
            dir: String::new(),
            env: None,
            stdin: a.stdin,
        })
    } else {
        let a: SystemArgs = decode(args)?;
        if a.name.is_empty() {
            return Err("bad arguments: name is empty".into());
        }
        Ok(Spec {
            program: a.name,
            args: a.args,
            dir: a.dir,
            env: a.env,
            stdin: a.stdin,
        })
    }
}

/// Waits until the job is marked killed.
async fn killed(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|k| *k).await.is_err() {
        // The sender lives in the job, which outlives this wait.
        std::future::pending::<()>().await;
    }
}

/// Sleeps `d`; `false` if the job was killed meanwhile.
async fn pause(d: Duration, rx: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = killed(rx) => false,
    }
}

fn epoch_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn record(id: &str, text: String, meta: u32) -> StreamRecord {
    StreamRecord {
        core: 0,
        command: id.to_string(),
        message: StreamMessage {
            message: text,
            epoch: epoch_ns(),
            meta,
        },
    }
}

/// A file name for job `id` (ids are client text).
pub(crate) fn safe_name(id: &str) -> String {
    let plain = !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if plain {
        id.to_string()
    } else {
        format!("x-{}", hex::encode(id.as_bytes()))
    }
}

impl JobManager {
    fn pgid_file(&self, id: &str) -> Option<PathBuf> {
        self.config
            .run_dir
            .as_ref()
            .map(|d| d.join("jobs").join(format!("{}.pgid", safe_name(id))))
    }

    /// The whole life of a job, from its queue turn to its result.
    pub(super) async fn drive(
        self: Arc<Self>,
        job: Arc<Job>,
        turn: Option<Turn>,
        permit: OwnedSemaphorePermit,
    ) {
        let mut kill_rx = job.killed.subscribe();
        let mut guard = None;
        let mut outcome = None;
        match turn {
            None => {}
            Some(Turn::Now(g)) => guard = Some(g),
            Some(Turn::Later(mut rx, mut g)) => {
                tokio::select! {
                    r = &mut rx => {
                        if r.is_ok() {
                            g.acquired();
                        }
                        guard = Some(g);
                    }
                    _ = killed(&mut kill_rx) => {
                        // The turn may have arrived at the same moment: pass it on.
                        queue::give_up(rx, g);
                        outcome = Some(Outcome::empty(State::Killed));
                    }
                }
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None => self.run_loop(&job, &mut kill_rx).await,
        };
        let cmd = &job.cmd;
        if cmd.stream {
            let m = if outcome.state == State::Success {
                meta::pack(level::STDOUT, meta::STREAM | meta::EXIT_SUCCESS)
            } else {
                meta::pack(level::STDERR, meta::STREAM | meta::EXIT_ERROR)
            };
            let marker = [record(&cmd.id, String::new(), m)];
            if let Err(e) = self.publish.stream(&cmd.id, &marker).await {
                tracing::warn!(id = %cmd.id, error = %e, "cannot push stream exit marker");
            }
        }
        let result = CommandResult {
            id: cmd.id.clone(),
            command: cmd.command.clone(),
            data: outcome.data,
            streams: outcome.streams,
            critical: outcome.critical,
            level: outcome.level,
            state: outcome.state,
            starttime: outcome.starttime,
            time: outcome.time,
            tags: cmd.tags.clone(),
            container: 0,
            code: outcome.code,
        };
        {
            let mut published = job.published.lock().await;
            let sent = if job.dup_seen.load(Ordering::SeqCst) {
                self.publish.replace_result(&result).await
            } else {
                self.publish.result(&result).await
            };
            if let Err(e) = sent {
                tracing::error!(id = %cmd.id, error = %e, "cannot publish result");
            }
            *published = true;
            self.table().remove(&cmd.id);
        }
        tracing::debug!(id = %cmd.id, state = ?result.state, "job ended");
        drop(guard);
        drop(permit);
        self.changed.notify_waiters();
    }

    /// §2.6: run, restart on failure up to `max_restart` runs, recur every `recurring_period`,
    /// stop on a kill.
    async fn run_loop(&self, job: &Arc<Job>, kill_rx: &mut watch::Receiver<bool>) -> Outcome {
        let cmd = &job.cmd;
        let mut runs: u64 = 0;
        loop {
            if *kill_rx.borrow() {
                return Outcome::empty(State::Killed);
            }
            let outcome = self.run_once(job, kill_rx).await;
            if outcome.state == State::Killed {
                return outcome;
            }
            // A kill that came after the run ended leaves the run's own outcome if the job
            // ends now; if it would run again, the pause below ends it as KILLED at once.
            if job.protected {
                if !pause(RESTART_DELAY, kill_rx).await {
                    return outcome.killed();
                }
                continue;
            }
            if outcome.state == State::Success {
                runs = 0;
            } else if cmd.max_restart > 0 {
                runs += 1;
                if runs < cmd.max_restart {
                    if !pause(RESTART_DELAY, kill_rx).await {
                        return outcome.killed();
                    }
                    continue;
                }
                runs = 0;
            }
            if cmd.recurring_period > 0 {
                if !pause(Duration::from_secs(cmd.recurring_period), kill_rx).await {
                    return outcome.killed();
                }
                continue;
            }
            return outcome;
        }
    }

    async fn run_once(&self, job: &Arc<Job>, kill_rx: &mut watch::Receiver<bool>) -> Outcome {
        let start = now_ms();
        job.starttime.store(start, Ordering::SeqCst);
        let name = job.cmd.command.as_str();
        let timer = Instant::now();
        let mut outcome = if name == CORE_SYSTEM || name == BASH {
            match spec_of(name, job.cmd.arguments.clone()) {
                Ok(spec) => self.run_process(job, spec, kill_rx).await,
                Err(e) => Outcome::error(e, start),
            }
        } else {
            self.run_builtin(job, kill_rx).await
        };
        outcome.starttime = start;
        outcome.time = i64::try_from(timer.elapsed().as_millis()).unwrap_or(i64::MAX);
        outcome
    }

    async fn run_builtin(&self, job: &Arc<Job>, kill_rx: &mut watch::Receiver<bool>) -> Outcome {
        let Some(handler) = self.registry.get(&job.cmd.command) else {
            return Outcome::empty(State::UnknownCmd);
        };
        let Some(me) = self.me.upgrade() else {
            return Outcome::error("agent is shutting down".into(), 0);
        };
        let ctx = Ctx {
            instance_id: self.base.instance_id.clone(),
            fs: self.base.fs.clone(),
            cpu: self.base.cpu.clone(),
            jobs: me,
            job_id: Arc::from(job.cmd.id.as_str()),
            power: self.base.power.clone(),
        };
        let mut task = tokio::spawn(handler(ctx, job.cmd.arguments.clone()));
        let joined = tokio::select! {
            r = &mut task => r,
            _ = killed(kill_rx) => {
                task.abort();
                return Outcome::empty(State::Killed);
            }
        };
        match joined {
            Ok(Ok(value)) => Outcome {
                data: value.to_string(),
                level: level::RESULT_JSON,
                ..Outcome::empty(State::Success)
            },
            Ok(Err(text)) => Outcome {
                data: serde_json::Value::String(text).to_string(),
                level: level::RESULT_JSON,
                ..Outcome::empty(State::Error)
            },
            Err(e) if e.is_panic() => {
                let msg = e
                    .into_panic()
                    .downcast::<String>()
                    .map(|s| *s)
                    .or_else(|p| p.downcast::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|_| "panic".to_string());
                Outcome {
                    critical: format!("PANIC({msg})"),
                    ..Outcome::empty(State::Error)
                }
            }
            Err(_) => Outcome::empty(State::Killed),
        }
    }

    async fn run_process(
        &self,
        job: &Arc<Job>,
        spec: Spec,
        kill_rx: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let cmd = &job.cmd;
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .stdin(if spec.stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if !spec.dir.is_empty() {
            command.current_dir(&spec.dir);
        }
        if let Some(env) = &spec.env {
            command.envs(env);
        }
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::error(format!("cannot start {}: {e}", spec.program), 0);
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        job.pid.store(pid, Ordering::SeqCst);
        let pgid_file = self.pgid_file(&cmd.id);
        if let Some(f) = pgid_file.clone()
            && pid > 0
        {
            // `<pgid> <starttime>` (see `pgid`), so teardown never signals a reused number.
            let written = tokio::task::spawn_blocking(move || {
                super::pgid::write(&f, pid).map_err(|e| (f, e))
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err((f, e))) => {
                    tracing::warn!(path = %f.display(), error = %e, "cannot record job process group");
                }
                Err(e) => tracing::warn!(error = %e, "job process group record task failed"),
            }
        }
        if let Some(mut stdin) = child.stdin.take() {
            let data = spec.stdin.into_bytes();
            tokio::spawn(async move {
                // A process that does not read its stdin closes the pipe: not an error.
                let _ = stdin.write_all(&data).await;
            });
        }
        let (tx, rx) = mpsc::channel::<(u16, String)>(1024);
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(read_lines(out, level::STDOUT, tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(read_lines(err, level::STDERR, tx.clone())));
        }
        drop(tx);
        let publish = self.publish.clone();
        let collector = tokio::spawn(collect(rx, cmd.stream.then(|| (publish, cmd.id.clone()))));

        enum Ended {
            Exited(std::io::Result<ExitStatus>),
            Timeout,
            Killed,
        }
        let limit = (cmd.max_time > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_secs(cmd.max_time));
        let ended = tokio::select! {
            s = child.wait() => Ended::Exited(s),
            _ = async { match limit { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => Ended::Timeout,
            _ = killed(kill_rx) => Ended::Killed,
        };
        let group = Pid::from_raw(pid);
        let sigkill_group = || {
            if pid > 1 {
                let _ = killpg(group, Signal::SIGKILL);
            }
        };
        let timed_out = matches!(ended, Ended::Timeout);
        let (status, was_killed) = match ended {
            Ended::Exited(s) => {
                // Reaped: from now on `kill` signals nothing. `kill` marks the job before it
                // reads the pid, so a kill that reached the process is seen here; one that comes
                // later (while the output drains) does not turn a natural exit into KILLED.
                job.pid.store(0, Ordering::SeqCst);
                (s, *kill_rx.borrow())
            }
            Ended::Timeout => {
                sigkill_group();
                let s = child.wait().await;
                job.pid.store(0, Ordering::SeqCst);
                (s, false)
            }
            Ended::Killed => {
                // kill() already delivered the signal; SIGKILL what is left after the grace time.
                let s = match tokio::time::timeout(self.config.kill_grace, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        sigkill_group();
                        child.wait().await
                    }
                };
                job.pid.store(0, Ordering::SeqCst);
                (s, true)
            }
        };
        if timed_out || was_killed {
            // Background members of the group: the number stays theirs while any of them lives.
            sigkill_group();
        }
        let drain = futures::future::join_all(readers.iter_mut());
        if tokio::time::timeout(DRAIN, drain).await.is_err() {
            for r in &readers {
                r.abort();
            }
        }
        let capture = collector.await.unwrap_or_default();
        self.base.cpu.forget(pid);
        if let Some(f) = &pgid_file {
            let group_alive = pid > 1 && killpg(group, None).is_ok();
            let gone = if group_alive {
                // Background processes of the job outlive it: keep them findable for teardown.
                tokio::fs::rename(f, f.with_extension(format!("{pid}.pgid"))).await
            } else {
                tokio::fs::remove_file(f).await
            };
            if let Err(e) = gone
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %f.display(), error = %e, "cannot update job process group file");
            }
        }
        let (state, code) = match status {
            _ if timed_out => (State::Timeout, None),
            _ if was_killed => (State::Killed, None),
            Ok(st) => match (
                st.code(),
                std::os::unix::process::ExitStatusExt::signal(&st),
            ) {
                (Some(0), _) => (State::Success, Some(0)),
                (Some(c), _) => (State::Error, Some(c)),
                (None, Some(sig)) => (State::Error, Some(128 + sig)),
                (None, None) => (State::Error, None),
            },
            Err(e) => {
                tracing::warn!(id = %cmd.id, error = %e, "cannot wait for job process");
                (State::Error, None)
            }
        };
        Outcome {
            state,
            data: capture.data.clone(),
            level: capture.level,
            critical: capture.critical.clone(),
            streams: Some(capture.streams()),
            code,
            starttime: 0,
            time: 0,
        }
    }
}

/// Reads lines of one pipe and sends them with the stream's plain level.
async fn read_lines<R: AsyncRead + Unpin>(pipe: R, plain: u16, tx: mpsc::Sender<(u16, String)>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => return,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                let line = String::from_utf8_lossy(&buf).into_owned();
                if tx.send((plain, line)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "job output read failed");
                return;
            }
        }
    }
}

/// Parses the output protocol, keeps the capture, and streams level 1/2 lines in batches.
async fn collect(
    mut rx: mpsc::Receiver<(u16, String)>,
    stream: Option<(Arc<dyn super::Publish>, String)>,
) -> Capture {
    let mut capture = Capture::default();
    let mut parsers = [LineParser::default(), LineParser::default()];
    let mut batch: Vec<StreamRecord> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some((plain, line)) = next {
            let parser = &mut parsers[usize::from(plain == level::STDERR)];
            if let Some((lvl, text)) = parser.feed(&line, plain) {
                capture.add(lvl, &text);
                if let Some((_, id)) = &stream
                    && (lvl == level::STDOUT || lvl == level::STDERR)
                {
                    batch.push(record(id, text, meta::pack(lvl, meta::STREAM)));
                }
            }
            next = if batch.len() < 500 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Some((publish, id)) = &stream
            && !batch.is_empty()
        {
            if let Err(e) = publish.stream(id, &batch).await {
                tracing::warn!(id = %id, error = %e, "cannot push job output stream");
            }
            batch.clear();
        }
    }
    capture
}
