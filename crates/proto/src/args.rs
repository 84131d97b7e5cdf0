//! Arguments of each core0 command (the `arguments` object of a [`crate::Command`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `core.system`: run a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SystemArgs {
    /// Executable (a path, or a name looked up in `PATH`).
    pub name: String,
    /// Arguments.
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub args: Vec<String>,
    /// Working directory ("" = core0's).
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub dir: String,
    /// Added to core0's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Written to the process's stdin, which is then closed.
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub stdin: String,
}

/// `bash`: run `sh -c <script>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BashArgs {
    /// The script.
    pub script: String,
    /// Written to stdin, which is then closed.
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub stdin: String,
}

/// `job.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobListArgs {
    /// One job (an unknown id is an error); null or "" = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `job.kill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobKillArgs {
    /// The job.
    pub id: String,
    /// Signal number; 0 means SIGTERM.
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub signal: i32,
}

/// `process.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcessListArgs {
    /// One process; null or 0 = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
}

/// `process.kill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcessKillArgs {
    /// The process; must be greater than 1.
    pub pid: i64,
    /// Signal number; 0 means SIGTERM.
    #[serde(default, deserialize_with = "crate::args::null_default")]
    pub signal: i32,
}

/// `filesystem.open`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsOpenArgs {
    /// Path of the file.
    pub file: String,
    /// Exactly one of `r`, `w`, `a`, `x`, optionally followed by `+`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Permission bits for a created file (e.g. 420 = 0644).
    #[serde(default = "default_perm")]
    pub perm: u32,
}

fn default_mode() -> String {
    "r".to_string()
}

fn default_perm() -> u32 {
    0o644
}

/// `filesystem.read` / `filesystem.close`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsFdArgs {
    /// The fd returned by `filesystem.open`.
    pub fd: String,
}

/// `filesystem.write`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsWriteArgs {
    /// The fd returned by `filesystem.open`.
    pub fd: String,
    /// Base64 of the bytes to write.
    pub block: String,
}

/// `filesystem.exists|list|mkdir|remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsPathArgs {
    /// The path.
    pub path: String,
}

/// `filesystem.move`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsMoveArgs {
    /// Source path.
    pub path: String,
    /// Destination path.
    pub destination: String,
}

/// `filesystem.chmod`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsChmodArgs {
    /// The path.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Apply below a directory too.
    #[serde(default)]
    pub recursive: bool,
}

/// `filesystem.chown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FsChownArgs {
    /// The path.
    pub path: String,
    /// User name.
    pub user: String,
    /// Group name.
    pub group: String,
    /// Apply below a directory too.
    #[serde(default)]
    pub recursive: bool,
}

pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn system_args_accept_nulls() {
        let a: SystemArgs = serde_json::from_value(
            json!({"name": "ls", "args": null, "dir": null, "env": null, "stdin": null}),
        )
        .expect("nulls");
        assert_eq!(a.name, "ls");
        assert!(a.args.is_empty());
        assert!(a.env.is_none());
    }
}
