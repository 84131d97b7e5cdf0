//! `/nodes/{nodeid}/containers...`: containers as a managed resource (create, list, get, start,
//! stop, delete: the handler writes the desired record and waits for the reconciler), and the
//! direct endpoints inside a running container (jobs, processes, files, ping, state, info), each
//! sent to the node as `corex.dispatch {container, command}`.

use super::AppState;
use super::processes::StartedJob;
use super::target::{self as direct, Failed, Target, check_signal, job_id, not_running, parse_pid};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Json, Path, decode_json};
use crate::reconcile::containers::{
    self as ctrs, ContainerError, ContainerSpec, ContainerView, KIND,
};
use crate::reconcile::nodes as registry;
use crate::reconcile::{self, ReconcileError, WaitError};
use crate::store::StoreError;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Multipart, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use grid_proto::api::{
    Container, ContainerListItem, ContainerStatus, CoreStateResult, CoreSystem, CreateContainer,
    DeleteFile, ErrorBody, JobListItem, JobResult, OsInfo, Process, ProcessSignal,
};
use grid_proto::args::{FsFdArgs, FsOpenArgs, FsPathArgs, FsWriteArgs};
use grid_proto::commands::{FS_CLOSE, FS_OPEN, FS_READ, FS_REMOVE, FS_WRITE};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::ToSchema;

/// How long a create, start or stop waits for the reconciler.
pub const APPLY_WAIT: Duration = Duration::from_secs(120);
/// Bytes per `filesystem.write` / `filesystem.read` block.
pub const FILE_BLOCK: usize = 512 * 1024;
/// Longest container name.
const MAX_NAME: usize = 64;

/// The multipart form of a file upload.
#[derive(Debug, ToSchema)]
pub struct FileUpload {
    /// The file's content.
    #[schema(format = Binary)]
    pub file: String,
}

/// `?path=` of the file endpoints.
#[derive(Debug, Deserialize)]
pub struct PathQuery {
    /// Path inside the container.
    #[serde(default)]
    pub path: Option<String>,
}

fn unknown_container(node: &str, name: &str) -> ApiError {
    ApiError::NotFound(format!("container {name} not found on node {node}"))
}

fn location(path: &str) -> ApiResult<HeaderValue> {
    HeaderValue::from_str(path).map_err(ApiError::internal)
}

impl From<ContainerError> for ApiError {
    fn from(e: ContainerError) -> Self {
        match e {
            ContainerError::Timeout { .. } => ApiError::GatewayTimeout(e.to_string()),
            ContainerError::DeleteFailed { message, status } => {
                let status = status.unwrap_or_else(|| {
                    if message.contains("unreachable") {
                        503
                    } else {
                        500
                    }
                });
                from_status(status, message)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<ReconcileError> for ApiError {
    fn from(e: ReconcileError) -> Self {
        ApiError::internal(e)
    }
}

/// The error of an HTTP status recorded by the controller.
fn from_status(status: u16, message: String) -> ApiError {
    match status {
        400 => ApiError::BadRequest(message),
        404 => ApiError::NotFound(message),
        409 => ApiError::Conflict(message),
        503 => ApiError::Unavailable(message),
        504 => ApiError::GatewayTimeout(message),
        _ => ApiError::Internal(message),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn check_name(what: &str, value: &str) -> ApiResult<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} {value:?} must be 1 to {MAX_NAME} characters of letters, digits, '_', '.' and '-'"
        )))
    }
}

fn check_flist(flist: &str) -> ApiResult<()> {
    if flist.is_empty() {
        return Err(ApiError::BadRequest("flist must not be empty".to_string()));
    }
    let ok = ["http://", "https://", "file://"]
        .iter()
        .any(|p| flist.len() > p.len() && flist.starts_with(p))
        || flist.starts_with('/');
    if ok && !flist.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "flist {flist:?} must be an http(s):// or file:// URL or an absolute path on the node"
        )))
    }
}

/// Checks a create request; fills the hostname with the name when empty.
pub fn validate(body: &mut CreateContainer) -> ApiResult<()> {
    check_name("container id", &body.id)?;
    if body.hostname.is_empty() {
        body.hostname = body.id.clone();
    }
    check_name("hostname", &body.hostname)?;
    check_flist(&body.flist)?;
    let mut defaults = 0;
    for nic in &body.nics {
        match nic.kind.as_str() {
            "default" => defaults += 1,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "nic type {other:?} is not supported: the supported type is \"default\" \
                     (vlan, vxlan, zerotier and bridge come later)"
                )));
            }
        }
    }
    if defaults > 1 {
        return Err(ApiError::BadRequest(
            "at most one nic of type \"default\" is allowed".to_string(),
        ));
    }
    if body.host_networking && !body.nics.is_empty() {
        return Err(ApiError::BadRequest(
            "hostNetworking shares the node's network: nics must be empty".to_string(),
        ));
    }
    let mut hosts = std::collections::BTreeSet::new();
    for p in &body.ports {
        let (host, _) = ctrs::parse_port(p).map_err(ApiError::BadRequest)?;
        if !hosts.insert(host) {
            return Err(ApiError::BadRequest(format!(
                "port {p:?} forwards a host port that is already forwarded"
            )));
        }
    }
    if !body.ports.is_empty() && defaults == 0 {
        return Err(ApiError::BadRequest(
            "ports need a nic of type \"default\"".to_string(),
        ));
    }
    for fs in &body.filesystems {
        match fs.split_once(':') {
            Some((pool, name)) if !pool.is_empty() && !name.is_empty() => {}
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "filesystem {fs:?} is not \"pool:filesystem\""
                )));
            }
        }
    }
    for p in &body.init_processes {
        if p.name.is_empty() {
            return Err(ApiError::BadRequest(
                "init process name must not be empty".to_string(),
            ));
        }
        if let Some(env) = &p.environment {
            env.to_map().map_err(ApiError::BadRequest)?;
        }
    }
    if let Some(l) = &body.limits {
        if l.cpu.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return Err(ApiError::BadRequest(
                "limits.cpu must be a positive number".to_string(),
            ));
        }
        if l.memory == Some(0) || l.pids == Some(0) {
            return Err(ApiError::BadRequest(
                "limits.memory and limits.pids must be positive".to_string(),
            ));
        }
    }
    Ok(())
}

async fn require_node(s: &AppState, node: &str) -> ApiResult<()> {
    match registry::node_spec(s.store.as_ref(), node).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound(format!("node {node} not found"))),
    }
}

async fn view(s: &AppState, node: &str, name: &str) -> ApiResult<ContainerView> {
    require_node(s, node).await?;
    ctrs::get_container(s.store.as_ref(), node, name)
        .await?
        .ok_or_else(|| unknown_container(node, name))
}

/// Waits for the outcome of `generation`; maps a failure to the status the controller recorded.
async fn wait_applied(s: &AppState, rname: &str, generation: u64) -> ApiResult<()> {
    match reconcile::wait_observed(s.store.as_ref(), KIND, rname, generation, APPLY_WAIT).await {
        Ok(_) => Ok(()),
        Err(WaitError::Failed(message)) => {
            let status = reconcile::get_observed(s.store.as_ref(), KIND, rname)
                .await?
                .and_then(|o| o.data.get("errorStatus").and_then(Value::as_u64))
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(500);
            Err(from_status(status, message))
        }
        Err(WaitError::Timeout { .. }) => Err(ApiError::GatewayTimeout(format!(
            "container {rname} was not applied within {} s",
            APPLY_WAIT.as_secs()
        ))),
        Err(WaitError::Store(e)) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Managed resource

/// List the containers of a node.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers", tag = "containers",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Containers", body = Vec<ContainerListItem>),
        (status = 404, description = "Unknown node", body = ErrorBody),
    )
)]
pub async fn list_containers(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<ContainerListItem>>> {
    require_node(&s, &nodeid).await?;
    let list = ctrs::list_containers(s.store.as_ref(), &nodeid).await?;
    Ok(Json(
        list.into_iter()
            .map(|v| ContainerListItem {
                status: v.status(),
                flist: v.spec.create.flist,
                hostname: v.spec.create.hostname,
                id: v.name,
            })
            .collect(),
    ))
}

/// Create a container; answers once it runs (or with the node's error, leaving nothing behind).
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers", tag = "containers",
    params(("nodeid" = String, Path, description = "Node id")),
    request_body = CreateContainer,
    responses(
        (status = 204, description = "The container runs",
            headers(("Location" = String, description = "/nodes/{nodeid}/containers/{id}"))),
        (status = 400, description = "Invalid body, bad image, URL or format", body = ErrorBody),
        (status = 404, description = "Unknown node or storage pool", body = ErrorBody),
        (status = 409, description = "Name taken on the node, or port already forwarded", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Not running in time", body = ErrorBody),
    )
)]
pub async fn create_container(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
    Json(mut body): Json<CreateContainer>,
) -> ApiResult<Response> {
    validate(&mut body)?;
    require_node(&s, &nodeid).await?;
    let name = body.id.clone();
    let rname = ctrs::record_name(&nodeid, &name);
    let exists = || ApiError::Conflict(format!("container {name} already exists on node {nodeid}"));
    if reconcile::get_desired(s.store.as_ref(), KIND, &rname)
        .await?
        .is_some()
    {
        return Err(exists());
    }
    let spec = ContainerSpec {
        node: nodeid.clone(),
        create: body,
        status: ContainerStatus::Running,
    };
    let spec = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    let generation = match reconcile::cas_desired(s.store.as_ref(), KIND, &rname, None, spec).await
    {
        Ok(g) => g,
        Err(ReconcileError::Store(StoreError::Conflict { .. })) => return Err(exists()),
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = wait_applied(&s, &rname, generation).await {
        // A failed create leaves no record: the reconciler removes whatever was made.
        if let Err(del) = reconcile::delete_desired(s.store.as_ref(), KIND, &rname).await {
            tracing::warn!(container = %rname, error = %del, "cannot remove failed container record");
        }
        return Err(e);
    }
    let loc = location(&format!("/nodes/{nodeid}/containers/{name}"))?;
    Ok((StatusCode::NO_CONTENT, [(header::LOCATION, loc)]).into_response())
}

/// One container: its whole spec, status and core0 id.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "The container", body = Container),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
    )
)]
pub async fn get_container(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<Container>> {
    let v = view(&s, &nodeid, &containerid).await?;
    let status = v.status();
    let c = v.spec.create;
    let nic_status = match status {
        ContainerStatus::Running => "up",
        ContainerStatus::Halted => "down",
    };
    Ok(Json(Container {
        id: v.name,
        container_id: v.data.container_id,
        status,
        hostname: c.hostname,
        flist: c.flist,
        init_processes: c.init_processes,
        filesystems: c.filesystems,
        nics: c
            .nics
            .into_iter()
            .map(|mut n| {
                n.status = Some(nic_status.to_string());
                n
            })
            .collect(),
        host_networking: c.host_networking,
        ports: c.ports,
        storage: c.storage,
        privileged: c.privileged,
        limits: c.limits,
        ip: v.data.ip,
        error: v.observed.and_then(|o| o.error),
    }))
}

/// Delete a container: answers once it is terminated and its files removed.
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/containers/{containerid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 503, description = "Node unreachable (the delete is retried)", body = ErrorBody),
        (status = 504, description = "Not removed in time (the delete goes on)", body = ErrorBody),
    )
)]
pub async fn delete_container(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    view(&s, &nodeid, &containerid).await?;
    let rname = ctrs::record_name(&nodeid, &containerid);
    if !reconcile::delete_desired(s.store.as_ref(), KIND, &rname).await? {
        return Err(unknown_container(&nodeid, &containerid));
    }
    ctrs::wait_removed(s.store.as_ref(), &rname, APPLY_WAIT).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the desired status; `409` when it already is that.
async fn set_status(
    s: &AppState,
    nodeid: &str,
    name: &str,
    status: ContainerStatus,
) -> ApiResult<()> {
    require_node(s, nodeid).await?;
    let rname = ctrs::record_name(nodeid, name);
    let store = s.store.as_ref();
    for _ in 0..16 {
        let Some(current) = reconcile::get_desired(store, KIND, &rname).await? else {
            return Err(unknown_container(nodeid, name));
        };
        let mut spec: ContainerSpec =
            serde_json::from_value(current.value.spec.clone()).map_err(ApiError::internal)?;
        if spec.status == status {
            let word = match status {
                ContainerStatus::Running => "running",
                ContainerStatus::Halted => "halted",
            };
            return Err(ApiError::Conflict(format!(
                "container {name} on node {nodeid} is already {word}"
            )));
        }
        spec.status = status;
        let value = serde_json::to_value(&spec).map_err(ApiError::internal)?;
        match reconcile::cas_desired(store, KIND, &rname, Some(&current), value).await {
            Ok(generation) => return wait_applied(s, &rname, generation).await,
            Err(ReconcileError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "container {name} on node {nodeid} kept changing, try again"
    )))
}

/// Start a halted container (its filesystem is kept).
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/start", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 201, description = "Running again",
            headers(("Location" = String, description = "/nodes/{nodeid}/containers/{id}"))),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Already running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn start_container(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Response> {
    set_status(&s, &nodeid, &containerid, ContainerStatus::Running).await?;
    let loc = location(&format!("/nodes/{nodeid}/containers/{containerid}"))?;
    Ok((StatusCode::CREATED, [(header::LOCATION, loc)]).into_response())
}

/// Stop a container, keeping its filesystem.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/stop", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 204, description = "Halted"),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Already halted", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn stop_container(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    set_status(&s, &nodeid, &containerid, ContainerStatus::Halted).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Direct calls inside a container

/// The running container `name` on `node`: `404` unknown, `503` node unreachable, `409` not
/// running.
async fn target(s: &AppState, node: &str, name: &str) -> ApiResult<Target> {
    let v = view(s, node, name).await?;
    match (v.status(), v.data.container_id) {
        (ContainerStatus::Running, Some(id)) => {
            Ok(Target::container(node, name, id, s.node(node).await?))
        }
        _ => {
            let node_down = registry::get_node(s.store.as_ref(), node)
                .await?
                .is_some_and(|n| n.status == grid_proto::api::NodeStatus::Halted);
            if node_down {
                Err(ApiError::Unavailable(format!("node {node} is unreachable")))
            } else {
                Err(not_running(node, name))
            }
        }
    }
}

/// Whether the container answers `core.ping`: `false` when it is not running or its node is
/// unreachable.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/ping", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "Whether the container answered", body = bool),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
    )
)]
pub async fn ping_container(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<bool>> {
    let t = match target(&s, &nodeid, &containerid).await {
        Ok(t) => t,
        Err(ApiError::Conflict(_) | ApiError::Unavailable(_)) => return Ok(Json(false)),
        Err(e) => return Err(e),
    };
    Ok(Json(direct::ping(&t).await))
}

/// CPU and memory used inside the container.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/state", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "Usage", body = CoreStateResult),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn container_state(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<CoreStateResult>> {
    direct::state(&target(&s, &nodeid, &containerid).await?).await
}

/// The container's operating system.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/info", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "OS information", body = OsInfo),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn container_info(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<OsInfo>> {
    direct::os_info(&target(&s, &nodeid, &containerid).await?).await
}

// Jobs ------------------------------------------------------------------------------------------

/// List the running jobs of a container.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/jobs", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "Running jobs", body = Vec<JobListItem>),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn list_container_jobs(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<JobListItem>>> {
    direct::list_jobs(&target(&s, &nodeid, &containerid).await?).await
}

/// Kill every job of a container.
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/containers/{containerid}/jobs", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 204, description = "Jobs killed"),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn kill_all_container_jobs(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    direct::kill_all_jobs(&target(&s, &nodeid, &containerid).await?).await
}

/// A container job's state while it runs, then its full result.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/jobs/{jobid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 200, description = "The job", body = JobResult),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node, container or job", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn get_container_job(
    State(s): State<AppState>,
    Path((nodeid, containerid, jobid)): Path<(String, String, String)>,
) -> ApiResult<Json<JobResult>> {
    let job = job_id(&jobid)?;
    direct::get_job(&s, &target(&s, &nodeid, &containerid).await?, &job).await
}

/// Kill a container job (SIGKILL).
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/containers/{containerid}/jobs/{jobid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 204, description = "Job killed"),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node, container or job", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn kill_container_job(
    State(s): State<AppState>,
    Path((nodeid, containerid, jobid)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let t = target(&s, &nodeid, &containerid).await?;
    direct::signal_job(&t, &job_id(&jobid)?, 9).await
}

/// Send a signal to a container job.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/jobs/{jobid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    request_body = ProcessSignal,
    responses(
        (status = 204, description = "Signal sent"),
        (status = 400, description = "Invalid body or job id", body = ErrorBody),
        (status = 404, description = "Unknown node, container or job", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn signal_container_job(
    State(s): State<AppState>,
    Path((nodeid, containerid, jobid)): Path<(String, String, String)>,
    Json(body): Json<ProcessSignal>,
) -> ApiResult<StatusCode> {
    check_signal(body.signal)?;
    let t = target(&s, &nodeid, &containerid).await?;
    direct::signal_job(&t, &job_id(&jobid)?, body.signal).await
}

/// Live output of a container job: SSE `stdout`, `stderr`, then `exit`.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/jobs/{jobid}/stream", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("jobid" = String, Path, description = "Job id"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `stdout`, `stderr` (one line of data each), then `exit` with data `{\"state\": \"success\", \"code\": 0}`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed job id", body = ErrorBody),
        (status = 404, description = "Unknown node, container or job", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn stream_container_job(
    State(s): State<AppState>,
    Path((nodeid, containerid, jobid)): Path<(String, String, String)>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let job = job_id(&jobid)?;
    direct::stream_job(&s, &target(&s, &nodeid, &containerid).await?, &job).await
}

// Processes -------------------------------------------------------------------------------------

/// List the processes of a container.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/processes", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    responses(
        (status = 200, description = "Processes", body = Vec<Process>),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn list_container_processes(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
) -> ApiResult<Json<Vec<Process>>> {
    direct::list_processes(&target(&s, &nodeid, &containerid).await?).await
}

/// Start a process in a container as a job; its output is streamed and its result kept.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/processes", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
    ),
    request_body = CoreSystem,
    responses(
        (status = 202, description = "Started; `Location` is the job", body = StartedJob,
            headers(("Location" = String, description = "/nodes/{nodeid}/containers/{containerid}/jobs/{jobid}"))),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "Unknown node or container", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn start_container_process(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
    Json(body): Json<CoreSystem>,
) -> ApiResult<Response> {
    let env = direct::check_start(&body)?;
    let t = target(&s, &nodeid, &containerid).await?;
    direct::start_process(&s, &t, body, env).await
}

/// One process of a container.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/processes/{processid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("processid" = i64, Path, description = "Process id (in the container's pid namespace)"),
    ),
    responses(
        (status = 200, description = "The process", body = Process),
        (status = 400, description = "Process id is not a positive integer", body = ErrorBody),
        (status = 404, description = "Unknown node, container or process", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn get_container_process(
    State(s): State<AppState>,
    Path((nodeid, containerid, processid)): Path<(String, String, String)>,
) -> ApiResult<Json<Process>> {
    let pid = parse_pid(&processid)?;
    direct::get_process(&target(&s, &nodeid, &containerid).await?, pid).await
}

/// Kill a container process: SIGTERM, then SIGKILL when it is still alive after 2 s.
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/containers/{containerid}/processes/{processid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("processid" = i64, Path, description = "Process id"),
    ),
    responses(
        (status = 204, description = "The process is gone"),
        (status = 400, description = "Process id is not a positive integer", body = ErrorBody),
        (status = 404, description = "Unknown node, container or process", body = ErrorBody),
        (status = 409, description = "Container not running, or not permitted", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn kill_container_process(
    State(s): State<AppState>,
    Path((nodeid, containerid, processid)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let pid = parse_pid(&processid)?;
    direct::kill_process(&target(&s, &nodeid, &containerid).await?, pid).await
}

/// Send a signal to a container process.
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/processes/{processid}", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("processid" = i64, Path, description = "Process id"),
    ),
    request_body = ProcessSignal,
    responses(
        (status = 204, description = "Signal sent"),
        (status = 400, description = "Invalid body or process id", body = ErrorBody),
        (status = 404, description = "Unknown node, container or process", body = ErrorBody),
        (status = 409, description = "Container not running, or not permitted", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn signal_container_process(
    State(s): State<AppState>,
    Path((nodeid, containerid, processid)): Path<(String, String, String)>,
    Json(body): Json<ProcessSignal>,
) -> ApiResult<StatusCode> {
    let pid = parse_pid(&processid)?;
    check_signal(body.signal)?;
    direct::signal_process(&target(&s, &nodeid, &containerid).await?, pid, body.signal).await
}

// Files -----------------------------------------------------------------------------------------

fn file_path(q: Result<Query<PathQuery>, QueryRejection>) -> ApiResult<String> {
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    match q.path {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(ApiError::BadRequest(
            "the path query parameter is required".to_string(),
        )),
    }
}

/// The answer to a failed `filesystem.*` in the container.
fn fs_error(t: &Target, command: &str, path: &str, message: &str) -> ApiError {
    let m = message.to_ascii_lowercase();
    if m.contains("no such file") || m.contains("not found") {
        ApiError::NotFound(format!("{path} not found in container {}", t.place.name()))
    } else if m.contains("permission denied") || m.contains("read-only") {
        ApiError::Conflict(format!(
            "{command} of {path} in container {}: {message}",
            t.place.name()
        ))
    } else if m.contains("is a directory")
        || m.contains("not a directory")
        || m.contains("invalid")
        || m.contains("bad")
    {
        ApiError::BadRequest(format!(
            "{command} of {path} in container {}: {message}",
            t.place.name()
        ))
    } else {
        ApiError::Internal(format!(
            "node {}: {command} of {path} in container {}: {message}",
            t.place.node(),
            t.place.name()
        ))
    }
}

async fn fs_call<T: DeserializeOwned, A: serde::Serialize>(
    t: &Target,
    command: &str,
    path: &str,
    args: &A,
) -> ApiResult<T> {
    t.call(command, args)
        .await?
        .map_err(|Failed(m)| fs_error(t, command, path, &m))
}

async fn fs_close(t: &Target, fd: &str) {
    let args = FsFdArgs { fd: fd.to_string() };
    if let Err(e) = t.call::<Value, _>(FS_CLOSE, &args).await {
        tracing::warn!(node = %t.place.node(), container = %t.place.name(), error = %e, "cannot close file");
    }
}

async fn write_block(t: &Target, fd: &str, path: &str, block: &[u8]) -> ApiResult<()> {
    let args = FsWriteArgs {
        fd: fd.to_string(),
        block: base64::engine::general_purpose::STANDARD.encode(block),
    };
    fs_call::<Value, _>(t, FS_WRITE, path, &args)
        .await
        .map(drop)
}

/// Streams the multipart field `file` into the open `fd`, 512 KiB per write.
async fn upload_into(
    t: &Target,
    fd: &str,
    path: &str,
    field: &mut axum::extract::multipart::Field<'_>,
) -> ApiResult<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(FILE_BLOCK);
    loop {
        let chunk = field
            .chunk()
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read the upload: {e}")))?;
        let Some(mut chunk) = chunk else { break };
        while !chunk.is_empty() {
            let take = (FILE_BLOCK - buf.len()).min(chunk.len());
            buf.extend_from_slice(&chunk.split_to(take));
            if buf.len() == FILE_BLOCK {
                write_block(t, fd, path, &buf).await?;
                buf.clear();
            }
        }
    }
    if !buf.is_empty() {
        write_block(t, fd, path, &buf).await?;
    }
    Ok(())
}

/// Upload a file into a container (multipart field `file`; any size, streamed).
#[utoipa::path(
    post, path = "/nodes/{nodeid}/containers/{containerid}/filesystem", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("path" = String, Query, description = "Destination path inside the container"),
    ),
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Missing path or file field", body = ErrorBody),
        (status = 404, description = "Unknown node or container, or missing directory", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn upload_file(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
    query: Result<Query<PathQuery>, QueryRejection>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<StatusCode> {
    let path = file_path(query)?;
    let mut form = form.map_err(|e| {
        if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            ApiError::UnsupportedMediaType(format!(
                "expected multipart/form-data: {}",
                e.body_text()
            ))
        } else {
            ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
        }
    })?;
    let t = target(&s, &nodeid, &containerid).await?;
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {e}")))?;
        let Some(mut field) = field else {
            return Err(ApiError::BadRequest(
                "the multipart field file is required".to_string(),
            ));
        };
        if field.name() != Some("file") {
            continue;
        }
        let open = FsOpenArgs {
            file: path.clone(),
            mode: "w".to_string(),
            perm: 0o644,
        };
        let fd: String = fs_call(&t, FS_OPEN, &path, &open).await?;
        let written = upload_into(&t, &fd, &path, &mut field).await;
        fs_close(&t, &fd).await;
        written?;
        return Ok(StatusCode::NO_CONTENT);
    }
}

/// Download a file of a container (raw bytes, streamed).
#[utoipa::path(
    get, path = "/nodes/{nodeid}/containers/{containerid}/filesystem", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("path" = String, Query, description = "Path inside the container"),
    ),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = String),
        (status = 400, description = "Missing path", body = ErrorBody),
        (status = 404, description = "Unknown node, container or file", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn download_file(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let path = file_path(query)?;
    let t = target(&s, &nodeid, &containerid).await?;
    let open = FsOpenArgs {
        file: path.clone(),
        mode: "r".to_string(),
        perm: 0o644,
    };
    let fd: String = fs_call(&t, FS_OPEN, &path, &open).await?;
    // The first block is read before answering, so a file that cannot be read is an error status.
    let first = match read_block(&t, &fd, &path).await {
        Ok(b) => b,
        Err(e) => {
            fs_close(&t, &fd).await;
            return Err(e);
        }
    };
    let state = (t, fd, path, Some(first));
    let stream = futures::stream::unfold(state, |(t, fd, path, pending)| async move {
        let block = match pending {
            Some(b) => Ok(b),
            None => read_block(&t, &fd, &path).await,
        };
        match block {
            Ok(b) if b.is_empty() => {
                fs_close(&t, &fd).await;
                None
            }
            Ok(b) => Some((Ok::<Bytes, std::io::Error>(b), (t, fd, path, None))),
            Err(e) => {
                fs_close(&t, &fd).await;
                tracing::warn!(error = %e, "file download failed midway");
                Some((
                    Err(std::io::Error::other(e.to_string())),
                    (t, String::new(), path, Some(Bytes::new())),
                ))
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn read_block(t: &Target, fd: &str, path: &str) -> ApiResult<Bytes> {
    let args = FsFdArgs { fd: fd.to_string() };
    let text: String = fs_call(t, FS_READ, path, &args).await?;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("node {}: bad base64 block: {e}", t.place.node())))
}

/// Delete a file of a container: `?path=` or a JSON body `{"path": ...}`.
#[utoipa::path(
    delete, path = "/nodes/{nodeid}/containers/{containerid}/filesystem", tag = "containers",
    params(
        ("nodeid" = String, Path, description = "Node id"),
        ("containerid" = String, Path, description = "Container name"),
        ("path" = Option<String>, Query, description = "Path inside the container (or the body's path)"),
    ),
    request_body(content = Option<DeleteFile>, description = "The path, when not in the query"),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Missing path", body = ErrorBody),
        (status = 404, description = "Unknown node, container or file", body = ErrorBody),
        (status = 409, description = "Container not running", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn delete_file(
    State(s): State<AppState>,
    Path((nodeid, containerid)): Path<(String, String)>,
    query: Result<Query<PathQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let from_query = file_path(query);
    let path = match from_query {
        Ok(p) => p,
        Err(e) => {
            let body = body.map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge("request body is too large".to_string())
                } else {
                    ApiError::BadRequest(format!("cannot read request body: {}", r.body_text()))
                }
            })?;
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(e);
            }
            let d: DeleteFile = decode_json(&body)?;
            if d.path.is_empty() {
                return Err(ApiError::BadRequest("path must not be empty".to_string()));
            }
            d.path
        }
    };
    let t = target(&s, &nodeid, &containerid).await?;
    let _: Value = fs_call(&t, FS_REMOVE, &path, &FsPathArgs { path: path.clone() }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> CreateContainer {
        serde_json::from_value(v).expect("body")
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = json!({"id": "vfw_22", "hostname": "vfw_22", "flist": "http://h/x.tar.gz",
            "nics": [{"type": "default"}], "ports": ["8080:80"]});
        validate(&mut body(ok)).expect("seed body is valid");
        let cases = [
            (json!({"id": "a b", "flist": "/x"}), "container id"),
            (json!({"id": "a", "flist": ""}), "flist must not be empty"),
            (json!({"id": "a", "flist": "ftp://x"}), "flist"),
            (
                json!({"id": "a", "flist": "/x", "nics": [{"type": "vlan", "id": "3"}]}),
                "vxlan",
            ),
            (
                json!({"id": "a", "flist": "/x", "nics": [{"type": "default"}, {"type": "default"}]}),
                "at most one",
            ),
            (
                json!({"id": "a", "flist": "/x", "nics": [{"type": "default"}], "ports": ["80"]}),
                "port",
            ),
            (
                json!({"id": "a", "flist": "/x", "ports": ["80:80"]}),
                "ports need",
            ),
            (
                json!({"id": "a", "flist": "/x", "filesystems": ["x"]}),
                "pool:filesystem",
            ),
        ];
        for (v, want) in cases {
            let e = validate(&mut body(v.clone())).expect_err("invalid");
            assert!(e.to_string().contains(want), "{v}: {e}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }
        let mut b = body(json!({"id": "c1", "flist": "file:///x.tar"}));
        validate(&mut b).expect("valid");
        assert_eq!(b.hostname, "c1");
    }
}
