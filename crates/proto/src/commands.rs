//! The wire names of core0 commands, in one place for both sides.

/// `core.ping`: answers `"PONG <version>"`.
pub const CORE_PING: &str = "core.ping";
/// `core.system`: runs a process ([`crate::args::SystemArgs`]).
pub const CORE_SYSTEM: &str = "core.system";
/// `bash`: runs `sh -c <script>` ([`crate::args::BashArgs`]).
pub const BASH: &str = "bash";
/// `core.state`: aggregated usage of core0 and its jobs ([`crate::info::CoreState`]).
pub const CORE_STATE: &str = "core.state";
/// `core.reboot`: a real reboot only with the opt-in flag, otherwise the safe reboot.
pub const CORE_REBOOT: &str = "core.reboot";
/// `job.list`: running jobs ([`crate::args::JobListArgs`] → [`crate::info::JobInfo`] list).
pub const JOB_LIST: &str = "job.list";
/// `job.kill`: signal a job ([`crate::args::JobKillArgs`] → bool).
pub const JOB_KILL: &str = "job.kill";
/// `job.killall`: terminate every unprotected job (→ `true`).
pub const JOB_KILLALL: &str = "job.killall";
/// `process.list`: OS processes ([`crate::args::ProcessListArgs`] → [`crate::info::ProcessInfo`] list).
pub const PROCESS_LIST: &str = "process.list";
/// `process.kill`: signal an OS process ([`crate::args::ProcessKillArgs`] → null).
pub const PROCESS_KILL: &str = "process.kill";
/// `info.cpu` → [`crate::info::CpuInfo`] list.
pub const INFO_CPU: &str = "info.cpu";
/// `info.mem` → [`crate::info::MemInfo`].
pub const INFO_MEM: &str = "info.mem";
/// `info.disk` → [`crate::info::DiskPartition`] list.
pub const INFO_DISK: &str = "info.disk";
/// `info.nic` → [`crate::info::NicInfo`] list.
pub const INFO_NIC: &str = "info.nic";
/// `info.os` → [`crate::info::OsInfo`].
pub const INFO_OS: &str = "info.os";
/// `info.port` → [`crate::info::PortInfo`] list.
pub const INFO_PORT: &str = "info.port";
/// `info.version` → [`crate::info::VersionInfo`].
pub const INFO_VERSION: &str = "info.version";
/// `filesystem.open` ([`crate::args::FsOpenArgs`] → fd string).
pub const FS_OPEN: &str = "filesystem.open";
/// `filesystem.read` ([`crate::args::FsFdArgs`] → base64 string, `""` at EOF).
pub const FS_READ: &str = "filesystem.read";
/// `filesystem.write` ([`crate::args::FsWriteArgs`] → null).
pub const FS_WRITE: &str = "filesystem.write";
/// `filesystem.close` ([`crate::args::FsFdArgs`] → null).
pub const FS_CLOSE: &str = "filesystem.close";
/// `filesystem.exists` ([`crate::args::FsPathArgs`] → bool).
pub const FS_EXISTS: &str = "filesystem.exists";
/// `filesystem.list` ([`crate::args::FsPathArgs`] → [`crate::info::FsEntry`] list).
pub const FS_LIST: &str = "filesystem.list";
/// `filesystem.mkdir` ([`crate::args::FsPathArgs`] → null).
pub const FS_MKDIR: &str = "filesystem.mkdir";
/// `filesystem.remove` ([`crate::args::FsPathArgs`] → null).
pub const FS_REMOVE: &str = "filesystem.remove";
/// `filesystem.move` ([`crate::args::FsMoveArgs`] → null).
pub const FS_MOVE: &str = "filesystem.move";
/// `filesystem.chmod` ([`crate::args::FsChmodArgs`] → null).
pub const FS_CHMOD: &str = "filesystem.chmod";
/// `filesystem.chown` ([`crate::args::FsChownArgs`] → null).
pub const FS_CHOWN: &str = "filesystem.chown";

/// Queue consumed by core0.
pub const QUEUE_DEFAULT: &str = "core:default";

/// `result:<id>`: the list holding a job's Result JSON.
pub fn result_key(id: &str) -> String {
    format!("result:{id}")
}

/// `result:<id>:flag`: the "accepted" marker; no TTL while running, 300 s after.
pub fn flag_key(id: &str) -> String {
    format!("result:{id}:flag")
}

/// `stream:<id>`: live output records of a job started with `stream: true`.
pub fn stream_key(id: &str) -> String {
    format!("stream:{id}")
}

/// Seconds a result (and its flag) lives after the job ends.
pub const RESULT_TTL_SECS: i64 = 300;
/// Seconds a stream list lives after its last push.
pub const STREAM_TTL_SECS: i64 = 60;
/// Entries kept in a stream list.
pub const STREAM_MAX_LEN: isize = 1000;
/// Lines of stdout and of stderr kept in a result.
pub const MAX_OUTPUT_LINES: usize = 1000;
