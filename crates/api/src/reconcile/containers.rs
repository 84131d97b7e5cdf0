//! The container controller: containers on nodes (`desired/containers/<node>:<name>`).
//!
//! The desired record holds the create request and the wanted status (`running` or `halted`).
//! The apply finds the node's container by its tag `grid:<name>` (`corex.find`) and makes it
//! match: `corex.create` when there is none (tags `grid:<name>` and `grid-gen:<generation>`),
//! `corex.start` / `corex.stop` when its state differs, `corex.terminate` when the record was
//! deleted. Every resync applies again, so a container comes back after a node reboot. The
//! observed data is `{containerId, status, ip}`; a failed apply records the error with the HTTP
//! status it maps to (`errorStatus`), so the waiting handler answers it.

use super::{
    ApplyError, Controller, Desired, Observed, ReconcileError, desired_prefix, observed_prefix,
};
use crate::reconcile::nodes::{self as registry, NodesController};
use crate::store::{StateStore, StoreError, WatchEventKind, decode_json};
use futures::StreamExt;
use futures::future::BoxFuture;
use grid_client::{ClientError, NodeClient};
use grid_proto::api::{ContainerStatus, CreateContainer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The controller's kind: records live at `desired/containers/<node>:<name>`.
pub const KIND: &str = "containers";

/// `corex.create` (wire name).
pub const COREX_CREATE: &str = "corex.create";
/// `corex.list` (wire name).
pub const COREX_LIST: &str = "corex.list";
/// `corex.find` (wire name).
pub const COREX_FIND: &str = "corex.find";
/// `corex.terminate` (wire name).
pub const COREX_TERMINATE: &str = "corex.terminate";
/// `corex.stop` (wire name, Grid).
pub const COREX_STOP: &str = "corex.stop";
/// `corex.start` (wire name, Grid).
pub const COREX_START: &str = "corex.start";
/// `corex.dispatch` (wire name).
pub const COREX_DISPATCH: &str = "corex.dispatch";

/// How often every container is applied again.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(10);
/// Longest `corex.create` may take (the image download included).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(110);
/// Longest one apply may take.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Budget of the short corex calls (find, start, stop, terminate).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The desired record of a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    /// The node it lives on.
    pub node: String,
    /// The create request.
    pub create: CreateContainer,
    /// `running` or `halted`.
    pub status: ContainerStatus,
}

/// What the controller records about a container (`observed/containers/...`'s `data`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerData {
    /// core0's numeric id.
    pub container_id: Option<u64>,
    /// `running` or `halted` as last seen.
    pub status: Option<ContainerStatus>,
    /// Address on the node's bridge.
    pub ip: Option<String>,
    /// HTTP status of the last failure (for the waiting handler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
}

/// Errors of the container helpers.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The store failed.
    #[error("cannot read containers: {0}")]
    Store(#[from] StoreError),
    /// A reconcile helper failed.
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// A stored record does not decode.
    #[error("container record {key} is invalid: {source}")]
    BadRecord {
        /// The key.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The observed record was not removed in time.
    #[error("container {name} was not removed within {} s", after.as_secs())]
    Timeout {
        /// `<node>:<name>`.
        name: String,
        /// How long was waited.
        after: Duration,
    },
    /// Removing the container from its node failed.
    #[error("{message}")]
    DeleteFailed {
        /// The recorded error.
        message: String,
        /// Its HTTP status, when known.
        status: Option<u16>,
    },
}

/// The record name of container `name` on `node`.
pub fn record_name(node: &str, name: &str) -> String {
    format!("{node}:{name}")
}

/// A container as the API shows it: spec, generation and last outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    /// The name.
    pub name: String,
    /// The desired record.
    pub spec: ContainerSpec,
    /// Its generation.
    pub generation: u64,
    /// The last outcome.
    pub observed: Option<Observed>,
    /// Decoded data of the outcome.
    pub data: ContainerData,
}

impl ContainerView {
    /// `running` only when the node reported it running and nothing failed since.
    pub fn status(&self) -> ContainerStatus {
        match &self.observed {
            Some(o) if o.error.is_none() && self.data.status == Some(ContainerStatus::Running) => {
                ContainerStatus::Running
            }
            _ => ContainerStatus::Halted,
        }
    }
}

fn data_of(o: Option<&Observed>) -> ContainerData {
    o.and_then(|o| serde_json::from_value(o.data.clone()).ok())
        .unwrap_or_default()
}

fn decode_spec(key: &str, d: &Desired) -> Result<ContainerSpec, ContainerError> {
    serde_json::from_value(d.spec.clone()).map_err(|source| ContainerError::BadRecord {
        key: key.to_string(),
        source,
    })
}

/// Every container of `node`, sorted by name.
pub async fn list_containers(
    store: &dyn StateStore,
    node: &str,
) -> Result<Vec<ContainerView>, ContainerError> {
    let prefix = format!("{}{node}:", desired_prefix(KIND));
    let oprefix = format!("{}{node}:", observed_prefix(KIND));
    let mut observed = HashMap::new();
    for kv in store.list(&oprefix).await? {
        if let Some(name) = kv.key.strip_prefix(&oprefix) {
            observed.insert(name.to_string(), decode_json::<Observed>(&kv)?.value);
        }
    }
    let mut out = Vec::new();
    for kv in store.list(&prefix).await? {
        let Some(name) = kv.key.strip_prefix(&prefix) else {
            continue;
        };
        let d = decode_json::<Desired>(&kv)?.value;
        let spec = decode_spec(&kv.key, &d)?;
        let o = observed.remove(name);
        out.push(ContainerView {
            name: name.to_string(),
            data: data_of(o.as_ref()),
            spec,
            generation: d.generation,
            observed: o,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One container, if its desired record exists.
pub async fn get_container(
    store: &dyn StateStore,
    node: &str,
    name: &str,
) -> Result<Option<ContainerView>, ContainerError> {
    let rname = record_name(node, name);
    let Some(d) = super::get_desired(store, KIND, &rname).await? else {
        return Ok(None);
    };
    let spec = decode_spec(&super::desired_key(KIND, &rname), &d.value)?;
    let o = super::get_observed(store, KIND, &rname).await?;
    Ok(Some(ContainerView {
        name: name.to_string(),
        data: data_of(o.as_ref()),
        spec,
        generation: d.value.generation,
        observed: o,
    }))
}

/// Waits until the observed record of `<kind>/<name>` is gone (the deletion was applied), at most
/// `timeout`. A recorded deletion error is [`ContainerError::DeleteFailed`].
pub async fn wait_removed(
    store: &dyn StateStore,
    name: &str,
    timeout: Duration,
) -> Result<(), ContainerError> {
    let key = super::observed_key(KIND, name);
    let failed = |kv: &crate::store::KeyValue| -> Result<Option<ContainerError>, ContainerError> {
        let o = decode_json::<Observed>(kv)?.value;
        Ok(match (&o.error, o.status.as_str()) {
            (Some(e), super::STATUS_DELETING) => Some(ContainerError::DeleteFailed {
                message: e.clone(),
                status: data_of(Some(&o)).error_status,
            }),
            _ => None,
        })
    };
    let wait = async {
        loop {
            let snap = store.snapshot(&key).await?;
            match snap.kvs.iter().find(|kv| kv.key == key) {
                None => return Ok(()),
                Some(kv) => {
                    if let Some(e) = failed(kv)? {
                        return Err(e);
                    }
                }
            }
            let mut events = match store.watch(&key, snap.revision).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) if ev.kv.key == key => match ev.kind {
                        WatchEventKind::Delete => return Ok(()),
                        WatchEventKind::Put => {
                            if let Some(e) = failed(&ev.kv)? {
                                return Err(e);
                            }
                        }
                    },
                    Ok(_) => {}
                    Err(StoreError::Compacted { .. }) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(r) => r,
        Err(_) => Err(ContainerError::Timeout {
            name: name.to_string(),
            after: timeout,
        }),
    }
}

/// One entry of `corex.list` / `corex.find` (the fields Grid reads).
#[derive(Debug, Clone, Deserialize)]
struct CorexEntry {
    #[serde(default)]
    container: CorexContainer,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct CorexContainer {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    ip: Option<String>,
}

/// The HTTP status a failure of corex on the node maps to, from its message.
pub fn status_of_node_error(message: &str) -> u16 {
    let m = message.to_ascii_lowercase();
    if m.contains("already exists")
        || m.contains("already forwarded")
        || m.contains("already in use")
        || m.contains("port") && m.contains("taken")
        || m.contains("is already running")
        || m.contains("is already halted")
    {
        409
    } else if m.contains("storage pool") && m.contains("not found") {
        404
    } else if m.contains("no free address") {
        503
    } else if [
        "image",
        "url",
        "format",
        "flist",
        "download",
        "archive",
        "nic",
        "port",
        "hostname",
        "limit",
        "filesystem",
    ]
    .iter()
    .any(|w| m.contains(w))
    {
        400
    } else {
        500
    }
}

/// The HTTP status of a client error talking to a node.
fn status_of_client_error(e: &ClientError) -> u16 {
    match e {
        ClientError::Failed { message, .. } => status_of_node_error(message),
        ClientError::Timeout { .. } => 504,
        ClientError::Connect { .. }
        | ClientError::Redis { .. }
        | ClientError::Unresponsive { .. }
        | ClientError::NotPickedUp { .. } => 503,
        ClientError::BadResult { .. } | ClientError::Encode(_) => 500,
    }
}

/// A failure of one apply step, with its HTTP status.
struct StepError {
    status: u16,
    message: String,
}

fn step(node: &str, e: ClientError) -> StepError {
    let status = status_of_client_error(&e);
    let message = match &e {
        ClientError::Failed { message, .. } => message.clone(),
        _ if status == 503 => format!("node {node} is unreachable: {e}"),
        _ => format!("node {node}: {e}"),
    };
    StepError { status, message }
}

/// The arguments of `corex.create` for `spec` at `generation` (see CONTAINERS-CONTRACT.md).
pub fn create_args(spec: &ContainerSpec, generation: u64) -> Result<Value, String> {
    let c = &spec.create;
    let mut port = serde_json::Map::new();
    for p in &c.ports {
        let (host, container) = parse_port(p)?;
        port.insert(host, json!(container));
    }
    let mut init = Vec::new();
    for p in &c.init_processes {
        let env = p
            .environment
            .as_ref()
            .map(|e| e.to_map())
            .transpose()?
            .unwrap_or_default();
        init.push(json!({
            "name": p.name, "args": p.args, "dir": p.pwd, "env": env, "stdin": p.stdin,
        }));
    }
    let nics: Vec<Value> = c
        .nics
        .iter()
        .map(|n| {
            let mut v = json!({"type": n.kind, "id": n.id});
            if let Some(h) = &n.hwaddr {
                v["hwaddr"] = json!(h);
            }
            if let Some(cfg) = &n.config {
                v["config"] = json!(cfg);
            }
            v
        })
        .collect();
    let hostname = if c.hostname.is_empty() {
        c.id.clone()
    } else {
        c.hostname.clone()
    };
    Ok(json!({
        "root": c.flist,
        "mount": Value::Null,
        "host_network": c.host_networking,
        "nics": nics,
        "port": port,
        "privileged": c.privileged,
        "hostname": hostname,
        "storage": Value::Null,
        "tags": [format!("grid:{}", c.id), format!("grid-gen:{generation}")],
        "name": c.id,
        "limits": c.limits.clone().unwrap_or_default(),
        "init_processes": init,
        "filesystems": c.filesystems,
    }))
}

/// Splits a port forward `"host:container[/udp|/tcp]"` into the `corex.create` key
/// (`"8080"`, `"53/udp"`) and the container port.
pub fn parse_port(p: &str) -> Result<(String, u16), String> {
    let bad = || format!("port {p:?} is not \"host:container\" with an optional /tcp or /udp");
    let (spec, proto) = match p.rsplit_once('/') {
        Some((s, proto @ ("tcp" | "udp"))) => (s, Some(proto)),
        Some(_) => return Err(bad()),
        None => (p, None),
    };
    let (host, container) = spec.split_once(':').ok_or_else(bad)?;
    let port = |s: &str| s.parse::<u16>().ok().filter(|n| *n > 0);
    let (Some(host), Some(container)) = (port(host), port(container)) else {
        return Err(bad());
    };
    let key = match proto {
        Some("udp") => format!("{host}/udp"),
        _ => host.to_string(),
    };
    Ok((key, container))
}

/// The container controller (see the module docs).
pub struct ContainersController {
    store: Arc<dyn StateStore>,
    nodes: Arc<NodesController>,
    resync: Duration,
}

impl std::fmt::Debug for ContainersController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainersController")
            .field("resync", &self.resync)
            .finish()
    }
}

impl ContainersController {
    /// A controller reaching nodes through `nodes`' connections (or its own, from the store).
    pub fn new(store: Arc<dyn StateStore>, nodes: Arc<NodesController>) -> Self {
        Self {
            store,
            nodes,
            resync: DEFAULT_RESYNC,
        }
    }

    /// Sets the resync interval.
    pub fn with_resync(mut self, resync: Duration) -> Self {
        self.resync = resync;
        self
    }

    async fn client(&self, node: &str) -> Result<NodeClient, StepError> {
        if let Some(c) = self.nodes.client(node) {
            return Ok(c);
        }
        let spec = registry::node_spec(self.store.as_ref(), node)
            .await
            .map_err(|e| StepError {
                status: 500,
                message: e.to_string(),
            })?
            .ok_or_else(|| StepError {
                status: 404,
                message: format!("node {node} not found"),
            })?;
        let password = Some(spec.redis_password.as_str()).filter(|p| !p.is_empty());
        NodeClient::connect(&spec.redis_addr, password)
            .await
            .map_err(|e| step(node, e))
    }

    /// The node's containers tagged `grid:<name>`, by numeric id.
    async fn find(
        &self,
        client: &NodeClient,
        node: &str,
        name: &str,
    ) -> Result<BTreeMap<u64, CorexContainer>, StepError> {
        let found: BTreeMap<String, CorexEntry> = client
            .call_json(
                COREX_FIND,
                json!({"tags": [format!("grid:{name}")]}),
                CALL_TIMEOUT,
            )
            .await
            .map_err(|e| step(node, e))?;
        Ok(found
            .into_iter()
            .filter_map(|(id, e)| id.parse::<u64>().ok().map(|id| (id, e.container)))
            .collect())
    }

    async fn simple(
        &self,
        client: &NodeClient,
        node: &str,
        command: &str,
        id: u64,
    ) -> Result<(), StepError> {
        client
            .call_json::<Value>(command, json!({"container": id}), CALL_TIMEOUT)
            .await
            .map(drop)
            .map_err(|e| step(node, e))
    }

    /// `corex.create` for `spec`; the address is looked up when the container has a nic.
    async fn create(
        &self,
        client: &NodeClient,
        spec: &ContainerSpec,
        generation: u64,
    ) -> Result<ContainerData, StepError> {
        let node = spec.node.as_str();
        let args = create_args(spec, generation).map_err(|message| StepError {
            status: 400,
            message,
        })?;
        let id: u64 = client
            .call_json(COREX_CREATE, args, CREATE_TIMEOUT)
            .await
            .map_err(|e| step(node, e))?;
        let with_nic =
            !spec.create.host_networking && spec.create.nics.iter().any(|n| n.kind == "default");
        let ip = if with_nic {
            match self.find(client, node, &spec.create.id).await {
                Ok(f) => f.get(&id).and_then(|c| c.ip.clone()),
                Err(_) => None,
            }
        } else {
            None
        };
        Ok(ContainerData {
            container_id: Some(id),
            status: Some(ContainerStatus::Running),
            ip,
            error_status: None,
        })
    }

    async fn apply_spec(
        &self,
        spec: &ContainerSpec,
        generation: u64,
        last: Option<&ContainerData>,
    ) -> Result<ContainerData, StepError> {
        let node = spec.node.as_str();
        let name = spec.create.id.as_str();
        let client = self.client(node).await?;
        // Nothing was ever made for this record: create right away. Should the node have the
        // name after all (an apply whose outcome was not recorded), it says so and the usual
        // look-up below takes over.
        if spec.status == ContainerStatus::Running && last.is_none_or(|d| d.container_id.is_none())
        {
            match self.create(&client, spec, generation).await {
                Err(e) if e.status == 409 && e.message.contains("already exists") => {}
                other => return other,
            }
        }
        let found = self.find(&client, node, name).await?;
        let current = found.into_iter().next_back();
        let running = |c: &CorexContainer| c.state.as_deref() != Some("halted");
        match (spec.status, current) {
            (ContainerStatus::Running, None) => self.create(&client, spec, generation).await,
            (ContainerStatus::Running, Some((id, c))) => {
                if !running(&c) {
                    self.simple(&client, node, COREX_START, id).await?;
                }
                Ok(ContainerData {
                    container_id: Some(id),
                    status: Some(ContainerStatus::Running),
                    ip: c.ip,
                    error_status: None,
                })
            }
            (ContainerStatus::Halted, Some((id, c))) => {
                if running(&c) {
                    self.simple(&client, node, COREX_STOP, id).await?;
                }
                Ok(ContainerData {
                    container_id: Some(id),
                    status: Some(ContainerStatus::Halted),
                    ip: c.ip,
                    error_status: None,
                })
            }
            (ContainerStatus::Halted, None) => Ok(ContainerData {
                container_id: None,
                status: Some(ContainerStatus::Halted),
                ip: None,
                error_status: None,
            }),
        }
    }

    async fn remove(&self, rname: &str) -> Result<(), StepError> {
        let Some((node, name)) = rname.split_once(':') else {
            return Ok(());
        };
        let client = match self.client(node).await {
            Ok(c) => c,
            // The node itself is gone: nothing left to remove.
            Err(e) if e.status == 404 => return Ok(()),
            Err(e) => return Err(e),
        };
        for id in self.find(&client, node, name).await?.into_keys() {
            match self.simple(&client, node, COREX_TERMINATE, id).await {
                Err(e) if e.message.ends_with("not found") => {}
                other => other?,
            }
        }
        Ok(())
    }
}

impl Controller for ContainersController {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn apply<'a>(
        &'a self,
        name: &'a str,
        desired: Option<&'a Desired>,
        last: Option<&'a Observed>,
    ) -> BoxFuture<'a, Result<Observed, ApplyError>> {
        Box::pin(async move {
            let Some(desired) = desired else {
                return match self.remove(name).await {
                    Ok(()) => Ok(Observed::new("terminated", Value::Null)),
                    Err(e) => Err(ApplyError::Failed(e.message)),
                };
            };
            let spec: ContainerSpec = desired.decode(KIND, name)?;
            let last = last
                .filter(|o| o.error.is_none())
                .and_then(|o| serde_json::from_value::<ContainerData>(o.data.clone()).ok());
            Ok(
                match self
                    .apply_spec(&spec, desired.generation, last.as_ref())
                    .await
                {
                    Ok(data) => Observed::new(
                        match data.status {
                            Some(ContainerStatus::Running) => "running",
                            _ => "halted",
                        },
                        serde_json::to_value(&data).unwrap_or(Value::Null),
                    ),
                    Err(e) => {
                        tracing::debug!(container = name, error = %e.message, "container apply failed");
                        let data = ContainerData {
                            container_id: None,
                            status: Some(ContainerStatus::Halted),
                            ip: None,
                            error_status: Some(e.status),
                        };
                        Observed::with_error(
                            "halted",
                            e.message,
                            serde_json::to_value(&data).unwrap_or(Value::Null),
                        )
                    }
                },
            )
        })
    }

    fn resync_interval(&self) -> Duration {
        self.resync
    }

    fn apply_timeout(&self) -> Duration {
        APPLY_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_to_corex_keys() {
        assert_eq!(parse_port("8080:80").expect("tcp"), ("8080".into(), 80));
        assert_eq!(parse_port("8080:80/tcp").expect("tcp"), ("8080".into(), 80));
        assert_eq!(parse_port("53:53/udp").expect("udp"), ("53/udp".into(), 53));
        for bad in ["80", "a:80", "0:80", "80:70000", "80:80/sctp", "", ":"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_errors_map_to_statuses() {
        assert_eq!(status_of_node_error("container a already exists"), 409);
        assert_eq!(status_of_node_error("port 8080 already forwarded"), 409);
        assert_eq!(status_of_node_error("storage pool p not found"), 404);
        assert_eq!(
            status_of_node_error("unsupported image format: zip archive"),
            400
        );
        assert_eq!(status_of_node_error("download failed: 404"), 400);
        assert_eq!(status_of_node_error("cannot make cgroup: EIO"), 500);
    }

    #[test]
    fn create_args_follow_the_contract() {
        let create: CreateContainer = serde_json::from_value(json!({
            "id": "c1", "flist": "http://h/i.tar.gz", "ports": ["8080:80", "53:53/udp"],
            "nics": [{"type": "default"}],
            "initProcesses": [{"name": "/bin/sh", "args": ["-c", "x"], "env": ["A=1"]}],
            "limits": {"memory": 1024}
        }))
        .expect("body");
        let spec = ContainerSpec {
            node: "n1".into(),
            create,
            status: ContainerStatus::Running,
        };
        let a = create_args(&spec, 7).expect("args");
        assert_eq!(a["root"], "http://h/i.tar.gz");
        assert_eq!(a["hostname"], "c1");
        assert_eq!(a["tags"], json!(["grid:c1", "grid-gen:7"]));
        assert_eq!(a["port"], json!({"8080": 80, "53/udp": 53}));
        assert_eq!(a["init_processes"][0]["env"], json!({"A": "1"}));
        assert_eq!(a["limits"], json!({"memory": 1024}));
        assert_eq!(a["nics"], json!([{"type": "default", "id": ""}]));
    }
}
