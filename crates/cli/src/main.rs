//! `grid`: parse the command line, start logging, run.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = grid_cli::Cli::parse();
    if !matches!(cli.command, grid_cli::Command::Dev(_)) {
        // Like other Unix tools, end quietly when the reader of our output goes away
        // (`grid node X processes | head`). Not for `grid dev`, which must clean up first.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread: `grid dev`'s children get PR_SET_PDEATHSIG, which follows the spawning thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(grid_cli::run(cli))
}
