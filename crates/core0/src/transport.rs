//! The Redis side of the protocol: [`RedisPublisher`] writes flags, results and live output;
//! [`consume`] pops Commands from `core:default` on a dedicated connection and hands them to the
//! [`JobManager`]. Before the first pop, [`consume`] ends the flags a previous core0 left
//! running (see [`end_orphaned_flags`]).

use crate::jobs::{JobManager, Publish, PublishFuture};
use grid_proto::commands::{
    QUEUE_DEFAULT, RESULT_TTL_SECS, STREAM_MAX_LEN, STREAM_TTL_SECS, flag_key, result_key,
    stream_key,
};
use grid_proto::wire::{Command, CommandResult, State, StreamRecord, level};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Pipeline};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Pause after a Redis error before reconnecting.
pub const BACKOFF: Duration = Duration::from_millis(200);
/// Seconds a `BLPOP` waits before the consumer checks for shutdown.
const POP_TIMEOUT_SECS: u64 = 1;
/// Attempts a publish makes before giving up (about 10 s with [`BACKOFF`]).
const PUBLISH_ATTEMPTS: u32 = 50;
/// Attempts of each last-resort step after a result could not be published.
const FALLBACK_ATTEMPTS: u32 = 5;
/// `MATCH` pattern of the flags, for the start-up sweep.
const FLAG_PATTERN: &str = "result:*:flag";
/// Keys `SCAN` looks at per call in the start-up sweep.
const SCAN_COUNT: usize = 1000;
/// Data (a JSON string) of the result published for a flag left by a previous core0.
pub const ORPHAN_DATA: &str = "core0 restarted while the job was running; its output is lost";
/// Data (a JSON string) of the result published when the real one could not be.
pub const UNPUBLISHED_DATA: &str = "core0 could not publish the job's result; it is lost";

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting to Redis failed.
    #[error("cannot connect to redis at {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// The client error.
        source: redis::RedisError,
    },
    /// A command failed.
    #[error("redis {what} failed: {source}")]
    Command {
        /// What was being done.
        what: String,
        /// The client error.
        source: redis::RedisError,
    },
    /// The value could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What.
        what: &'static str,
        /// The serializer error.
        source: serde_json::Error,
    },
}

fn addr_of(client: &Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// Opens a multiplexed connection whose requests time out after `response` (None = never).
pub async fn connect(
    client: &Client,
    response: Option<Duration>,
) -> Result<MultiplexedConnection, TransportError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|source| TransportError::Connect {
            addr: addr_of(client),
            source,
        })
}

/// Publishes on Redis; reconnects after an error and retries for about 10 s.
pub struct RedisPublisher {
    client: Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    attempts: u32,
}

impl RedisPublisher {
    /// A publisher for `client` (connects lazily).
    pub fn new(client: Client) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            attempts: PUBLISH_ATTEMPTS,
        }
    }

    /// The same publisher giving up after `attempts` tries (at least one) instead of ~10 s.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    async fn conn(&self) -> Result<MultiplexedConnection, TransportError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = connect(&self.client, Some(Duration::from_secs(5))).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `pipe`, retrying with a fresh connection on errors (about 10 s).
    pub async fn exec(&self, what: &str, pipe: &Pipeline) -> Result<(), TransportError> {
        self.exec_tries(what, pipe, self.attempts).await
    }

    async fn exec_tries(
        &self,
        what: &str,
        pipe: &Pipeline,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res =
                match self.conn().await {
                    Ok(mut c) => pipe.query_async::<()>(&mut c).await.map_err(|source| {
                        TransportError::Command {
                            what: what.to_string(),
                            source,
                        }
                    }),
                    Err(e) => Err(e),
                };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= attempts => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "redis publish failed, retrying");
                    *self.conn.lock().await = None;
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }

    /// `FLUSHALL` (safe reboot).
    pub async fn flushall(&self) -> Result<(), TransportError> {
        let mut p = redis::pipe();
        p.cmd("FLUSHALL").ignore();
        self.exec("flushall", &p).await
    }

    fn encode_result(r: &CommandResult) -> Result<String, String> {
        serde_json::to_string(r).map_err(|source| {
            TransportError::Encode {
                what: "result",
                source,
            }
            .to_string()
        })
    }

    async fn run(&self, what: &str, pipe: Pipeline) -> Result<(), String> {
        self.exec(what, &pipe).await.map_err(|e| e.to_string())
    }

    /// Publishes a final result; when that finally fails, makes sure the flag still gets its
    /// TTL (so clients do not wait for ever) and tries to leave a small `ERROR` result.
    async fn final_result(
        &self,
        what: &str,
        r: &CommandResult,
        replace: bool,
    ) -> Result<(), String> {
        let json = Self::encode_result(r)?;
        let sent = self.run(what, final_pipe(&r.id, &json, replace)).await;
        let Err(e) = sent else {
            return Ok(());
        };
        tracing::error!(
            id = %r.id,
            error = %e,
            "GIVING UP publishing the result of job {}: it is lost; ending its flag",
            r.id
        );
        // On its own: a transaction holding a push that Redis refuses (out of memory, say)
        // would be aborted as a whole.
        let mut p = redis::pipe();
        p.expire(flag_key(&r.id), RESULT_TTL_SECS).ignore();
        let fallback = FALLBACK_ATTEMPTS.min(self.attempts);
        if let Err(e2) = self.exec_tries("expire flag", &p, fallback).await {
            tracing::error!(id = %r.id, error = %e2, "cannot end the flag of job {} either", r.id);
        }
        let small = error_result(&r.id, &r.command, &r.tags, UNPUBLISHED_DATA);
        if let Ok(json) = Self::encode_result(&small)
            && let Err(e2) = self
                .exec_tries("fallback result", &final_pipe(&r.id, &json, true), fallback)
                .await
        {
            tracing::error!(id = %r.id, error = %e2, "cannot publish a fallback result either");
        }
        Err(e)
    }
}

/// The pipeline of a final result: the flag and the result get the 300 s TTL; `replace`
/// empties the result list first.
fn final_pipe(id: &str, json: &str, replace: bool) -> Pipeline {
    let key = result_key(id);
    let mut p = redis::pipe();
    p.atomic().expire(flag_key(id), RESULT_TTL_SECS).ignore();
    if replace {
        p.del(&key).ignore();
    }
    p.rpush(&key, json)
        .ignore()
        .expire(&key, RESULT_TTL_SECS)
        .ignore();
    p
}

/// An `ERROR` result with `text` as its data (a JSON string, level 20), empty streams and no
/// times.
pub fn error_result(id: &str, command: &str, tags: &str, text: &str) -> CommandResult {
    CommandResult {
        id: id.to_string(),
        command: command.to_string(),
        data: serde_json::Value::String(text.to_string()).to_string(),
        streams: Some([String::new(), String::new()]),
        critical: String::new(),
        level: level::RESULT_JSON,
        state: State::Error,
        starttime: 0,
        time: 0,
        tags: tags.to_string(),
        container: 0,
        code: None,
    }
}

/// Ends every flag that still has no TTL (`result:<id>:flag` with TTL -1): at start-up the
/// job table is empty, so such a flag belongs to a job of a previous core0 whose result will
/// never come. Each gets an `ERROR` result ([`ORPHAN_DATA`]) and the usual 300 s TTLs.
/// Walks the keys with `SCAN` (never `KEYS`). Ids for which `ours` holds (jobs this core0
/// already runs) are left alone. Returns the ids it ended.
pub async fn end_orphaned_flags(
    conn: &mut MultiplexedConnection,
    ours: impl Fn(&str) -> bool,
) -> Result<Vec<String>, TransportError> {
    let failed = |what: &str| {
        let what = what.to_string();
        move |source| TransportError::Command { what, source }
    };
    let mut cursor: u64 = 0;
    let mut ended = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(FLAG_PATTERN)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await
            .map_err(failed("scan flags"))?;
        for key in keys {
            let Some(id) = key
                .strip_prefix("result:")
                .and_then(|k| k.strip_suffix(":flag"))
            else {
                continue;
            };
            if ours(id) {
                continue;
            }
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(conn)
                .await
                .map_err(failed("ttl of a flag"))?;
            if ttl != -1 {
                continue;
            }
            let r = error_result(id, "", "", ORPHAN_DATA);
            let json = serde_json::to_string(&r).map_err(|source| TransportError::Encode {
                what: "result",
                source,
            })?;
            final_pipe(id, &json, true)
                .query_async::<()>(conn)
                .await
                .map_err(failed("orphaned flag result"))?;
            tracing::warn!(id, "job of a previous core0 had no result: published ERROR");
            ended.push(id.to_string());
        }
        cursor = next;
        if cursor == 0 {
            return Ok(ended);
        }
    }
}

impl Publish for RedisPublisher {
    fn flag<'a>(&'a self, id: &'a str) -> PublishFuture<'a> {
        Box::pin(async move {
            let flag = flag_key(id);
            let mut p = redis::pipe();
            p.atomic()
                .del(result_key(id))
                .ignore()
                .del(&flag)
                .ignore()
                .rpush(&flag, "")
                .ignore();
            self.run("flag", p).await
        })
    }

    fn result<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move { self.final_result("result", r, false).await })
    }

    fn replace_result<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move { self.final_result("replace result", r, true).await })
    }

    fn duplicate<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move {
            let json = Self::encode_result(r)?;
            let key = result_key(&r.id);
            let mut p = redis::pipe();
            p.atomic()
                .rpush(&key, json)
                .ignore()
                .expire(&key, RESULT_TTL_SECS)
                .ignore();
            self.run("duplicate result", p).await
        })
    }

    fn stream<'a>(&'a self, id: &'a str, records: &'a [StreamRecord]) -> PublishFuture<'a> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let items = records
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| {
                    TransportError::Encode {
                        what: "stream record",
                        source,
                    }
                    .to_string()
                })?;
            let key = stream_key(id);
            let mut p = redis::pipe();
            p.atomic()
                .rpush(&key, items)
                .ignore()
                .ltrim(&key, -STREAM_MAX_LEN, -1)
                .ignore()
                .expire(&key, STREAM_TTL_SECS)
                .ignore();
            self.run("stream push", p).await
        })
    }
}

/// Pops commands from `core:default` until `stop` turns true, submitting each to `jobs`.
/// `ready` is told once the first connection is up and the flags a previous core0 left
/// running have been ended ([`end_orphaned_flags`]). Redis errors are logged and retried.
pub async fn consume(
    client: Client,
    jobs: Arc<JobManager>,
    stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    consume_with(client, jobs, Arc::new(|_: &str| false), stop, ready).await;
}

/// Job ids that run outside the [`JobManager`] (in containers) and whose flags the start-up
/// sweep leaves alone.
pub type Ours = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// [`consume`], with `ours` telling which other job ids this core0 runs.
pub async fn consume_with(
    client: Client,
    jobs: Arc<JobManager>,
    ours: Ours,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut ready = ready;
    let mut conn: Option<MultiplexedConnection> = None;
    let mut swept = false;
    while !*stop.borrow() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                // The pop blocks for up to POP_TIMEOUT_SECS: give the answer time to arrive.
                match connect(&client, Some(Duration::from_secs(POP_TIMEOUT_SECS + 5))).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer cannot connect");
                        backoff(&mut stop).await;
                        continue;
                    }
                }
            }
        };
        if !swept {
            match end_orphaned_flags(c, |id| jobs.contains(id) || ours(id)).await {
                Ok(ids) => {
                    if !ids.is_empty() {
                        tracing::warn!(
                            count = ids.len(),
                            "ended flags of jobs lost in a core0 restart"
                        );
                    }
                    swept = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sweep orphaned flags, retrying");
                    conn = None;
                    backoff(&mut stop).await;
                    continue;
                }
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        let popped: Result<Option<(String, String)>, _> = redis::cmd("BLPOP")
            .arg(QUEUE_DEFAULT)
            .arg(POP_TIMEOUT_SECS)
            .query_async(c)
            .await;
        match popped {
            Ok(None) => {}
            Ok(Some((_, text))) => {
                submit_text(&jobs, &text).await;
                // Under load more commands wait behind this one: take up to a batch of them in
                // one round trip (in order) rather than one BLPOP each.
                let more: Result<Option<Vec<String>>, _> = redis::cmd("LPOP")
                    .arg(QUEUE_DEFAULT)
                    .arg(POP_BATCH)
                    .query_async(c)
                    .await;
                match more {
                    Ok(batch) => {
                        for text in batch.unwrap_or_default() {
                            submit_text(&jobs, &text).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer pop failed, reconnecting");
                        conn = None;
                        backoff(&mut stop).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer pop failed, reconnecting");
                conn = None;
                backoff(&mut stop).await;
            }
        }
    }
    tracing::info!("consumer stopped");
}

/// Commands taken from `core:default` in one round trip when more are waiting.
const POP_BATCH: usize = 64;

/// Decodes one queued command and hands it to the job manager (an undecodable one is dropped).
async fn submit_text(jobs: &JobManager, text: &str) {
    match serde_json::from_str::<Command>(text) {
        Ok(cmd) => {
            jobs.submit(cmd).await;
        }
        Err(e) => {
            let shown: String = text.chars().take(200).collect();
            tracing::warn!(error = %e, command = %shown, "dropping undecodable command");
        }
    }
}

async fn backoff(stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(BACKOFF) => {}
        _ = stop.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::AsyncCommands;

    /// A redis-server on a free port, killed on drop.
    struct Redis {
        child: std::process::Child,
        client: Client,
    }

    impl Redis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = std::process::Command::new("/usr/bin/redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start redis-server");
            let client = Client::open(format!("redis://127.0.0.1:{port}")).expect("redis url");
            let r = Redis { child, client };
            let until = std::time::Instant::now() + Duration::from_secs(5);
            // Readiness poll: the server answers PING once it is up.
            while r
                .client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(
                    std::time::Instant::now() < until,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            r
        }

        async fn conn(&self) -> MultiplexedConnection {
            connect(&self.client, Some(Duration::from_secs(5)))
                .await
                .expect("connect")
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn orphaned_flags_get_an_error_result() {
        let redis = Redis::start();
        let mut c = redis.conn().await;
        // More orphans than one SCAN call returns, a finished job, and an orphan that got a
        // DUPILICATE_ID result pushed.
        for i in 0..1500 {
            let _: i64 = c
                .rpush(flag_key(&format!("o{i}")), "")
                .await
                .expect("rpush");
        }
        let _: i64 = c.rpush(flag_key("done"), "").await.expect("rpush");
        let _: bool = c.expire(flag_key("done"), 100).await.expect("expire");
        let _: i64 = c.rpush(flag_key("dup"), "").await.expect("rpush");
        let _: i64 = c.rpush(result_key("dup"), "{}").await.expect("rpush");

        let _: i64 = c.rpush(flag_key("mine"), "").await.expect("rpush");
        let mut ended = end_orphaned_flags(&mut c, |id| id == "mine")
            .await
            .expect("sweep");
        ended.sort();
        assert_eq!(ended.len(), 1501);
        assert!(ended.contains(&"dup".to_string()) && !ended.contains(&"done".to_string()));

        let items: Vec<String> = c.lrange(result_key("dup"), 0, -1).await.expect("lrange");
        assert_eq!(items.len(), 1, "the result list is replaced");
        let r: CommandResult = serde_json::from_str(&items[0]).expect("result json");
        assert_eq!((r.id.as_str(), r.state, r.level), ("dup", State::Error, 20));
        assert_eq!(r.json_data::<String>().expect("json string"), ORPHAN_DATA);
        assert_eq!(r.streams, Some([String::new(), String::new()]));
        assert_eq!(r.starttime, 0);
        for key in [flag_key("o7"), result_key("o7"), flag_key("dup")] {
            let ttl: i64 = c.ttl(&key).await.expect("ttl");
            assert!(ttl > 290 && ttl <= 300, "{key} ttl {ttl}");
        }
        let ttl: i64 = c.ttl(flag_key("done")).await.expect("ttl");
        assert!(ttl <= 100, "a finished job's flag is left alone");
        let exists: bool = c.exists(result_key("done")).await.expect("exists");
        assert!(!exists);
        let ttl: i64 = c.ttl(flag_key("mine")).await.expect("ttl");
        assert_eq!(ttl, -1, "a job of this core0 is left alone");
        assert!(
            end_orphaned_flags(&mut c, |id| id == "mine")
                .await
                .expect("sweep")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_result_redis_refuses_still_ends_the_flag() {
        let redis = Redis::start();
        let mut c = redis.conn().await;
        let publisher = RedisPublisher::new(redis.client.clone()).with_attempts(2);
        publisher.flag("big").await.expect("flag");
        // Every command that may grow memory is now refused (out of memory); EXPIRE is not.
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(1)
            .query_async(&mut c)
            .await
            .expect("config set");
        let r = error_result("big", "bash", "", "x");
        assert!(publisher.result(&r).await.is_err());
        let ttl: i64 = c.ttl(flag_key("big")).await.expect("ttl");
        assert!(ttl > 290 && ttl <= 300, "flag ttl {ttl}");
    }
}
