//! Records of process groups (and pids) that outlive core0: `run/jobs/<id>.pgid`, `core0.pid`
//! and `redis.pid` hold `<pid> <starttime>`, where starttime is field 22 of `/proc/<pid>/stat`.
//! Whoever reads such a record later (teardown, adoption) checks it against /proc first, so a
//! pid that the kernel gave to another process is never signalled.
//!
//! Files of the older one-number format are still read: their starttime is unknown, and a
//! group is then taken as recorded only if `/proc/<pgid>/stat` still names it as its own
//! process group.

use std::path::Path;

/// The fields of `/proc/<pid>/stat` these checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 22: start time in clock ticks after boot.
    pub starttime: u64,
}

/// Parses `/proc/<pid>/stat` text. The command name may hold spaces and parentheses, so the
/// fields are read after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    // Field N (proc(5) numbering, state is field 3) is f[N - 3].
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pgrp: f.get(5 - 3)?.parse().ok()?,
        starttime: f.get(22 - 3)?.parse().ok()?,
    })
}

/// The stat fields of a live (or zombie) process; `None` when it does not exist.
pub fn stat_of(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// A pid (or process group id) read back from a record file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The pid; for a job, also its process group id.
    pub pid: i32,
    /// Its starttime when recorded; `None` for files of the old one-number format.
    pub starttime: Option<u64>,
}

impl Record {
    /// The record of the running process `pid` (its starttime read now).
    pub fn of(pid: i32) -> Self {
        Self {
            pid,
            starttime: stat_of(pid).map(|s| s.starttime),
        }
    }

    /// The text kept in a record file: `<pid> <starttime>` (just `<pid>` when unknown).
    pub fn text(&self) -> String {
        match self.starttime {
            Some(t) => format!("{} {t}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }

    /// Parses a record's text: `<pid> <starttime>` or the old `<pid>`. Tokens after the
    /// second are left to the caller. Pids below 2 are refused.
    pub fn parse(text: &str) -> Option<Self> {
        let mut tokens = text.split_whitespace();
        let pid: i32 = tokens.next()?.parse().ok().filter(|p| *p > 1)?;
        let starttime = match tokens.next() {
            Some(t) => Some(t.parse().ok()?),
            None => None,
        };
        Some(Self { pid, starttime })
    }

    /// Reads a record file; `None` when missing or unreadable.
    pub fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Whether `pid` is still the recorded process: same starttime, or, for an old record,
    /// a process that exists.
    pub fn is_same_process(&self) -> bool {
        match (stat_of(self.pid), self.starttime) {
            (Some(st), Some(t)) => st.starttime == t,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Whether the process group `pid` is still the recorded job's group, so that signalling
    /// it cannot reach a stranger.
    ///
    /// - The leader exists: its starttime must match (old records: it must still lead its
    ///   group).
    /// - The leader is gone but the group still has members: those are the job's own
    ///   background processes. The kernel keeps a number allocated while any process uses it
    ///   as its process group, so no new process can have taken it meanwhile.
    pub fn is_same_group(&self) -> bool {
        match stat_of(self.pid) {
            Some(st) => match self.starttime {
                Some(t) => st.starttime == t,
                None => st.pgrp == self.pid,
            },
            None => group_exists(self.pid),
        }
    }
}

/// Whether some process has process group `pgid`.
pub fn group_exists(pgid: i32) -> bool {
    pgid > 1 && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

/// Writes the record of the running process `pid` to `path`. Blocking.
pub fn write(path: &Path, pid: i32) -> std::io::Result<()> {
    std::fs::write(path, Record::of(pid).text())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    /// Kills a test's process group on drop, even when the test fails.
    struct Group(i32);

    impl Drop for Group {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Starts `sh -c script` as the leader of a new session; returns the child and its group.
    fn session(script: &str) -> (std::process::Child, Group) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid fits");
        (child, Group(pid))
    }

    #[test]
    fn parses_stat_after_the_last_paren() {
        let text = "42 (a) b (c)) S 1 40 41 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                pgrp: 40,
                starttime: 777
            })
        );
        assert_eq!(parse_stat("42 (x) S 1"), None);
    }

    #[test]
    fn record_text_round_trips_and_reads_the_old_format() {
        let r = Record {
            pid: 1234,
            starttime: Some(99),
        };
        assert_eq!(r.text(), "1234 99\n");
        assert_eq!(Record::parse(&r.text()), Some(r));
        assert_eq!(
            Record::parse("1234\n"),
            Some(Record {
                pid: 1234,
                starttime: None
            })
        );
        assert_eq!(Record::parse("1 5"), None);
        assert_eq!(Record::parse("12 x"), None);
        assert_eq!(Record::parse(""), None);
    }

    #[test]
    fn live_group_matches_only_its_starttime() {
        let (mut child, group) = session("read x");
        let rec = Record::of(group.0);
        let st = rec.starttime.expect("starttime of a live process");
        assert!(rec.is_same_group() && rec.is_same_process());
        let reused = Record {
            pid: group.0,
            starttime: Some(st + 1),
        };
        assert!(!reused.is_same_group() && !reused.is_same_process());
        let old = Record {
            pid: group.0,
            starttime: None,
        };
        assert!(old.is_same_group(), "an old record of a group leader");
        drop(group);
        let _ = child.wait();
        assert!(!rec.is_same_group() && !rec.is_same_process());
    }

    #[test]
    fn old_record_of_a_process_that_leads_no_group_is_refused() {
        // This test's own process leads no group of the same number only if it is not a
        // group leader; a plain child of it is never one.
        let mut child = Command::new("sh")
            .args(["-c", "read x"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let old = Record {
            pid,
            starttime: None,
        };
        assert!(!old.is_same_group());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn group_without_its_leader_is_still_recorded() {
        // The leader starts a background member, reports it, and exits.
        let (mut child, group) = session("sleep 30 & echo $!");
        let rec = Record::of(group.0);
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped stdout")),
            &mut line,
        )
        .expect("member pid");
        child.wait().expect("leader exits");
        assert!(stat_of(group.0).is_none(), "the leader is reaped");
        assert!(rec.is_same_group(), "its background member keeps the group");
        drop(group);
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x.pgid");
        let me = i32::try_from(std::process::id()).expect("pid fits");
        write(&f, me).expect("write");
        let rec = Record::read(&f).expect("read back");
        assert_eq!(rec.pid, me);
        assert!(rec.starttime.is_some() && rec.is_same_process());
    }
}
