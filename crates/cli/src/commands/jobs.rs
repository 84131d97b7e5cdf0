//! `grid job run|ls|get|kill`: jobs on a node, with live output for `run`.

use super::{CommandError, Ctx, println_out};
use crate::api_client::{ApiError, segment};
use crate::output;
use crate::sse::{SseEvent, SseParser};
use futures::StreamExt;
use grid_proto::api::{CoreSystem, Environment, JobListItem, JobResult};
use reqwest::Method;
use reqwest::header::LOCATION;
use serde::Deserialize;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `grid job run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Node id.
    pub node: String,
    /// Kill the job after this many seconds (exit code 124); 0 = no limit.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub max_time: u64,
    /// Environment variable for the process (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<String>,
    /// Working directory on the node.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// What `grid job kill` kills.
#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("which").required(true))]
pub struct KillArgs {
    /// Node id.
    pub node: String,
    /// Job id.
    #[arg(group = "which")]
    pub job: Option<String>,
    /// Kill every job of the node.
    #[arg(long, group = "which")]
    pub all: bool,
}

fn parse_env(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The data of the final `exit` event.
#[derive(Debug, Deserialize)]
struct ExitEvent {
    state: String,
    #[serde(default)]
    code: Option<i32>,
}

/// The exit status `grid job run` ends with, from the job's final state and exit code.
///
/// `timeout` → 124 (as `timeout(1)`), `killed` → 137 (128 + SIGKILL); otherwise the job's own
/// code (a negative code −N, a death by signal N, → 128 + N); a failure without a code → 1.
pub fn exit_code(state: &str, code: Option<i32>) -> u8 {
    let from_code = |c: i32| -> u8 {
        if let Ok(c) = u8::try_from(c) {
            c
        } else if (-127..0).contains(&c) {
            // In range by the check above: 128 + 1..=127.
            u8::try_from(128 - c).unwrap_or(1)
        } else {
            1
        }
    };
    match state.to_ascii_lowercase().as_str() {
        "timeout" => 124,
        "killed" => 137,
        "success" => code.map_or(0, from_code),
        _ => match code.map(from_code) {
            Some(c) if c != 0 => c,
            _ => 1,
        },
    }
}

/// The job id from the `Location` of a `202` (`/nodes/{id}/jobs/{jobid}`).
pub fn job_id_from_location(location: &str) -> Option<String> {
    let path = location.split(['?', '#']).next().unwrap_or(location);
    let (_, rest) = path.rsplit_once("/jobs/")?;
    let id = rest.trim_end_matches('/');
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}

/// The job id from a JSON body: a string, or an object with `id`.
fn job_id_from_body(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Object(o) => o
            .get("id")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        _ => None,
    }
}

/// `grid job run`: start the process, print its output as it comes, exit with its code.
pub async fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode, CommandError> {
    let node = segment(&args.node);
    let mut command = args.command.into_iter();
    let name = command.next().unwrap_or_default();
    let body = CoreSystem {
        name,
        pwd: args.dir.unwrap_or_default(),
        args: command.collect(),
        environment: (!args.env.is_empty()).then_some(Environment::List(args.env)),
        stdin: String::new(),
        max_time: args.max_time,
        queue: None,
    };
    let label = args.node.clone();
    run_job(
        ctx,
        &format!("/nodes/{node}/processes"),
        &format!("/nodes/{node}/jobs"),
        &body,
        &label,
    )
    .await
}

/// Starts a process with `POST processes_path`, prints its output as it comes and returns its
/// exit code; `jobs_path` is where its jobs live (`/nodes/{n}/jobs` or
/// `/nodes/{n}/containers/{c}/jobs`), `label` names the node (or container) in errors.
pub async fn run_job(
    ctx: &Ctx,
    processes_path: &str,
    jobs_path: &str,
    body: &CoreSystem,
    label: &str,
) -> Result<ExitCode, CommandError> {
    let path = processes_path.to_string();
    let resp = ctx
        .client
        .send(Method::POST, &path, Some(body), None)
        .await?;
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(job_id_from_location);
    let job = match location {
        Some(job) => job,
        None => {
            let bytes = resp.bytes().await.unwrap_or_default();
            job_id_from_body(&bytes).ok_or_else(|| CommandError::NoJobId { path: path.clone() })?
        }
    };
    follow_job(
        ctx,
        &format!("{jobs_path}/{}", segment(&job)),
        &job,
        label,
        true,
    )
    .await
}

/// Prints the output of the job at `job_path` (live, or replayed when it ended) and returns its
/// exit code. With `kill_on_interrupt`, Ctrl-C kills the job.
pub async fn follow_job(
    ctx: &Ctx,
    job_path: &str,
    job: &str,
    label: &str,
    kill_on_interrupt: bool,
) -> Result<ExitCode, CommandError> {
    let job = job.to_string();
    let stream_path = format!("{job_path}/stream");
    let resp = ctx
        .client
        .send::<()>(Method::GET, &stream_path, None, None)
        .await?;
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                None => break,
                Some(Err(source)) => {
                    return Err(ApiError::Request {
                        method: Method::GET,
                        url: format!("{}{stream_path}", ctx.client.base()),
                        source,
                    }
                    .into());
                }
                Some(Ok(chunk)) => {
                    for event in parser.push(&chunk) {
                        if let Some(code) = handle_event(&job, event)? {
                            return Ok(ExitCode::from(code));
                        }
                    }
                }
            },
            _ = &mut ctrl_c => {
                if !kill_on_interrupt {
                    return Ok(ExitCode::from(130));
                }
                // The job is ours: do not leave it running when the user gives up on it.
                let killed = ctx.client.delete(job_path, Some(Duration::from_secs(5))).await;
                match killed {
                    Ok(()) => eprintln!("grid: interrupted, killed job {job}"),
                    Err(e) => eprintln!("grid: interrupted; could not kill job {job}: {e}"),
                }
                return Ok(ExitCode::from(130));
            }
        }
    }
    // The stream ended without an `exit` event: ask for the result instead.
    let result: JobResult = ctx.client.get(job_path).await?;
    if result.state.eq_ignore_ascii_case("running") {
        return Err(CommandError::StreamEnded {
            node: label.to_string(),
            job,
        });
    }
    Ok(ExitCode::from(exit_code(&result.state, result.code)))
}

/// Prints an output event; returns the exit status for the `exit` event.
fn handle_event(job: &str, event: SseEvent) -> Result<Option<u8>, CommandError> {
    match event.event.as_str() {
        "stdout" => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", event.data)
                .and_then(|()| out.flush())
                .map_err(|source| CommandError::Write {
                    stream: "stdout",
                    source,
                })?;
        }
        "stderr" => {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{}", event.data).map_err(|source| CommandError::Write {
                stream: "stderr",
                source,
            })?;
        }
        "exit" => {
            let exit: ExitEvent =
                serde_json::from_str(&event.data).map_err(|source| CommandError::BadExitEvent {
                    job: job.to_string(),
                    data: event.data.clone(),
                    source,
                })?;
            return Ok(Some(exit_code(&exit.state, exit.code)));
        }
        _ => {}
    }
    Ok(None)
}

/// `grid job ls <node>`.
pub async fn list(ctx: &Ctx, node: &str) -> Result<ExitCode, CommandError> {
    let path = format!("/nodes/{}/jobs", segment(node));
    if let Some(jobs) = ctx.get_or_print::<Vec<JobListItem>>(&path).await? {
        println_out(&output::jobs(&jobs))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `grid job get <node> <job>`.
pub async fn get(ctx: &Ctx, node: &str, job: &str) -> Result<ExitCode, CommandError> {
    let path = format!("/nodes/{}/jobs/{}", segment(node), segment(job));
    if let Some(result) = ctx.get_or_print::<JobResult>(&path).await? {
        println_out(&output::job(&result))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `grid job kill <node> <job>|--all`.
pub async fn kill(ctx: &Ctx, args: KillArgs) -> Result<ExitCode, CommandError> {
    let node = segment(&args.node);
    match (&args.job, args.all) {
        (Some(job), _) => {
            ctx.client
                .delete(&format!("/nodes/{node}/jobs/{}", segment(job)), None)
                .await?;
            if !ctx.json {
                println_out(&format!("killed job {job}"))?;
            }
        }
        (None, _) => {
            ctx.client
                .delete(&format!("/nodes/{node}/jobs"), None)
                .await?;
            if !ctx.json {
                println_out(&format!("killed every job on node {}", args.node))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code("success", Some(0)), 0);
        assert_eq!(exit_code("success", None), 0);
        assert_eq!(exit_code("error", Some(3)), 3);
        assert_eq!(exit_code("ERROR", Some(42)), 42);
        assert_eq!(exit_code("error", None), 1);
        assert_eq!(exit_code("error", Some(0)), 1);
        assert_eq!(exit_code("error", Some(-15)), 143);
        assert_eq!(exit_code("error", Some(1000)), 1);
        assert_eq!(exit_code("killed", None), 137);
        assert_eq!(exit_code("KILLED", Some(-9)), 137);
        assert_eq!(exit_code("timeout", None), 124);
        assert_eq!(exit_code("unknown_cmd", None), 1);
    }

    #[test]
    fn job_ids_from_location_and_body() {
        assert_eq!(
            job_id_from_location("/nodes/525400123456/jobs/abc-1").as_deref(),
            Some("abc-1")
        );
        assert_eq!(
            job_id_from_location("http://h:1/nodes/n/jobs/abc?x=1").as_deref(),
            Some("abc")
        );
        assert_eq!(job_id_from_location("/nodes/n/jobs/"), None);
        assert_eq!(job_id_from_location("/nodes/n"), None);
        assert_eq!(job_id_from_body(br#""j1""#).as_deref(), Some("j1"));
        assert_eq!(job_id_from_body(br#"{"id":"j2"}"#).as_deref(), Some("j2"));
        assert_eq!(job_id_from_body(b""), None);
    }

    #[test]
    fn env_items_must_be_key_value() {
        assert!(parse_env("A=1").is_ok());
        assert!(parse_env("A=").is_ok());
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A").is_err());
    }
}
