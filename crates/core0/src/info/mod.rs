//! `info.*`: host facts read from `/proc` and `/sys`.
//!
//! Every reader is a thin wrapper around a parser of the file's text, so the parsers are tested on
//! sample text and the readers on the real host. All functions block (file reads, `statvfs`): call
//! them from `tokio::task::spawn_blocking`.

use std::io;
use std::path::{Path, PathBuf};

mod cpu;
mod disk;
mod mem;
mod nic;
mod os;
mod port;

pub use cpu::cpus;
pub use disk::{disks, disks_of};
pub use grid_proto::info::{
    CpuInfo, DiskPartition, MemInfo, NicAddr, NicInfo, OsInfo, PortInfo, VersionInfo,
};
pub use mem::mem;
pub use nic::{nics, nics_of};
pub use os::os;
pub use port::{ports, ports_in};

pub(crate) use os::boot_time;

/// Why a host fact could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// A file under `/proc`, `/sys` or `/etc` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file's text was not in the expected format.
    #[error("cannot parse {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// `getifaddrs` failed.
    #[error("cannot list interface addresses: {0}")]
    Ifaddrs(#[source] nix::Error),
    /// `gethostname` failed.
    #[error("cannot read the hostname: {0}")]
    Hostname(#[source] nix::Error),
}

/// Reads a whole text file, naming it in the error.
pub(crate) fn read(path: impl AsRef<Path>) -> Result<String, InfoError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|source| InfoError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a small text file and trims it; `None` when it is missing or unreadable.
pub(crate) fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `info.version`: the package version as branch, the git revision given at build time.
pub fn version() -> VersionInfo {
    VersionInfo {
        branch: env!("CARGO_PKG_VERSION").to_string(),
        revision: option_env!("GRID_GIT_REV").unwrap_or("unknown").to_string(),
        dirty: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_has_the_package_version() {
        let v = version();
        assert_eq!(v.branch, env!("CARGO_PKG_VERSION"));
        assert!(!v.revision.is_empty());
        assert!(!v.dirty);
    }
}
