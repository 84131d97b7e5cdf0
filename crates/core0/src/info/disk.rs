//! `info.disk`: every mount of `/proc/self/mounts` (virtual filesystems included), with sizes
//! from `statvfs` and the kind of the backing block device.

use super::{DiskPartition, InfoError, read, read_trimmed};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const MOUNTS: &str = "/proc/self/mounts";

/// Filesystem types whose `statvfs` may hang on an unreachable server: their sizes stay 0.
const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "afs",
    "ceph",
    "glusterfs",
    "lustre",
    "9p",
    "davfs",
    "autofs",
    "fuse.sshfs",
    "fuse.s3fs",
    "fuse.glusterfs",
    "fuse.rclone",
    "fuse.cephfs",
];

/// `info.disk`: the mounted filesystems.
pub fn disks() -> Result<Vec<DiskPartition>, InfoError> {
    disks_of(None)
}

/// `info.disk` as process `pid` sees it (a container's corex): its mount table, sizes measured
/// through its root (`/proc/<pid>/root`); `None`: this process's view.
#[allow(
    clippy::useless_conversion,
    reason = "statvfs counters are u32 on some 32-bit targets"
)]
pub fn disks_of(pid: Option<i32>) -> Result<Vec<DiskPartition>, InfoError> {
    let (table, root) = match pid {
        Some(p) => (format!("/proc/{p}/mounts"), format!("/proc/{p}/root")),
        None => (MOUNTS.to_string(), String::new()),
    };
    let mut list = parse_mounts(&read(table)?);
    for d in &mut list {
        let local = !NETWORK_FS.contains(&d.fstype.as_str());
        let at = format!("{root}{}", d.mountpoint);
        if let Some(st) = local
            .then(|| nix::sys::statvfs::statvfs(at.as_str()).ok())
            .flatten()
        {
            let frsize = u64::from(st.fragment_size());
            d.size = u64::from(st.blocks()).saturating_mul(frsize);
            d.free = u64::from(st.blocks_available()).saturating_mul(frsize);
        }
        if d.device.starts_with("/dev/") {
            d.kind = block_kind(Path::new(&d.device));
        }
    }
    Ok(list)
}

/// Parses mounts text (`device mountpoint fstype opts freq passno`), unescaping `\040` and co.
fn parse_mounts(text: &str) -> Vec<DiskPartition> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some(DiskPartition {
                device: unescape(f.next()?),
                mountpoint: unescape(f.next()?),
                fstype: unescape(f.next()?),
                opts: unescape(f.next()?),
                ..DiskPartition::default()
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mounts field.
fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..=i + 3];
            let octal = digits.iter().all(|c| (b'0'..=b'7').contains(c));
            let v = digits
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c.wrapping_sub(b'0')));
            if let (true, Ok(byte)) = (octal, u8::try_from(v)) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `nvme`, `ssd` or `hdd` for a block device node, through `/sys/dev/block/<maj>:<min>`.
fn block_kind(dev: &Path) -> Option<String> {
    let md = std::fs::metadata(dev).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let sys = std::fs::canonicalize(sys).ok()?;
    // A partition's queue settings are its parent disk's.
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    let name = disk.file_name()?.to_string_lossy().into_owned();
    let rotational = read_trimmed(disk.join("queue/rotational"));
    classify(&name, rotational.as_deref())
}

/// The kind from the disk's name and its `queue/rotational` text.
fn classify(disk_name: &str, rotational: Option<&str>) -> Option<String> {
    if disk_name.starts_with("nvme") {
        return Some("nvme".to_string());
    }
    match rotational? {
        "1" => Some("hdd".to_string()),
        "0" => Some("ssd".to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mounts_with_escapes() {
        let text = "proc /proc proc rw,relatime 0 0\n\
                    /dev/vda1 /mnt/my\\040disk ext4 rw,relatime 0 0\n\
                    short line\n";
        let v = parse_mounts(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].device, "proc");
        assert_eq!(v[0].fstype, "proc");
        assert_eq!(v[1].mountpoint, "/mnt/my disk");
        assert_eq!(v[1].opts, "rw,relatime");
        assert_eq!(v[1].kind, None);
    }

    #[test]
    fn unescapes_octal_and_keeps_stray_backslashes() {
        assert_eq!(unescape("a\\011b\\134c"), "a\tb\\c");
        assert_eq!(unescape("a\\9"), "a\\9");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn classifies_devices() {
        assert_eq!(classify("nvme0n1", Some("0")).as_deref(), Some("nvme"));
        assert_eq!(classify("sda", Some("1")).as_deref(), Some("hdd"));
        assert_eq!(classify("vda", Some("0")).as_deref(), Some("ssd"));
        assert_eq!(classify("vda", None), None);
    }

    #[test]
    fn real_mounts_include_root_and_proc() {
        let list = disks().expect("disks");
        let root = list
            .iter()
            .find(|d| d.mountpoint == "/")
            .expect("/ is mounted");
        assert!(root.size > 0, "{root:?}");
        assert!(root.free <= root.size);
        assert!(list.iter().any(|d| d.fstype == "proc"), "virtual fs kept");
        assert!(
            list.iter()
                .filter(|d| !d.device.starts_with("/dev/"))
                .all(|d| d.kind.is_none())
        );
    }
}
