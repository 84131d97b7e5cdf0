//! `core0`: parse the command line, start logging to stderr, run the agent or the teardown.

use clap::Parser;
use core0::config::{Cli, Sub};
use std::process::ExitCode;
use std::time::Duration;

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    match Cli::parse().into_sub() {
        // First, before any thread exists: corex forks into a new pid namespace.
        Sub::CorexInit(a) => ExitCode::from(core0::containers::corex::init_main(&a.dir, a.spare)),
        Sub::Run(cfg) => {
            init_tracing(&cfg.log_level);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("core0: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let res = rt.block_on(core0::agent::Agent::run(*cfg));
            rt.shutdown_timeout(Duration::from_millis(500));
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("core0: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Sub::Teardown(t) => {
            init_tracing("info");
            match core0::agent::teardown(&t.data_dir) {
                Ok(r) => {
                    tracing::info!(
                        core0_killed = r.core0_killed,
                        groups = ?r.groups_killed,
                        redis_stopped = r.redis_stopped,
                        containers_stopped = r.containers_stopped,
                        "teardown done"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("core0 teardown: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
