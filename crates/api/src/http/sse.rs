//! Live output of a job as Server-Sent Events.
//!
//! The node's `stream:<id>` list is consumed by `BLPOP`, so it can be read only once: the
//! [`StreamHub`] keeps one reader task per (node, job) that fans every record out through a
//! tokio broadcast channel to all subscribers, and keeps what it read so a late subscriber gets
//! the lines from the start. Events: `stdout` and `stderr` (one line each as data), then `exit`
//! with `{"state": "<api state>", "code": <int|null>}` taken from the job's result. A job that
//! ended is replayed from its result. A reader nobody listens to for [`IDLE`] stops and drops
//! what it kept; a later subscriber starts a new one. When the server shuts down, every open
//! stream ends with an `error` event ([`until_shutdown`]).

use crate::archive::Archive;
use crate::shutdown::Shutdown;
use futures::StreamExt;
use grid_client::{ClientError, NodeClient};
use grid_proto::api::JobResult;
use grid_proto::commands::stream_key;
use grid_proto::wire::level;
use redis::AsyncCommands;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Events kept per job for late subscribers.
const HISTORY: usize = 4000;
/// Capacity of the fan-out channel (a slower subscriber skips lines).
const CHANNEL: usize = 1024;
/// One `BLPOP` wait of the reader.
pub const POLL: Duration = Duration::from_secs(5);
/// How long a reader goes on without any subscriber before it stops.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long the reader waits for the result after the exit marker.
const RESULT_WAIT: Duration = Duration::from_secs(30);

/// The `data` of the final `exit` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitData {
    /// The job's API state (`success`, `error`, …).
    pub state: String,
    /// Its exit status, when it is a process job.
    pub code: Option<i32>,
}

/// One event of a job's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A line of stdout.
    Stdout(String),
    /// A line of stderr.
    Stderr(String),
    /// The job ended.
    Exit(ExitData),
    /// The stream cannot go on (the node went away).
    Error(String),
}

impl StreamEvent {
    /// Whether this event ends the stream.
    pub fn is_last(&self) -> bool {
        matches!(self, StreamEvent::Exit(_) | StreamEvent::Error(_))
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Stdout(_) => "stdout",
            StreamEvent::Stderr(_) => "stderr",
            StreamEvent::Exit(_) => "exit",
            StreamEvent::Error(_) => "error",
        }
    }

    /// The SSE data: the line, or JSON for `exit` and `error`.
    pub fn data(&self) -> String {
        match self {
            StreamEvent::Stdout(l) | StreamEvent::Stderr(l) => l.replace(['\r', '\n'], ""),
            StreamEvent::Exit(d) => serde_json::to_string(d).unwrap_or_default(),
            StreamEvent::Error(e) => serde_json::json!({ "error": e }).to_string(),
        }
    }

    fn exit_of(r: &JobResult) -> Self {
        StreamEvent::Exit(ExitData {
            state: r.state.clone(),
            code: r.code,
        })
    }
}

/// The events of a finished job, rebuilt from its result.
pub fn replay(result: &JobResult) -> Vec<StreamEvent> {
    result
        .stdout
        .lines()
        .map(|l| StreamEvent::Stdout(l.to_string()))
        .chain(
            result
                .stderr
                .lines()
                .map(|l| StreamEvent::Stderr(l.to_string())),
        )
        .chain(std::iter::once(StreamEvent::exit_of(result)))
        .collect()
}

#[derive(Default)]
struct History {
    events: VecDeque<StreamEvent>,
    finished: bool,
}

struct JobStream {
    history: Mutex<History>,
    tx: broadcast::Sender<StreamEvent>,
}

impl JobStream {
    fn push(&self, ev: StreamEvent) {
        let Ok(mut h) = self.history.lock() else {
            return;
        };
        if h.events.len() >= HISTORY {
            h.events.pop_front();
        }
        h.finished = ev.is_last();
        h.events.push_back(ev.clone());
        // No receiver is fine: the history keeps it.
        let _ = self.tx.send(ev);
    }
}

type Key = (String, String);

/// One reader per (node, job), many subscribers.
#[derive(Clone)]
pub struct StreamHub {
    jobs: Arc<Mutex<HashMap<Key, Arc<JobStream>>>>,
    archive: Archive,
    poll: Duration,
    idle: Duration,
}

impl std::fmt::Debug for StreamHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.jobs.lock().map(|j| j.len()).unwrap_or(0);
        f.debug_struct("StreamHub").field("readers", &n).finish()
    }
}

/// What a subscriber gets: the events so far, then the live ones.
pub type EventStream = futures::stream::BoxStream<'static, StreamEvent>;

fn ended(events: Vec<StreamEvent>) -> EventStream {
    Box::pin(futures::stream::iter(events))
}

impl StreamHub {
    /// A hub that archives the results it reads.
    pub fn new(archive: Archive) -> Self {
        Self {
            jobs: Arc::new(Mutex::new(HashMap::new())),
            archive,
            poll: POLL,
            idle: IDLE,
        }
    }

    /// Sets the reader's `BLPOP` wait and how long it goes on without subscribers (defaults
    /// [`POLL`] and [`IDLE`]; tests shorten them).
    pub fn with_timing(mut self, poll: Duration, idle: Duration) -> Self {
        self.poll = poll;
        self.idle = idle;
        self
    }

    /// Removes the entry of `key` if it still is `js` (a stopped reader never removes its
    /// successor). With `only_unheard`, only when nobody is subscribed; returns whether it did.
    fn retire(&self, key: &Key, js: &Arc<JobStream>, only_unheard: bool) -> bool {
        let Ok(mut jobs) = self.jobs.lock() else {
            return false;
        };
        // Subscribers subscribe under this lock, so the count cannot grow meanwhile.
        if only_unheard && js.tx.receiver_count() > 0 {
            return false;
        }
        if jobs.get(key).is_some_and(|cur| Arc::ptr_eq(cur, js)) {
            jobs.remove(key);
        }
        true
    }

    /// Whether a reader is live for this job.
    pub fn is_reading(&self, node: &str, job: &str) -> bool {
        self.jobs
            .lock()
            .map(|j| j.contains_key(&(node.to_string(), job.to_string())))
            .unwrap_or(false)
    }

    /// Subscribes to the live stream of a job that is running or still has stream records,
    /// starting a reader when there is none.
    pub fn subscribe(&self, node: &str, job: &str, client: NodeClient) -> EventStream {
        let key = (node.to_string(), job.to_string());
        let (past, rx) = {
            let Ok(mut jobs) = self.jobs.lock() else {
                return ended(vec![StreamEvent::Error("stream hub is unavailable".into())]);
            };
            let js = match jobs.get(&key) {
                Some(js) => js.clone(),
                None => {
                    let (tx, _) = broadcast::channel(CHANNEL);
                    let js = Arc::new(JobStream {
                        history: Mutex::new(History::default()),
                        tx,
                    });
                    jobs.insert(key.clone(), js.clone());
                    let hub = self.clone();
                    let reader = js.clone();
                    tokio::spawn(async move {
                        hub.read(&key, client, &reader).await;
                    });
                    js
                }
            };
            let Ok(h) = js.history.lock() else {
                return ended(vec![StreamEvent::Error("stream hub is unavailable".into())]);
            };
            let past: Vec<StreamEvent> = h.events.iter().cloned().collect();
            if h.finished {
                return ended(past);
            }
            // Subscribed under the history lock: nothing is missed or doubled; and under the
            // hub's lock: the reader cannot stop for want of subscribers meanwhile.
            (past, js.tx.subscribe())
        };
        let live = futures::stream::unfold((rx, false), |(mut rx, done)| async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let last = ev.is_last();
                        return Some((ev, (rx, last)));
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "slow stream subscriber skipped lines");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Box::pin(futures::StreamExt::chain(futures::stream::iter(past), live))
    }

    /// Reads the job's records until it ends (then retires its entry), or until nobody has
    /// listened for the idle time (then the entry goes first, and with it what it kept).
    async fn read(&self, key: &Key, client: NodeClient, js: &Arc<JobStream>) {
        let last = self.read_until_end(key, client, js).await;
        if let Some(ev) = last {
            js.push(ev);
            self.retire(key, js, false);
        }
    }

    /// The loop of [`StreamHub::read`]: the last event, or `None` when it stopped unheard.
    async fn read_until_end(
        &self,
        key: &Key,
        client: NodeClient,
        js: &Arc<JobStream>,
    ) -> Option<StreamEvent> {
        let (node, job) = key;
        let mut unheard_since: Option<Instant> = None;
        loop {
            if js.tx.receiver_count() == 0 {
                let since = *unheard_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.idle && self.retire(key, js, true) {
                    tracing::debug!(node, job, "no subscriber left, job stream reader stops");
                    return None;
                }
            } else {
                unheard_since = None;
            }
            match client.next_stream_record(job, self.poll).await {
                Ok(Some(rec)) => {
                    if rec.message.is_exit() {
                        return Some(
                            self.final_event(node, job, &client, Some(rec.message.meta))
                                .await,
                        );
                    }
                    match rec.message.level() {
                        level::STDOUT => js.push(StreamEvent::Stdout(rec.message.message)),
                        level::STDERR => js.push(StreamEvent::Stderr(rec.message.message)),
                        _ => {}
                    }
                }
                Ok(None) => match client.is_running(job).await {
                    Ok(true) => {}
                    // Ended without (or after losing) its exit marker.
                    Ok(false) => return Some(self.final_event(node, job, &client, None).await),
                    Err(e) => return Some(lost(node, &e)),
                },
                Err(e) => return Some(lost(node, &e)),
            }
        }
    }

    async fn final_event(
        &self,
        node: &str,
        job: &str,
        client: &NodeClient,
        meta: Option<u32>,
    ) -> StreamEvent {
        match client.wait_result(job, RESULT_WAIT).await {
            Ok(Some(r)) => {
                let result = JobResult::from(&r);
                if let Err(e) = self.archive.save(node, &result).await {
                    tracing::warn!(node, job, error = %e, "cannot archive job result");
                }
                StreamEvent::exit_of(&result)
            }
            Ok(None) | Err(_) => match meta {
                Some(m) => StreamEvent::Exit(ExitData {
                    state: if m & grid_proto::wire::meta::EXIT_SUCCESS != 0 {
                        "success".to_string()
                    } else {
                        "error".to_string()
                    },
                    code: None,
                }),
                None => StreamEvent::Error(format!("job {job} ended without a result")),
            },
        }
    }
}

/// `events`, cut short by the server's shutdown with an `error` event, so an open stream never
/// holds the graceful shutdown up.
pub fn until_shutdown(events: EventStream, shutdown: Shutdown) -> EventStream {
    Box::pin(futures::stream::unfold(
        Some((events, shutdown)),
        |state| async move {
            let (mut events, shutdown) = state?;
            tokio::select! {
                biased;
                () = shutdown.wait() => Some((
                    StreamEvent::Error("grid-api is shutting down".to_string()),
                    None,
                )),
                ev = events.next() => {
                    let ev = ev?;
                    let more = !ev.is_last();
                    Some((ev, more.then_some((events, shutdown))))
                }
            }
        },
    ))
}

fn lost(node: &str, e: &ClientError) -> StreamEvent {
    tracing::warn!(node, error = %e, "job stream lost");
    StreamEvent::Error(format!("lost the stream from node {node}"))
}

/// Whether `stream:<id>` still holds records.
pub async fn has_stream_records(client: &NodeClient, job: &str) -> Result<bool, ClientError> {
    let mut conn = client.connection();
    let n: i64 = conn
        .llen(stream_key(job))
        .await
        .map_err(|source| ClientError::Redis {
            addr: client.addr().to_string(),
            source,
        })?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_gives_lines_then_exit() {
        let r = JobResult {
            id: "j".into(),
            name: "core.system".into(),
            level: 0,
            start_time: 0,
            stdout: "a\nb\n".into(),
            stderr: "e\n".into(),
            state: "error".into(),
            data: String::new(),
            code: Some(3),
        };
        let evs = replay(&r);
        assert_eq!(
            evs,
            vec![
                StreamEvent::Stdout("a".into()),
                StreamEvent::Stdout("b".into()),
                StreamEvent::Stderr("e".into()),
                StreamEvent::Exit(ExitData {
                    state: "error".into(),
                    code: Some(3)
                }),
            ]
        );
        assert_eq!(evs[3].data(), r#"{"state":"error","code":3}"#);
        assert_eq!(StreamEvent::Stdout("x\ry".into()).data(), "xy");
    }

    #[tokio::test]
    async fn shutdown_ends_an_open_stream_with_an_error() {
        let shutdown = Shutdown::new();
        let open: EventStream = Box::pin(
            futures::stream::iter(vec![StreamEvent::Stdout("a".into())])
                .chain(futures::stream::pending()),
        );
        let mut events = until_shutdown(open, shutdown.clone());
        assert_eq!(events.next().await, Some(StreamEvent::Stdout("a".into())));
        shutdown.trigger();
        assert_eq!(
            events.next().await,
            Some(StreamEvent::Error("grid-api is shutting down".into()))
        );
        assert_eq!(events.next().await, None);

        // A stream that ends by itself is passed through as it is.
        let done: EventStream = Box::pin(futures::stream::iter(replay(&JobResult {
            id: "j".into(),
            name: "core.system".into(),
            level: 0,
            start_time: 0,
            stdout: "a\n".into(),
            stderr: String::new(),
            state: "success".into(),
            data: String::new(),
            code: Some(0),
        })));
        let all: Vec<StreamEvent> = until_shutdown(done, Shutdown::new()).collect().await;
        assert_eq!(all.len(), 2);
        assert!(all[1].is_last());
    }
}
