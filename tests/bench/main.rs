//! `grid-bench`: raw core0 commands over Redis, measured from a client process.
//!
//! `grid-bench rtt --redis 127.0.0.1:6379 --password PW [--runs 2000] [--command core.system]`
//! prints p50/p90/p99 of `core.system {name: "true"}` (or `core.ping`), each a full protocol round
//! trip: RPUSH on `core:default`, the node runs it, the client reads `result:<id>`.
//!
//! The container subcommands do ONE operation per process, so that hyperfine can time a client
//! process per run (connect, one or two round trips, exit):
//!
//! - `corex-create --redis A [--password P] --image URL --name N [--nic]`: `corex.create` with
//!   tags `grid:N`, no nic (`"nics": []`, host networking off: a network namespace holding only
//!   `lo`) unless `--nic` asks for a default nic; returns when corex answers (the container runs).
//! - `corex-terminate --redis A [--password P] --name N [--if-exists]`: finds the container by its
//!   tag `grid:N` (`corex.find`) and terminates it; with `--if-exists` no container is not an error.
//! - `corex-exec --redis A [--password P] (--name N | --id ID) -- CMD [ARGS..]`: `corex.dispatch`
//!   of `core.system CMD ARGS` and a wait for its result; fails unless the command succeeded.
//! - `corex-start-delete --redis A [--password P] --image URL --name N`: create, then terminate.
//! - `corex-list --redis A [--password P]`: one line per container: `id name state corex-pid`.

use anyhow::{Context, Result, bail};
use grid_client::NodeClient;
use grid_proto::{Command, State};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// How long a container create may take (an image download included).
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long any other container command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: grid-bench rtt --redis HOST:PORT [--password PW] [--runs N] [--command core.system|core.ping]
       grid-bench corex-create --redis HOST:PORT [--password PW] --image URL --name N [--nic]
       grid-bench corex-terminate --redis HOST:PORT [--password PW] --name N [--if-exists]
       grid-bench corex-exec --redis HOST:PORT [--password PW] (--name N | --id ID) -- CMD [ARGS..]
       grid-bench corex-start-delete --redis HOST:PORT [--password PW] --image URL --name N
       grid-bench corex-list --redis HOST:PORT [--password PW]";

/// The options before a `--` (the rest is a command line).
fn options(args: &[String]) -> &[String] {
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    &args[..end]
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let opts = options(args);
    opts.iter()
        .position(|a| a == name)
        .and_then(|i| opts.get(i + 1).cloned())
}

fn flag(args: &[String], name: &str) -> bool {
    options(args).iter().any(|a| a == name)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(sub) = args.get(1).map(String::as_str) else {
        bail!("{USAGE}");
    };
    if !matches!(
        sub,
        "rtt"
            | "corex-create"
            | "corex-terminate"
            | "corex-exec"
            | "corex-start-delete"
            | "corex-list"
    ) {
        bail!("unknown subcommand {sub:?}\n{USAGE}");
    }
    let addr = arg(&args, "--redis").context("--redis HOST:PORT is required")?;
    let password = arg(&args, "--password");
    let client = NodeClient::connect(&addr, password.as_deref()).await?;
    match sub {
        "rtt" => rtt(&client, &args).await,
        "corex-create" => {
            let image = arg(&args, "--image").context("--image URL is required")?;
            let name = arg(&args, "--name").context("--name N is required")?;
            create(&client, &image, &name, flag(&args, "--nic")).await?;
            Ok(())
        }
        "corex-terminate" => {
            let name = arg(&args, "--name").context("--name N is required")?;
            terminate(&client, &name, flag(&args, "--if-exists")).await
        }
        "corex-exec" => {
            let id = match (arg(&args, "--id"), arg(&args, "--name")) {
                (Some(id), _) => id.parse().context("--id wants a container id")?,
                (None, Some(name)) => find(&client, &name)
                    .await?
                    .with_context(|| format!("no container tagged grid:{name}"))?,
                (None, None) => bail!("--name N or --id ID is required\n{USAGE}"),
            };
            let line: Vec<String> = args
                .iter()
                .skip_while(|a| *a != "--")
                .skip(1)
                .cloned()
                .collect();
            exec(&client, id, &line).await
        }
        "corex-start-delete" => {
            let image = arg(&args, "--image").context("--image URL is required")?;
            let name = arg(&args, "--name").context("--name N is required")?;
            let id = create(&client, &image, &name, false).await?;
            call(
                &client,
                "corex.terminate",
                json!({"container": id}),
                CALL_TIMEOUT,
            )
            .await?;
            Ok(())
        }
        _ => list(&client).await,
    }
}

/// Runs `command` and returns its JSON data; any state but SUCCESS is an error.
async fn call(client: &NodeClient, command: &str, args: Value, timeout: Duration) -> Result<Value> {
    let r = client.call(command, args, timeout).await?;
    if r.state != State::Success {
        bail!("{command} answered {:?}: {}", r.state, r.data);
    }
    if r.data.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&r.data).with_context(|| format!("{command}: data {:?}", r.data))
}

async fn create(client: &NodeClient, image: &str, name: &str, nic: bool) -> Result<u64> {
    let nics = if nic {
        json!([{"type": "default"}])
    } else {
        json!([])
    };
    let data = call(
        client,
        "corex.create",
        json!({"root": image, "host_network": false, "nics": nics, "hostname": name,
            "name": name, "tags": [format!("grid:{name}"), "grid-gen:1"]}),
        CREATE_TIMEOUT,
    )
    .await?;
    data.as_u64()
        .with_context(|| format!("corex.create answered {data} instead of a container id"))
}

/// The id of the container tagged `grid:<name>`, if any.
async fn find(client: &NodeClient, name: &str) -> Result<Option<u64>> {
    let data = call(
        client,
        "corex.find",
        json!({"tags": [format!("grid:{name}")]}),
        CALL_TIMEOUT,
    )
    .await?;
    let ids = data
        .as_object()
        .with_context(|| format!("corex.find answered {data}"))?;
    Ok(ids.keys().find_map(|k| k.parse().ok()))
}

async fn terminate(client: &NodeClient, name: &str, if_exists: bool) -> Result<()> {
    match find(client, name).await? {
        Some(id) => {
            call(
                client,
                "corex.terminate",
                json!({"container": id}),
                CALL_TIMEOUT,
            )
            .await?;
            Ok(())
        }
        None if if_exists => Ok(()),
        None => bail!("no container tagged grid:{name}"),
    }
}

async fn exec(client: &NodeClient, id: u64, line: &[String]) -> Result<()> {
    let Some((name, rest)) = line.split_first() else {
        bail!("corex-exec needs a command after --\n{USAGE}");
    };
    let cmd = Command::new(
        uuid::Uuid::new_v4().to_string(),
        "core.system",
        json!({"name": name, "args": rest}),
    );
    call(
        client,
        "corex.dispatch",
        json!({"container": id, "command": cmd}),
        CALL_TIMEOUT,
    )
    .await?;
    let r = client
        .wait_result(&cmd.id, CALL_TIMEOUT)
        .await?
        .with_context(|| format!("{name} did not finish within {CALL_TIMEOUT:?}"))?;
    if r.state != State::Success {
        bail!("{name} in container {id} ended {:?}: {}", r.state, r.data);
    }
    Ok(())
}

async fn list(client: &NodeClient) -> Result<()> {
    let data = call(client, "corex.list", json!({}), CALL_TIMEOUT).await?;
    let all = data
        .as_object()
        .with_context(|| format!("corex.list answered {data}"))?;
    for (id, c) in all {
        let c = &c["container"];
        println!(
            "{id} {} {} {}",
            c["name"].as_str().unwrap_or("-"),
            c["state"].as_str().unwrap_or("-"),
            c["pid"].as_i64().unwrap_or(0)
        );
    }
    Ok(())
}

async fn rtt(client: &NodeClient, args: &[String]) -> Result<()> {
    let runs: usize = arg(args, "--runs")
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(2000);
    let command = arg(args, "--command").unwrap_or_else(|| "core.system".into());
    let arguments = if command == "core.system" {
        json!({"name": "true"})
    } else {
        json!({})
    };
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
        if r.state != State::Success {
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
