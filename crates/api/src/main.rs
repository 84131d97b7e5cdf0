//! `grid-api`: parse the configuration, start logging, serve.

use clap::Parser;
use grid_api::config::{Cli, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=info")),
        )
        .init();
    let config = Config::load(&Cli::parse())?;
    grid_api::server::serve(config).await
}
