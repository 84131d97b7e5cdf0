//! Rendering for people: plain column tables, key/value lists, human sizes and times.
//! (`--json` bypasses all of this and prints the API's JSON.)

use comfy_table::{Table, TableStyle};
use grid_proto::api::{
    CoreStateResult, CpuInfo, DiskInfo, JobListItem, JobResult, MemInfo, NicInfo, Node, NodeStatus,
    OsInfo, Process,
};

/// Bytes as a binary-unit size: `512 B`, `1.5 KiB`, `15.6 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss above 2^53 bytes is irrelevant for one decimal.
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // `999.96` rounds to `1000.0`: show it in the next unit instead.
    if format!("{value:.1}") == "1024.0" && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds since the epoch as a UTC time, `2024-05-01 12:34:56Z`.
pub fn utc_time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// A borderless table with a header row; trailing spaces trimmed, no final newline.
pub fn table<H: ToString>(header: &[H], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(TableStyle::new()).force_no_tty();
    t.set_header(header.iter().map(ToString::to_string).collect::<Vec<_>>());
    t.add_rows(rows);
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t.trim_fmt()
}

/// A two-column list of `key  value` lines, keys aligned.
pub fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}").trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn status_str(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Running => "running",
        NodeStatus::Halted => "halted",
    }
}

/// `grid nodes`.
pub fn nodes(nodes: &[Node]) -> String {
    table(
        &["ID", "HOSTNAME", "STATUS"],
        nodes
            .iter()
            .map(|n| {
                vec![
                    n.id.clone(),
                    n.hostname.clone(),
                    status_str(n.status).into(),
                ]
            })
            .collect(),
    )
}

/// One node.
pub fn node(n: &Node) -> String {
    key_values(&[
        ("id", n.id.clone()),
        ("hostname", n.hostname.clone()),
        ("status", status_str(n.status).into()),
    ])
}

/// `grid node <id> mem`.
pub fn mem(m: &MemInfo) -> String {
    key_values(&[
        ("total", human_size(m.total)),
        (
            "used",
            format!("{} ({:.1}%)", human_size(m.used), m.used_percent),
        ),
        ("available", human_size(m.available)),
        ("free", human_size(m.free)),
        ("cached", human_size(m.cached)),
        ("buffers", human_size(m.buffers)),
        ("active", human_size(m.active)),
        ("inactive", human_size(m.inactive)),
        ("wired", human_size(m.wired)),
    ])
}

/// `grid node <id> cpus`.
pub fn cpus(cpus: &[CpuInfo]) -> String {
    table(
        &["CPU", "FAMILY", "CORES", "MHZ", "CACHE", "FLAGS"],
        cpus.iter()
            .enumerate()
            .map(|(i, c)| {
                vec![
                    i.to_string(),
                    c.family.clone(),
                    c.cores.to_string(),
                    format!("{:.0}", c.mhz),
                    human_size(
                        u64::try_from(c.cache_size)
                            .unwrap_or(0)
                            .saturating_mul(1024),
                    ),
                    c.flags.len().to_string(),
                ]
            })
            .collect(),
    )
}

/// `grid node <id> disks`.
pub fn disks(disks: &[DiskInfo]) -> String {
    table(
        &["DEVICE", "MOUNTPOINT", "FSTYPE", "SIZE", "TYPE", "OPTIONS"],
        disks
            .iter()
            .map(|d| {
                vec![
                    d.device.clone(),
                    d.mountpoint.clone(),
                    d.fstype.clone(),
                    human_size(d.size.saturating_mul(1 << 30)),
                    d.kind.clone().unwrap_or_else(|| "-".into()),
                    d.opts.clone(),
                ]
            })
            .collect(),
    )
}

/// `grid node <id> nics`.
pub fn nics(nics: &[NicInfo]) -> String {
    table(
        &["NAME", "MAC", "MTU", "FLAGS", "ADDRESSES"],
        nics.iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.hardwareaddr.clone(),
                    n.mtu.to_string(),
                    n.flags.join(","),
                    n.addrs.join(" "),
                ]
            })
            .collect(),
    )
}

/// `grid node <id> info`.
pub fn os_info(o: &OsInfo) -> String {
    let virt = match (
        o.virtualization_system.as_str(),
        o.virtualization_role.as_str(),
    ) {
        ("", "") => "-".to_string(),
        (s, "") => s.to_string(),
        ("", r) => r.to_string(),
        (s, r) => format!("{s} ({r})"),
    };
    key_values(&[
        ("hostname", o.hostname.clone()),
        ("os", o.os.clone()),
        (
            "platform",
            format!(
                "{} {} ({})",
                o.platform, o.platform_version, o.platform_family
            ),
        ),
        ("kernel", o.kernel_version.clone()),
        ("virtualization", virt),
        (
            "boot time",
            utc_time_ms(i64::try_from(o.boot_time).unwrap_or(0) * 1000),
        ),
        ("uptime", human_duration(o.uptime)),
        ("processes", o.procs.to_string()),
        ("instance", o.instance_id.clone()),
    ])
}

/// Seconds as `3d 4h 5m 6s`, leading zero units omitted.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

/// `grid node <id> state`.
pub fn core_state(s: &CoreStateResult) -> String {
    key_values(&[
        ("cpu", format!("{:.1}%", s.cpu)),
        ("rss", human_size(s.rss)),
        ("vms", human_size(s.vms)),
        ("swap", human_size(s.swap)),
        ("instance", s.instance_id.clone()),
    ])
}

/// `grid node <id> jobs` and `grid job ls`.
pub fn jobs(jobs: &[JobListItem]) -> String {
    table(
        &["ID", "STARTED"],
        jobs.iter()
            .map(|j| vec![j.id.clone(), utc_time_ms(j.start_time)])
            .collect(),
    )
}

/// `grid job get`.
pub fn job(j: &JobResult) -> String {
    let mut out = key_values(&[
        ("id", j.id.clone()),
        ("name", j.name.clone()),
        ("state", j.state.clone()),
        ("code", j.code.map_or_else(|| "-".into(), |c| c.to_string())),
        ("started", utc_time_ms(j.start_time)),
    ]);
    for (title, text) in [
        ("data", &j.data),
        ("stdout", &j.stdout),
        ("stderr", &j.stderr),
    ] {
        if !text.is_empty() {
            out.push_str(&format!(
                "\n--- {title} ---\n{}",
                text.trim_end_matches('\n')
            ));
        }
    }
    out
}

/// `grid node <id> processes`.
pub fn processes(procs: &[Process]) -> String {
    table(
        &["PID", "CPU(s)", "RSS", "VMS", "SWAP", "COMMAND"],
        procs
            .iter()
            .map(|p| {
                vec![
                    p.pid.to_string(),
                    format!("{:.1}", p.cpu.user + p.cpu.system),
                    human_size(p.rss),
                    human_size(p.vms),
                    human_size(p.swap),
                    p.cmdline.clone(),
                ]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(human_size(16_777_216_000), "15.6 GiB");
        assert_eq!(human_size(5 << 40), "5.0 TiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time_ms(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_time_ms(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc_time_ms(1_714_566_896_789), "2024-05-01 12:34:56Z");
        assert_eq!(utc_time_ms(-1000), "1969-12-31 23:59:59Z");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(3600), "1h 0m 0s");
        assert_eq!(human_duration(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn node_table() {
        let list = vec![
            Node {
                hostname: "alpha".into(),
                id: "525400123456".into(),
                status: NodeStatus::Running,
            },
            Node {
                hostname: "b".into(),
                id: "525400123457".into(),
                status: NodeStatus::Halted,
            },
        ];
        assert_eq!(
            nodes(&list),
            "ID            HOSTNAME  STATUS\n\
             525400123456  alpha     running\n\
             525400123457  b         halted"
        );
        assert_eq!(nodes(&[]), "ID  HOSTNAME  STATUS");
    }

    #[test]
    fn key_value_alignment() {
        assert_eq!(
            key_values(&[
                ("a", "1".into()),
                ("long", "2".into()),
                ("e", String::new())
            ]),
            "a     1\nlong  2\ne"
        );
    }
}
