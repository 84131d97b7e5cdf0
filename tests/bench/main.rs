//! `grid-bench`: round trips of raw core0 commands over Redis, measured from a client process.
//!
//! `grid-bench rtt --redis 127.0.0.1:6379 --password PW [--runs 2000] [--command core.system]`
//! prints p50/p90/p99 of `core.system {name: "true"}` (or `core.ping`), each a full protocol round
//! trip: RPUSH on `core:default`, the node runs it, the client reads `result:<id>`.

use anyhow::{Context, Result, bail};
use grid_client::NodeClient;
use serde_json::json;
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("rtt") {
        bail!(
            "usage: grid-bench rtt --redis HOST:PORT [--password PW] [--runs N] [--command core.system|core.ping]"
        );
    }
    let addr = arg(&args, "--redis").context("--redis HOST:PORT")?;
    let password = arg(&args, "--password");
    let runs: usize = arg(&args, "--runs")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(2000);
    let command = arg(&args, "--command").unwrap_or_else(|| "core.system".into());
    let arguments = if command == "core.system" {
        json!({"name": "true"})
    } else {
        json!({})
    };
    let client = NodeClient::connect(&addr, password.as_deref()).await?;
    // Warm up connections and the node.
    for _ in 0..50 {
        client
            .call(&command, arguments.clone(), Duration::from_secs(10))
            .await?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = client
            .call(&command, arguments.clone(), Duration::from_secs(10))
            .await?;
        times.push(t.elapsed());
        if r.state != grid_proto::State::Success {
            bail!("{command} answered {:?}: {}", r.state, r.data);
        }
    }
    times.sort();
    println!(
        "{command} round trip over redis, {runs} runs: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
        pct(&times, 0.5).as_secs_f64() * 1e3,
        pct(&times, 0.9).as_secs_f64() * 1e3,
        pct(&times, 0.99).as_secs_f64() * 1e3
    );
    Ok(())
}
