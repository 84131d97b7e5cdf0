//! `/nodes/{nodeid}/processes...`: a node's OS processes, and starting a process as a job.

use super::{AppState, call_json};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Json, Path};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use grid_client::{ClientError, NodeClient};
use grid_proto::Command;
use grid_proto::api::{CoreSystem, ErrorBody, Process, ProcessSignal};
use grid_proto::args::{ProcessKillArgs, ProcessListArgs, SystemArgs};
use grid_proto::commands::{CORE_SYSTEM, PROCESS_KILL, PROCESS_LIST};
use grid_proto::info::ProcessInfo;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;

/// How long the node has to accept a started process.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process has to end after SIGTERM before it gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);
/// How often a terminating process is looked at.
const TERM_POLL: Duration = Duration::from_millis(100);

/// Answer of a process start: the job id (also in the `Location` header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartedJob {
    /// Id of the job running the process.
    pub id: String,
}

fn parse_pid(raw: &str) -> ApiResult<i64> {
    match raw.parse::<i64>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(ApiError::BadRequest(format!(
            "process id must be a positive integer, not {raw:?}"
        ))),
    }
}

fn not_found(node: &str, pid: i64) -> ApiError {
    ApiError::NotFound(format!("process {pid} not found on node {node}"))
}

/// One process, or `None` when it does not exist.
async fn find_process(client: &NodeClient, node: &str, pid: i64) -> ApiResult<Option<Process>> {
    let args =
        serde_json::to_value(ProcessListArgs { pid: Some(pid) }).map_err(ApiError::internal)?;
    match client
        .call_json::<Vec<ProcessInfo>>(PROCESS_LIST, args, super::CALL_TIMEOUT)
        .await
    {
        Ok(list) => Ok(list.into_iter().find(|p| p.pid == pid).map(Process::from)),
        // A missing pid is an error of process.list.
        Err(ClientError::Failed { .. }) => Ok(None),
        Err(e) => Err(ApiError::from_client(node, e)),
    }
}

/// Sends `signal` to `pid`. When the node refuses, the process is looked up again: gone (it ended
/// between the lookup and the signal) → `404`; not permitted → `409`; else the node's error.
async fn signal(client: &NodeClient, node: &str, pid: i64, signal: i32) -> ApiResult<()> {
    if pid <= 1 {
        return Err(ApiError::BadRequest(format!(
            "refusing to signal process {pid}"
        )));
    }
    let args = serde_json::to_value(ProcessKillArgs { pid, signal }).map_err(ApiError::internal)?;
    match client
        .call_json::<serde_json::Value>(PROCESS_KILL, args, super::CALL_TIMEOUT)
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Failed { message, .. }) => {
            let gone = find_process(client, node, pid).await?.is_none();
            Err(signal_refused(node, pid, signal, &message, gone))
        }
        Err(e) => Err(ApiError::from_client(node, e)),
    }
}

/// The answer to a `process.kill` the node refused with `message`; `gone`: the process no longer
/// exists. The texts are core0's (`procs::ProcError`).
fn signal_refused(node: &str, pid: i64, signal: i32, message: &str, gone: bool) -> ApiError {
    if gone || message.ends_with("not found") {
        not_found(node, pid)
    } else if message.starts_with("not permitted") {
        ApiError::Conflict(format!(
            "node {node} is not permitted to send signal {signal} to process {pid} \
             (the process belongs to another user or is protected)"
        ))
    } else if message.starts_with("invalid signal") {
        ApiError::BadRequest(format!("signal {signal} is not valid on node {node}"))
    } else {
        ApiError::Internal(format!(
            "node {node}: process.kill of {pid} with signal {signal}: {message}"
        ))
    }
}

/// List the OS processes of a node.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/processes", tag = "processes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Processes", body = Vec<Process>),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn list_processes(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<Process>>> {
    let client = s.node(&nodeid).await?;
    let list: Vec<ProcessInfo> =
        call_json(&client, &nodeid, PROCESS_LIST, &ProcessListArgs::default()).await?;
    Ok(Json(list.into_iter().map(Process::from).collect()))
}

/// Start a process on a node as a job; its output is streamed and its result kept.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/processes", tag = "processes",
    params(("nodeid" = String, Path, description = "Node id")),
    request_body = CoreSystem,
    responses(
        (status = 202, description = "Started; `Location` is the job", body = StartedJob,
            headers(("Location" = String, description = "/nodes/{nodeid}/jobs/{jobid}"))),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn start_process(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
    Json(body): Json<CoreSystem>,
) -> ApiResult<Response> {
    if body.name.is_empty() {
        return Err(ApiError::BadRequest("name must not be empty".to_string()));
    }
    let env = body
        .environment
        .as_ref()
        .map(|e| e.to_map())
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let client = s.node(&nodeid).await?;
    let args = SystemArgs {
        name: body.name,
        args: body.args,
        dir: body.pwd,
        env,
        stdin: body.stdin,
    };
    let jobid = uuid::Uuid::new_v4().to_string();
    let mut cmd = Command::new(
        jobid.clone(),
        CORE_SYSTEM,
        serde_json::to_value(&args).map_err(ApiError::internal)?,
    );
    cmd.max_time = body.max_time;
    cmd.queue = body.queue.filter(|q| !q.is_empty());
    cmd.stream = true;
    client
        .spawn(&cmd, ACCEPT_TIMEOUT)
        .await
        .map_err(|e| ApiError::from_client(&nodeid, e))?;
    s.archive.watch_job(nodeid.clone(), client, jobid.clone());
    let location = HeaderValue::from_str(&format!("/nodes/{nodeid}/jobs/{jobid}"))
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(StartedJob { id: jobid }),
    )
        .into_response())
}

/// One OS process of a node.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/processes/{processid}", tag = "processes",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("processid" = i64, Path, description = "Process id"),
    ),
    responses(
        (status = 200, description = "The process", body = Process),
        (status = 400, description = "Process id is not a positive integer", body = ErrorBody),
        (status = 404, description = "Unknown node or process", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn get_process(
    State(s): State<AppState>,
    Path((nodeid, processid)): Path<(String, String)>,
) -> ApiResult<Json<Process>> {
    let pid = parse_pid(&processid)?;
    let client = s.node(&nodeid).await?;
    find_process(&client, &nodeid, pid)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&nodeid, pid))
}

/// Kill a process: SIGTERM, then SIGKILL when it is still alive after 2 s.
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/processes/{processid}", tag = "processes",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("processid" = i64, Path, description = "Process id"),
    ),
    responses(
        (status = 204, description = "The process is gone"),
        (status = 400, description = "Process id is not a positive integer", body = ErrorBody),
        (status = 404, description = "Unknown node or process", body = ErrorBody),
        (status = 409, description = "The node may not signal the process", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn kill_process(
    State(s): State<AppState>,
    Path((nodeid, processid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let pid = parse_pid(&processid)?;
    let client = s.node(&nodeid).await?;
    if find_process(&client, &nodeid, pid).await?.is_none() {
        return Err(not_found(&nodeid, pid));
    }
    signal(&client, &nodeid, pid, 15).await?;
    let deadline = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < deadline {
        // Polling the node: it has no "process ended" notification.
        tokio::time::sleep(TERM_POLL).await;
        if find_process(&client, &nodeid, pid).await?.is_none() {
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    match signal(&client, &nodeid, pid, 9).await {
        // Not found: it ended between the last look and the SIGKILL.
        Ok(()) | Err(ApiError::NotFound(_)) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e),
    }
}

/// Send a signal to a process.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/processes/{processid}", tag = "processes",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("processid" = i64, Path, description = "Process id"),
    ),
    request_body = ProcessSignal,
    responses(
        (status = 204, description = "Signal sent"),
        (status = 400, description = "Invalid body or process id", body = ErrorBody),
        (status = 404, description = "Unknown node or process", body = ErrorBody),
        (status = 409, description = "The node may not signal the process", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn signal_process(
    State(s): State<AppState>,
    Path((nodeid, processid)): Path<(String, String)>,
    Json(body): Json<ProcessSignal>,
) -> ApiResult<StatusCode> {
    let pid = parse_pid(&processid)?;
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::BadRequest(format!(
            "signal must be between 1 and 64, not {}",
            body.signal
        )));
    }
    let client = s.node(&nodeid).await?;
    if find_process(&client, &nodeid, pid).await?.is_none() {
        return Err(not_found(&nodeid, pid));
    }
    signal(&client, &nodeid, pid, body.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_must_be_positive_integers() {
        assert_eq!(parse_pid("42").expect("pid"), 42);
        assert!(parse_pid("abc").is_err());
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("-3").is_err());
    }

    #[test]
    fn refused_signals_map_to_client_statuses() {
        let status =
            |message: &str, gone: bool| signal_refused("n1", 42, 15, message, gone).status();
        // The process ended between the lookup and the signal.
        assert_eq!(status("process 42 not found", false), StatusCode::NOT_FOUND);
        assert_eq!(
            status("cannot signal process 42: EIO", true),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status("not permitted to signal process 42", false),
            StatusCode::CONFLICT
        );
        assert_eq!(status("invalid signal 15", false), StatusCode::BAD_REQUEST);
        assert_eq!(
            status("cannot signal process 42: EIO", false),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            signal_refused("n1", 42, 15, "not permitted to signal process 42", false).to_string(),
            "node n1 is not permitted to send signal 15 to process 42 \
             (the process belongs to another user or is protected)"
        );
    }
}
