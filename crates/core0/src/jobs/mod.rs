//! The job manager: every command runs as a tracked job.
//!
//! [`JobManager::submit`] takes a decoded [`Command`], applies the protocol's admission rules
//! (empty id, deadline, duplicate id, unknown command), flags it as accepted and starts it as a
//! task: a process (`core.system`, `bash`) or a built-in of the [`Registry`]. The task runs the
//! §2.6 loop (queue turn, `max_time`, `max_restart`, `recurring_period`) and publishes exactly one
//! Result through a [`Publish`] sink. The job table answers `job.list`, `job.kill` and
//! `job.killall`.
//!
//! Host jobs are not adopted after a core0 restart: core0 held the only read end of their
//! output pipes, so a job that outlives core0 ends with SIGPIPE on its next write (one that
//! never writes runs on until teardown kills its recorded process group). The next core0
//! publishes an `ERROR` result for every flag such a job left behind
//! ([`crate::transport::consume`]).

mod output;
pub mod pgid;
mod queue;
mod run;

pub(crate) use run::safe_name;

use crate::builtins::{Power, Registry};
use grid_proto::info::{CoreState, JobInfo};
use grid_proto::wire::{Command, CommandResult, State, StreamRecord};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};

pub use output::{Capture, LineParser};

/// Jobs that may exist at once; a full table stops the consumer until a job ends.
pub const DEFAULT_MAX_JOBS: usize = 10_000;

/// Data of the `DUPILICATE_ID` result: plain text, as in the original (§2.3).
pub const DUPLICATE_DATA: &str = "duplicate job id";

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// `job.list` for an id that is not running.
    #[error("job not found")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// `job.kill` with a number that is not a signal.
    #[error("invalid signal {signal}")]
    BadSignal {
        /// The number given.
        signal: i32,
    },
    /// Signalling the job's process group failed.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The group.
        pgid: i32,
        /// The OS error.
        source: nix::Error,
    },
}

/// A boxed future returned by [`Publish`] methods.
pub type PublishFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where jobs put their flags, results and live output (Redis in production).
pub trait Publish: Send + Sync {
    /// Marks job `id` as accepted: `result:<id>:flag` holds one element and no TTL, and a stale
    /// `result:<id>` of an earlier job with this id is removed.
    fn flag<'a>(&'a self, id: &'a str) -> PublishFuture<'a>;
    /// Publishes a job's final result: the flag and the result get the 300 s TTL.
    fn result<'a>(&'a self, result: &'a CommandResult) -> PublishFuture<'a>;
    /// Like [`Publish::result`], but the result list's content is replaced (after a
    /// `DUPILICATE_ID` result was pushed on it).
    fn replace_result<'a>(&'a self, result: &'a CommandResult) -> PublishFuture<'a>;
    /// Pushes a `DUPILICATE_ID` result on `result:<id>` without touching the flag.
    fn duplicate<'a>(&'a self, result: &'a CommandResult) -> PublishFuture<'a>;
    /// Appends live output records to `stream:<id>` (trimmed, 60 s TTL).
    fn stream<'a>(&'a self, id: &'a str, records: &'a [StreamRecord]) -> PublishFuture<'a>;
}

/// The parts of a built-in's [`crate::builtins::Ctx`] that do not depend on the job.
#[derive(Clone)]
pub struct CtxBase {
    /// The agent's instance id.
    pub instance_id: Arc<str>,
    /// Open files of `filesystem.open`.
    pub fs: Arc<crate::fs::FsTable>,
    /// CPU-percent sampler.
    pub cpu: Arc<crate::procs::CpuMeter>,
    /// Reboot control.
    pub power: Arc<Power>,
}

/// Settings of a [`JobManager`].
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Where `jobs/<id>.pgid` files are written; `None` = nowhere.
    pub run_dir: Option<PathBuf>,
    /// Jobs that may exist at once.
    pub max_jobs: usize,
    /// Time a job's processes get between SIGTERM (kill) and SIGKILL.
    pub kill_grace: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            run_dir: None,
            max_jobs: DEFAULT_MAX_JOBS,
            kill_grace: Duration::from_secs(5),
        }
    }
}

/// What [`JobManager::submit`] did with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Not run and no result (empty id, or picked up after its deadline).
    Dropped,
    /// A job with this id runs: a `DUPILICATE_ID` result was pushed.
    Duplicate,
    /// No such command: an `UNKNOWN_CMD` result was published.
    Unknown,
    /// The job was started (or queued).
    Started,
}

/// Options for an internally submitted job.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitOptions {
    /// Restarts at once whenever it ends and survives `job.killall` (startup services).
    pub protected: bool,
}

/// One running (or queued) job.
struct Job {
    cmd: Command,
    protected: bool,
    /// Start of the current run, ms since the epoch.
    starttime: AtomicI64,
    /// Pid (= process group) of the current run's process while it runs, 0 when none. It is
    /// cleared as soon as the process has been reaped, so a kill never reaches a reused pid.
    pid: AtomicI32,
    /// Set once the job is to end as KILLED.
    killed: watch::Sender<bool>,
    /// A `DUPILICATE_ID` result was pushed on this job's result list.
    dup_seen: AtomicBool,
    /// Held while the final result is published; `true` once it was.
    published: tokio::sync::Mutex<bool>,
}

/// Running jobs, queues, and the rules of the protocol.
pub struct JobManager {
    me: Weak<JobManager>,
    publish: Arc<dyn Publish>,
    registry: Registry,
    base: CtxBase,
    config: JobsConfig,
    table: Mutex<HashMap<String, Arc<Job>>>,
    queues: queue::Queues,
    permits: Arc<Semaphore>,
    changed: Notify,
    /// Commands accepted to run since this manager was made.
    commands: std::sync::atomic::AtomicU64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether `cmd` has a deadline that has passed (it is then dropped, and this is logged).
fn past_deadline(cmd: &Command) -> bool {
    let Some(deadline) = cmd.deadline else {
        return false;
    };
    if i64::try_from(deadline).unwrap_or(i64::MAX) >= now_ms() {
        return false;
    }
    tracing::warn!(id = %cmd.id, command = %cmd.command, deadline, "dropping a command picked up after its deadline");
    true
}

/// Whether `name` is run as a process rather than a built-in.
fn is_process(name: &str) -> bool {
    name == grid_proto::commands::CORE_SYSTEM || name == grid_proto::commands::BASH
}

impl JobManager {
    /// A manager publishing through `publish`, running built-ins of `registry`.
    pub fn new(
        publish: Arc<dyn Publish>,
        registry: Registry,
        base: CtxBase,
        config: JobsConfig,
    ) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(config.max_jobs.max(1)));
        Arc::new_cyclic(|me| JobManager {
            me: me.clone(),
            publish,
            registry,
            base,
            config,
            table: Mutex::new(HashMap::new()),
            queues: queue::Queues::default(),
            permits,
            changed: Notify::new(),
            commands: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        // Every critical section is a single map operation: a poisoned map is still consistent.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a command from the transport: drops, rejects or starts it (see the module doc).
    pub async fn submit(&self, cmd: Command) -> Submitted {
        self.submit_with(cmd, SubmitOptions::default()).await
    }

    /// [`JobManager::submit`] with options.
    pub async fn submit_with(&self, cmd: Command, opts: SubmitOptions) -> Submitted {
        if cmd.id.is_empty() {
            tracing::warn!(command = %cmd.command, "dropping a command with an empty id");
            return Submitted::Dropped;
        }
        if past_deadline(&cmd) {
            return Submitted::Dropped;
        }
        let known = is_process(&cmd.command) || self.registry.contains(&cmd.command);
        // Waits here while the table is full, which stops the consumer (as the original does).
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Submitted::Dropped, // the semaphore is never closed
        };
        // The wait for a free slot may have outlasted the deadline.
        if past_deadline(&cmd) {
            return Submitted::Dropped;
        }
        let job = loop {
            let existing = self.table().get(&cmd.id).cloned();
            if let Some(running) = existing {
                let published = running.published.lock().await;
                if *published {
                    // It ended and left the table while we waited: the id is free again.
                    continue;
                }
                running.dup_seen.store(true, Ordering::SeqCst);
                let mut r = CommandResult::bare(&cmd, State::DuplicateId);
                r.data = DUPLICATE_DATA.to_string();
                if let Err(e) = self.publish.duplicate(&r).await {
                    tracing::error!(id = %cmd.id, error = %e, "cannot publish duplicate id result");
                }
                tracing::warn!(id = %cmd.id, "duplicate job id");
                return Submitted::Duplicate;
            }
            if !known {
                drop(permit);
                if let Err(e) = self.publish.flag(&cmd.id).await {
                    tracing::error!(id = %cmd.id, error = %e, "cannot flag job");
                }
                let r = CommandResult::bare(&cmd, State::UnknownCmd);
                if let Err(e) = self.publish.result(&r).await {
                    tracing::error!(id = %cmd.id, error = %e, "cannot publish result");
                }
                tracing::warn!(id = %cmd.id, command = %cmd.command, "unknown command");
                return Submitted::Unknown;
            }
            self.commands.fetch_add(1, Ordering::Relaxed);
            let (killed, _) = watch::channel(false);
            let job = Arc::new(Job {
                cmd: cmd.clone(),
                protected: opts.protected,
                starttime: AtomicI64::new(now_ms()),
                pid: AtomicI32::new(0),
                killed,
                dup_seen: AtomicBool::new(false),
                published: tokio::sync::Mutex::new(false),
            });
            let mut table = self.table();
            if table.contains_key(&cmd.id) {
                continue; // lost a race with another submitter of the same id
            }
            table.insert(cmd.id.clone(), job.clone());
            break job;
        };
        let turn = match cmd.queue.as_deref() {
            Some(q) if !q.is_empty() => Some(self.queues.enter(q)),
            _ => None,
        };
        let Some(me) = self.me.upgrade() else {
            return Submitted::Dropped;
        };
        tracing::debug!(id = %cmd.id, command = %cmd.command, "job started");
        // The job is in the table and holds its place in its queue, so order and duplicate
        // detection are settled here; the flag is raised by the job's own task, before it runs,
        // so that the consumer can take the next command without waiting for Redis.
        tokio::spawn(async move {
            if let Err(e) = me.publish.flag(&job.cmd.id).await {
                tracing::error!(id = %job.cmd.id, error = %e, "cannot flag job");
            }
            me.drive(job, turn, permit).await
        });
        Submitted::Started
    }

    /// The running jobs, or the one with `id` (an error if it does not run).
    pub fn list(&self, id: Option<&str>) -> Result<Vec<JobInfo>, JobError> {
        let jobs: Vec<Arc<Job>> = {
            let table = self.table();
            match id.filter(|i| !i.is_empty()) {
                Some(id) => vec![
                    table
                        .get(id)
                        .cloned()
                        .ok_or_else(|| JobError::NotFound { id: id.to_string() })?,
                ],
                None => table.values().cloned().collect(),
            }
        };
        let mut out: Vec<JobInfo> = jobs
            .iter()
            .map(|job| {
                let pid = job.pid.load(Ordering::SeqCst);
                let stats = if pid > 0 {
                    self.base.cpu.sample(pid)
                } else {
                    None
                };
                let stats = stats.unwrap_or_default();
                JobInfo {
                    cpu: stats.cpu,
                    rss: stats.rss,
                    vms: stats.vms,
                    swap: stats.swap,
                    debug: if pid > 0 {
                        pid.to_string()
                    } else {
                        String::new()
                    },
                    starttime: job.starttime.load(Ordering::SeqCst),
                    cmd: job.cmd.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.starttime
                .cmp(&b.starttime)
                .then_with(|| a.cmd.id.cmp(&b.cmd.id))
        });
        Ok(out)
    }

    /// Signals job `id`; `false` when no such job runs. Signal 0 means SIGTERM; SIGTERM and
    /// SIGKILL end the job as KILLED, other signals are only delivered to its process group.
    /// A kill that comes after the job's process exited (while its output drains) signals
    /// nothing and leaves the run's own state; it only stops further runs.
    pub fn kill(&self, id: &str, signal: i32) -> Result<bool, JobError> {
        let Some(job) = self.table().get(id).cloned() else {
            return Ok(false);
        };
        let sig = if signal == 0 { libc::SIGTERM } else { signal };
        if !(1..=libc::SIGRTMAX()).contains(&sig) {
            return Err(JobError::BadSignal { signal });
        }
        if sig == libc::SIGTERM || sig == libc::SIGKILL {
            job.killed.send_replace(true);
        }
        // Read after marking the job: the runner clears the pid once it has reaped the process
        // and only then looks at the mark, so a signal sent here always counts as a kill, and
        // a process already reaped (its pid possibly reused) is never signalled.
        let pgid = job.pid.load(Ordering::SeqCst);
        if pgid > 1 {
            // SAFETY: kill(2) takes plain integers; a negative pid addresses the process group.
            // libc rather than nix so that any signal number (real-time ones too) passes.
            let rc = unsafe { libc::kill(-pgid, sig) };
            if rc < 0 {
                let err = nix::errno::Errno::last();
                if err != nix::errno::Errno::ESRCH {
                    return Err(JobError::Signal { pgid, source: err });
                }
            }
        }
        Ok(true)
    }

    /// Terminates every job except `except` (the caller's own job) and, unless
    /// `include_protected`, the protected ones. Returns how many were signalled.
    pub fn killall(&self, except: Option<&str>, include_protected: bool) -> usize {
        let ids: Vec<String> = self
            .table()
            .iter()
            .filter(|(id, job)| {
                Some(id.as_str()) != except && (include_protected || !job.protected)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut n = 0;
        for id in ids {
            match self.kill(&id, 0) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(id = %id, error = %e, "cannot kill job"),
            }
        }
        n
    }

    /// Pids of the running process jobs.
    pub fn pids(&self) -> Vec<i32> {
        self.table()
            .values()
            .map(|j| j.pid.load(Ordering::SeqCst))
            .filter(|p| *p > 0)
            .collect()
    }

    /// Number of jobs in the table.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no job runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether job `id` is in the table.
    pub fn contains(&self, id: &str) -> bool {
        self.table().contains_key(id)
    }

    /// Waits until `done()` holds (checked at every job end), for at most `limit`; returns
    /// whether it holds.
    async fn wait_until(&self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return done(self);
            }
        }
    }

    /// Waits until job `id` has published its result and left the table (at most `limit`).
    pub async fn wait_gone(&self, id: &str, limit: Duration) -> bool {
        self.wait_until(limit, |m| !m.contains(id)).await
    }

    /// Waits until no job is left (at most `limit`).
    pub async fn wait_empty(&self, limit: Duration) -> bool {
        self.wait_until(limit, |m| m.is_empty()).await
    }

    /// Usage of core0 and every running process job, summed (`core.state`).
    pub fn usage(&self) -> CoreState {
        let mut total = self.base.cpu.self_usage();
        for pid in self.pids() {
            if let Some(s) = self.base.cpu.sample(pid) {
                total.cpu += s.cpu;
                total.rss += s.rss;
                total.vms += s.vms;
                total.swap += s.swap;
            }
        }
        total.debug = String::new();
        total.instance_id = self.base.instance_id.to_string();
        total.commands = Some(self.commands.load(std::sync::atomic::Ordering::Relaxed));
        total
    }
}

#[cfg(test)]
mod tests;
