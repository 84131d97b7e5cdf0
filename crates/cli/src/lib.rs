//! `grid`: the command-line client of the Grid API, and `grid dev`, which runs a whole grid on
//! one machine.
//!
//! The client subcommands print tables for people, or the API's JSON with `--json`; errors go to
//! stderr as `error: <message> (HTTP <status>)` with exit status 1.

pub mod api_client;
pub mod commands;
pub mod dev;
pub mod output;
pub mod sse;

use clap::{Parser, Subcommand};
use commands::containers::ContainerCommand;
use commands::jobs::{KillArgs, RunArgs};
use commands::nodes::NodeAction;
use commands::{CommandError, Ctx};
use std::process::ExitCode;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "grid", version, about = "Command-line client of the Grid API")]
pub struct Cli {
    /// Base URL of the Grid API.
    #[arg(
        long,
        global = true,
        env = "GRID_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// API token, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "GRID_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON (pretty) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the nodes.
    Nodes,
    /// Show one node, or its memory, cpus, disks, nics, OS, state, jobs or processes; reboot or
    /// ping it.
    Node {
        /// Node id.
        id: String,
        /// What to show or do (default: the node itself).
        #[command(subcommand)]
        action: Option<NodeAction>,
    },
    /// Run, list, inspect and kill jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Create, list and remove containers; run commands and copy files in them.
    #[command(subcommand, visible_alias = "containers")]
    Container(ContainerCommand),
    /// Run a whole grid on this machine (an API and local nodes) until interrupted.
    Dev(dev::DevArgs),
}

/// `grid job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Run a command on a node, print its output as it comes, exit with its exit code.
    Run(RunArgs),
    /// List the running jobs of a node.
    Ls {
        /// Node id.
        node: String,
    },
    /// Show a job: its state, exit code and captured output.
    Get {
        /// Node id.
        node: String,
        /// Job id.
        job: String,
    },
    /// Kill a job, or every job of a node with `--all`.
    Kill(KillArgs),
}

/// Runs the parsed command line; prints errors and returns the process exit status.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Dev(args) => match dev::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", dev::error_chain(&e));
                ExitCode::FAILURE
            }
        },
        command => {
            let client = match api_client::ApiClient::new(&cli.url, cli.token) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}", dev::error_chain(&e));
                    return ExitCode::FAILURE;
                }
            };
            let ctx = Ctx {
                client,
                json: cli.json,
            };
            match client_command(&ctx, command).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {}", dev::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn client_command(ctx: &Ctx, command: Command) -> Result<ExitCode, CommandError> {
    match command {
        Command::Nodes => commands::nodes::list(ctx).await,
        Command::Node { id, action } => {
            commands::nodes::node(ctx, &id, action.unwrap_or(NodeAction::Show)).await
        }
        Command::Job(JobCommand::Run(args)) => commands::jobs::run(ctx, args).await,
        Command::Job(JobCommand::Ls { node }) => commands::jobs::list(ctx, &node).await,
        Command::Job(JobCommand::Get { node, job }) => commands::jobs::get(ctx, &node, &job).await,
        Command::Job(JobCommand::Kill(args)) => commands::jobs::kill(ctx, args).await,
        Command::Container(c) => commands::containers::run(ctx, c).await,
        // Handled by `run` before a client is made.
        Command::Dev(_) => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn job_run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "grid",
            "job",
            "run",
            "n1",
            "--max-time",
            "5",
            "--env",
            "A=1",
            "--env",
            "B=2",
            "--dir",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .expect("parses");
        let Command::Job(JobCommand::Run(args)) = cli.command else {
            panic!("not job run: {:?}", cli.command);
        };
        assert_eq!(args.node, "n1");
        assert_eq!(args.max_time, 5);
        assert_eq!(args.env, ["A=1", "B=2"]);
        assert_eq!(args.dir.as_deref(), Some("/tmp"));
        assert_eq!(args.command, ["sh", "-c", "echo hi"]);
    }

    #[test]
    fn container_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "grid",
            "container",
            "create",
            "n1",
            "web",
            "--image",
            "http://h/i.tar.gz",
            "--port",
            "8080:80",
            "--port",
            "53:53/udp",
            "--memory",
            "256M",
            "--cpu",
            "0.5",
        ])
        .expect("parses");
        let Command::Container(ContainerCommand::Create(args)) = cli.command else {
            panic!("not container create: {:?}", cli.command);
        };
        assert_eq!(args.ports, ["8080:80", "53:53/udp"]);
        assert_eq!(args.memory, Some(256 << 20));
        assert_eq!(args.cpu, Some(0.5));
        let cli = Cli::try_parse_from(["grid", "container", "exec", "n1", "web", "--", "ls", "-l"])
            .expect("parses");
        let Command::Container(ContainerCommand::Exec(args)) = cli.command else {
            panic!("not container exec: {:?}", cli.command);
        };
        assert_eq!(args.command, ["ls", "-l"]);
        assert!(
            Cli::try_parse_from([
                "grid",
                "container",
                "create",
                "n",
                "c",
                "--image",
                "/x",
                "--host-net",
                "--port",
                "1:1"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["grid", "container", "cp", "a", "n:c:/b"]).is_ok());
    }

    #[test]
    fn node_subcommands_and_global_flags() {
        let cli = Cli::try_parse_from([
            "grid",
            "node",
            "abc",
            "mem",
            "--json",
            "--url",
            "http://x:1",
        ])
        .expect("parses");
        assert!(cli.json);
        assert_eq!(cli.url, "http://x:1");
        assert!(matches!(
            cli.command,
            Command::Node { ref id, action: Some(NodeAction::Mem) } if id == "abc"
        ));
        let cli = Cli::try_parse_from(["grid", "node", "abc"]).expect("parses");
        assert!(matches!(cli.command, Command::Node { action: None, .. }));
        assert!(Cli::try_parse_from(["grid", "job", "kill", "n"]).is_err());
        assert!(Cli::try_parse_from(["grid", "job", "kill", "n", "j", "--all"]).is_err());
        assert!(Cli::try_parse_from(["grid", "job", "kill", "n", "--all"]).is_ok());
    }
}
