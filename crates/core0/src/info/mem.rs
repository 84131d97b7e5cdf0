//! `info.mem` from `/proc/meminfo`, with gopsutil's arithmetic.

use super::{InfoError, MemInfo, read};
use std::collections::HashMap;

const MEMINFO: &str = "/proc/meminfo";

/// `info.mem`: memory figures in bytes.
pub fn mem() -> Result<MemInfo, InfoError> {
    parse_meminfo(&read(MEMINFO)?).ok_or_else(|| InfoError::Parse {
        path: MEMINFO.into(),
        what: "no MemTotal line".to_string(),
    })
}

/// Parses `/proc/meminfo` text; `None` without a `MemTotal` line.
fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let mut kv: HashMap<&str, u64> = HashMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(Ok(n)) = words.next().map(str::parse::<u64>) else {
            continue;
        };
        let bytes = match words.next() {
            Some("kB") => n.saturating_mul(1024),
            _ => n,
        };
        kv.insert(key.trim(), bytes);
    }
    let get = |k: &str| kv.get(k).copied().unwrap_or(0);
    let total = *kv.get("MemTotal")?;
    let free = get("MemFree");
    let buffers = get("Buffers");
    let cached = get("Cached") + get("SReclaimable");
    let available = kv
        .get("MemAvailable")
        .copied()
        .unwrap_or(free + buffers + cached);
    let used = total.saturating_sub(free + buffers + cached);
    let used_percent = if total == 0 {
        0.0
    } else {
        used as f64 / total as f64 * 100.0
    };
    Some(MemInfo {
        total,
        available,
        used,
        used_percent,
        free,
        active: get("Active"),
        inactive: get("Inactive"),
        wired: 0,
        buffers,
        cached,
        writeback: get("Writeback"),
        dirty: get("Dirty"),
        writebacktmp: get("WritebackTmp"),
        shared: get("Shmem"),
        slab: get("Slab"),
        pagetables: get("PageTables"),
        swapcached: get("SwapCached"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:        1000 kB
MemFree:          100 kB
MemAvailable:     600 kB
Buffers:           50 kB
Cached:           200 kB
SwapCached:         1 kB
Active:           300 kB
Inactive:         400 kB
Active(anon):       1 kB
Dirty:              2 kB
Writeback:          3 kB
Shmem:              4 kB
Slab:              30 kB
SReclaimable:      25 kB
PageTables:         5 kB
WritebackTmp:       6 kB
HugePages_Total:    0
";

    #[test]
    fn parses_sample_with_gopsutil_semantics() {
        let m = parse_meminfo(SAMPLE).expect("sample has MemTotal");
        assert_eq!(m.total, 1000 * 1024);
        assert_eq!(m.free, 100 * 1024);
        assert_eq!(m.available, 600 * 1024);
        assert_eq!(m.buffers, 50 * 1024);
        assert_eq!(m.cached, 225 * 1024);
        assert_eq!(m.used, (1000 - 100 - 50 - 225) * 1024);
        assert!((m.used_percent - 62.5).abs() < 1e-9);
        assert_eq!(m.active, 300 * 1024);
        assert_eq!(m.inactive, 400 * 1024);
        assert_eq!(m.dirty, 2 * 1024);
        assert_eq!(m.writeback, 3 * 1024);
        assert_eq!(m.shared, 4 * 1024);
        assert_eq!(m.slab, 30 * 1024);
        assert_eq!(m.pagetables, 5 * 1024);
        assert_eq!(m.writebacktmp, 6 * 1024);
        assert_eq!(m.swapcached, 1024);
        assert_eq!(m.wired, 0);
    }

    #[test]
    fn without_memavailable_available_is_free_buffers_cached() {
        let m = parse_meminfo("MemTotal: 10 kB\nMemFree: 2 kB\nBuffers: 1 kB\nCached: 3 kB\n")
            .expect("has MemTotal");
        assert_eq!(m.available, 6 * 1024);
    }

    #[test]
    fn without_memtotal_is_none() {
        assert!(parse_meminfo("MemFree: 2 kB\n").is_none());
    }

    #[test]
    fn real_total_matches_proc_meminfo() {
        let text = std::fs::read_to_string(MEMINFO).expect("/proc/meminfo is readable");
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("MemTotal line");
        let m = mem().expect("mem");
        assert_eq!(m.total, kb * 1024);
        assert!(m.used_percent > 0.0 && m.used_percent < 100.0);
    }
}
