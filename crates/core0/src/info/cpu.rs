//! `info.cpu` from `/proc/cpuinfo`, one entry per logical CPU (gopsutil's `InfoStat`).

use super::{CpuInfo, InfoError, read, read_trimmed};

const CPUINFO: &str = "/proc/cpuinfo";

/// `info.cpu`: one entry per logical CPU.
pub fn cpus() -> Result<Vec<CpuInfo>, InfoError> {
    let mut list = parse_cpuinfo(&read(CPUINFO)?);
    for c in &mut list {
        // gopsutil prefers the maximum frequency of cpufreq over the current "cpu MHz".
        let path = format!(
            "/sys/devices/system/cpu/cpu{}/cpufreq/cpuinfo_max_freq",
            c.cpu
        );
        if let Some(khz) = read_trimmed(path).and_then(|s| s.parse::<f64>().ok()) {
            c.mhz = khz / 1000.0;
        }
    }
    Ok(list)
}

/// Parses `/proc/cpuinfo` text: every `processor` line starts an entry.
pub(crate) fn parse_cpuinfo(text: &str) -> Vec<CpuInfo> {
    let mut out = Vec::new();
    let mut cur: Option<CpuInfo> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "processor" {
            if let Some(c) = cur.take() {
                out.push(c);
            }
            cur = Some(CpuInfo {
                cpu: value.parse().unwrap_or(out.len() as i32),
                cores: 1,
                ..CpuInfo::default()
            });
            continue;
        }
        let Some(c) = cur.as_mut() else {
            continue;
        };
        match key {
            "vendor_id" | "vendorId" => c.vendor_id = value.to_string(),
            "cpu family" => c.family = value.to_string(),
            "model" => c.model = value.to_string(),
            "model name" | "cpu" => c.model_name = value.to_string(),
            "stepping" => c.stepping = value.parse().unwrap_or(0),
            "cpu MHz" | "clock" => {
                c.mhz = value
                    .trim_end_matches("MHz")
                    .trim()
                    .parse()
                    .unwrap_or(c.mhz)
            }
            "cache size" => {
                c.cache_size = value
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            }
            "physical id" => c.physical_id = value.to_string(),
            "core id" => c.core_id = value.to_string(),
            "cpu cores" => c.cores = value.parse().unwrap_or(1),
            "flags" | "Features" => {
                c.flags = value.split_whitespace().map(str::to_string).collect()
            }
            "microcode" => c.microcode = value.to_string(),
            _ => {}
        }
    }
    out.extend(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
cpu MHz\t\t: 2596.152
cache size\t: 1024 KB
physical id\t: 0
siblings\t: 2
core id\t\t: 0
cpu cores\t: 2
flags\t\t: fpu vme hypervisor

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2596.152
cache size\t: 1024 KB
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu
";

    #[test]
    fn parses_one_entry_per_logical_cpu() {
        let v = parse_cpuinfo(SAMPLE);
        assert_eq!(v.len(), 2);
        let c = &v[0];
        assert_eq!(c.cpu, 0);
        assert_eq!(c.vendor_id, "AuthenticAMD");
        assert_eq!(c.family, "25");
        assert_eq!(c.model, "17");
        assert_eq!(c.model_name, "AMD EPYC");
        assert_eq!(c.stepping, 1);
        assert_eq!(c.microcode, "0x1000065");
        assert!((c.mhz - 2596.152).abs() < 1e-9);
        assert_eq!(c.cache_size, 1024);
        assert_eq!(c.physical_id, "0");
        assert_eq!(c.core_id, "0");
        assert_eq!(c.cores, 2);
        assert_eq!(c.flags, vec!["fpu", "vme", "hypervisor"]);
        assert_eq!(v[1].cpu, 1);
        assert_eq!(v[1].core_id, "1");
        assert_eq!(v[1].cores, 1, "no `cpu cores` line: 1, as gopsutil");
    }

    #[test]
    fn real_cpuinfo_has_every_online_cpu() {
        let list = cpus().expect("cpus");
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(list.len() >= n, "{} entries, {n} cpus usable", list.len());
        assert!(list.iter().all(|c| c.cores >= 1));
    }
}
