//! Command line of the `core0` binary.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `core0 [run] …` or `core0 teardown …`.
#[derive(Debug, Parser)]
#[command(
    name = "core0",
    version,
    about = "Grid node agent",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// Options of `run` when no subcommand is given.
    #[command(flatten)]
    pub run: RunConfig,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Run the agent (the default).
    Run(Box<RunConfig>),
    /// Kill the job process groups and the redis-server a node left behind.
    Teardown(TeardownConfig),
    /// Internal: start corex, the PID 1 of a container (run by core0 itself).
    #[command(name = "__corex-init", hide = true)]
    CorexInit(CorexInitArgs),
}

/// Arguments of the hidden `__corex-init` subcommand.
#[derive(Debug, Clone, Args)]
pub struct CorexInitArgs {
    /// The container directory (holds `spec.json`).
    pub dir: PathBuf,
    /// Make a spare: join the cgroups of `spare.json`, wait for `go` on stdin.
    #[arg(long)]
    pub spare: bool,
}

impl Cli {
    /// The subcommand, `run` with the top-level options when none was named.
    pub fn into_sub(self) -> Sub {
        self.command.unwrap_or_else(|| Sub::Run(Box::new(self.run)))
    }
}

/// Options of `core0 run`.
#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    /// Node id (default: the MAC of the default-route NIC without colons).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Data directory (default: /var/lib/core0/<node-id>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the redis-server core0 starts (`host:port`).
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis_listen: String,
    /// Password of that redis-server (default: generated once, kept in <data-dir>/redis.password).
    #[arg(long, env = "CORE0_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Use this Redis instead of starting one (`redis://[:password@]host:port[/db]`).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// `host:port` of the node's Redis as the API should reach it (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Base URL of the Grid API to register with (`POST <url>/nodes/join`).
    #[arg(long, requires = "join_token")]
    pub join: Option<String>,
    /// Join token configured on the API.
    #[arg(long, env = "CORE0_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Let `core.reboot` really reboot the host (otherwise it restarts core0 with empty state).
    #[arg(long)]
    pub allow_host_reboot: bool,
    /// Seconds a safe reboot keeps the node halted.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub reboot_downtime: u64,
    /// Do not keep a spare container ready (namespaces and cgroups made ahead of the next
    /// create, about 0.5 MB): every create then pays for them itself.
    #[arg(long)]
    pub no_spare_container: bool,
    /// Log filter (`info`, `debug`, `core0=debug`, …).
    #[arg(long, default_value = "info", env = "CORE0_LOG")]
    pub log_level: String,
}

/// Options of `core0 teardown`.
#[derive(Debug, Clone, Args)]
pub struct TeardownConfig {
    /// The node's data directory.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// Splits `host:port` (`[v6]:port` too).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_run_without_subcommand_and_teardown() {
        let cli = Cli::try_parse_from(["core0", "--node-id", "n1", "--reboot-downtime", "1"])
            .expect("valid");
        let Sub::Run(r) = cli.into_sub() else {
            panic!("run expected")
        };
        assert_eq!(r.node_id.as_deref(), Some("n1"));
        assert_eq!(r.reboot_downtime, 1);
        assert_eq!(r.redis_listen, "127.0.0.1:6379");
        let cli =
            Cli::try_parse_from(["core0", "teardown", "--data-dir", "/tmp/x"]).expect("valid");
        assert!(matches!(cli.into_sub(), Sub::Teardown(t) if t.data_dir == Path::new("/tmp/x")));
        assert!(Cli::try_parse_from(["core0", "--join", "http://x"]).is_err());
        let cli = Cli::try_parse_from(["corex", "__corex-init", "/d/c1"]).expect("valid");
        assert!(
            matches!(cli.into_sub(), Sub::CorexInit(a) if a.dir == Path::new("/d/c1") && !a.spare)
        );
        let cli =
            Cli::try_parse_from(["corex", "__corex-init", "/d/c2", "--spare"]).expect("valid");
        assert!(matches!(cli.into_sub(), Sub::CorexInit(a) if a.spare));
    }

    #[test]
    fn splits_addresses() {
        assert_eq!(
            split_host_port("127.0.0.1:6379"),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(split_host_port("[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(split_host_port("nope"), None);
        assert_eq!(split_host_port(":1"), None);
    }
}
