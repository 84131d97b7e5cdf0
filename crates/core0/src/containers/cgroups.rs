//! Per-container cgroups: cpu, memory, pids and devices limits on cgroup v1 (one hierarchy per
//! controller, as on this machine kind) and cgroup v2 (one unified hierarchy).
//!
//! A container's cgroups are `<controller mount>/<parent>/c<id>` (v1) or
//! `<root>/<parent>/c<id>` (v2). The parent (`grid/<node>` say) is shared by the node's containers
//! and is never removed by [`CgroupSet::remove`]; [`remove_parent`] removes a whole parent tree
//! (node teardown, test cleanup).
//!
//! cgroup v2 has no devices controller: the kernel wants an eBPF program attached to the cgroup for
//! that, which is not done yet, so on v2 device access is limited only by the minimal `/dev`
//! corex mounts and by the dropped capabilities (no `CAP_SYS_ADMIN`, `CAP_MKNOD` still allowed).

use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The default mount point of the cgroup file systems.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers Grid uses, when mounted.
const V1_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
];

/// The CFS period Grid uses for cpu limits, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Devices an unprivileged container may use (besides `mknod`): null, zero, full, random,
/// urandom, tty, console, ptmx and the pts slaves.
const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup file system under the root.
    #[error("no cgroup v1 controllers or cgroup v2 hierarchy under {0}")]
    NoHierarchy(PathBuf),
    /// The parent name is not a relative path of plain components.
    #[error("invalid cgroup parent {0:?}: want a relative path like grid/n0")]
    BadParent(String),
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A cgroup file could not be read or written.
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A cgroup file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Resource limits of a container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU time in cores (1.5 = one and a half cores).
    pub cpu: Option<f64>,
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// Maximum number of processes (and threads).
    pub pids: Option<u64>,
}

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One mount per v1 controller: `(controller, mount dir)`; co-mounted controllers (`cpu,cpuacct`)
    /// appear once.
    V1(Vec<(String, PathBuf)>),
    /// The unified hierarchy mounted at this directory.
    V2(PathBuf),
}

impl Layout {
    /// Detects the layout under `root` (normally [`CGROUP_ROOT`]): a `cgroup.controllers` file at the
    /// root means v2; otherwise each v1 controller directory holding `cgroup.procs` counts.
    pub fn detect(root: &Path) -> Result<Self, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Self::V2(root.to_path_buf()));
        }
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut found = Vec::new();
        for c in V1_CONTROLLERS {
            let dir = root.join(c);
            if !dir.join("cgroup.procs").is_file() {
                continue;
            }
            // `cpu` and `cpuacct` are often symlinks to one `cpu,cpuacct` mount.
            let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if seen.contains(&real) {
                continue;
            }
            seen.push(real);
            found.push(((*c).to_string(), dir));
        }
        if found.is_empty() {
            return Err(CgroupError::NoHierarchy(root.to_path_buf()));
        }
        Ok(Self::V1(found))
    }

    /// Whether this is cgroup v2.
    pub fn is_v2(&self) -> bool {
        matches!(self, Self::V2(_))
    }
}

/// Checks a parent name: relative, plain components only.
pub fn check_parent(parent: &str) -> Result<(), CgroupError> {
    let p = Path::new(parent);
    let ok = !parent.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !parent.contains(['\n', '\0']);
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadParent(parent.to_string()))
    }
}

/// The cgroups of one container: one directory per v1 controller, or one v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSet {
    /// `(controller, leaf dir)`; the controller is `unified` on v2.
    dirs: Vec<(String, PathBuf)>,
    v2: bool,
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes every level of `rel` under a cpuset mount, copying `cpuset.cpus`/`cpuset.mems` from the
/// level above where they are empty (a v1 cpuset cgroup starts empty and refuses tasks).
fn mkdir_cpuset(mount: &Path, rel: &Path) -> Result<(), CgroupError> {
    let mut cur = mount.to_path_buf();
    for comp in rel.components() {
        let parent = cur.clone();
        cur.push(comp);
        mkdir(&cur)?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let mine = read_file(&cur.join(f))?;
            if mine.trim().is_empty() {
                let theirs = read_file(&parent.join(f))?;
                write_file(&cur.join(f), theirs.trim())?;
            }
        }
    }
    Ok(())
}

/// Makes every level of `rel` under a v2 root, enabling the wanted controllers in each level's
/// `cgroup.subtree_control` above the leaf.
fn mkdir_v2(root: &Path, rel: &Path) -> Result<(), CgroupError> {
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for comp in comps {
        let available = read_file(&cur.join("cgroup.controllers"))?;
        let want: Vec<String> = ["cpu", "memory", "pids"]
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !want.is_empty() {
            write_file(&cur.join("cgroup.subtree_control"), &want.join(" "))?;
        }
        cur.push(comp);
        mkdir(&cur)?;
    }
    Ok(())
}

impl CgroupSet {
    /// The cgroups of container `id` under `parent`, without touching the host.
    pub fn open(layout: &Layout, parent: &str, id: u32) -> Result<Self, CgroupError> {
        check_parent(parent)?;
        let leaf = Path::new(parent).join(format!("c{id}"));
        Ok(match layout {
            Layout::V1(mounts) => Self {
                dirs: mounts
                    .iter()
                    .map(|(c, m)| (c.clone(), m.join(&leaf)))
                    .collect(),
                v2: false,
            },
            Layout::V2(root) => Self {
                dirs: vec![("unified".to_string(), root.join(&leaf))],
                v2: true,
            },
        })
    }

    /// Makes the cgroups of container `id` and writes its limits; devices are restricted unless
    /// `privileged` (v1 only). On error, what was made is removed again.
    pub fn create(
        layout: &Layout,
        parent: &str,
        id: u32,
        limits: &Limits,
        privileged: bool,
    ) -> Result<Self, CgroupError> {
        let set = Self::open(layout, parent, id)?;
        let res = set.configure(layout, parent, id, limits, privileged);
        if let Err(e) = res {
            let _ = set.remove(Duration::from_secs(2));
            return Err(e);
        }
        Ok(set)
    }

    fn configure(
        &self,
        layout: &Layout,
        parent: &str,
        id: u32,
        limits: &Limits,
        privileged: bool,
    ) -> Result<(), CgroupError> {
        let rel = Path::new(parent).join(format!("c{id}"));
        match layout {
            Layout::V1(mounts) => {
                for (c, mount) in mounts {
                    if c == "cpuset" {
                        mkdir_cpuset(mount, &rel)?;
                    } else {
                        let dir = mount.join(&rel);
                        std::fs::create_dir_all(&dir)
                            .map_err(|source| CgroupError::Create { path: dir, source })?;
                    }
                }
                if !privileged {
                    for (c, dir) in &self.dirs {
                        if c == "devices" {
                            write_file(&dir.join("devices.deny"), "a")?;
                            for rule in DEVICE_ALLOW {
                                write_file(&dir.join("devices.allow"), rule)?;
                            }
                        }
                    }
                }
            }
            Layout::V2(root) => mkdir_v2(root, &rel)?,
        }
        self.apply_limits(limits)
    }

    /// Writes the limits that are set (the others keep their current value).
    fn apply_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (c, dir) in &self.dirs {
            let memory = |file: &str| -> Result<(), CgroupError> {
                match limits.memory {
                    Some(m) => write_file(&dir.join(file), &m.to_string()),
                    None => Ok(()),
                }
            };
            let pids = || -> Result<(), CgroupError> {
                match limits.pids {
                    Some(p) => write_file(&dir.join("pids.max"), &p.to_string()),
                    None => Ok(()),
                }
            };
            match c.as_str() {
                "memory" => memory("memory.limit_in_bytes")?,
                "cpu" => {
                    if let Some(cpu) = limits.cpu {
                        write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write_file(&dir.join("cpu.cfs_quota_us"), &cpu_quota(cpu))?;
                    }
                }
                "pids" => pids()?,
                "unified" => {
                    memory("memory.max")?;
                    if let Some(cpu) = limits.cpu {
                        write_file(
                            &dir.join("cpu.max"),
                            &format!("{} {CPU_PERIOD_US}", cpu_quota(cpu)),
                        )?;
                    }
                    pids()?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Gives a set made unprivileged and without limits (a spare container's) the limits and
    /// device rules of the container that takes it over.
    pub fn take_over(&self, limits: &Limits, privileged: bool) -> Result<(), CgroupError> {
        if privileged {
            for (c, dir) in &self.dirs {
                if c == "devices" {
                    write_file(&dir.join("devices.allow"), "a")?;
                }
            }
        }
        self.apply_limits(limits)
    }

    /// The leaf directories, `(controller, dir)`.
    pub fn dirs(&self) -> &[(String, PathBuf)] {
        &self.dirs
    }

    /// Whether this set is on cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Moves process `pid` (0: the caller) into every cgroup of the set.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the set (their union over the controllers).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for (_, dir) in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for p in s.split_whitespace().filter_map(|p| p.parse().ok()) {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Whether any of the leaf directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }

    /// Kills what is left in the cgroups and removes them, retrying briefly while the kernel
    /// still counts exiting tasks. A missing directory is not an error.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            remove_dir_killing(dir, timeout)?;
        }
        Ok(())
    }
}

fn cpu_quota(cores: f64) -> String {
    // The kernel refuses quotas under 1 ms.
    let q = (cores * CPU_PERIOD_US as f64).round().max(1000.0);
    format!("{}", q as u64)
}

/// Kills the processes of one cgroup directory (and of its children) and removes it.
fn remove_dir_killing(dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_dir_killing(&e.path(), timeout)?;
            }
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for p in s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                if p > 1 {
                    // SAFETY: kill(2) with a positive pid of a process in Grid's own cgroup.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                if Instant::now() >= deadline {
                    return Err(CgroupError::Remove {
                        path: dir.to_path_buf(),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Removes a parent (`grid/n0` or `gridtest-123`) and everything below it in every hierarchy,
/// killing the processes still in it. Only the last component of `parent` and what is below it
/// are removed.
pub fn remove_parent(layout: &Layout, parent: &str, timeout: Duration) -> Result<(), CgroupError> {
    check_parent(parent)?;
    let roots: Vec<PathBuf> = match layout {
        Layout::V1(m) => m.iter().map(|(_, d)| d.clone()).collect(),
        Layout::V2(r) => vec![r.clone()],
    };
    for r in roots {
        remove_dir_killing(&r.join(parent), timeout)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_checked() {
        assert!(check_parent("grid/n0").is_ok());
        assert!(check_parent("gridtest-12").is_ok());
        for bad in ["", "/grid", "grid/../x", "./grid", "a\nb"] {
            assert!(check_parent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quotas() {
        assert_eq!(cpu_quota(1.0), "100000");
        assert_eq!(cpu_quota(0.5), "50000");
        assert_eq!(cpu_quota(0.001), "1000");
    }

    #[test]
    fn v2_layout_writes_limits_and_subtree_control() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu memory pids\n",
        )
        .expect("write");
        // A plain directory stands in for the kernel: each level's cgroup.controllers is made
        // by the test as the kernel would.
        let layout = Layout::detect(root.path()).expect("detect");
        assert!(layout.is_v2());
        std::fs::create_dir_all(root.path().join("grid/n0")).expect("mkdir");
        for d in ["grid", "grid/n0"] {
            std::fs::write(
                root.path().join(d).join("cgroup.controllers"),
                "cpu memory pids",
            )
            .expect("write");
        }
        let limits = Limits {
            cpu: Some(2.0),
            memory: Some(1 << 20),
            pids: Some(10),
        };
        let set = CgroupSet::create(&layout, "grid/n0", 7, &limits, false).expect("create");
        let leaf = root.path().join("grid/n0/c7");
        assert_eq!(set.dirs(), &[("unified".to_string(), leaf.clone())]);
        let rd = |p: &str| std::fs::read_to_string(leaf.join(p)).expect("read");
        assert_eq!(rd("memory.max"), "1048576");
        assert_eq!(rd("cpu.max"), "200000 100000");
        assert_eq!(rd("pids.max"), "10");
        let sc =
            std::fs::read_to_string(root.path().join("grid/cgroup.subtree_control")).expect("read");
        assert_eq!(sc, "+cpu +memory +pids");
    }

    #[test]
    fn v1_spare_set_is_taken_over_with_limits_and_devices() {
        let root = tempfile::tempdir().expect("tempdir");
        for c in ["memory", "devices", "pids"] {
            std::fs::create_dir_all(root.path().join(c)).expect("mkdir");
            std::fs::write(root.path().join(c).join("cgroup.procs"), "").expect("write");
        }
        let layout = Layout::detect(root.path()).expect("detect");
        assert!(!layout.is_v2());
        let set =
            CgroupSet::create(&layout, "grid/n0", 3, &Limits::default(), false).expect("create");
        let leaf = |c: &str, f: &str| root.path().join(c).join("grid/n0/c3").join(f);
        let rd = |c: &str, f: &str| std::fs::read_to_string(leaf(c, f)).ok();
        // Made unprivileged, without limits: the last device rule written, no limit files.
        assert_eq!(rd("devices", "devices.deny").as_deref(), Some("a"));
        assert_eq!(
            rd("devices", "devices.allow").as_deref(),
            Some("c 136:* rwm")
        );
        assert_eq!(rd("memory", "memory.limit_in_bytes"), None);
        let limits = Limits {
            cpu: None,
            memory: Some(64 << 20),
            pids: Some(50),
        };
        set.take_over(&limits, true).expect("take over");
        assert_eq!(rd("devices", "devices.allow").as_deref(), Some("a"));
        assert_eq!(
            rd("memory", "memory.limit_in_bytes").as_deref(),
            Some("67108864")
        );
        assert_eq!(rd("pids", "pids.max").as_deref(), Some("50"));
    }
}
