//! `/nodes/{nodeid}/jobs...`: a node's jobs (direct: one core0 command per request), and the
//! live output of a job as Server-Sent Events.

use super::AppState;
use super::target::{self, Target, job_id};
use crate::error::ApiResult;
use crate::http::extract::{Json, Path};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use grid_proto::api::{ErrorBody, JobListItem, JobResult};
use std::convert::Infallible;

/// List the running jobs of a node.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/jobs", tag = "jobs",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Running jobs", body = Vec<JobListItem>),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<JobListItem>>> {
    target::list_jobs(&Target::node(&s, &nodeid).await?).await
}

/// Kill every job of a node (its own services survive).
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/jobs", tag = "jobs",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 204, description = "Jobs killed"),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn kill_all_jobs(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<StatusCode> {
    target::kill_all_jobs(&Target::node(&s, &nodeid).await?).await
}

/// A job's state while it runs, then its full result (kept by the API after the node's TTL).
#[utoipa::path(
    get, path = "/nodes/{nodeid}/jobs/{jobid}", tag = "jobs",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 200, description = "The job", body = JobResult),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node or job", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(s): State<AppState>,
    Path((nodeid, jobid)): Path<(String, String)>,
) -> ApiResult<Json<JobResult>> {
    let job = job_id(&jobid)?;
    target::get_job(&s, &Target::node(&s, &nodeid).await?, &job).await
}

/// Kill a job (SIGKILL).
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/jobs/{jobid}", tag = "jobs",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 204, description = "Job killed"),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node or job", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn kill_job(
    State(s): State<AppState>,
    Path((nodeid, jobid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let job = job_id(&jobid)?;
    target::signal_job(&Target::node(&s, &nodeid).await?, &job, 9).await
}

/// Live output of a job: SSE events `stdout` and `stderr` (one line each), then `exit` with
/// `{"state", "code"}`.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/jobs/{jobid}/stream", tag = "jobs",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `stdout`, `stderr` (one line of data each), then `exit` with data `{\"state\": \"success\", \"code\": 0}`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node or job", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn stream_job(
    State(s): State<AppState>,
    Path((nodeid, jobid)): Path<(String, String)>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let job = job_id(&jobid)?;
    target::stream_job(&s, &Target::node(&s, &nodeid).await?, &job).await
}
