//! The Redis side of the protocol: [`RedisPublisher`] writes flags, results and live output;
//! [`consume`] pops Commands from `core:default` on a dedicated connection and hands them to the
//! [`JobManager`].

use crate::jobs::{JobManager, Publish, PublishFuture};
use grid_proto::commands::{
    QUEUE_DEFAULT, RESULT_TTL_SECS, STREAM_MAX_LEN, STREAM_TTL_SECS, flag_key, result_key,
    stream_key,
};
use grid_proto::wire::{Command, CommandResult, StreamRecord};
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
}

impl RedisPublisher {
    /// A publisher for `client` (connects lazily).
    pub fn new(client: Client) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
        }
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

    /// Runs `pipe`, retrying with a fresh connection on errors.
    pub async fn exec(&self, what: &str, pipe: &Pipeline) -> Result<(), TransportError> {
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
                Err(e) if attempt >= PUBLISH_ATTEMPTS => return Err(e),
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
        Box::pin(async move {
            let json = Self::encode_result(r)?;
            let key = result_key(&r.id);
            let mut p = redis::pipe();
            p.atomic()
                .expire(flag_key(&r.id), RESULT_TTL_SECS)
                .ignore()
                .rpush(&key, json)
                .ignore()
                .expire(&key, RESULT_TTL_SECS)
                .ignore();
            self.run("result", p).await
        })
    }

    fn replace_result<'a>(&'a self, r: &'a CommandResult) -> PublishFuture<'a> {
        Box::pin(async move {
            let json = Self::encode_result(r)?;
            let key = result_key(&r.id);
            let mut p = redis::pipe();
            p.atomic()
                .expire(flag_key(&r.id), RESULT_TTL_SECS)
                .ignore()
                .del(&key)
                .ignore()
                .rpush(&key, json)
                .ignore()
                .expire(&key, RESULT_TTL_SECS)
                .ignore();
            self.run("replace result", p).await
        })
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
/// `ready` is told once the first connection is up. Redis errors are logged and retried.
pub async fn consume(
    client: Client,
    jobs: Arc<JobManager>,
    mut stop: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut ready = ready;
    let mut conn: Option<MultiplexedConnection> = None;
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
            Ok(Some((_, text))) => match serde_json::from_str::<Command>(&text) {
                Ok(cmd) => {
                    jobs.submit(cmd).await;
                }
                Err(e) => {
                    let shown: String = text.chars().take(200).collect();
                    tracing::warn!(error = %e, command = %shown, "dropping undecodable command");
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "consumer pop failed, reconnecting");
                conn = None;
                backoff(&mut stop).await;
            }
        }
    }
    tracing::info!("consumer stopped");
}

async fn backoff(stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(BACKOFF) => {}
        _ = stop.changed() => {}
    }
}
