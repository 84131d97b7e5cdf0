//! What core0's built-in commands return (the JSON in `data`, level 20), with the original's
//! field names (gopsutil structs of 2017).

use crate::wire::Command;
use serde::{Deserialize, Serialize};

/// `info.mem`: bytes (and a percentage) from `/proc/meminfo`, gopsutil's `VirtualMemoryStat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemInfo {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
    /// total - free - buffers - cached.
    pub used: u64,
    /// used / total × 100.
    pub used_percent: f64,
    /// MemFree.
    pub free: u64,
    /// Active.
    pub active: u64,
    /// Inactive.
    pub inactive: u64,
    /// Always 0 on Linux (a BSD counter).
    pub wired: u64,
    /// Buffers.
    pub buffers: u64,
    /// Cached (+ SReclaimable, as gopsutil does).
    pub cached: u64,
    /// Writeback.
    pub writeback: u64,
    /// Dirty.
    pub dirty: u64,
    /// WritebackTmp.
    pub writebacktmp: u64,
    /// Shmem.
    pub shared: u64,
    /// Slab.
    pub slab: u64,
    /// PageTables.
    pub pagetables: u64,
    /// SwapCached.
    pub swapcached: u64,
}

/// `info.cpu`: one entry per logical CPU, gopsutil's `InfoStat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// Logical CPU number.
    pub cpu: i32,
    /// vendor_id.
    pub vendor_id: String,
    /// cpu family.
    pub family: String,
    /// model.
    pub model: String,
    /// stepping.
    pub stepping: i32,
    /// physical id.
    pub physical_id: String,
    /// core id.
    pub core_id: String,
    /// Cores of this entry (1 per logical CPU, as gopsutil).
    pub cores: i32,
    /// model name.
    pub model_name: String,
    /// cpu MHz.
    pub mhz: f64,
    /// cache size in KB.
    pub cache_size: i32,
    /// flags.
    pub flags: Vec<String>,
    /// microcode.
    pub microcode: String,
}

/// `info.disk`: one mounted filesystem. `size`, `free` and `type` are Grid extensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DiskPartition {
    /// Source device (`/dev/vda`, `proc`, …).
    pub device: String,
    /// Mount point.
    pub mountpoint: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount options.
    pub opts: String,
    /// Total bytes (statvfs), 0 when unknown.
    #[serde(default)]
    pub size: u64,
    /// Free bytes (statvfs), 0 when unknown.
    #[serde(default)]
    pub free: u64,
    /// `nvme`, `ssd` or `hdd` for a block device; absent otherwise.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One address of a NIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NicAddr {
    /// `ip/prefix`.
    pub addr: String,
}

/// `info.nic`: one network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NicInfo {
    /// MTU.
    pub mtu: u32,
    /// Interface name.
    pub name: String,
    /// MAC address (`aa:bb:..`), "" when none.
    pub hardwareaddr: String,
    /// `up`, `broadcast`, `loopback`, `pointtopoint`, `multicast`.
    pub flags: Vec<String>,
    /// Addresses.
    pub addrs: Vec<NicAddr>,
    /// Mb/s from `/sys/class/net/<if>/speed`, 0 when unknown.
    #[serde(default)]
    pub speed: i64,
}

/// `info.os`, gopsutil's host `InfoStat`, plus Grid's `instanceId`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct OsInfo {
    /// Hostname.
    pub hostname: String,
    /// Seconds since boot.
    pub uptime: u64,
    /// Boot time, epoch seconds.
    pub boot_time: u64,
    /// Number of processes.
    pub procs: u64,
    /// `linux`.
    pub os: String,
    /// e.g. `debian`.
    pub platform: String,
    /// e.g. `debian`.
    pub platform_family: String,
    /// e.g. `12.8`.
    pub platform_version: String,
    /// Kernel release.
    pub kernel_version: String,
    /// e.g. `kvm`, "" when none detected.
    pub virtualization_system: String,
    /// `guest`, `host` or "".
    pub virtualization_role: String,
    /// /etc/machine-id (or the product uuid).
    pub hostid: String,
    /// Grid extension: changes on every core0 start and every reboot.
    #[serde(default)]
    pub instance_id: String,
}

/// `info.port`: a listening socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PortInfo {
    /// `tcp`, `tcp6`, `udp`, `udp6` or `unix`.
    pub network: String,
    /// Port (inet sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path (unix sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<String>,
    /// Bound address (inet sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Owning process, 0 when unknown.
    pub pid: i64,
}

/// `info.version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VersionInfo {
    /// Branch (or the package version).
    pub branch: String,
    /// Revision.
    pub revision: String,
    /// Built from a dirty tree.
    pub dirty: bool,
}

/// Usage figures of a job, of core0, or (`core.state`) their sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CoreState {
    /// CPU percent since the previous sample (100 = one core).
    pub cpu: f64,
    /// Resident bytes.
    pub rss: u64,
    /// Virtual bytes.
    pub vms: u64,
    /// Swapped bytes.
    pub swap: u64,
    /// The pid where stats were taken, as text (always present, as in the original).
    #[serde(default)]
    pub debug: String,
    /// Grid extension on `core.state`: the agent's instance id.
    #[serde(
        default,
        rename = "instanceId",
        skip_serializing_if = "String::is_empty"
    )]
    pub instance_id: String,
    /// Grid extension on `core.state`: commands this agent instance has run (including this
    /// one), so that a benchmark can prove every answer came from the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<u64>,
}

/// `job.list`: a running job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// CPU percent since the previous sample of this job.
    pub cpu: f64,
    /// Resident bytes of the job's process.
    pub rss: u64,
    /// Virtual bytes.
    pub vms: u64,
    /// Swapped bytes.
    pub swap: u64,
    /// The job's pid as text ("" for built-ins).
    pub debug: String,
    /// Start, ms since the epoch.
    pub starttime: i64,
    /// The command that started it.
    pub cmd: Command,
}

/// Cumulative CPU seconds of a process, in the keys of the seed (lowercase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CpuTimes {
    /// User seconds.
    pub user: f64,
    /// System seconds.
    pub system: f64,
    /// Always 0 for a process.
    pub idle: f64,
    /// Always 0 for a process.
    pub nice: f64,
    /// Seconds waited for block I/O (delayacct), 0 when unavailable.
    pub iowait: f64,
    /// Always 0 for a process.
    pub irq: f64,
    /// Always 0 for a process.
    pub softirq: f64,
    /// Always 0 for a process.
    pub steal: f64,
    /// Always 0 for a process.
    pub stolen: f64,
    /// Guest seconds with nice.
    pub guestnice: f64,
}

/// `process.list`: an OS process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcessInfo {
    /// Pid.
    pub pid: i64,
    /// Parent pid.
    pub ppid: i64,
    /// Command line, arguments joined by spaces.
    pub cmdline: String,
    /// `comm`.
    pub name: String,
    /// Start, ms since the epoch.
    pub createtime: i64,
    /// Cumulative CPU seconds.
    pub cpu: CpuTimes,
    /// Resident bytes.
    pub rss: u64,
    /// Virtual bytes.
    pub vms: u64,
    /// Swapped bytes (VmSwap).
    pub swap: u64,
}

/// `filesystem.list`: a directory entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsEntry {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Whether it is a directory.
    pub is_dir: bool,
}
