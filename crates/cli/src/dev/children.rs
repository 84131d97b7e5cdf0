//! The child processes of `grid dev`: spawned in their own process group (a terminal's Ctrl-C
//! reaches `grid` only, which then stops them in order), with `PR_SET_PDEATHSIG` so they get
//! SIGTERM if `grid` dies without cleaning up, their output forwarded to our stderr with a
//! prefix, and their exits reported on a channel. Dropping [`Children`] SIGKILLs the process
//! group of every child not yet reaped: no child outlives `grid dev`, even on an error path.

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

/// What can go wrong starting a child.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The program could not be started.
    #[error("cannot start {name} ({program})")]
    Spawn {
        /// Our name for the child.
        name: String,
        /// The program.
        program: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A child's exit, as reported on the exit channel.
#[derive(Debug, Clone)]
pub struct Exit {
    /// Our name for the child.
    pub name: String,
    /// How it ended.
    pub status: ExitStatus,
}

#[derive(Debug)]
struct Supervised {
    name: String,
    pid: Pid,
    exited: watch::Receiver<Option<ExitStatus>>,
}

/// The running children and the channel of their exits.
#[derive(Debug)]
pub struct Children {
    list: Vec<Supervised>,
    exits: mpsc::UnboundedSender<Exit>,
}

/// Configures a command as every `grid dev` child: own process group, SIGTERM on our death,
/// no stdin.
fn prepare(cmd: &mut Command) {
    cmd.stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is
    // async-signal-safe and touches no memory of the parent. The death signal is tied to the
    // spawning thread; `grid` runs a current-thread runtime, so that is the main thread.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Copies lines of a child's output to our stderr with `[name] ` in front.
fn forward(name: &str, out: impl AsyncRead + Unpin + Send + 'static) {
    let prefix = format!("[{name}] ");
    tokio::spawn(async move {
        let mut reader = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    eprintln!("{prefix}{}", text.trim_end_matches(['\n', '\r']));
                }
            }
        }
    });
}

impl Children {
    /// No children yet; exits will be sent on `exits`.
    pub fn new(exits: mpsc::UnboundedSender<Exit>) -> Self {
        Self {
            list: Vec::new(),
            exits,
        }
    }

    /// Starts `program args` as the child called `name`.
    pub fn spawn<I, S>(&mut self, name: &str, program: &Path, args: I) -> Result<(), ChildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_with_env(name, program, args, std::iter::empty::<(&str, &str)>())
    }

    /// Like [`Children::spawn`], with environment variables added to ours. Secrets go here, not
    /// in `args`: a command line is readable by every user (`/proc/<pid>/cmdline`), an
    /// environment only by the process's owner.
    pub fn spawn_with_env<I, S, E, K, V>(
        &mut self,
        name: &str,
        program: &Path,
        args: I,
        envs: E,
    ) -> Result<(), ChildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        prepare(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            name: name.to_string(),
            program: program.to_path_buf(),
            source,
        })?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .ok_or_else(|| ChildError::Spawn {
                name: name.to_string(),
                program: program.to_path_buf(),
                source: std::io::Error::other("the child has no pid"),
            })?;
        if let Some(out) = child.stdout.take() {
            forward(name, out);
        }
        if let Some(err) = child.stderr.take() {
            forward(name, err);
        }
        let (tx, rx) = watch::channel(None);
        let exits = self.exits.clone();
        let child_name = name.to_string();
        tokio::spawn(async move {
            // `wait` only fails when the child was never spawned; report that as a failure.
            let status = match child.wait().await {
                Ok(status) => status,
                Err(_) => std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
            };
            tx.send_replace(Some(status));
            let _ = exits.send(Exit {
                name: child_name,
                status,
            });
        });
        self.list.push(Supervised {
            name: name.to_string(),
            pid,
            exited: rx,
        });
        Ok(())
    }

    /// Whether the child called `name` was started and has not exited.
    pub fn is_running(&self, name: &str) -> bool {
        self.list
            .iter()
            .any(|c| c.name == name && c.exited.borrow().is_none())
    }

    /// Sends SIGTERM to the child called `name` (if it is running).
    pub fn terminate(&self, name: &str) {
        for c in self.list.iter().filter(|c| c.name == name) {
            if c.exited.borrow().is_none() {
                let _ = kill(c.pid, Signal::SIGTERM);
            }
        }
    }

    /// Waits until the child called `name` has exited; after `grace`, SIGKILLs its process group
    /// and waits for that too. Returns its exit status (`None` if it was never started).
    pub async fn wait_or_kill(&self, name: &str, grace: Duration) -> Option<ExitStatus> {
        let c = self.list.iter().find(|c| c.name == name)?;
        let mut rx = c.exited.clone();
        let done = tokio::time::timeout(grace, rx.wait_for(|s| s.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| *s));
        if done.is_some() {
            return done;
        }
        eprintln!(
            "grid dev: {name} did not stop within {}s; killing it",
            grace.as_secs()
        );
        if rx.borrow().is_none() {
            let _ = killpg(c.pid, Signal::SIGKILL);
        }
        rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
    }

    /// SIGTERM, then [`Children::wait_or_kill`].
    pub async fn stop(&self, name: &str, grace: Duration) -> Option<ExitStatus> {
        self.terminate(name);
        self.wait_or_kill(name, grace).await
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &self.list {
            // An unreaped child still owns its pid (a zombie at worst), so the group is ours.
            if c.exited.borrow().is_none() {
                let _ = killpg(c.pid, Signal::SIGKILL);
            }
        }
    }
}

/// Runs `program args` to completion as a `grid dev` helper (own process group, output to our
/// stderr with a prefix), killing it after `timeout`. Returns its status, or a message.
pub async fn run_to_end<I, S>(
    name: &str,
    program: &Path,
    args: I,
    timeout: Duration,
) -> Result<ExitStatus, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    prepare(&mut cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    if let Some(out) = child.stdout.take() {
        forward(name, out);
    }
    if let Some(err) = child.stderr.take() {
        forward(name, err);
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(format!("cannot wait for {}: {e}", program.display())),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "{name} did not finish within {}s",
                timeout.as_secs()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: Pid) -> bool {
        kill(pid, None).is_ok()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_terminates_and_reports_exits() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut children = Children::new(tx);
        children
            .spawn("sleeper", Path::new("/bin/sleep"), ["1000"])
            .expect("spawn sleep");
        children
            .spawn("quick", Path::new("/bin/sh"), ["-c", "echo hi; exit 3"])
            .expect("spawn sh");
        let exit = rx.recv().await.expect("an exit");
        assert_eq!(exit.name, "quick");
        assert_eq!(exit.status.code(), Some(3));
        assert!(children.is_running("sleeper"));
        let status = children
            .stop("sleeper", Duration::from_secs(10))
            .await
            .expect("started");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        assert!(!children.is_running("sleeper"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn environment_reaches_the_child() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut children = Children::new(tx);
        children
            .spawn_with_env(
                "env",
                Path::new("/bin/sh"),
                ["-c", r#"test "$GRID_TEST_SECRET" = s3cret"#],
                [("GRID_TEST_SECRET", "s3cret")],
            )
            .expect("spawn sh");
        let exit = rx.recv().await.expect("an exit");
        assert_eq!(
            exit.status.code(),
            Some(0),
            "the child did not see its variable"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut children = Children::new(tx);
        // The shell says when its trap is set, so the test does not race the SIGTERM.
        let marker = tempfile::tempdir().expect("temp dir");
        let ready = marker.path().join("ready");
        let script = format!("trap '' TERM; touch {}; exec sleep 1000", ready.display());
        children
            .spawn("stubborn", Path::new("/bin/sh"), ["-c", &script])
            .expect("spawn");
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = children
            .stop("stubborn", Duration::from_millis(300))
            .await
            .expect("started");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_children_kills_them() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut children = Children::new(tx);
        children
            .spawn("sleeper", Path::new("/bin/sleep"), ["1000"])
            .expect("spawn");
        let pid = children.list[0].pid;
        assert!(alive(pid));
        drop(children);
        // SIGKILL is delivered before kill(2) returns; the zombie is reaped by tokio's driver.
        let mut status = 0;
        // SAFETY: waitpid on our own child pid with a valid out pointer.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
        if r == pid.as_raw() {
            assert!(libc::WIFSIGNALED(status));
            assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn run_to_end_reports_status_and_timeout() {
        let ok = run_to_end(
            "t",
            Path::new("/bin/sh"),
            ["-c", "exit 0"],
            Duration::from_secs(10),
        )
        .await
        .expect("runs");
        assert!(ok.success());
        let slow = run_to_end(
            "t",
            Path::new("/bin/sleep"),
            ["1000"],
            Duration::from_millis(100),
        )
        .await;
        assert!(slow.is_err());
    }
}
