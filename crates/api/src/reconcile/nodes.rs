//! The node controller: registered nodes (`desired/nodes/<id>`) and their health.
//!
//! A node is registered by its own join (`POST /nodes/join`) or by the API's configuration. Its
//! apply is a health check: `core.ping` through the node's Redis, with `info.os` to learn the
//! hostname and instance id when they are unknown or after a failure. The observed status is
//! `running`, or `halted` (with the error) once the node failed two checks in a row. The
//! controller keeps one [`NodeClient`] per node, which HTTP handlers reuse through
//! [`NodesController::client`].

use super::{
    ApplyError, Controller, Desired, Observed, ReconcileError, cas_desired, desired_prefix,
    get_desired, observed_prefix,
};
use crate::store::{StateStore, StoreError, decode_json};
use futures::future::BoxFuture;
use grid_client::{ClientError, NodeClient};
use grid_proto::NodeId;
use grid_proto::api::NodeStatus;
use grid_proto::commands::{CORE_PING, INFO_OS};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The controller's kind: records live at `desired/nodes/<id>` and `observed/nodes/<id>`.
pub const KIND: &str = "nodes";

/// Observed status of a node that answers.
pub const STATUS_RUNNING: &str = "running";

/// Observed status of a node that does not answer.
pub const STATUS_HALTED: &str = "halted";

/// How often every node is checked.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(1);

/// How long a node has to answer `core.ping` (and to accept a connection).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Failed checks in a row after which a running node is `halted`.
pub const DEFAULT_FAILURES_TO_HALT: u32 = 2;

/// Compare-and-swap attempts of [`register_node`].
const MAX_REGISTER_ATTEMPTS: usize = 64;

/// How a node came to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeSource {
    /// The node joined by itself with the join token.
    Join,
    /// The node is listed in the API's configuration.
    Config,
}

/// The desired record of a node (`desired/nodes/<id>`). Holds the Redis password: never sent
/// to clients (see [`NodeView`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Node id.
    pub id: String,
    /// Hostname as registered (the node's own answer wins once known).
    pub hostname: String,
    /// `host:port` of the node's Redis.
    pub redis_addr: String,
    /// Password of the node's Redis ("" = none).
    #[serde(default)]
    pub redis_password: String,
    /// Instance id as registered ("" = unknown).
    #[serde(default)]
    pub instance_id: String,
    /// Join or configuration.
    pub source: NodeSource,
    /// [`hash_token`] of the join token a joined node presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
}

/// What the API shows of a node: desired and observed merged, no secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Hostname: the node's own answer, else the registered one.
    pub hostname: String,
    /// Running when the last check of the current registration succeeded.
    pub status: NodeStatus,
    /// The agent's instance id ("" when unknown).
    pub instance_id: String,
    /// `host:port` of the node's Redis.
    pub redis_addr: String,
}

/// Errors of node registration.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The node id is not a valid id.
    #[error("invalid node id: {0}")]
    InvalidId(#[from] grid_proto::IdError),
    /// A node joined with a token already holds this id, and the token presented differs.
    #[error("node {id} is registered with another join token")]
    TokenMismatch {
        /// The node id.
        id: String,
    },
    /// The store failed.
    #[error("cannot register node: {0}")]
    Store(#[from] ReconcileError),
    /// Too many concurrent registrations of one id.
    #[error("node {id} kept changing, gave up registering it")]
    Contention {
        /// The node id.
        id: String,
    },
}

/// Errors reading nodes.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error("cannot read nodes: {0}")]
    Store(#[from] StoreError),
    /// A stored node record does not decode.
    #[error("node record {key} is invalid: {source}")]
    BadRecord {
        /// The key.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Hashes a join token for storage and comparison (hex SHA-256).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn same_hash(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Creates or updates the node's desired record; returns its generation (unchanged when the spec
/// is the same). A node that joined with a token can only be replaced by a join presenting the
/// same token ([`RegisterError::TokenMismatch`]).
pub async fn register_node(store: &dyn StateStore, spec: NodeSpec) -> Result<u64, RegisterError> {
    NodeId::new(spec.id.clone())?;
    let spec_json = serde_json::to_value(&spec).map_err(|source| {
        ReconcileError::Store(StoreError::Json {
            key: super::desired_key(KIND, &spec.id),
            source,
        })
    })?;
    for _ in 0..MAX_REGISTER_ATTEMPTS {
        let current = get_desired(store, KIND, &spec.id).await?;
        if let Some(cur) = &current {
            // An undecodable record is replaced: there is no token to protect in it.
            if let Ok(old) = serde_json::from_value::<NodeSpec>(cur.value.spec.clone()) {
                if old.source == NodeSource::Join
                    && let Some(old_hash) = &old.token_hash
                {
                    let presented = spec.token_hash.as_deref().unwrap_or("");
                    if !same_hash(old_hash, presented) {
                        return Err(RegisterError::TokenMismatch { id: spec.id });
                    }
                }
                if old == spec {
                    return Ok(cur.value.generation);
                }
            }
        }
        match cas_desired(store, KIND, &spec.id, current.as_ref(), spec_json.clone()).await {
            Err(ReconcileError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(e.into()),
            Ok(generation) => return Ok(generation),
        }
    }
    Err(RegisterError::Contention { id: spec.id })
}

/// The registered spec of a node (with its Redis password: for the API's own use only).
pub async fn node_spec(store: &dyn StateStore, id: &str) -> Result<Option<NodeSpec>, NodeError> {
    let key = super::desired_key(KIND, id);
    let Some(kv) = store.get(&key).await? else {
        return Ok(None);
    };
    let d = decode_json::<Desired>(&kv)?.value;
    serde_json::from_value(d.spec)
        .map(Some)
        .map_err(|source| NodeError::BadRecord { key, source })
}

fn view(spec: NodeSpec, generation: u64, observed: Option<&Observed>) -> NodeView {
    let current = observed.filter(|o| o.observed_generation >= generation);
    let status = match current {
        Some(o) if o.status == STATUS_RUNNING => NodeStatus::Running,
        _ => NodeStatus::Halted,
    };
    let text = |field: &str| {
        observed
            .and_then(|o| o.data.get(field))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    NodeView {
        hostname: text("hostname").unwrap_or(spec.hostname),
        instance_id: text("instanceId").unwrap_or(spec.instance_id),
        id: spec.id,
        status,
        redis_addr: spec.redis_addr,
    }
}

fn decode_spec(key: &str, d: &Desired) -> Result<NodeSpec, NodeError> {
    serde_json::from_value(d.spec.clone()).map_err(|source| NodeError::BadRecord {
        key: key.to_string(),
        source,
    })
}

/// Every registered node, sorted by id, with its status (no observed record yet = halted).
pub async fn list_nodes(store: &dyn StateStore) -> Result<Vec<NodeView>, NodeError> {
    let desired = store.list(&desired_prefix(KIND)).await?;
    let oprefix = observed_prefix(KIND);
    let mut observed = HashMap::new();
    for kv in store.list(&oprefix).await? {
        if let Some(id) = kv.key.strip_prefix(&oprefix) {
            observed.insert(id.to_string(), decode_json::<Observed>(&kv)?.value);
        }
    }
    let mut out = Vec::with_capacity(desired.len());
    for kv in &desired {
        let d = decode_json::<Desired>(kv)?.value;
        let spec = decode_spec(&kv.key, &d)?;
        let o = observed.get(&spec.id);
        out.push(view(spec, d.generation, o));
    }
    Ok(out)
}

/// One node, if registered.
pub async fn get_node(store: &dyn StateStore, id: &str) -> Result<Option<NodeView>, NodeError> {
    let key = super::desired_key(KIND, id);
    let Some(kv) = store.get(&key).await? else {
        return Ok(None);
    };
    let d = decode_json::<Desired>(&kv)?.value;
    let spec = decode_spec(&key, &d)?;
    let observed = match store.get(&super::observed_key(KIND, id)).await? {
        Some(kv) => Some(decode_json::<Observed>(&kv)?.value),
        None => None,
    };
    Ok(Some(view(spec, d.generation, observed.as_ref())))
}

/// What the controller knows of one node between checks.
#[derive(Default)]
struct NodeState {
    addr: String,
    password: String,
    client: Option<NodeClient>,
    /// Failed checks in a row.
    failures: u32,
    /// The last check (or the last `failures_to_halt` checks) said running.
    running: bool,
    hostname: String,
    instance_id: String,
    /// `info.os` answered since the last failure.
    info_known: bool,
}

impl NodeState {
    fn data(&self) -> Value {
        json!({ "hostname": self.hostname, "instanceId": self.instance_id })
    }
}

/// The node controller (see the module docs). Share it as `Arc<NodesController>`: the same value
/// goes to the [`super::Reconciler`] and to the HTTP handlers.
pub struct NodesController {
    nodes: Mutex<HashMap<String, NodeState>>,
    resync: Duration,
    ping_timeout: Duration,
    failures_to_halt: u32,
}

impl std::fmt::Debug for NodesController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodesController")
            .field("resync", &self.resync)
            .field("ping_timeout", &self.ping_timeout)
            .finish()
    }
}

impl Default for NodesController {
    fn default() -> Self {
        Self::new()
    }
}

impl NodesController {
    /// A controller with the default timing: check every second, 1 s to answer, halted after two
    /// failures.
    pub fn new() -> Self {
        Self::with_timing(
            DEFAULT_RESYNC,
            DEFAULT_PING_TIMEOUT,
            DEFAULT_FAILURES_TO_HALT,
        )
    }

    /// A controller with its own timing.
    pub fn with_timing(resync: Duration, ping_timeout: Duration, failures_to_halt: u32) -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            resync,
            ping_timeout,
            failures_to_halt: failures_to_halt.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeState>> {
        // The map stays consistent under every panic point (plain field writes), so a poisoned
        // lock is still usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The controller's connection to node `id`, when it has one (it reconnects on the next
    /// check after a connection error).
    pub fn client(&self, id: &str) -> Option<NodeClient> {
        self.lock().get(id).and_then(|n| n.client.clone())
    }

    async fn connect(&self, spec: &NodeSpec) -> Result<NodeClient, String> {
        let password = Some(spec.redis_password.as_str()).filter(|p| !p.is_empty());
        match tokio::time::timeout(
            self.ping_timeout,
            NodeClient::connect(&spec.redis_addr, password),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no connection to {} within {:?}",
                spec.redis_addr, self.ping_timeout
            )),
        }
    }

    async fn check(&self, name: &str, spec: NodeSpec) -> Observed {
        let (client, need_info) = {
            let mut nodes = self.lock();
            let st = nodes.entry(name.to_string()).or_default();
            if st.addr != spec.redis_addr || st.password != spec.redis_password {
                *st = NodeState {
                    addr: spec.redis_addr.clone(),
                    password: spec.redis_password.clone(),
                    ..NodeState::default()
                };
            }
            if st.hostname.is_empty() {
                st.hostname = spec.hostname.clone();
            }
            if st.instance_id.is_empty() {
                st.instance_id = spec.instance_id.clone();
            }
            (st.client.clone(), !st.info_known || st.failures > 0)
        };
        let client = match client {
            Some(c) => Ok(c),
            None => self.connect(&spec).await,
        };
        let pinged = match client {
            Ok(c) => match c
                .call_json::<Value>(CORE_PING, json!({}), self.ping_timeout)
                .await
            {
                Ok(_) => Ok(c),
                Err(e) => {
                    // Keep a healthy connection when only the agent is silent.
                    let keep = !matches!(
                        e,
                        ClientError::Connect { .. }
                            | ClientError::Redis { .. }
                            | ClientError::Unresponsive { .. }
                    );
                    Err((e.to_string(), keep.then_some(c)))
                }
            },
            Err(e) => Err((e, None)),
        };
        let info = match &pinged {
            Ok(c) if need_info => match c
                .call_json::<Value>(INFO_OS, json!({}), self.ping_timeout)
                .await
            {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::debug!(node = name, error = %e, "info.os failed");
                    None
                }
            },
            _ => None,
        };

        let mut nodes = self.lock();
        let st = nodes.entry(name.to_string()).or_default();
        match pinged {
            Ok(c) => {
                st.client = Some(c);
                st.failures = 0;
                st.running = true;
                if let Some(info) = info {
                    let text = |f: &str| info.get(f).and_then(Value::as_str).unwrap_or("");
                    if !text("hostname").is_empty() {
                        st.hostname = text("hostname").to_string();
                    }
                    if !text("instanceId").is_empty() {
                        st.instance_id = text("instanceId").to_string();
                    }
                    st.info_known = true;
                }
                Observed::new(STATUS_RUNNING, st.data())
            }
            Err((message, keep)) => {
                st.client = keep;
                st.failures = st.failures.saturating_add(1);
                st.info_known = false;
                if st.running && st.failures < self.failures_to_halt {
                    tracing::debug!(node = name, error = %message, "node missed a check");
                    Observed::new(STATUS_RUNNING, st.data())
                } else {
                    if st.running {
                        tracing::warn!(node = name, error = %message, "node halted");
                    }
                    st.running = false;
                    Observed::with_error(STATUS_HALTED, message, st.data())
                }
            }
        }
    }
}

impl Controller for NodesController {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn apply<'a>(
        &'a self,
        name: &'a str,
        desired: Option<&'a Desired>,
        _last: Option<&'a Observed>,
    ) -> BoxFuture<'a, Result<Observed, ApplyError>> {
        Box::pin(async move {
            let Some(desired) = desired else {
                self.lock().remove(name);
                return Ok(Observed::new(STATUS_HALTED, Value::Null));
            };
            let spec: NodeSpec = desired.decode(KIND, name)?;
            Ok(self.check(name, spec).await)
        })
    }

    fn resync_interval(&self) -> Duration {
        self.resync
    }
}

#[cfg(test)]
mod tests;
