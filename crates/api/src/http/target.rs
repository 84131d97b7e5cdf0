//! Where a direct endpoint runs its commands: a node (`/nodes/{nodeid}/...`), or a running
//! container on a node (`/nodes/{nodeid}/containers/{containerid}/...`, each command sent as
//! `corex.dispatch {container, command}`), and the one implementation of the endpoints both
//! route families share: jobs (list, get, kill, kill all, stream), processes (list, get, start,
//! kill, signal), ping, state and OS info. The handlers in `jobs`, `processes`, `nodes` and
//! `containers` only resolve their [`Target`] and call these.

use super::processes::{ACCEPT_TIMEOUT, StartedJob, TERM_GRACE};
use super::sse::{self, StreamEvent};
use super::{AppState, CALL_TIMEOUT};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::Json;
use crate::reconcile::containers::COREX_DISPATCH;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use grid_client::{ClientError, NodeClient};
use grid_proto::api::{CoreStateResult, CoreSystem, JobListItem, JobResult, OsInfo, Process};
use grid_proto::args::{JobKillArgs, JobListArgs, ProcessKillArgs, ProcessListArgs, SystemArgs};
use grid_proto::commands::{
    CORE_PING, CORE_STATE, CORE_SYSTEM, INFO_OS, JOB_KILL, JOB_KILLALL, JOB_LIST, PROCESS_KILL,
    PROCESS_LIST,
};
use grid_proto::info::{CoreState, JobInfo, ProcessInfo};
use grid_proto::{Command, CommandResult, JobId, State as JobState, info};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;

/// Budget of a ping.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a terminating process is looked at.
const TERM_POLL: Duration = Duration::from_millis(100);

/// Where commands run: a node, or a running container on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The node itself.
    Node {
        /// Node id.
        node: String,
    },
    /// A running container on `node`.
    Container {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
        /// core0's id of the container.
        id: u64,
    },
}

impl Place {
    /// The node the commands are sent to.
    pub fn node(&self) -> &str {
        match self {
            Place::Node { node } | Place::Container { node, .. } => node,
        }
    }

    /// The container's name (a node's id for a node).
    pub fn name(&self) -> &str {
        match self {
            Place::Node { node } | Place::Container { name: node, .. } => node,
        }
    }

    /// Where, in an error message: `on node n1` or `in container c1 on node n1`.
    fn whereabouts(&self) -> String {
        match self {
            Place::Node { node } => format!("on node {node}"),
            Place::Container { node, name, .. } => format!("in container {name} on node {node}"),
        }
    }

    /// The path of job `jobid` of this place.
    fn job_path(&self, jobid: &str) -> String {
        match self {
            Place::Node { node } => format!("/nodes/{node}/jobs/{jobid}"),
            Place::Container { node, name, .. } => {
                format!("/nodes/{node}/containers/{name}/jobs/{jobid}")
            }
        }
    }
}

/// A [`Place`] and its node's connection.
#[derive(Clone)]
pub struct Target {
    /// Where the commands run.
    pub place: Place,
    /// The connection to the place's node.
    pub client: NodeClient,
}

/// A command that ran and did not succeed: its message.
pub struct Failed(pub String);

/// The answer when container `name` on `node` is not running.
pub fn not_running(node: &str, name: &str) -> ApiError {
    ApiError::Conflict(format!("container {name} on node {node} is not running"))
}

impl Target {
    /// The registered node `id`: `404` when unknown, `503` when it cannot be reached.
    pub async fn node(s: &AppState, id: &str) -> ApiResult<Self> {
        Ok(Self {
            client: s.node(id).await?,
            place: Place::Node {
                node: id.to_string(),
            },
        })
    }

    /// The running container `name` (core0 id `id`) on the node of `client`.
    pub fn container(node: &str, name: &str, id: u64, client: NodeClient) -> Self {
        Self {
            place: Place::Container {
                node: node.to_string(),
                name: name.to_string(),
                id,
            },
            client,
        }
    }

    fn node_id(&self) -> &str {
        self.place.node()
    }

    /// Dispatches `cmd` (its id kept) into container `id`; returns once the container took it.
    async fn dispatch(&self, name: &str, id: u64, cmd: &Command) -> ApiResult<()> {
        let args = json!({"container": id, "command": cmd});
        match self
            .client
            .call_json::<Value>(COREX_DISPATCH, args, CALL_TIMEOUT)
            .await
        {
            Ok(_) => Ok(()),
            Err(ClientError::Failed { message, .. }) => {
                let m = message.to_ascii_lowercase();
                if m.contains("not found") || m.contains("halted") || m.contains("not running") {
                    Err(not_running(self.node_id(), name))
                } else {
                    Err(ApiError::Internal(format!(
                        "node {}: corex.dispatch into container {name}: {message}",
                        self.node_id()
                    )))
                }
            }
            Err(e) => Err(ApiError::from_client(self.node_id(), e)),
        }
    }

    /// Runs `command` and waits up to `timeout` for its result (any state).
    pub async fn run(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> ApiResult<CommandResult> {
        let Place::Container { node, name, id } = &self.place else {
            return self
                .client
                .call(command, args, timeout)
                .await
                .map_err(|e| ApiError::from_client(self.node_id(), e));
        };
        let cmd = Command::new(uuid::Uuid::new_v4().to_string(), command, args);
        self.dispatch(name, *id, &cmd).await?;
        match self.client.wait_result(&cmd.id, timeout).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ApiError::GatewayTimeout(format!(
                "container {name} on node {node} did not finish {command} within {} s",
                timeout.as_secs()
            ))),
            Err(e) => Err(ApiError::from_client(node, e)),
        }
    }

    /// Runs a built-in (10 s budget) and decodes its JSON data; a failure is `Ok(Err(message))`.
    pub async fn call<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        command: &str,
        args: &A,
    ) -> ApiResult<Result<T, Failed>> {
        let args = serde_json::to_value(args).map_err(ApiError::internal)?;
        if let Place::Node { node } = &self.place {
            return match self.client.call_json(command, args, CALL_TIMEOUT).await {
                Ok(v) => Ok(Ok(v)),
                Err(ClientError::Failed { message, .. }) => Ok(Err(Failed(message))),
                Err(e) => Err(ApiError::from_client(node, e)),
            };
        }
        let r = self.run(command, args, CALL_TIMEOUT).await?;
        if r.state != JobState::Success {
            let message = serde_json::from_str::<String>(&r.data).unwrap_or(r.data.clone());
            return Ok(Err(Failed(message)));
        }
        r.json_data().map(Ok).map_err(|e| {
            ApiError::Internal(format!(
                "node {}: unreadable answer to {command}: {e}",
                self.node_id()
            ))
        })
    }

    /// Like [`Target::call`], a failure being an internal error.
    pub async fn call_ok<T: DeserializeOwned, A: Serialize + ?Sized>(
        &self,
        command: &str,
        args: &A,
    ) -> ApiResult<T> {
        self.call(command, args).await?.map_err(|Failed(m)| {
            ApiError::Internal(format!(
                "node {}: {command} {} failed: {m}",
                self.node_id(),
                self.place.whereabouts()
            ))
        })
    }

    /// Starts `cmd` as a job; returns once the node (or container) took it.
    async fn spawn(&self, cmd: &Command) -> ApiResult<()> {
        match &self.place {
            Place::Node { node } => self
                .client
                .spawn(cmd, ACCEPT_TIMEOUT)
                .await
                .map(drop)
                .map_err(|e| ApiError::from_client(node, e)),
            Place::Container { node, name, id } => {
                tokio::time::timeout(ACCEPT_TIMEOUT + CALL_TIMEOUT, self.dispatch(name, *id, cmd))
                    .await
                    .map_err(|_| {
                        ApiError::GatewayTimeout(format!(
                            "node {node} did not take the process for container {name} in time"
                        ))
                    })?
            }
        }
    }

    /// Whether a result read from the node belongs to this place.
    fn owns(&self, r: &CommandResult) -> bool {
        match &self.place {
            Place::Node { .. } => true,
            Place::Container { id, .. } => r.container == *id,
        }
    }

    /// Whether job `job` still runs here.
    async fn is_running(&self, job: &JobId) -> ApiResult<bool> {
        match &self.place {
            Place::Node { node } => self
                .client
                .is_running(job.as_str())
                .await
                .map_err(|e| ApiError::from_client(node, e)),
            Place::Container { .. } => Ok(job_running(self, job).await?.is_some()),
        }
    }
}

// Ping, state, info --------------------------------------------------------------------------------

/// Whether the place answers `core.ping` within [`PING_TIMEOUT`].
pub async fn ping(t: &Target) -> bool {
    matches!(
        t.run(CORE_PING, json!({}), PING_TIMEOUT).await,
        Ok(r) if r.state == JobState::Success
    )
}

/// CPU and memory used by the place's agent and its jobs.
pub async fn state(t: &Target) -> ApiResult<Json<CoreStateResult>> {
    let st: CoreState = t.call_ok(CORE_STATE, &json!({})).await?;
    Ok(Json(st.into()))
}

/// The place's operating system.
pub async fn os_info(t: &Target) -> ApiResult<Json<OsInfo>> {
    let os: info::OsInfo = t.call_ok(INFO_OS, &json!({})).await?;
    Ok(Json(os.into()))
}

// Jobs -------------------------------------------------------------------------------------------

/// A job id from the path: `400` when malformed.
pub fn job_id(raw: &str) -> ApiResult<JobId> {
    JobId::new(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The answer when job `job` is not known at `place`.
pub fn job_not_found(place: &Place, job: &str) -> ApiError {
    ApiError::NotFound(format!("job {job} not found {}", place.whereabouts()))
}

/// A signal number from a body: `400` outside 1..=64.
pub fn check_signal(signal: i32) -> ApiResult<()> {
    if (1..=64).contains(&signal) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "signal must be between 1 and 64, not {signal}"
        )))
    }
}

/// The running jobs.
pub async fn list_jobs(t: &Target) -> ApiResult<Json<Vec<JobListItem>>> {
    let jobs: Vec<JobInfo> = t.call_ok(JOB_LIST, &JobListArgs::default()).await?;
    Ok(Json(
        jobs.into_iter()
            .map(|j| JobListItem {
                id: j.cmd.id,
                start_time: j.starttime,
            })
            .collect(),
    ))
}

/// Kills every job (a node's own services survive).
pub async fn kill_all_jobs(t: &Target) -> ApiResult<StatusCode> {
    let _: Value = t.call_ok(JOB_KILLALL, &json!({})).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Job `job` when it is running (by `job.list`).
async fn job_running(t: &Target, job: &JobId) -> ApiResult<Option<JobInfo>> {
    let args = JobListArgs {
        id: Some(job.to_string()),
    };
    match t.call::<Vec<JobInfo>, _>(JOB_LIST, &args).await? {
        Ok(list) => Ok(list.into_iter().find(|j| j.cmd.id == job.as_str())),
        // An unknown id is an error of job.list: the job is not running.
        Err(Failed(_)) => Ok(None),
    }
}

/// Looks a job up: running (job.list), then the node's result (of this place), then the archive.
pub async fn find_job(s: &AppState, t: &Target, job: &JobId) -> ApiResult<Option<JobResult>> {
    if let Some(j) = job_running(t, job).await? {
        return Ok(Some(JobResult::running(
            &j.cmd.id,
            &j.cmd.command,
            j.starttime,
        )));
    }
    let node = t.node_id();
    match t.client.result_now(job.as_str()).await {
        Ok(Some(r)) if t.owns(&r) => {
            let result = JobResult::from(&r);
            if let Err(e) = s.archive.save(node, &result).await {
                tracing::warn!(node, job = %job, error = %e, "cannot archive job result");
            }
            return Ok(Some(result));
        }
        Ok(Some(_)) => return Ok(None),
        Ok(None) => {}
        Err(e @ ClientError::BadResult { .. }) => {
            tracing::warn!(node, job = %job, error = %e, "unreadable result");
        }
        Err(e) => return Err(ApiError::from_client(node, e)),
    }
    Ok(s.archive.get(node, job.as_str()).await?)
}

/// A job's state while it runs, then its full result.
pub async fn get_job(s: &AppState, t: &Target, job: &JobId) -> ApiResult<Json<JobResult>> {
    find_job(s, t, job)
        .await?
        .map(Json)
        .ok_or_else(|| job_not_found(&t.place, job.as_str()))
}

/// Sends `signal` to job `job`: `404` when it is not running.
pub async fn signal_job(t: &Target, job: &JobId, signal: i32) -> ApiResult<StatusCode> {
    let args = JobKillArgs {
        id: job.to_string(),
        signal,
    };
    match t.call::<bool, _>(JOB_KILL, &args).await? {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(job_not_found(&t.place, job.as_str())),
        Err(Failed(m)) if m.contains("not found") || m.contains("unknown") => {
            Err(job_not_found(&t.place, job.as_str()))
        }
        Err(Failed(m)) => Err(ApiError::Internal(format!(
            "node {}: job.kill {}: {m}",
            t.node_id(),
            t.place.whereabouts()
        ))),
    }
}

/// Live output of a job as Server-Sent Events.
pub async fn stream_job(
    s: &AppState,
    t: &Target,
    job: &JobId,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>> + use<>>> {
    let node = t.node_id();
    // A job with a reader, or still running, is followed live. One that ended is replayed from
    // its result (complete, unlike records a stopped reader may have taken); only without a
    // result are its leftover records read. The stream key is the node's `stream:<id>` (a
    // container's jobs too): the node's hub serves it.
    let live = s.streams.is_reading(node, job.as_str()) || t.is_running(job).await?;
    let events: sse::EventStream = if live {
        s.streams.subscribe(node, job.as_str(), t.client.clone())
    } else if let Some(result) = find_job(s, t, job).await? {
        Box::pin(futures::stream::iter(sse::replay(&result)))
    } else if sse::has_stream_records(&t.client, job.as_str())
        .await
        .map_err(|e| ApiError::from_client(node, e))?
    {
        s.streams.subscribe(node, job.as_str(), t.client.clone())
    } else {
        return Err(job_not_found(&t.place, job.as_str()));
    };
    let events = sse::until_shutdown(events, s.shutdown.clone());
    let stream =
        events.map(|ev: StreamEvent| Ok(Event::default().event(ev.name()).data(ev.data())));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

// Processes --------------------------------------------------------------------------------------

/// A process id from the path: `400` unless a positive integer.
pub fn parse_pid(raw: &str) -> ApiResult<i64> {
    match raw.parse::<i64>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(ApiError::BadRequest(format!(
            "process id must be a positive integer, not {raw:?}"
        ))),
    }
}

/// The answer when process `pid` does not exist at `place`.
pub fn process_not_found(place: &Place, pid: i64) -> ApiError {
    ApiError::NotFound(format!("process {pid} not found {}", place.whereabouts()))
}

/// The OS processes.
pub async fn list_processes(t: &Target) -> ApiResult<Json<Vec<Process>>> {
    let list: Vec<ProcessInfo> = t.call_ok(PROCESS_LIST, &ProcessListArgs::default()).await?;
    Ok(Json(list.into_iter().map(Process::from).collect()))
}

/// One process, or `None` when it does not exist.
async fn find_process(t: &Target, pid: i64) -> ApiResult<Option<Process>> {
    let args = ProcessListArgs { pid: Some(pid) };
    match t.call::<Vec<ProcessInfo>, _>(PROCESS_LIST, &args).await? {
        Ok(list) => Ok(list.into_iter().find(|p| p.pid == pid).map(Process::from)),
        // A missing pid is an error of process.list.
        Err(Failed(_)) => Ok(None),
    }
}

/// One process: `404` when it does not exist.
pub async fn get_process(t: &Target, pid: i64) -> ApiResult<Json<Process>> {
    find_process(t, pid)
        .await?
        .map(Json)
        .ok_or_else(|| process_not_found(&t.place, pid))
}

/// Sends `signal` to `pid`. When refused, the process is looked up again: gone (it ended between
/// the lookup and the signal) → `404`; not permitted → `409`; else see [`signal_refused`].
async fn send_signal(t: &Target, pid: i64, signal: i32) -> ApiResult<()> {
    if pid <= 1 {
        return Err(ApiError::BadRequest(format!(
            "refusing to signal process {pid}"
        )));
    }
    match t
        .call::<Value, _>(PROCESS_KILL, &ProcessKillArgs { pid, signal })
        .await?
    {
        Ok(_) => Ok(()),
        Err(Failed(message)) => {
            let gone = message.ends_with("not found") || find_process(t, pid).await?.is_none();
            Err(signal_refused(&t.place, pid, signal, &message, gone))
        }
    }
}

/// The answer to a `process.kill` refused with `message`; `gone`: the process no longer exists.
/// The texts are core0's (`procs::ProcError`).
fn signal_refused(place: &Place, pid: i64, signal: i32, message: &str, gone: bool) -> ApiError {
    let node = place.node();
    if gone || message.ends_with("not found") {
        return process_not_found(place, pid);
    }
    match place {
        Place::Node { .. } if message.starts_with("not permitted") => ApiError::Conflict(format!(
            "node {node} is not permitted to send signal {signal} to process {pid} \
                 (the process belongs to another user or is protected)"
        )),
        Place::Container { name, .. } if message.starts_with("not permitted") => {
            ApiError::Conflict(format!(
                "not permitted to send signal {signal} to process {pid} in container {name}"
            ))
        }
        _ if message.starts_with("invalid signal") => ApiError::BadRequest(format!(
            "signal {signal} is not valid {}",
            place.whereabouts()
        )),
        _ => ApiError::Internal(format!(
            "node {node}: process.kill of {pid} with signal {signal} {}: {message}",
            place.whereabouts()
        )),
    }
}

/// Sends `signal` to an existing process: `404` when it does not exist.
pub async fn signal_process(t: &Target, pid: i64, signal: i32) -> ApiResult<StatusCode> {
    if find_process(t, pid).await?.is_none() {
        return Err(process_not_found(&t.place, pid));
    }
    send_signal(t, pid, signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Kills a process: SIGTERM, then SIGKILL when it is still alive after [`TERM_GRACE`].
pub async fn kill_process(t: &Target, pid: i64) -> ApiResult<StatusCode> {
    signal_process(t, pid, 15).await?;
    let deadline = tokio::time::Instant::now() + TERM_GRACE;
    while tokio::time::Instant::now() < deadline {
        // Polling the node: it has no "process ended" notification.
        tokio::time::sleep(TERM_POLL).await;
        if find_process(t, pid).await?.is_none() {
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    match send_signal(t, pid, 9).await {
        // Not found: it ended between the last look and the SIGKILL.
        Ok(()) | Err(ApiError::NotFound(_)) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e),
    }
}

/// Checks a process start: the name is set; returns the environment as a map.
pub fn check_start(
    body: &CoreSystem,
) -> ApiResult<Option<std::collections::BTreeMap<String, String>>> {
    if body.name.is_empty() {
        return Err(ApiError::BadRequest("name must not be empty".to_string()));
    }
    body.environment
        .as_ref()
        .map(|e| e.to_map())
        .transpose()
        .map_err(ApiError::BadRequest)
}

/// Starts a process as a streamed job (checked by [`check_start`], environment `env`):
/// `202` with the job in `Location`; its result is kept by the archive.
pub async fn start_process(
    s: &AppState,
    t: &Target,
    body: CoreSystem,
    env: Option<std::collections::BTreeMap<String, String>>,
) -> ApiResult<Response> {
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
    t.spawn(&cmd).await?;
    s.archive
        .watch_job(t.node_id().to_string(), t.client.clone(), jobid.clone());
    let location = HeaderValue::from_str(&t.place.job_path(&jobid)).map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(StartedJob { id: jobid }),
    )
        .into_response())
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
        let node = Place::Node { node: "n1".into() };
        let status =
            |message: &str, gone: bool| signal_refused(&node, 42, 15, message, gone).status();
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
            signal_refused(&node, 42, 15, "not permitted to signal process 42", false).to_string(),
            "node n1 is not permitted to send signal 15 to process 42 \
             (the process belongs to another user or is protected)"
        );
    }

    #[test]
    fn container_errors_name_the_container() {
        let c = Place::Container {
            node: "n1".into(),
            name: "c1".into(),
            id: 3,
        };
        assert_eq!(
            process_not_found(&c, 7).to_string(),
            "process 7 not found in container c1 on node n1"
        );
        assert_eq!(
            job_not_found(&c, "j").to_string(),
            "job j not found in container c1 on node n1"
        );
        assert_eq!(
            signal_refused(&c, 7, 15, "not permitted to signal process 7", false).to_string(),
            "not permitted to send signal 15 to process 7 in container c1"
        );
        // A signal the kernel refuses is the client's mistake, in a container as on a node.
        assert_eq!(
            signal_refused(&c, 7, 40, "invalid signal 40", false).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(c.job_path("j"), "/nodes/n1/containers/c1/jobs/j");
    }
}
