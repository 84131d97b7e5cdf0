//! `/nodes/{nodeid}/jobs...`: a node's jobs (direct: one core0 command per request), and the
//! live output of a job as Server-Sent Events.

use super::sse::{self, StreamEvent};
use super::{AppState, CALL_TIMEOUT, call_json};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Json, Path};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::StreamExt;
use grid_client::ClientError;
use grid_proto::JobId;
use grid_proto::api::{ErrorBody, JobListItem, JobResult};
use grid_proto::args::{JobKillArgs, JobListArgs};
use grid_proto::commands::{JOB_KILL, JOB_KILLALL, JOB_LIST};
use grid_proto::info::JobInfo;
use std::convert::Infallible;

fn job_id(raw: &str) -> ApiResult<JobId> {
    JobId::new(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn not_found(node: &str, job: &str) -> ApiError {
    ApiError::NotFound(format!("job {job} not found on node {node}"))
}

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
    let client = s.node(&nodeid).await?;
    let jobs: Vec<JobInfo> = call_json(&client, &nodeid, JOB_LIST, &JobListArgs::default()).await?;
    Ok(Json(
        jobs.into_iter()
            .map(|j| JobListItem {
                id: j.cmd.id,
                start_time: j.starttime,
            })
            .collect(),
    ))
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
    let client = s.node(&nodeid).await?;
    let _: serde_json::Value =
        call_json(&client, &nodeid, JOB_KILLALL, &serde_json::json!({})).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Looks a job up: running (job.list), then the node's result, then the archive.
pub(crate) async fn find_job(
    s: &AppState,
    client: &grid_client::NodeClient,
    nodeid: &str,
    job: &JobId,
) -> ApiResult<Option<JobResult>> {
    let args = JobListArgs {
        id: Some(job.to_string()),
    };
    let args = serde_json::to_value(&args).map_err(ApiError::internal)?;
    match client
        .call_json::<Vec<JobInfo>>(JOB_LIST, args, CALL_TIMEOUT)
        .await
    {
        Ok(list) => {
            if let Some(j) = list.into_iter().find(|j| j.cmd.id == job.as_str()) {
                return Ok(Some(JobResult::running(
                    &j.cmd.id,
                    &j.cmd.command,
                    j.starttime,
                )));
            }
        }
        // An unknown id is an error of job.list: the job is not running.
        Err(ClientError::Failed { .. }) => {}
        Err(e) => return Err(ApiError::from_client(nodeid, e)),
    }
    match client.result_now(job.as_str()).await {
        Ok(Some(r)) => {
            let result = JobResult::from(&r);
            if let Err(e) = s.archive.save(nodeid, &result).await {
                tracing::warn!(node = nodeid, job = %job, error = %e, "cannot archive job result");
            }
            return Ok(Some(result));
        }
        Ok(None) => {}
        Err(e @ ClientError::BadResult { .. }) => {
            tracing::warn!(node = nodeid, job = %job, error = %e, "unreadable result");
        }
        Err(e) => return Err(ApiError::from_client(nodeid, e)),
    }
    Ok(s.archive.get(nodeid, job.as_str()).await?)
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
    let client = s.node(&nodeid).await?;
    find_job(&s, &client, &nodeid, &job)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&nodeid, &jobid))
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
    let client = s.node(&nodeid).await?;
    let args = JobKillArgs {
        id: job.to_string(),
        signal: 9,
    };
    let killed: bool = call_json(&client, &nodeid, JOB_KILL, &args).await?;
    if killed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&nodeid, &jobid))
    }
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
    let client = s.node(&nodeid).await?;
    // A job with a reader, or still running, is followed live. One that ended is replayed from
    // its result (complete, unlike records a stopped reader may have taken); only without a
    // result are its leftover records read.
    let live = s.streams.is_reading(&nodeid, job.as_str())
        || client
            .is_running(job.as_str())
            .await
            .map_err(|e| ApiError::from_client(&nodeid, e))?;
    let events: sse::EventStream = if live {
        s.streams.subscribe(&nodeid, job.as_str(), client)
    } else if let Some(result) = find_job(&s, &client, &nodeid, &job).await? {
        Box::pin(futures::stream::iter(sse::replay(&result)))
    } else if sse::has_stream_records(&client, job.as_str())
        .await
        .map_err(|e| ApiError::from_client(&nodeid, e))?
    {
        s.streams.subscribe(&nodeid, job.as_str(), client)
    } else {
        return Err(not_found(&nodeid, &jobid));
    };
    let events = sse::until_shutdown(events, s.shutdown.clone());
    let stream =
        events.map(|ev: StreamEvent| Ok(Event::default().event(ev.name()).data(ev.data())));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
