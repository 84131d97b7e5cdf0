//! OS processes from `/proc`: listing, signalling, and CPU-percent sampling.
//!
//! Everything here blocks on `/proc` reads: call it from `tokio::task::spawn_blocking`.

use grid_proto::info::{CoreState, CpuTimes, ProcessInfo};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Why a process operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// No such process.
    #[error("process {pid} not found")]
    NotFound {
        /// The pid asked for.
        pid: i64,
    },
    /// `process.kill` refuses pids up to 1 (init, "all", process groups).
    #[error("invalid pid {pid}: must be greater than 1")]
    InvalidPid {
        /// The pid asked for.
        pid: i64,
    },
    /// The signal number is not one the kernel knows.
    #[error("invalid signal {signal}")]
    InvalidSignal {
        /// The signal asked for.
        signal: i32,
    },
    /// Not allowed to signal the process.
    #[error("not permitted to signal process {pid}")]
    Permission {
        /// The pid asked for.
        pid: i64,
    },
    /// `/proc` could not be listed.
    #[error("cannot list /proc: {0}")]
    ListProc(#[source] std::io::Error),
    /// Another `kill(2)` failure.
    #[error("cannot signal process {pid}: {source}")]
    Kill {
        /// The pid asked for.
        pid: i64,
        /// The errno.
        source: nix::Error,
    },
}

/// Host constants read once: clock ticks per second, page size, boot time.
struct Host {
    clk_tck: f64,
    page_size: u64,
    boot_time: u64,
}

/// The host constants; a missing value falls back to the usual Linux one.
fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        use nix::unistd::{SysconfVar, sysconf};
        let conf = |v, d: i64| match sysconf(v) {
            Ok(Some(n)) if n > 0 => n,
            _ => d,
        };
        Host {
            clk_tck: conf(SysconfVar::CLK_TCK, 100) as f64,
            page_size: conf(SysconfVar::PAGE_SIZE, 4096) as u64,
            boot_time: crate::info::boot_time().unwrap_or(0),
        }
    })
}

/// The fields of `/proc/<pid>/stat` this module uses (ticks and pages as the kernel gives them).
#[derive(Debug, Clone, PartialEq, Default)]
struct Stat {
    comm: String,
    ppid: i64,
    utime: u64,
    stime: u64,
    starttime: u64,
    blkio_ticks: u64,
}

/// Parses `/proc/<pid>/stat` text. `comm` may hold spaces and parentheses: it ends at the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields after comm, numbered from 3 (state) as in proc(5): field N is f[N - 3].
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        comm,
        ppid: f.get(1)?.parse().ok()?,
        utime: num(14)?,
        stime: num(15)?,
        starttime: num(22)?,
        blkio_ticks: num(42).unwrap_or(0),
    })
}

/// (vms, rss) in pages from `/proc/<pid>/statm` text.
fn parse_statm(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().map(|s| s.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// `VmSwap` in bytes from `/proc/<pid>/status` text; 0 when absent (kernel threads).
fn parse_vmswap(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("VmSwap:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A NUL-separated command line joined by spaces; `[comm]` when empty (kernel threads).
fn cmdline_text(raw: &[u8], comm: &str) -> String {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        format!("[{comm}]")
    } else {
        args.join(" ")
    }
}

/// Memory of a process in bytes: (rss, vms, swap).
fn memory(pid: i64) -> Option<(u64, u64, u64)> {
    let page = host().page_size;
    let (vms, rss) = parse_statm(&std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?)?;
    let swap = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| parse_vmswap(&s))
        .unwrap_or(0);
    Some((rss * page, vms * page, swap))
}

/// Reads one process; `None` when it vanished (or is unreadable) meanwhile.
fn read_process(pid: i64) -> Option<ProcessInfo> {
    let h = host();
    let stat = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let (rss, vms, swap) = memory(pid)?;
    let secs = |ticks: u64| ticks as f64 / h.clk_tck;
    let createtime =
        h.boot_time as i64 * 1000 + (stat.starttime as f64 * 1000.0 / h.clk_tck) as i64;
    Some(ProcessInfo {
        pid,
        ppid: stat.ppid,
        cmdline: cmdline_text(&raw, &stat.comm),
        name: stat.comm,
        createtime,
        cpu: CpuTimes {
            user: secs(stat.utime),
            system: secs(stat.stime),
            iowait: secs(stat.blkio_ticks),
            ..CpuTimes::default()
        },
        rss,
        vms,
        swap,
    })
}

/// `process.list`: one process (`Some(pid)`, pid > 0) or all (`None` or 0).
///
/// Processes that exit while the list is read are left out.
pub fn list(pid: Option<i64>) -> Result<Vec<ProcessInfo>, ProcError> {
    match pid {
        Some(pid) if pid != 0 => {
            if pid < 0 {
                return Err(ProcError::NotFound { pid });
            }
            read_process(pid)
                .map(|p| vec![p])
                .ok_or(ProcError::NotFound { pid })
        }
        _ => {
            let mut pids: Vec<i64> = std::fs::read_dir("/proc")
                .map_err(ProcError::ListProc)?
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            pids.sort_unstable();
            Ok(pids.into_iter().filter_map(read_process).collect())
        }
    }
}

/// `process.kill`: sends `signal` (0 = SIGTERM) to `pid`, which must be greater than 1.
pub fn kill(pid: i64, signal: i32) -> Result<(), ProcError> {
    if pid <= 1 {
        return Err(ProcError::InvalidPid { pid });
    }
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| ProcError::NotFound { pid })?;
    let signal = if signal == 0 { libc::SIGTERM } else { signal };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. libc is used instead of
    // nix so that any signal number (real-time ones included) passes through as-is.
    let rc = unsafe { libc::kill(raw_pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::ESRCH => Err(ProcError::NotFound { pid }),
        nix::errno::Errno::EPERM => Err(ProcError::Permission { pid }),
        nix::errno::Errno::EINVAL => Err(ProcError::InvalidSignal { signal }),
        source => Err(ProcError::Kill { pid, source }),
    }
}

/// The previous sample of one pid.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `starttime` of the process, so a reused pid is not mistaken for the old process.
    starttime: u64,
    /// utime + stime, in ticks.
    ticks: u64,
    at: Instant,
}

/// Keeps the previous CPU sample per pid, so percentages are real deltas.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Mutex<HashMap<i32, Sample>>,
}

impl CpuMeter {
    /// Usage of `pid`: CPU percent since this meter last sampled it (100 = one core; on the first
    /// sample, the average since the process started), and its memory. `None` when it is gone.
    pub fn sample(&self, pid: i32) -> Option<CoreState> {
        let h = host();
        let now = Instant::now();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| parse_stat(&t));
        let Some(stat) = stat else {
            self.forget(pid);
            return None;
        };
        let (rss, vms, swap) = memory(i64::from(pid))?;
        let ticks = stat.utime + stat.stime;
        let current = Sample {
            starttime: stat.starttime,
            ticks,
            at: now,
        };
        let previous = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(pid, current)
            .filter(|p| p.starttime == stat.starttime);
        let (cpu_secs, wall_secs) = match previous {
            Some(p) => (
                ticks.saturating_sub(p.ticks) as f64 / h.clk_tck,
                now.duration_since(p.at).as_secs_f64(),
            ),
            None => {
                let uptime = std::fs::read_to_string("/proc/uptime")
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
                    .unwrap_or(0.0);
                (
                    ticks as f64 / h.clk_tck,
                    uptime - stat.starttime as f64 / h.clk_tck,
                )
            }
        };
        let cpu = if wall_secs > 0.0 {
            cpu_secs / wall_secs * 100.0
        } else {
            0.0
        };
        Some(CoreState {
            cpu,
            rss,
            vms,
            swap,
            debug: pid.to_string(),
            instance_id: String::new(),
            commands: None,
        })
    }

    /// Drops the remembered sample of `pid` (call when a job ends).
    pub fn forget(&self, pid: i32) {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&pid);
    }

    /// Usage of the agent's own process (zeros if `/proc/self` cannot be read).
    pub fn self_usage(&self) -> CoreState {
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        self.sample(pid).unwrap_or_else(|| CoreState {
            debug: pid.to_string(),
            ..CoreState::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    const STAT: &str = "14709 (my (odd) cmd) R 14701 14701 10756 0 -1 4194304 99 0 0 0 \
        250 130 0 0 20 0 1 0 1216295 3133440 414 18446744073709551615 1 2 3 0 0 0 0 0 0 0 0 0 17 \
        0 0 0 7 0 0 4 5 6 7 8 9 0";

    #[test]
    fn parses_stat_with_odd_comm() {
        let s = parse_stat(STAT).expect("valid stat");
        assert_eq!(s.comm, "my (odd) cmd");
        assert_eq!(s.ppid, 14701);
        assert_eq!(s.utime, 250);
        assert_eq!(s.stime, 130);
        assert_eq!(s.starttime, 1_216_295);
        assert_eq!(s.blkio_ticks, 7);
        assert!(parse_stat("1 (x) R").is_none());
    }

    #[test]
    fn parses_statm_status_cmdline() {
        assert_eq!(parse_statm("765 434 406 5 0 123 0\n"), Some((765, 434)));
        assert_eq!(parse_statm("x"), None);
        assert_eq!(parse_vmswap("Name:\tx\nVmSwap:\t      12 kB\n"), 12 * 1024);
        assert_eq!(parse_vmswap("Name:\tkthreadd\n"), 0);
        assert_eq!(cmdline_text(b"sleep\x0010\x00", "sleep"), "sleep 10");
        assert_eq!(cmdline_text(b"", "kthreadd"), "[kthreadd]");
    }

    #[test]
    fn lists_own_process() {
        let me = i64::from(std::process::id());
        let all = list(None).expect("list all");
        let p = all.iter().find(|p| p.pid == me).expect("own pid listed");
        assert!(!p.cmdline.is_empty());
        assert!(p.rss > 0 && p.vms >= p.rss);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as i64;
        assert!(p.createtime > 0 && p.createtime <= now_ms + 1000);
        let one = list(Some(me)).expect("list own pid");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].pid, me);
        assert!(!list(Some(0)).expect("0 = all").is_empty());
    }

    #[test]
    fn missing_pid_is_not_found() {
        // pid_max is at most 2^22, so this pid cannot exist.
        let pid = 1 << 23;
        assert!(matches!(list(Some(pid)), Err(ProcError::NotFound { pid: p }) if p == pid));
        assert!(matches!(kill(pid, 0), Err(ProcError::NotFound { .. })));
    }

    #[test]
    fn refuses_init_and_below() {
        assert!(matches!(kill(1, 15), Err(ProcError::InvalidPid { pid: 1 })));
        assert!(matches!(kill(0, 15), Err(ProcError::InvalidPid { pid: 0 })));
        assert!(matches!(
            kill(-1, 9),
            Err(ProcError::InvalidPid { pid: -1 })
        ));
    }

    /// Kills and reaps the child if the test fails before doing so.
    struct ChildGuard(Child);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn meters_a_busy_child_then_kills_it() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = ChildGuard(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("spawn sh"),
        );
        let pid = i32::try_from(child.0.id()).expect("pids fit in i32");
        let meter = CpuMeter::default();
        let first = meter.sample(pid).expect("child is running");
        assert_eq!(first.debug, pid.to_string());
        assert!(first.rss > 0);
        // The measurement itself needs wall time to pass; there is no readiness signal for "busy".
        std::thread::sleep(std::time::Duration::from_millis(200));
        let second = meter.sample(pid).expect("child is running");
        assert!(second.cpu > 20.0, "busy child at {}%", second.cpu);

        kill(i64::from(pid), 0).expect("SIGTERM the child");
        let status = child.0.wait().expect("reap the child");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(meter.sample(pid).is_none(), "reaped child is gone");
        assert!(list(Some(i64::from(pid))).is_err());
        meter.forget(pid);
    }

    #[test]
    fn self_usage_names_own_pid() {
        let meter = CpuMeter::default();
        let s = meter.self_usage();
        assert_eq!(s.debug, std::process::id().to_string());
        assert!(s.rss > 0);
        assert!(s.cpu >= 0.0);
    }
}
