//! `/nodes/{nodeid}/processes...`: a node's OS processes, and starting a process as a job.

use super::AppState;
use super::target::{self, Target, check_signal, parse_pid};
use crate::error::ApiResult;
use crate::http::extract::{Json, Path};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use grid_proto::api::{CoreSystem, ErrorBody, Process, ProcessSignal};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;

/// How long the node has to accept a started process.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process has to end after SIGTERM before it gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// Answer of a process start: the job id (also in the `Location` header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartedJob {
    /// Id of the job running the process.
    pub id: String,
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
    target::list_processes(&Target::node(&s, &nodeid).await?).await
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
    let env = target::check_start(&body)?;
    let t = Target::node(&s, &nodeid).await?;
    target::start_process(&s, &t, body, env).await
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
    target::get_process(&Target::node(&s, &nodeid).await?, pid).await
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
    target::kill_process(&Target::node(&s, &nodeid).await?, pid).await
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
    check_signal(body.signal)?;
    target::signal_process(&Target::node(&s, &nodeid).await?, pid, body.signal).await
}
