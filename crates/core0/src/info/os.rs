//! `info.os`: hostname, boot time, distribution, kernel, virtualization and host id.

use super::{InfoError, OsInfo, read, read_trimmed};
use std::collections::HashMap;
use std::path::Path;

const STAT: &str = "/proc/stat";
const UPTIME: &str = "/proc/uptime";

/// `info.os`, with `instance_id` copied into `instanceId`.
pub fn os(instance_id: &str) -> Result<OsInfo, InfoError> {
    let hostname = nix::unistd::gethostname()
        .map_err(InfoError::Hostname)?
        .to_string_lossy()
        .into_owned();
    let uptime = parse_uptime(&read(UPTIME)?).ok_or_else(|| InfoError::Parse {
        path: UPTIME.into(),
        what: "no seconds field".to_string(),
    })?;
    let release = read("/etc/os-release")
        .or_else(|_| read("/usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    let (platform, platform_family, mut platform_version) = platform(&release);
    if platform == "debian" {
        // gopsutil reports the point release ("12.8") from /etc/debian_version.
        if let Some(v) = read_trimmed("/etc/debian_version")
            .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        {
            platform_version = v;
        }
    }
    let (virtualization_system, virtualization_role) = virtualization();
    Ok(OsInfo {
        hostname,
        uptime,
        boot_time: boot_time()?,
        procs: count_pids(),
        os: "linux".to_string(),
        platform,
        platform_family,
        platform_version,
        kernel_version: kernel_release(),
        virtualization_system,
        virtualization_role,
        hostid: host_id(),
        instance_id: instance_id.to_string(),
    })
}

/// Boot time in epoch seconds (`btime` of `/proc/stat`).
pub(crate) fn boot_time() -> Result<u64, InfoError> {
    parse_btime(&read(STAT)?).ok_or_else(|| InfoError::Parse {
        path: STAT.into(),
        what: "no btime line".to_string(),
    })
}

/// The `btime` value of `/proc/stat` text.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Whole seconds of `/proc/uptime` text.
fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(secs as u64)
}

/// `KEY=value` pairs of os-release text, quotes removed.
fn parse_os_release(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// (platform, family, version): `ID`, the first word of `ID_LIKE` (or `ID`), `VERSION_ID`.
fn platform(release: &HashMap<String, String>) -> (String, String, String) {
    let id = release.get("ID").cloned().unwrap_or_default();
    let family = release
        .get("ID_LIKE")
        .and_then(|l| l.split_whitespace().next())
        .map_or_else(|| id.clone(), str::to_string);
    let version = release.get("VERSION_ID").cloned().unwrap_or_default();
    (id, family, version)
}

/// Number of processes: the numeric directories of `/proc`.
fn count_pids() -> u64 {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count() as u64
    })
}

/// The kernel release, as `uname -r` prints it.
fn kernel_release() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default()
}

/// `/etc/machine-id`, else the DMI product uuid, else "".
fn host_id() -> String {
    read_trimmed("/etc/machine-id")
        .filter(|s| !s.is_empty())
        .or_else(|| read_trimmed("/sys/class/dmi/id/product_uuid").map(|s| s.to_lowercase()))
        .unwrap_or_default()
}

/// (system, role) of the virtualization the agent runs under or provides; ("", "") when none.
fn virtualization() -> (String, String) {
    let guest = |s: &str| (s.to_string(), "guest".to_string());
    let dmi = |f: &str| read_trimmed(Path::new("/sys/class/dmi/id").join(f)).unwrap_or_default();
    if let Some(sys) = dmi_system(
        &dmi("sys_vendor"),
        &dmi("product_name"),
        &dmi("bios_vendor"),
    ) {
        return guest(sys);
    }
    let cpuinfo = read_trimmed("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo_has_hypervisor(&cpuinfo) {
        return guest(cpuid_hypervisor().unwrap_or("kvm"));
    }
    if Path::new("/proc/xen").exists() {
        let role =
            if read_trimmed("/proc/xen/capabilities").is_some_and(|c| c.contains("control_d")) {
                "host"
            } else {
                "guest"
            };
        return ("xen".to_string(), role.to_string());
    }
    if Path::new("/sys/module/kvm").exists() || Path::new("/dev/kvm").exists() {
        return ("kvm".to_string(), "host".to_string());
    }
    if let Some(c) = std::fs::read("/proc/1/environ").ok().and_then(|e| {
        e.split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"container="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }) {
        return guest(&c);
    }
    if Path::new("/.dockerenv").exists() {
        return guest("docker");
    }
    if Path::new("/run/.containerenv").exists() {
        return guest("podman");
    }
    (String::new(), String::new())
}

/// The hypervisor named by DMI strings.
fn dmi_system(vendor: &str, product: &str, bios: &str) -> Option<&'static str> {
    let all = format!("{vendor}\n{product}\n{bios}");
    let has = |s: &str| all.contains(s);
    if has("KVM") || has("QEMU") || has("OpenStack") || has("Amazon EC2") || has("Google") {
        Some("kvm")
    } else if has("VMware") {
        Some("vmware")
    } else if has("VirtualBox") || has("innotek") {
        Some("vbox")
    } else if has("Xen") {
        Some("xen")
    } else if vendor.contains("Microsoft") && product.contains("Virtual Machine") {
        Some("hyperv")
    } else if has("Parallels") {
        Some("parallels")
    } else if has("Bochs") {
        Some("bochs")
    } else {
        None
    }
}

/// Whether `/proc/cpuinfo` says the CPU is virtual (`hypervisor` flag or a QEMU/KVM model).
fn cpuinfo_has_hypervisor(text: &str) -> bool {
    text.lines().any(|l| {
        let Some((k, v)) = l.split_once(':') else {
            return false;
        };
        match k.trim() {
            "flags" => v.split_whitespace().any(|f| f == "hypervisor"),
            "model name" => v.contains("QEMU Virtual CPU") || v.contains("Common KVM processor"),
            _ => false,
        }
    })
}

/// The hypervisor vendor of CPUID leaf 0x40000000, when known.
#[cfg(target_arch = "x86_64")]
fn cpuid_hypervisor() -> Option<&'static str> {
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x40000000 is reserved for hypervisors and
    // returns zeros or garbage (never faults) without one.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid(0x4000_0000) };
    let mut sig = Vec::with_capacity(12);
    for w in [r.ebx, r.ecx, r.edx] {
        sig.extend_from_slice(&w.to_le_bytes());
    }
    hypervisor_from_signature(&sig)
}

/// Without CPUID the vendor is unknown.
#[cfg(not(target_arch = "x86_64"))]
fn cpuid_hypervisor() -> Option<&'static str> {
    None
}

/// The hypervisor of a 12-byte CPUID vendor signature.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn hypervisor_from_signature(sig: &[u8]) -> Option<&'static str> {
    let known: &[(&[u8], &str)] = &[
        (b"KVMKVMKVM", "kvm"),
        (b"TCGTCGTCGTCG", "qemu"),
        (b"Microsoft Hv", "hyperv"),
        (b"VMwareVMware", "vmware"),
        (b"XenVMMXenVMM", "xen"),
        (b"VBoxVBoxVBox", "vbox"),
        (b"bhyve bhyve ", "bhyve"),
        (b"ACRNACRNACRN", "acrn"),
        (b" lrpepyh vr", "parallels"),
    ];
    known
        .iter()
        .find(|(prefix, _)| sig.starts_with(prefix))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_btime_and_uptime() {
        let stat = "cpu  1 2 3 4\nintr 5\nbtime 1732670000\nprocesses 99\n";
        assert_eq!(parse_btime(stat), Some(1_732_670_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
        assert_eq!(parse_uptime("12345.67 2345.00\n"), Some(12345));
        assert_eq!(parse_uptime(""), None);
    }

    #[test]
    fn parses_os_release() {
        let text = "PRETTY_NAME=\"CentOS Linux 7 (Core)\"\nID=\"centos\"\nID_LIKE=\"rhel fedora\"\n\
                    VERSION_ID='7'\n# comment\n";
        let r = parse_os_release(text);
        assert_eq!(
            platform(&r),
            ("centos".to_string(), "rhel".to_string(), "7".to_string())
        );
        let r = parse_os_release("ID=alpine\nVERSION_ID=3.20.1\n");
        assert_eq!(
            platform(&r),
            (
                "alpine".to_string(),
                "alpine".to_string(),
                "3.20.1".to_string()
            )
        );
    }

    #[test]
    fn detects_hypervisors() {
        assert_eq!(
            dmi_system("QEMU", "Standard PC (Q35 + ICH9, 2009)", ""),
            Some("kvm")
        );
        assert_eq!(
            dmi_system("Microsoft Corporation", "Virtual Machine", ""),
            Some("hyperv")
        );
        assert_eq!(dmi_system("Dell Inc.", "PowerEdge R640", "Dell Inc."), None);
        assert!(cpuinfo_has_hypervisor(
            "flags\t\t: fpu vme hypervisor lahf_lm\n"
        ));
        assert!(!cpuinfo_has_hypervisor(
            "flags\t\t: fpu vme\nmodel name\t: AMD EPYC\n"
        ));
        assert_eq!(hypervisor_from_signature(b"KVMKVMKVM\0\0\0"), Some("kvm"));
        assert_eq!(hypervisor_from_signature(b"\0\0\0\0\0\0\0\0\0\0\0\0"), None);
    }

    #[test]
    fn real_os_info() {
        let o = os("inst-1").expect("os");
        assert_eq!(o.os, "linux");
        assert_eq!(o.instance_id, "inst-1");
        assert!(!o.hostname.is_empty());
        assert!(o.boot_time > 1_000_000_000);
        assert!(o.procs >= 1);
        assert!(!o.kernel_version.is_empty());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        assert!(o.boot_time + o.uptime <= now + 2 && o.boot_time + o.uptime + 5 >= now);
    }
}
