//! JSON types of the Grid API (RAML `types.raml` names, with DECISIONS.md's fixes).
//!
//! Request bodies refuse unknown fields (`400` naming the field); responses carry exactly the
//! spec's fields plus the few documented Grid extensions.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words for the client.
    pub error: String,
}

/// Whether a node answers its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Answers its health check.
    Running,
    /// Does not answer.
    Halted,
}

/// A node as listed by `GET /nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Hostname of the node.
    pub hostname: String,
    /// Node id (MAC of the default-route NIC without colons).
    pub id: String,
    /// `running` or `halted`.
    pub status: NodeStatus,
}

/// Body of `POST /nodes/join`: a core0 registering itself (Grid extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// Node id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `host:port` of the node's Redis.
    pub redis_addr: String,
    /// Password of the node's Redis (never sent back to clients).
    #[serde(default)]
    pub redis_password: String,
    /// The agent's instance id.
    #[serde(default)]
    pub instance_id: String,
    /// The join token configured on the API.
    pub join_token: String,
}

/// `GET /nodes/{id}/mem`: exactly these ten fields, bytes of the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemInfo {
    /// Bytes in use by the kernel's active list.
    pub active: u64,
    /// Bytes available for new work.
    pub available: u64,
    /// Buffer bytes.
    pub buffers: u64,
    /// Page-cache bytes.
    pub cached: u64,
    /// Free bytes.
    pub free: u64,
    /// Inactive bytes.
    pub inactive: u64,
    /// Total bytes.
    pub total: u64,
    /// Used bytes.
    pub used: u64,
    /// Used percent.
    pub used_percent: f64,
    /// Wired bytes (0 on Linux).
    pub wired: u64,
}

impl From<crate::info::MemInfo> for MemInfo {
    fn from(m: crate::info::MemInfo) -> Self {
        Self {
            active: m.active,
            available: m.available,
            buffers: m.buffers,
            cached: m.cached,
            free: m.free,
            inactive: m.inactive,
            total: m.total,
            used: m.used,
            used_percent: m.used_percent,
            wired: m.wired,
        }
    }
}

/// `GET /nodes/{id}/cpus`: one logical CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// Cache size, KB.
    pub cache_size: i32,
    /// Cores.
    pub cores: i32,
    /// CPU family.
    pub family: String,
    /// CPU flags.
    pub flags: Vec<String>,
    /// Clock, MHz.
    pub mhz: f64,
}

impl From<crate::info::CpuInfo> for CpuInfo {
    fn from(c: crate::info::CpuInfo) -> Self {
        Self {
            cache_size: c.cache_size,
            cores: c.cores,
            family: c.family,
            flags: c.flags,
            mhz: c.mhz,
        }
    }
}

/// `GET /nodes/{id}/disks`: a mounted filesystem on a block device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskInfo {
    /// Device.
    pub device: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount point.
    pub mountpoint: String,
    /// Mount options.
    pub opts: String,
    /// Size, GiB (rounded down).
    pub size: u64,
    /// `nvme`, `ssd` or `hdd`; null when the device kind is unknown.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `GET /nodes/{id}/nics`: a network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NicInfo {
    /// `ip/prefix` addresses.
    pub addrs: Vec<String>,
    /// Flags (`up`, `broadcast`, …).
    pub flags: Vec<String>,
    /// MAC address.
    pub hardwareaddr: String,
    /// MTU.
    pub mtu: u32,
    /// Name.
    pub name: String,
}

impl From<crate::info::NicInfo> for NicInfo {
    fn from(n: crate::info::NicInfo) -> Self {
        Self {
            addrs: n.addrs.into_iter().map(|a| a.addr).collect(),
            flags: n.flags,
            hardwareaddr: n.hardwareaddr,
            mtu: n.mtu,
            name: n.name,
        }
    }
}

/// `GET /nodes/{id}/info`: the node's OS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OsInfo {
    /// Boot time, epoch seconds.
    pub boot_time: u64,
    /// Hostname.
    pub hostname: String,
    /// `linux`.
    pub os: String,
    /// Distribution.
    pub platform: String,
    /// Distribution family.
    pub platform_family: String,
    /// Distribution version.
    pub platform_version: String,
    /// Number of processes.
    pub procs: u64,
    /// Seconds since boot.
    pub uptime: u64,
    /// `guest`, `host` or "".
    pub virtualization_role: String,
    /// e.g. `kvm`.
    pub virtualization_system: String,
    /// Kernel release (Grid extension).
    pub kernel_version: String,
    /// The agent's instance id; changes on every agent start and reboot (Grid extension).
    pub instance_id: String,
}

impl From<crate::info::OsInfo> for OsInfo {
    fn from(o: crate::info::OsInfo) -> Self {
        Self {
            boot_time: o.boot_time,
            hostname: o.hostname,
            os: o.os,
            platform: o.platform,
            platform_family: o.platform_family,
            platform_version: o.platform_version,
            procs: o.procs,
            uptime: o.uptime,
            virtualization_role: o.virtualization_role,
            virtualization_system: o.virtualization_system,
            kernel_version: o.kernel_version,
            instance_id: o.instance_id,
        }
    }
}

/// `GET /nodes/{id}/state`: usage of the agent and its jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CoreStateResult {
    /// CPU percent (100 = one core).
    pub cpu: f64,
    /// Resident bytes.
    pub rss: u64,
    /// Virtual bytes.
    pub vms: u64,
    /// Swapped bytes.
    pub swap: u64,
    /// The agent's instance id (Grid extension).
    pub instance_id: String,
    /// Commands this agent instance has run, this one included (Grid extension).
    pub commands: u64,
}

impl From<crate::info::CoreState> for CoreStateResult {
    fn from(s: crate::info::CoreState) -> Self {
        Self {
            cpu: s.cpu,
            rss: s.rss,
            vms: s.vms,
            swap: s.swap,
            instance_id: s.instance_id,
            commands: s.commands.unwrap_or(0),
        }
    }
}

/// `GET .../jobs`: a running job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobListItem {
    /// Job id.
    pub id: String,
    /// Start, ms since the epoch.
    pub start_time: i64,
}

/// `GET .../jobs/{jobid}`: a running job's state, then its full result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    /// Job id.
    pub id: String,
    /// Command name (`core.system`, `bash`, …).
    pub name: String,
    /// 20 when `data` holds JSON.
    pub level: u16,
    /// Start, ms since the epoch.
    pub start_time: i64,
    /// Captured stdout (last 1000 lines).
    pub stdout: String,
    /// Captured stderr (last 1000 lines).
    pub stderr: String,
    /// `running`, `success`, `error`, `timeout`, `killed`, `unknown_cmd`, `duplicate_id`.
    pub state: String,
    /// Result payload.
    pub data: String,
    /// Exit status of a process job (Grid extension); null while running or for built-ins.
    pub code: Option<i32>,
}

impl JobResult {
    /// The answer for a job that is still running.
    pub fn running(id: &str, name: &str, start_time: i64) -> Self {
        Self {
            id: id.to_string(),
            name: name.to_string(),
            level: 0,
            start_time,
            stdout: String::new(),
            stderr: String::new(),
            state: crate::State::Running.api_str().to_string(),
            data: String::new(),
            code: None,
        }
    }
}

impl From<&crate::CommandResult> for JobResult {
    fn from(r: &crate::CommandResult) -> Self {
        Self {
            id: r.id.clone(),
            name: r.command.clone(),
            level: r.level,
            start_time: r.starttime,
            stdout: r.stdout().to_string(),
            stderr: r.stderr().to_string(),
            state: r.state.api_str().to_string(),
            data: r.data.clone(),
            code: r.code,
        }
    }
}

/// Environment of a process: a `KEY=VALUE` list or a map.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Environment {
    /// `["KEY=VALUE", ...]`.
    List(Vec<String>),
    /// `{"KEY": "VALUE"}`.
    Map(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for Environment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::Array(_) => serde_json::from_value(v)
                .map(Environment::List)
                .map_err(|_| {
                    serde::de::Error::custom("env must be a list of KEY=VALUE strings or a map")
                }),
            serde_json::Value::Object(_) => serde_json::from_value(v)
                .map(Environment::Map)
                .map_err(|_| {
                    serde::de::Error::custom("env must be a list of KEY=VALUE strings or a map")
                }),
            _ => Err(serde::de::Error::custom(
                "env must be a list of KEY=VALUE strings or a map",
            )),
        }
    }
}

impl Environment {
    /// The environment as a map; a list item without `=` is an error naming it.
    pub fn to_map(&self) -> Result<BTreeMap<String, String>, String> {
        match self {
            Environment::Map(m) => Ok(m.clone()),
            Environment::List(items) => items
                .iter()
                .map(|item| match item.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                    _ => Err(format!("env item {item:?} is not KEY=VALUE")),
                })
                .collect(),
        }
    }
}

/// `POST .../processes`: start a process as a job (RAML `CoreSystem`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CoreSystem {
    /// Executable.
    pub name: String,
    /// Working directory ("" = the agent's).
    #[serde(default)]
    pub pwd: String,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment; also accepted as `env`.
    #[serde(default, alias = "env")]
    pub environment: Option<Environment>,
    /// Written to stdin, then closed.
    #[serde(default)]
    pub stdin: String,
    /// Seconds before the job is killed with state `timeout`; 0 = none (Grid extension).
    #[serde(default)]
    pub max_time: u64,
    /// Named queue: jobs in one queue run one at a time (Grid extension).
    #[serde(default)]
    pub queue: Option<String>,
}

/// CPU seconds of a process (lowercase keys, as in the seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct CpuStats {
    /// Guest nice seconds.
    pub guestnice: f64,
    /// Idle seconds.
    pub idle: f64,
    /// I/O wait seconds.
    pub iowait: f64,
    /// IRQ seconds.
    pub irq: f64,
    /// Nice seconds.
    pub nice: f64,
    /// Soft IRQ seconds.
    pub softirq: f64,
    /// Steal seconds.
    pub steal: f64,
    /// Stolen seconds.
    pub stolen: f64,
    /// System seconds.
    pub system: f64,
    /// User seconds.
    pub user: f64,
}

impl From<crate::info::CpuTimes> for CpuStats {
    fn from(c: crate::info::CpuTimes) -> Self {
        Self {
            guestnice: c.guestnice,
            idle: c.idle,
            iowait: c.iowait,
            irq: c.irq,
            nice: c.nice,
            softirq: c.softirq,
            steal: c.steal,
            stolen: c.stolen,
            system: c.system,
            user: c.user,
        }
    }
}

/// `GET .../processes`: an OS process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Process {
    /// Command line.
    pub cmdline: String,
    /// Cumulative CPU seconds.
    pub cpu: CpuStats,
    /// Pid.
    pub pid: i64,
    /// Resident bytes.
    pub rss: u64,
    /// Swapped bytes.
    pub swap: u64,
    /// Virtual bytes.
    pub vms: u64,
}

impl From<crate::info::ProcessInfo> for Process {
    fn from(p: crate::info::ProcessInfo) -> Self {
        Self {
            cmdline: p.cmdline,
            cpu: p.cpu.into(),
            pid: p.pid,
            rss: p.rss,
            swap: p.swap,
            vms: p.vms,
        }
    }
}

/// `POST .../processes/{pid}` and `.../jobs/{jobid}`: send a signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessSignal {
    /// Signal number (1–64).
    pub signal: i32,
}

/// Whether a container runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    /// The container runs.
    Running,
    /// The container is stopped (or its node is unreachable).
    Halted,
}

/// Address settings of a `vlan` or `vxlan` nic (RAML `ContainerNIC.config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerNicConfig {
    /// Use DHCP; when true the other fields are ignored.
    #[serde(default)]
    pub dhcp: bool,
    /// Address with prefix, e.g. `10.0.0.2/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
}

/// A network interface of a container (RAML `ContainerNIC`). Only `default` (the node's NAT
/// bridge) is supported for now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerNic {
    /// `default`; `vlan`, `vxlan`, `zerotier` and `bridge` come later.
    #[serde(rename = "type")]
    pub kind: String,
    /// VLAN tag, VXLAN id or ZeroTier network id ("" for `default`).
    #[serde(default)]
    pub id: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hwaddr: Option<String>,
    /// Address settings (vlan and vxlan only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerNicConfig>,
    /// `up` or `down`: set in answers, ignored in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// Resource limits of a container (Grid extension); each is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ContainerLimits {
    /// CPUs (e.g. `0.5` = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Most processes at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// `POST /nodes/{nodeid}/containers`: a container to create (RAML `CreateContainer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateContainer {
    /// The container's name, unique on its node (`[A-Za-z0-9_.-]{1,64}`); also accepted as `name`.
    #[serde(alias = "name")]
    pub id: String,
    /// Hostname inside the container ("" = the name).
    #[serde(default)]
    pub hostname: String,
    /// URL of the root filesystem image (`http(s)://`, `file://` or an absolute path on the node):
    /// a tar archive, optionally gzip-compressed.
    pub flist: String,
    /// Processes started when the container boots; also accepted as `initprocesses`.
    #[serde(default, alias = "initprocesses")]
    pub init_processes: Vec<CoreSystem>,
    /// `pool:fs` filesystems, mounted at `/fs/<pool>/<fs>`.
    #[serde(default)]
    pub filesystems: Vec<String>,
    /// Network interfaces.
    #[serde(default)]
    pub nics: Vec<ContainerNic>,
    /// Share the node's network namespace.
    #[serde(default)]
    pub host_networking: bool,
    /// Port forwards `"host:container"`, optionally with `/tcp` or `/udp`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Backing store of an original flist (ignored: FUSE flists are not supported).
    #[serde(default)]
    pub storage: String,
    /// Run with the full capability set (Grid extension).
    #[serde(default)]
    pub privileged: bool,
    /// Resource limits (Grid extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ContainerLimits>,
}

/// `GET /nodes/{nodeid}/containers`: a container in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContainerListItem {
    /// Image URL.
    pub flist: String,
    /// Hostname.
    pub hostname: String,
    /// The container's name.
    pub id: String,
    /// `running` or `halted`.
    pub status: ContainerStatus,
}

/// `GET /nodes/{nodeid}/containers/{containerid}`: the whole spec, its status and core0 id
/// (RAML `Container`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// The container's name (Grid extension).
    pub id: String,
    /// core0's numeric id of the container; null until it was made.
    pub container_id: Option<u64>,
    /// `running` or `halted`.
    pub status: ContainerStatus,
    /// Hostname.
    pub hostname: String,
    /// Image URL.
    pub flist: String,
    /// Processes started at boot (lowercase key, as in the RAML).
    #[serde(rename = "initprocesses")]
    pub init_processes: Vec<CoreSystem>,
    /// `pool:fs` filesystems.
    pub filesystems: Vec<String>,
    /// Network interfaces, with their status.
    pub nics: Vec<ContainerNic>,
    /// Shares the node's network namespace.
    pub host_networking: bool,
    /// Port forwards.
    pub ports: Vec<String>,
    /// As given at creation.
    pub storage: String,
    /// Full capability set (Grid extension).
    pub privileged: bool,
    /// Resource limits (Grid extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ContainerLimits>,
    /// Address on the node's bridge (Grid extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Why the last apply to the node failed, if it did (Grid extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `DELETE .../filesystem` with a JSON body (RAML `DeleteFile`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteFile {
    /// The path inside the container.
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn core_system_accepts_env_alias_list_and_map() {
        let a: CoreSystem =
            serde_json::from_value(json!({"name": "x", "env": ["A=1"]})).expect("list");
        assert_eq!(a.environment.expect("env").to_map().expect("map")["A"], "1");
        let b: CoreSystem =
            serde_json::from_value(json!({"name": "x", "environment": {"B": "2"}})).expect("map");
        assert_eq!(b.environment.expect("env").to_map().expect("map")["B"], "2");
    }

    #[test]
    fn core_system_refuses_unknown_fields() {
        let e = serde_json::from_value::<CoreSystem>(json!({"name": "x", "bogus": 1}))
            .expect_err("unknown field");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn mem_info_has_exactly_the_seed_fields() {
        let v = serde_json::to_value(MemInfo::from(crate::info::MemInfo::default()))
            .expect("serialize");
        let mut keys: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "active",
                "available",
                "buffers",
                "cached",
                "free",
                "inactive",
                "total",
                "used",
                "usedPercent",
                "wired"
            ]
        );
    }

    #[test]
    fn create_container_accepts_the_seed_body_and_both_spellings() {
        let c: CreateContainer = serde_json::from_value(json!({
            "id": "vfw_22", "hostname": "vfw_22", "flist": "http://x/a.tar.gz",
            "hostNetworking": false, "filesystems": [], "initprocesses": [],
            "ports": [], "nics": [{"type": "default"}]
        }))
        .expect("seed body");
        assert_eq!(c.nics[0].kind, "default");
        let c: CreateContainer = serde_json::from_value(json!({
            "name": "a", "flist": "/x.tar", "initProcesses": [{"name": "/bin/sh"}]
        }))
        .expect("camel case and name");
        assert_eq!(c.id, "a");
        assert_eq!(c.init_processes[0].name, "/bin/sh");
        let e = serde_json::from_value::<CreateContainer>(
            json!({"id": "a", "flist": "/x", "bogus": 1}),
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e =
            serde_json::from_value::<CreateContainer>(json!({"id": "a"})).expect_err("no flist");
        assert!(e.to_string().contains("flist"), "{e}");
    }
}
