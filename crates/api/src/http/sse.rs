//! Live output of a job as Server-Sent Events.
//!
//! The node's `stream:<id>` list is consumed by `BLPOP`, so it can be read only once: the
//! [`StreamHub`] keeps one reader task per (node, job) that fans every record out through a
//! tokio broadcast channel to all subscribers, and keeps what it read so a late subscriber gets
//! the lines from the start. Events: `stdout` and `stderr` (one line each as data), then `exit`
//! with `{"state": "<api state>", "code": <int|null>}` taken from the job's result. A job that
//! ended long ago (its stream list is gone) is replayed from its result.

use crate::archive::Archive;
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

/// Events kept per job for late subscribers.
const HISTORY: usize = 4000;
/// Capacity of the fan-out channel (a slower subscriber skips lines).
const CHANNEL: usize = 1024;
/// One `BLPOP` wait of the reader.
const POLL: Duration = Duration::from_secs(5);
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
        }
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
        let js = {
            let Ok(mut jobs) = self.jobs.lock() else {
                return ended(vec![StreamEvent::Error("stream hub is unavailable".into())]);
            };
            match jobs.get(&key) {
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
                        if let Ok(mut jobs) = hub.jobs.lock() {
                            jobs.remove(&key);
                        }
                    });
                    js
                }
            }
        };
        let (past, rx) = {
            let Ok(h) = js.history.lock() else {
                return ended(vec![StreamEvent::Error("stream hub is unavailable".into())]);
            };
            let past: Vec<StreamEvent> = h.events.iter().cloned().collect();
            if h.finished {
                return ended(past);
            }
            // Subscribed under the history lock: nothing is missed or doubled.
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

    async fn read(&self, (node, job): &Key, client: NodeClient, js: &JobStream) {
        loop {
            match client.next_stream_record(job, POLL).await {
                Ok(Some(rec)) => {
                    if rec.message.is_exit() {
                        js.push(
                            self.final_event(node, job, &client, Some(rec.message.meta))
                                .await,
                        );
                        return;
                    }
                    match rec.message.level() {
                        level::STDOUT => js.push(StreamEvent::Stdout(rec.message.message)),
                        level::STDERR => js.push(StreamEvent::Stderr(rec.message.message)),
                        _ => {}
                    }
                }
                Ok(None) => match client.is_running(job).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Ended without (or after losing) its exit marker.
                        js.push(self.final_event(node, job, &client, None).await);
                        return;
                    }
                    Err(e) => {
                        js.push(lost(node, &e));
                        return;
                    }
                },
                Err(e) => {
                    js.push(lost(node, &e));
                    return;
                }
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
}
