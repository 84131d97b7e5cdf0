//! The host effects of networking behind one narrow trait: running `ip` and `nft`, and reading
//! and writing sysctls. [`HostOps`] runs the real commands in the calling thread's network
//! namespace; a recording fake serves the unit tests of the logic.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Why a host effect failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program, e.g. `ip`.
        program: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The whole command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A sysctl file could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The file under `/proc/sys`.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// A network namespace could not be opened or entered.
    #[error("cannot enter network namespace {netns}: {reason}")]
    Netns {
        /// The namespace.
        netns: String,
        /// Why.
        reason: String,
    },
}

impl OpsError {
    /// Whether the command failed because the object it names does not exist (a link, an
    /// address, an nftables table or chain).
    pub fn is_not_found(&self) -> bool {
        match self {
            OpsError::Failed { stderr, .. } => {
                stderr.contains("does not exist")
                    || stderr.contains("Cannot find device")
                    || stderr.contains("No such file or directory")
                    || stderr.contains("No such device")
            }
            _ => false,
        }
    }
}

/// A network namespace other than the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRef {
    /// The namespace of a process (e.g. a container's init).
    Pid(i32),
    /// A named namespace, bind-mounted at `/run/netns/<name>` (`ip netns add`).
    Named(String),
}

impl NetnsRef {
    /// The argument `ip link set ... netns <arg>` takes.
    pub fn ip_arg(&self) -> String {
        match self {
            NetnsRef::Pid(pid) => pid.to_string(),
            NetnsRef::Named(name) => name.clone(),
        }
    }

    /// The namespace file to `setns` into.
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            NetnsRef::Named(name) => PathBuf::from("/run/netns").join(name),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsRef::Pid(pid) => write!(f, "pid {pid}"),
            NetnsRef::Named(name) => write!(f, "{name}"),
        }
    }
}

/// Every host effect the networking code has. Commands act on the calling thread's network
/// namespace unless a method says otherwise.
pub trait NetOps {
    /// Runs `ip <args>` and returns its standard output.
    fn ip(&self, args: &[&str]) -> Result<String, OpsError>;
    /// Runs `ip <args>` inside another network namespace and returns its standard output.
    fn ip_in(&self, netns: &NetnsRef, args: &[&str]) -> Result<String, OpsError>;
    /// Runs several `ip` commands in one process (`ip -batch -`), in `netns` when given, stopping
    /// at the first that fails.
    fn ip_batch(&self, netns: Option<&NetnsRef>, commands: &[&[&str]]) -> Result<(), OpsError>;
    /// Runs `nft <args>` and returns its standard output.
    fn nft(&self, args: &[&str]) -> Result<String, OpsError>;
    /// Applies an nftables script as one transaction (`nft -f -`).
    fn nft_script(&self, script: &str) -> Result<(), OpsError>;
    /// Reads a sysctl, e.g. `net/ipv4/ip_forward`, trimmed.
    fn read_sysctl(&self, key: &str) -> Result<String, OpsError>;
    /// Writes a sysctl, e.g. `net/ipv4/ip_forward`.
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError>;
}

/// The real [`NetOps`]: runs `ip` and `nft` from `PATH` and uses `/proc/sys`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostOps;

impl HostOps {
    fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, OpsError> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let spawn_err = |source| OpsError::Spawn {
            program: program.to_owned(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(text) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(OpsError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The file of a sysctl key.
fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Runs `f` on a new thread that has entered `netns`; processes it spawns start there too.
pub fn in_netns<T: Send>(
    netns: &NetnsRef,
    f: impl FnOnce() -> Result<T, OpsError> + Send,
) -> Result<T, OpsError> {
    let path = netns.path();
    let err = |reason: String| OpsError::Netns {
        netns: netns.to_string(),
        reason,
    };
    let file = std::fs::File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(format!("setns: {e}")))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(err("the thread running in it panicked".into())))
    })
}

impl NetOps for HostOps {
    fn ip(&self, args: &[&str]) -> Result<String, OpsError> {
        Self::run("ip", args, None)
    }

    fn ip_in(&self, netns: &NetnsRef, args: &[&str]) -> Result<String, OpsError> {
        in_netns(netns, || Self::run("ip", args, None))
    }

    fn ip_batch(&self, netns: Option<&NetnsRef>, commands: &[&[&str]]) -> Result<(), OpsError> {
        // Arguments are interface names, addresses and keywords: no quoting needed, and a
        // newline in one would start another command.
        if let Some(bad) = commands.iter().flat_map(|c| c.iter()).find(|a| {
            a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        }) {
            return Err(OpsError::Failed {
                command: "ip -batch -".into(),
                status: "not run".into(),
                stderr: format!("argument {bad:?} cannot go into a batch"),
            });
        }
        let script: String = commands.iter().map(|c| c.join(" ") + "\n").collect();
        let run = || Self::run("ip", &["-batch", "-"], Some(&script)).map(drop);
        match netns {
            Some(ns) => in_netns(ns, run),
            None => run(),
        }
    }

    fn nft(&self, args: &[&str]) -> Result<String, OpsError> {
        Self::run("nft", args, None)
    }

    fn nft_script(&self, script: &str) -> Result<(), OpsError> {
        Self::run("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn read_sysctl(&self, key: &str) -> Result<String, OpsError> {
        let path = sysctl_path(key);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| OpsError::Sysctl { path, source })
    }

    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError> {
        let path = sysctl_path(key);
        std::fs::write(&path, value).map_err(|source| OpsError::Sysctl { path, source })
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A recording [`NetOps`] for unit tests: answers from a table of canned replies.

    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Records every call as one line (`ip ...`, `ip@<ns> ...`, `nft ...`, `nft -f -\n<script>`,
    /// `sysctl <key>=<value>`) and answers from `replies` (exact command line), else `""`.
    #[derive(Default)]
    pub struct FakeOps {
        pub calls: RefCell<Vec<String>>,
        pub replies: RefCell<HashMap<String, Result<String, String>>>,
        pub sysctls: RefCell<HashMap<String, String>>,
    }

    impl FakeOps {
        /// Answers `line` with `stdout`.
        pub fn reply(&self, line: &str, stdout: &str) {
            self.replies
                .borrow_mut()
                .insert(line.to_owned(), Ok(stdout.to_owned()));
        }

        /// Fails `line` with `stderr`.
        pub fn fail(&self, line: &str, stderr: &str) {
            self.replies
                .borrow_mut()
                .insert(line.to_owned(), Err(stderr.to_owned()));
        }

        /// The calls that changed something (not listings or reads).
        pub fn changes(&self) -> Vec<String> {
            self.calls
                .borrow()
                .iter()
                .filter(|c| {
                    !c.contains(" -j ") && !c.starts_with("nft -j") && !c.starts_with("ip -j")
                })
                .cloned()
                .collect()
        }

        fn answer(&self, line: String) -> Result<String, OpsError> {
            self.calls.borrow_mut().push(line.clone());
            match self.replies.borrow().get(&line) {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(OpsError::Failed {
                    command: line,
                    status: "exit status: 1".into(),
                    stderr: e.clone(),
                }),
                None => Ok(String::new()),
            }
        }
    }

    impl NetOps for FakeOps {
        fn ip(&self, args: &[&str]) -> Result<String, OpsError> {
            self.answer(format!("ip {}", args.join(" ")))
        }
        fn ip_in(&self, netns: &NetnsRef, args: &[&str]) -> Result<String, OpsError> {
            self.answer(format!("ip@{} {}", netns.ip_arg(), args.join(" ")))
        }
        fn ip_batch(&self, netns: Option<&NetnsRef>, commands: &[&[&str]]) -> Result<(), OpsError> {
            for c in commands {
                match netns {
                    Some(ns) => self.ip_in(ns, c)?,
                    None => self.ip(c)?,
                };
            }
            Ok(())
        }
        fn nft(&self, args: &[&str]) -> Result<String, OpsError> {
            self.answer(format!("nft {}", args.join(" ")))
        }
        fn nft_script(&self, script: &str) -> Result<(), OpsError> {
            self.answer(format!("nft -f -\n{script}")).map(drop)
        }
        fn read_sysctl(&self, key: &str) -> Result<String, OpsError> {
            Ok(self
                .sysctls
                .borrow()
                .get(key)
                .cloned()
                .unwrap_or_else(|| "0".into()))
        }
        fn write_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError> {
            self.calls
                .borrow_mut()
                .push(format!("sysctl {key}={value}"));
            self.sysctls.borrow_mut().insert(key.into(), value.into());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_refuses_arguments_that_would_split_a_line() {
        for bad in ["", "a b", "x\ny", "\"q\"", "it's"] {
            let e = HostOps
                .ip_batch(None, &[&["link", "set", bad, "up"]])
                .expect_err("refused");
            assert!(e.to_string().contains("cannot go into a batch"), "{e}");
        }
    }
}
