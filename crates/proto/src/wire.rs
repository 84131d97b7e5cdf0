//! The core0 wire format: Command (client → node), Result (node → client), job states and the
//! live-output records of `stream:<id>`. Spellings are the original ones, including the
//! `DUPILICATE_ID` state.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A command as pushed on `core:default` (or dispatched into a container).
///
/// Unknown fields are ignored so that any client of the 2017 protocol can talk to core0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Command {
    /// Job id, unique among running jobs. An empty id makes core0 drop the command.
    #[serde(default)]
    pub id: String,
    /// Command name, e.g. `core.system`.
    #[serde(default)]
    pub command: String,
    /// Arguments, decoded by the handler.
    #[serde(default)]
    pub arguments: Value,
    /// Named FIFO: jobs in one queue run one at a time, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Declared by the original protocol and ignored.
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub stats_interval: u64,
    /// Seconds before the job is killed with state `TIMEOUT`; 0 = no limit.
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub max_time: u64,
    /// Runs in total on a non-`SUCCESS` exit (restarted after 1 s); 0 = no restart.
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub max_restart: u64,
    /// Seconds between the end of one run and the start of the next; 0 = run once.
    #[serde(
        default,
        skip_serializing_if = "is_zero",
        deserialize_with = "null_as_default"
    )]
    pub recurring_period: u64,
    /// Push live output records on `stream:<id>`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// Per-command log filter (kept for compatibility, unused).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub log_levels: Vec<i64>,
    /// Free text copied into the result.
    #[serde(default, deserialize_with = "tags_as_string")]
    pub tags: String,
    /// Grid extension: ms since the epoch after which core0 drops the command unrun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Tags are a free string in 2017, a list of strings in later clients: accept both.
fn tags_as_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tags {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Tags>::deserialize(d)? {
        None => String::new(),
        Some(Tags::One(s)) => s,
        Some(Tags::Many(v)) => v.join(","),
    })
}

impl Command {
    /// A command with the given id, name and arguments and every option at its default.
    pub fn new(id: impl Into<String>, command: impl Into<String>, arguments: Value) -> Self {
        Self {
            id: id.into(),
            command: command.into(),
            arguments,
            ..Self::default()
        }
    }
}

/// The state of a job. Serialized as the original's uppercase wire strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Exit status 0, or the built-in returned no error.
    #[serde(rename = "SUCCESS")]
    Success,
    /// Non-zero exit, handler error, spawn failure.
    #[serde(rename = "ERROR")]
    Error,
    /// `max_time` exceeded; the process group got SIGKILL.
    #[serde(rename = "TIMEOUT")]
    Timeout,
    /// Ended by `job.kill`, `job.killall` and the like.
    #[serde(rename = "KILLED")]
    Killed,
    /// No handler for that command name.
    #[serde(rename = "UNKNOWN_CMD")]
    UnknownCmd,
    /// A job with that id is still running (misspelt as on the original wire).
    #[serde(rename = "DUPILICATE_ID")]
    DuplicateId,
    /// Still running: never on the core0 wire, used by the API for a listed job.
    #[serde(rename = "RUNNING")]
    Running,
}

impl State {
    /// The API's lowercase spelling (RAML): `success`, `error`, …, `duplicate_id`, `running`.
    pub fn api_str(self) -> &'static str {
        match self {
            State::Success => "success",
            State::Error => "error",
            State::Timeout => "timeout",
            State::Killed => "killed",
            State::UnknownCmd => "unknown_cmd",
            State::DuplicateId => "duplicate_id",
            State::Running => "running",
        }
    }
}

/// Result levels of messages (the `N::` output protocol).
pub mod level {
    /// A line of stdout.
    pub const STDOUT: u16 = 1;
    /// A line of stderr.
    pub const STDERR: u16 = 2;
    /// Critical message: becomes the result's `critical`.
    pub const CRITICAL: u16 = 9;
    /// A statsd metric line.
    pub const STATS: u16 = 10;
    /// JSON result data.
    pub const RESULT_JSON: u16 = 20;
    /// YAML result data.
    pub const RESULT_YAML: u16 = 21;
    /// TOML result data.
    pub const RESULT_TOML: u16 = 22;
    /// Human-readable result data.
    pub const RESULT_HRD: u16 = 23;
    /// Full job JSON.
    pub const RESULT_JOB: u16 = 30;

    /// Whether a level carries result data (20–23, 30).
    pub fn is_result(level: u16) -> bool {
        matches!(level, 20..=23 | 30)
    }
}

/// A job's result, pushed on `result:<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Job id.
    pub id: String,
    /// Command name.
    #[serde(default)]
    pub command: String,
    /// Payload: JSON text for built-ins (level 20), the last result-level message of a process.
    #[serde(default)]
    pub data: String,
    /// `[stdout, stderr]`, the last 1000 lines each, every line ending in `\n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<[String; 2]>,
    /// Last level-9 line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub critical: String,
    /// Level of `data` (20 = JSON); 0 when there is none.
    #[serde(default)]
    pub level: u16,
    /// Final state.
    pub state: State,
    /// Start of the last run, ms since the epoch.
    #[serde(default)]
    pub starttime: i64,
    /// Duration of the last run, ms.
    #[serde(default)]
    pub time: i64,
    /// Copied from the command.
    #[serde(default, deserialize_with = "tags_as_string")]
    pub tags: String,
    /// 0 for host jobs, the container id for dispatched jobs.
    #[serde(default)]
    pub container: u64,
    /// Grid extension: exit status of a process job (absent for built-ins and signals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

impl CommandResult {
    /// A result carrying only a state (as for `UNKNOWN_CMD`), with no output.
    pub fn bare(cmd: &Command, state: State) -> Self {
        Self {
            id: cmd.id.clone(),
            command: cmd.command.clone(),
            data: String::new(),
            streams: None,
            critical: String::new(),
            level: 0,
            state,
            starttime: 0,
            time: 0,
            tags: cmd.tags.clone(),
            container: 0,
            code: None,
        }
    }

    /// Decodes `data` as JSON when `level` is 20.
    pub fn json_data<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.data)
    }

    /// stdout (`streams[0]`), or "".
    pub fn stdout(&self) -> &str {
        self.streams.as_ref().map(|s| s[0].as_str()).unwrap_or("")
    }

    /// stderr (`streams[1]`), or "".
    pub fn stderr(&self) -> &str {
        self.streams.as_ref().map(|s| s[1].as_str()).unwrap_or("")
    }
}

/// Flags in the low 16 bits of a stream message's `meta`.
pub mod meta {
    /// The message belongs to a streamed job.
    pub const STREAM: u32 = 0x1;
    /// End of stream: the job succeeded.
    pub const EXIT_SUCCESS: u32 = 0x2;
    /// End of stream: the job failed.
    pub const EXIT_ERROR: u32 = 0x4;

    /// `level << 16 | flags`.
    pub fn pack(level: u16, flags: u32) -> u32 {
        (u32::from(level) << 16) | (flags & 0xffff)
    }

    /// The level part of a meta value.
    pub fn level(meta: u32) -> u16 {
        // The shift leaves at most 16 bits.
        (meta >> 16) as u16
    }
}

/// One message of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMessage {
    /// The line, without its newline.
    pub message: String,
    /// Unix time in ns.
    pub epoch: i64,
    /// `level << 16 | flags` ([`meta`]).
    pub meta: u32,
}

impl StreamMessage {
    /// The level of the message.
    pub fn level(&self) -> u16 {
        meta::level(self.meta)
    }

    /// Whether this is the end-of-stream marker.
    pub fn is_exit(&self) -> bool {
        self.meta & (meta::EXIT_SUCCESS | meta::EXIT_ERROR) != 0
    }
}

/// An entry of `stream:<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// 0 for the host, the container id otherwise.
    pub core: u64,
    /// The job id.
    pub command: String,
    /// The message.
    pub message: StreamMessage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_accepts_python_client_nulls() {
        let c: Command = serde_json::from_value(json!({
            "id": "a", "command": "core.ping", "arguments": {}, "queue": null,
            "max_time": null, "stream": false, "tags": null, "extra": 1
        }))
        .expect("python shape");
        assert_eq!(c.max_time, 0);
        assert_eq!(c.queue, None);
        assert_eq!(c.tags, "");
    }

    #[test]
    fn command_accepts_tag_lists() {
        let c: Command =
            serde_json::from_value(json!({"id": "a", "command": "x", "tags": ["a", "b"]}))
                .expect("tag list");
        assert_eq!(c.tags, "a,b");
    }

    #[test]
    fn states_keep_wire_spelling() {
        assert_eq!(
            serde_json::to_string(&State::DuplicateId).expect("serialize"),
            "\"DUPILICATE_ID\""
        );
        assert_eq!(State::DuplicateId.api_str(), "duplicate_id");
        let s: State = serde_json::from_str("\"UNKNOWN_CMD\"").expect("parse");
        assert_eq!(s, State::UnknownCmd);
    }

    #[test]
    fn meta_packs_level_and_flags() {
        let m = meta::pack(level::STDERR, meta::STREAM | meta::EXIT_ERROR);
        assert_eq!(meta::level(m), 2);
        let msg = StreamMessage {
            message: String::new(),
            epoch: 0,
            meta: m,
        };
        assert!(msg.is_exit());
    }

    #[test]
    fn result_round_trips_with_code() {
        let r = CommandResult {
            code: Some(3),
            streams: Some(["a\n".into(), String::new()]),
            ..CommandResult::bare(&Command::new("j", "core.system", json!({})), State::Error)
        };
        let text = serde_json::to_string(&r).expect("serialize");
        let back: CommandResult = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, r);
        assert_eq!(back.stdout(), "a\n");
    }
}
