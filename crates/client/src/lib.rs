//! Client of the core0 command protocol over Redis.
//!
//! One [`NodeClient`] per node: it pushes [`Command`]s on `core:default`, waits for
//! `result:<id>` without consuming it (`BRPOPLPUSH` onto itself), and reads `stream:<id>`.
//! A caller that gives up before the node took its command removes it again (`LREM`), and every
//! command carries a `deadline`, so a command never runs late on a node that comes back.
//! Used by grid-api, the integration tests and the benchmarks.

use grid_proto::commands::{QUEUE_DEFAULT, flag_key, result_key, stream_key};
use grid_proto::{Command, CommandResult, State, StreamRecord};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node's Redis cannot be reached or refused the connection.
    #[error("node redis at {addr} is unreachable: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Cause.
        source: redis::RedisError,
    },
    /// A Redis command failed.
    #[error("redis error on {addr}: {source}")]
    Redis {
        /// `host:port`.
        addr: String,
        /// Cause.
        source: redis::RedisError,
    },
    /// The node did not take the command in time (its agent is not consuming): it was withdrawn.
    #[error("node did not pick up {command} within {waited:?}")]
    NotPickedUp {
        /// Command name.
        command: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The node took the command but did not finish it in time.
    #[error("node did not finish {command} within {waited:?}")]
    Timeout {
        /// Command name.
        command: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The node answered with something that is not a Result.
    #[error("node sent an unreadable result for {id}: {source}")]
    BadResult {
        /// Job id.
        id: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The node's Redis did not answer a blocking command within its wait plus
    /// [`BLOCKING_SLACK`] (the host vanished, or its network did): the connection was dropped.
    #[error("node redis at {addr} did not answer {command} within {waited:?}")]
    Unresponsive {
        /// `host:port`.
        addr: String,
        /// The Redis command, e.g. `BRPOPLPUSH`.
        command: &'static str,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A built-in command failed on the node.
    #[error("{command} failed on the node: {message}")]
    Failed {
        /// Command name.
        command: String,
        /// The node's error text.
        message: String,
        /// The result state.
        state: State,
    },
    /// The command could not be encoded.
    #[error("cannot encode command: {0}")]
    Encode(serde_json::Error),
}

/// A connection to one node's Redis.
#[derive(Clone)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    client: redis::Client,
    conn: MultiplexedConnection,
    /// Connections for blocking commands: each waiter takes one for itself.
    idle: Mutex<Vec<MultiplexedConnection>>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

/// Idle blocking connections kept per node.
const MAX_IDLE: usize = 128;

/// How much longer than its own wait a blocking command may take before the node counts as
/// gone: without it, a host that lost power mid-`BLPOP` holds the caller until TCP gives up.
pub const BLOCKING_SLACK: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn redis_url(addr: &str, password: Option<&str>) -> String {
    match password {
        Some(pw) if !pw.is_empty() => {
            // The password goes into the URL's userinfo: percent-encode everything but unreserved.
            let enc: String = pw
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("redis://:{enc}@{addr}/")
        }
        _ => format!("redis://{addr}/"),
    }
}

/// Connections for blocking commands: the wait is bounded by [`NodeClient::blocking`] itself.
fn blocking_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(None)
}

impl NodeClient {
    /// Connects to a node's Redis at `host:port` (AUTH with `password` when given).
    pub async fn connect(addr: &str, password: Option<&str>) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let client = redis::Client::open(redis_url(addr, password)).map_err(connect_err)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        // The first call needs a connection for its blocking wait too: open it alongside.
        let waiter_config = blocking_config();
        let (conn, waiter) = tokio::join!(
            client.get_multiplexed_async_connection_with_config(&config),
            client.get_multiplexed_async_connection_with_config(&waiter_config),
        );
        let conn = conn.map_err(connect_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                client,
                conn,
                idle: Mutex::new(waiter.into_iter().collect()),
            }),
        })
    }

    /// `host:port` of the node's Redis.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    fn redis_err(&self, source: redis::RedisError) -> ClientError {
        ClientError::Redis {
            addr: self.inner.addr.clone(),
            source,
        }
    }

    /// A connection for non-blocking commands (shared, pipelined).
    pub fn connection(&self) -> MultiplexedConnection {
        self.inner.conn.clone()
    }

    async fn take_blocking(&self) -> Result<MultiplexedConnection, ClientError> {
        let pooled = self.inner.idle.lock().ok().and_then(|mut v| v.pop());
        if let Some(c) = pooled {
            return Ok(c);
        }
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&blocking_config())
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.inner.addr.clone(),
                source,
            })
    }

    fn give_back(&self, conn: MultiplexedConnection) {
        if let Ok(mut idle) = self.inner.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
    }

    /// Runs blocking command `name` with `keys` and a server-side wait of `wait` on a connection
    /// of its own. The answer must come within `wait` + [`BLOCKING_SLACK`]; otherwise the
    /// connection is dropped (never pooled again) and [`ClientError::Unresponsive`] returned.
    async fn blocking<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        keys: &[&str],
        wait: Duration,
    ) -> Result<T, ClientError> {
        let mut conn = self.take_blocking().await?;
        let mut cmd = redis::cmd(name);
        for k in keys {
            cmd.arg(*k);
        }
        cmd.arg(wait.as_secs_f64().max(0.01));
        let limit = wait.saturating_add(BLOCKING_SLACK);
        match tokio::time::timeout(limit, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.give_back(conn);
                Ok(v)
            }
            // A connection that failed is not reused either.
            Ok(Err(e)) => Err(self.redis_err(e)),
            Err(_) => {
                tracing::warn!(addr = %self.inner.addr, command = name, ?limit, "node redis does not answer, dropping the connection");
                Err(ClientError::Unresponsive {
                    addr: self.inner.addr.clone(),
                    command: name,
                    waited: limit,
                })
            }
        }
    }

    /// Pushes `cmd` on `core:default` as it is.
    pub async fn push(&self, cmd: &Command) -> Result<String, ClientError> {
        let text = serde_json::to_string(cmd).map_err(ClientError::Encode)?;
        let mut conn = self.connection();
        let _: i64 = conn
            .rpush(QUEUE_DEFAULT, &text)
            .await
            .map_err(|e| self.redis_err(e))?;
        Ok(text)
    }

    /// Runs `command` with `args` and returns its result, whatever its state.
    ///
    /// The command carries a deadline of now + `timeout`. When the node did not take it in time it
    /// is withdrawn from the queue ([`ClientError::NotPickedUp`]); when the node took it but did
    /// not finish, [`ClientError::Timeout`].
    pub async fn call(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<CommandResult, ClientError> {
        let mut cmd = Command::new(uuid::Uuid::new_v4().to_string(), command, args);
        self.run(&mut cmd, timeout).await
    }

    /// Like [`NodeClient::call`] for a prepared command (its id is kept; a deadline is set).
    pub async fn run(
        &self,
        cmd: &mut Command,
        timeout: Duration,
    ) -> Result<CommandResult, ClientError> {
        let deadline = now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        cmd.deadline = Some(cmd.deadline.map_or(deadline, |d| d.min(deadline)));
        let text = self.push(cmd).await?;
        match self.wait_result(&cmd.id, timeout).await? {
            Some(r) => Ok(r),
            None => Err(self.give_up(cmd, &text, timeout).await),
        }
    }

    /// Runs a built-in and decodes its JSON data; any state but `SUCCESS` is an error.
    pub async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let r = self.call(command, args, timeout).await?;
        if r.state != State::Success {
            let message = serde_json::from_str::<String>(&r.data).unwrap_or(r.data.clone());
            return Err(ClientError::Failed {
                command: command.to_string(),
                message,
                state: r.state,
            });
        }
        r.json_data()
            .map_err(|source| ClientError::BadResult { id: r.id, source })
    }

    /// Pushes a command and waits until the node has accepted it (its flag exists).
    ///
    /// Returns the job id. When the node does not take it within `accept_timeout`, the command is
    /// withdrawn and [`ClientError::NotPickedUp`] returned.
    pub async fn spawn(
        &self,
        cmd: &Command,
        accept_timeout: Duration,
    ) -> Result<String, ClientError> {
        let mut cmd = cmd.clone();
        let deadline = now_ms() + u64::try_from(accept_timeout.as_millis()).unwrap_or(u64::MAX);
        cmd.deadline = Some(cmd.deadline.map_or(deadline, |d| d.min(deadline)));
        let text = self.push(&cmd).await?;
        let flag = flag_key(&cmd.id);
        let got: Option<String> = self
            .blocking("BRPOPLPUSH", &[&flag, &flag], accept_timeout)
            .await?;
        match got {
            Some(_) => Ok(cmd.id.clone()),
            None => Err(self.give_up(&cmd, &text, accept_timeout).await),
        }
    }

    /// Decides why a wait ended empty: withdraws a command still queued.
    async fn give_up(&self, cmd: &Command, text: &str, waited: Duration) -> ClientError {
        let mut conn = self.connection();
        let removed: Result<i64, _> = conn.lrem(QUEUE_DEFAULT, 1, text).await;
        match removed {
            Ok(n) if n > 0 => ClientError::NotPickedUp {
                command: cmd.command.clone(),
                waited,
            },
            Ok(_) => ClientError::Timeout {
                command: cmd.command.clone(),
                waited,
            },
            Err(e) => self.redis_err(e),
        }
    }

    /// Waits up to `timeout` for the result of job `id`, leaving it in place for other readers.
    pub async fn wait_result(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<CommandResult>, ClientError> {
        let key = result_key(id);
        let got: Option<String> = self.blocking("BRPOPLPUSH", &[&key, &key], timeout).await?;
        got.map(|text| self.decode(id, &text)).transpose()
    }

    /// The result of job `id` if there is one now (the newest element of `result:<id>`).
    pub async fn result_now(&self, id: &str) -> Result<Option<CommandResult>, ClientError> {
        let mut conn = self.connection();
        let got: Option<String> = conn
            .lindex(result_key(id), -1)
            .await
            .map_err(|e| self.redis_err(e))?;
        got.map(|text| self.decode(id, &text)).transpose()
    }

    /// Whether job `id` is known and still running: its flag exists and has no TTL yet.
    pub async fn is_running(&self, id: &str) -> Result<bool, ClientError> {
        let mut conn = self.connection();
        let ttl: i64 = conn
            .ttl(flag_key(id))
            .await
            .map_err(|e| self.redis_err(e))?;
        Ok(ttl == -1)
    }

    /// Pops the next live-output record of job `id`, waiting up to `timeout`.
    pub async fn next_stream_record(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<StreamRecord>, ClientError> {
        let got: Option<(String, String)> =
            self.blocking("BLPOP", &[&stream_key(id)], timeout).await?;
        match got {
            None => Ok(None),
            Some((_, text)) => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|source| ClientError::BadResult {
                        id: id.to_string(),
                        source,
                    })
            }
        }
    }

    fn decode(&self, id: &str, text: &str) -> Result<CommandResult, ClientError> {
        serde_json::from_str(text).map_err(|source| ClientError::BadResult {
            id: id.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command as Process, Stdio};

    /// A real redis-server on a free port, stopped (and thawed first) on drop.
    struct Redis {
        child: Child,
        addr: String,
    }

    impl Redis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Process::new("/usr/bin/redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start /usr/bin/redis-server");
            let out = child.stdout.take().expect("stdout is piped");
            let mut lines = BufReader::new(out).lines();
            let ready = lines
                .by_ref()
                .map_while(Result::ok)
                .any(|l| l.contains("Ready to accept connections"));
            // Keep draining so the server never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            let redis = Self {
                child,
                addr: format!("127.0.0.1:{port}"),
            };
            assert!(ready, "redis-server exited before it was ready");
            redis
        }

        /// Sends `sig` (a `kill` signal name) to the server.
        fn signal(&self, sig: &str) {
            let status = Process::new("kill")
                .arg(format!("-{sig}"))
                .arg(self.child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{sig} failed");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = Process::new("kill")
                .arg("-CONT")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn idle(client: &NodeClient) -> usize {
        client
            .inner
            .idle
            .lock()
            .expect("idle lock is never poisoned in tests")
            .len()
    }

    #[tokio::test]
    async fn a_frozen_node_ends_blocking_waits_and_drops_the_connection() {
        let redis = Redis::start();
        let client = NodeClient::connect(&redis.addr, None)
            .await
            .expect("connect");
        // A wait that ends normally gives its connection back to the pool.
        let got = client
            .wait_result("j1", Duration::from_millis(10))
            .await
            .expect("empty wait");
        assert!(got.is_none());
        assert_eq!(idle(&client), 1);

        // Stopped, the server neither answers nor closes: a host that lost its power.
        redis.signal("STOP");
        let started = std::time::Instant::now();
        let err = client
            .wait_result("j1", Duration::from_millis(200))
            .await
            .expect_err("a frozen node cannot answer");
        let took = started.elapsed();
        assert!(
            matches!(
                err,
                ClientError::Unresponsive {
                    command: "BRPOPLPUSH",
                    ..
                }
            ),
            "unexpected error: {err}"
        );
        assert!(took >= BLOCKING_SLACK, "gave up too early: {took:?}");
        assert!(took < BLOCKING_SLACK * 3, "gave up too late: {took:?}");
        assert_eq!(
            idle(&client),
            0,
            "the dead connection went back to the pool"
        );
    }

    #[test]
    fn password_is_percent_encoded_in_url() {
        assert_eq!(redis_url("127.0.0.1:6379", None), "redis://127.0.0.1:6379/");
        assert_eq!(
            redis_url("h:1", Some("a b/@c")),
            "redis://:a%20b%2F%40c@h:1/"
        );
    }
}
