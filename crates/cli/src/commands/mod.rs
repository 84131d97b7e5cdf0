//! The client subcommands: each one calls the API and prints a table (or the raw JSON with
//! `--json`).

pub mod containers;
pub mod jobs;
pub mod nodes;

use crate::api_client::{ApiClient, ApiError};
use serde::de::DeserializeOwned;
use std::io::Write;

/// What can go wrong in a client subcommand.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The API call failed (its error already names the request or carries the HTTP status).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Writing to our stdout or stderr failed.
    #[error("cannot write to {stream}")]
    Write {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A local file could not be read or written.
    #[error("cannot use local file {path}")]
    Local {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// The answer to starting a process named no job.
    #[error("the answer to POST {path} names no job (no Location header and no id in the body)")]
    NoJobId {
        /// The request path.
        path: String,
    },
    /// The output stream ended without an `exit` event and the job is still running.
    #[error("the output stream of job {job} on node {node} ended before the job did")]
    StreamEnded {
        /// Node id.
        node: String,
        /// Job id.
        job: String,
    },
    /// The `exit` event's data is not `{"state": ..., "code": ...}`.
    #[error("bad exit event from job {job}: {data:?}")]
    BadExitEvent {
        /// Job id.
        job: String,
        /// The event data.
        data: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// What every client subcommand needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The API client.
    pub client: ApiClient,
    /// Print raw JSON instead of tables.
    pub json: bool,
}

impl Ctx {
    /// `GET path`: with `--json` prints the answer pretty and returns `None`; otherwise decodes it.
    pub async fn get_or_print<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, CommandError> {
        let bytes = self.client.get_bytes(path).await?;
        if self.json {
            let value: serde_json::Value =
                self.client.decode(reqwest::Method::GET, path, &bytes)?;
            print_json(&value)?;
            return Ok(None);
        }
        Ok(Some(self.client.decode(
            reqwest::Method::GET,
            path,
            &bytes,
        )?))
    }
}

/// Prints a JSON value, pretty, on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    println_out(&text)
}

/// Prints a line on stdout, reporting a write failure (a closed pipe) as an error.
pub fn println_out(text: &str) -> Result<(), CommandError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|source| CommandError::Write {
            stream: "stdout",
            source,
        })
}
