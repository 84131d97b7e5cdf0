//! `/nodes...`: the node registry (join, list, get) and a node's direct endpoints (reboot, ping,
//! state and hardware info).

use super::target::{self, Target};
use super::{AppState, call_json};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{Json, Path};
use crate::reconcile::nodes as registry;
use axum::extract::State;
use axum::http::StatusCode;
use grid_client::NodeClient;
use grid_proto::api::{
    CoreStateResult, CpuInfo, DiskInfo, ErrorBody, JoinRequest, MemInfo, NicInfo, Node, OsInfo,
};
use grid_proto::commands::{CORE_REBOOT, INFO_CPU, INFO_DISK, INFO_MEM, INFO_NIC};
use grid_proto::{Command, info};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Bytes in a GiB (disk sizes are answered in GiB).
const GIB: u64 = 1024 * 1024 * 1024;
/// How long a node has to accept a reboot.
const REBOOT_ACCEPT: Duration = Duration::from_secs(5);

fn unknown_node(id: &str) -> ApiError {
    ApiError::NotFound(format!("node {id} not found"))
}

/// The client of a registered node: `404` when unknown, `503` when it cannot be reached.
///
/// The node controller's connection is reused; before its first health check (a node that has
/// just joined) or after it lost the node, a connection is tried here.
pub(crate) async fn node_client(s: &AppState, id: &str) -> ApiResult<NodeClient> {
    // The controller holds a connection only for registered nodes (it drops it when the node's
    // record is deleted), so the hot path needs no store read.
    if let Some(c) = s.nodes.client(id) {
        return Ok(c);
    }
    let spec = registry::node_spec(s.store.as_ref(), id)
        .await?
        .ok_or_else(|| unknown_node(id))?;
    let password = Some(spec.redis_password.as_str()).filter(|p| !p.is_empty());
    NodeClient::connect(&spec.redis_addr, password)
        .await
        .map_err(|e| ApiError::from_client(id, e))
}

/// Whether `presented` is one of the configured join tokens (constant time per token).
fn join_token_ok(configured: &[String], presented: &str) -> bool {
    let want = Sha256::digest(presented.as_bytes());
    let mut ok = false;
    for t in configured {
        ok |= bool::from(Sha256::digest(t.as_bytes()).ct_eq(&want));
    }
    ok
}

/// Registers a node that joined with `req`.
async fn join(s: &AppState, req: JoinRequest) -> ApiResult<()> {
    if !join_token_ok(&s.join_tokens, &req.join_token) {
        return Err(ApiError::Forbidden(format!(
            "node {} presented an unknown join token",
            req.id
        )));
    }
    let spec = registry::NodeSpec {
        token_hash: Some(registry::hash_token(&req.join_token)),
        id: req.id,
        hostname: req.hostname,
        redis_addr: req.redis_addr,
        redis_password: req.redis_password,
        instance_id: req.instance_id,
        source: registry::NodeSource::Join,
    };
    if spec.redis_addr.is_empty() {
        return Err(ApiError::BadRequest(
            "redisAddr must not be empty".to_string(),
        ));
    }
    registry::register_node(s.store.as_ref(), spec)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            registry::RegisterError::InvalidId(e) => ApiError::BadRequest(e.to_string()),
            e @ registry::RegisterError::TokenMismatch { .. } => ApiError::Conflict(e.to_string()),
            e => ApiError::internal(e),
        })
}

fn to_api(v: registry::NodeView) -> Node {
    Node {
        hostname: v.hostname,
        id: v.id,
        status: v.status,
    }
}

/// List every registered node.
#[utoipa::path(
    get, path = "/nodes", tag = "nodes",
    responses((status = 200, description = "Nodes", body = Vec<Node>))
)]
pub async fn list_nodes(State(s): State<AppState>) -> ApiResult<Json<Vec<Node>>> {
    let nodes = registry::list_nodes(s.store.as_ref()).await?;
    Ok(Json(nodes.into_iter().map(to_api).collect()))
}

/// A node agent registers itself (Grid extension; authenticated by its join token).
#[utoipa::path(
    post, path = "/nodes/join", tag = "nodes",
    security(()),
    request_body = JoinRequest,
    responses(
        (status = 204, description = "Registered"),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 403, description = "Bad join token", body = ErrorBody),
        (status = 409, description = "Node id registered from elsewhere", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn join_node(
    State(s): State<AppState>,
    Json(req): Json<JoinRequest>,
) -> ApiResult<StatusCode> {
    join(&s, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One node.
#[utoipa::path(
    get, path = "/nodes/{nodeid}", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 404, description = "Unknown node", body = ErrorBody),
    )
)]
pub async fn get_node(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Node>> {
    registry::get_node(s.store.as_ref(), &nodeid)
        .await?
        .map(|v| Json(to_api(v)))
        .ok_or_else(|| unknown_node(&nodeid))
}

/// Reboot a node (a safe reboot unless its agent opted in to real ones).
#[utoipa::path(
    post, path = "/nodes/{nodeid}/reboot", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 204, description = "The node took the reboot"),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
    )
)]
pub async fn reboot_node(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<StatusCode> {
    let client = s.node(&nodeid).await?;
    // The result of a reboot may never come: the node taking the command is the answer.
    let cmd = Command::new(uuid::Uuid::new_v4().to_string(), CORE_REBOOT, json!({}));
    client
        .spawn(&cmd, REBOOT_ACCEPT)
        .await
        .map_err(|e| ApiError::from_client(&nodeid, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether the node's agent answers: `true` or `false` (never 503).
#[utoipa::path(
    post, path = "/nodes/{nodeid}/ping", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Whether the agent answered", body = bool),
        (status = 404, description = "Unknown node", body = ErrorBody),
    )
)]
pub async fn ping_node(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<bool>> {
    let t = match Target::node(&s, &nodeid).await {
        Ok(t) => t,
        Err(ApiError::Unavailable(_)) => return Ok(Json(false)),
        Err(e) => return Err(e),
    };
    Ok(Json(target::ping(&t).await))
}

/// CPU and memory used by the node's agent and its jobs.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/state", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Usage", body = CoreStateResult),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_state(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<CoreStateResult>> {
    target::state(&Target::node(&s, &nodeid).await?).await
}

/// The node's CPUs.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/cpus", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "CPUs", body = Vec<CpuInfo>),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_cpus(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<CpuInfo>>> {
    let client = s.node(&nodeid).await?;
    let cpus: Vec<info::CpuInfo> = call_json(&client, &nodeid, INFO_CPU, &json!({})).await?;
    Ok(Json(cpus.into_iter().map(CpuInfo::from).collect()))
}

/// Maps `info.disk` partitions to the API's disks: block devices only, sizes in GiB.
pub fn disks_of(parts: Vec<info::DiskPartition>) -> Vec<DiskInfo> {
    parts
        .into_iter()
        .filter(|p| p.device.starts_with("/dev/"))
        .map(|p| DiskInfo {
            device: p.device,
            fstype: p.fstype,
            mountpoint: p.mountpoint,
            opts: p.opts,
            size: p.size / GIB,
            kind: p.kind,
        })
        .collect()
}

/// The node's mounted block devices.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/disks", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Disks", body = Vec<DiskInfo>),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_disks(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<DiskInfo>>> {
    let client = s.node(&nodeid).await?;
    let parts: Vec<info::DiskPartition> =
        call_json(&client, &nodeid, INFO_DISK, &json!({})).await?;
    Ok(Json(disks_of(parts)))
}

/// The node's memory.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/mem", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Memory", body = MemInfo),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_mem(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<MemInfo>> {
    let client = s.node(&nodeid).await?;
    let mem: info::MemInfo = call_json(&client, &nodeid, INFO_MEM, &json!({})).await?;
    Ok(Json(mem.into()))
}

/// The node's network interfaces.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/nics", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Interfaces", body = Vec<NicInfo>),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_nics(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<Vec<NicInfo>>> {
    let client = s.node(&nodeid).await?;
    let nics: Vec<info::NicInfo> = call_json(&client, &nodeid, INFO_NIC, &json!({})).await?;
    Ok(Json(nics.into_iter().map(NicInfo::from).collect()))
}

/// The node's operating system.
#[utoipa::path(
    get, path = "/nodes/{nodeid}/info", tag = "nodes",
    params(("nodeid" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "OS information", body = OsInfo),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "Node unreachable", body = ErrorBody),
        (status = 504, description = "Node too slow", body = ErrorBody),
    )
)]
pub async fn node_info(
    State(s): State<AppState>,
    Path(nodeid): Path<String>,
) -> ApiResult<Json<OsInfo>> {
    target::os_info(&Target::node(&s, &nodeid).await?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_keep_block_devices_in_gib() {
        let parts = vec![
            info::DiskPartition {
                device: "/dev/sda1".into(),
                mountpoint: "/".into(),
                fstype: "ext4".into(),
                opts: "rw".into(),
                size: 20 * GIB + 5,
                free: 0,
                kind: Some("ssd".into()),
            },
            info::DiskPartition {
                device: "tmpfs".into(),
                mountpoint: "/run".into(),
                fstype: "tmpfs".into(),
                ..Default::default()
            },
        ];
        let disks = disks_of(parts);
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].size, 20);
        assert_eq!(disks[0].kind.as_deref(), Some("ssd"));
    }

    #[test]
    fn join_tokens_are_matched_exactly() {
        let tokens = vec!["a".to_string(), "bb".to_string()];
        assert!(join_token_ok(&tokens, "bb"));
        assert!(!join_token_ok(&tokens, "b"));
        assert!(!join_token_ok(&[], ""));
    }
}
