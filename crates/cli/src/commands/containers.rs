//! `grid container ls|create|rm|start|stop|exec|cp|ps|jobs|logs`: containers on a node.

use super::jobs::{follow_job, run_job};
use super::{CommandError, Ctx, println_out};
use crate::api_client::{ApiError, segment};
use crate::output;
use futures::StreamExt;
use grid_proto::api::{
    ContainerLimits, ContainerListItem, ContainerNic, CoreSystem, CreateContainer, Environment,
    JobListItem, Process,
};
use reqwest::Method;
use std::process::ExitCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes read from a local file per chunk of an upload.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// `grid container ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ContainerCommand {
    /// List the containers of a node.
    Ls {
        /// Node id.
        node: String,
    },
    /// Create a container and wait until it runs.
    Create(CreateArgs),
    /// Delete a container (its filesystem too).
    Rm {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
    },
    /// Start a stopped container.
    Start {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
    },
    /// Stop a container, keeping its filesystem.
    Stop {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
    },
    /// Run a command in a container, print its output as it comes, exit with its exit code.
    Exec(ExecArgs),
    /// Copy a file into (`LOCAL NODE:NAME:/PATH`) or out of (`NODE:NAME:/PATH LOCAL`) a container.
    Cp {
        /// Source: a local file or `NODE:NAME:/PATH`.
        src: String,
        /// Destination: `NODE:NAME:/PATH` or a local file.
        dst: String,
    },
    /// List the processes of a container.
    Ps {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
    },
    /// List the running jobs of a container.
    Jobs {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
    },
    /// Print the output of a container job (live while it runs), exit with its exit code.
    Logs {
        /// Node id.
        node: String,
        /// Container name.
        name: String,
        /// Job id.
        job: String,
    },
}

/// Arguments of `grid container create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Node id.
    pub node: String,
    /// Container name (`[A-Za-z0-9_.-]`, at most 64).
    pub name: String,
    /// Root filesystem image: an http(s):// or file:// URL or an absolute path on the node.
    #[arg(long, value_name = "URL")]
    pub image: String,
    /// Hostname (default: the name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Forward a node port to the container: `HOST:CONTAINER[/tcp|/udp]` (repeatable).
    #[arg(long = "port", value_name = "HOST:CONTAINER")]
    pub ports: Vec<String>,
    /// Share the node's network instead of a nic on its bridge.
    #[arg(long, conflicts_with = "ports")]
    pub host_net: bool,
    /// No nic at all: a network namespace holding only `lo`.
    #[arg(long, conflicts_with_all = ["ports", "host_net"])]
    pub no_nic: bool,
    /// Run with the full capability set.
    #[arg(long)]
    pub privileged: bool,
    /// Memory limit, bytes with an optional K, M or G suffix.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// CPU limit in cores (e.g. 0.5).
    #[arg(long)]
    pub cpu: Option<f64>,
}

/// Arguments of `grid container exec`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Node id.
    pub node: String,
    /// Container name.
    pub name: String,
    /// Environment variable for the process (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the container.
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

/// Parses `512`, `64K`, `256M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size such as 268435456, 256M or 1G"))
}

/// A file in a container: `NODE:NAME:/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePath {
    /// Node id.
    pub node: String,
    /// Container name.
    pub name: String,
    /// Absolute path in the container.
    pub path: String,
}

/// `NODE:NAME:/PATH` → its parts; anything else is a local path.
pub fn remote_path(s: &str) -> Option<RemotePath> {
    let (node, rest) = s.split_once(':')?;
    let (name, path) = rest.split_once(':')?;
    let plain = |p: &str| !p.is_empty() && !p.contains('/');
    (plain(node) && plain(name) && path.starts_with('/')).then(|| RemotePath {
        node: node.to_string(),
        name: name.to_string(),
        path: path.to_string(),
    })
}

fn base(node: &str, name: &str) -> String {
    format!("/nodes/{}/containers/{}", segment(node), segment(name))
}

/// Runs a `grid container` subcommand.
pub async fn run(ctx: &Ctx, command: ContainerCommand) -> Result<ExitCode, CommandError> {
    match command {
        ContainerCommand::Ls { node } => {
            let path = format!("/nodes/{}/containers", segment(&node));
            if let Some(list) = ctx.get_or_print::<Vec<ContainerListItem>>(&path).await? {
                let rows = list
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            serde_json::to_value(c.status)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            c.hostname.clone(),
                            c.flist.clone(),
                        ]
                    })
                    .collect();
                println_out(&output::table(
                    &["NAME", "STATUS", "HOSTNAME", "IMAGE"],
                    rows,
                ))?;
            }
        }
        ContainerCommand::Create(args) => create(ctx, args).await?,
        ContainerCommand::Rm { node, name } => {
            ctx.client.delete(&base(&node, &name), None).await?;
            done(ctx, &format!("deleted container {name}"))?;
        }
        ContainerCommand::Start { node, name } => {
            ctx.client
                .post_bytes::<()>(&format!("{}/start", base(&node, &name)), None)
                .await?;
            done(ctx, &format!("started container {name}"))?;
        }
        ContainerCommand::Stop { node, name } => {
            ctx.client
                .post_bytes::<()>(&format!("{}/stop", base(&node, &name)), None)
                .await?;
            done(ctx, &format!("stopped container {name}"))?;
        }
        ContainerCommand::Exec(args) => return exec(ctx, args).await,
        ContainerCommand::Cp { src, dst } => return copy(ctx, &src, &dst).await,
        ContainerCommand::Ps { node, name } => {
            let path = format!("{}/processes", base(&node, &name));
            if let Some(procs) = ctx.get_or_print::<Vec<Process>>(&path).await? {
                println_out(&output::processes(&procs))?;
            }
        }
        ContainerCommand::Jobs { node, name } => {
            let path = format!("{}/jobs", base(&node, &name));
            if let Some(jobs) = ctx.get_or_print::<Vec<JobListItem>>(&path).await? {
                println_out(&output::jobs(&jobs))?;
            }
        }
        ContainerCommand::Logs { node, name, job } => {
            let path = format!("{}/jobs/{}", base(&node, &name), segment(&job));
            return follow_job(ctx, &path, &job, &format!("{node}:{name}"), false).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(ctx: &Ctx, text: &str) -> Result<(), CommandError> {
    if ctx.json { Ok(()) } else { println_out(text) }
}

async fn create(ctx: &Ctx, args: CreateArgs) -> Result<(), CommandError> {
    let limits = (args.memory.is_some() || args.cpu.is_some()).then_some(ContainerLimits {
        cpu: args.cpu,
        memory: args.memory,
        pids: None,
    });
    let body = CreateContainer {
        id: args.name.clone(),
        hostname: args.hostname.unwrap_or_else(|| args.name.clone()),
        flist: args.image,
        init_processes: Vec::new(),
        filesystems: Vec::new(),
        nics: if args.host_net || args.no_nic {
            Vec::new()
        } else {
            vec![ContainerNic {
                kind: "default".to_string(),
                id: String::new(),
                hwaddr: None,
                config: None,
                status: None,
            }]
        },
        host_networking: args.host_net,
        ports: args.ports,
        storage: String::new(),
        privileged: args.privileged,
        limits,
    };
    let path = format!("/nodes/{}/containers", segment(&args.node));
    ctx.client
        .send(Method::POST, &path, Some(&body), None)
        .await?;
    done(ctx, &format!("container {} runs", args.name))
}

async fn exec(ctx: &Ctx, args: ExecArgs) -> Result<ExitCode, CommandError> {
    let b = base(&args.node, &args.name);
    let mut command = args.command.into_iter();
    let body = CoreSystem {
        name: command.next().unwrap_or_default(),
        pwd: args.dir.unwrap_or_default(),
        args: command.collect(),
        environment: (!args.env.is_empty()).then_some(Environment::List(args.env)),
        stdin: String::new(),
        max_time: 0,
        queue: None,
    };
    let label = format!("{}:{}", args.node, args.name);
    run_job(
        ctx,
        &format!("{b}/processes"),
        &format!("{b}/jobs"),
        &body,
        &label,
    )
    .await
}

fn local_io(path: &str, source: std::io::Error) -> CommandError {
    CommandError::Local {
        path: path.to_string(),
        source,
    }
}

async fn copy(ctx: &Ctx, src: &str, dst: &str) -> Result<ExitCode, CommandError> {
    match (remote_path(src), remote_path(dst)) {
        (None, Some(to)) => upload(ctx, src, &to).await?,
        (Some(from), None) => download(ctx, &from, dst).await?,
        _ => {
            return Err(CommandError::Usage(
                "cp copies between a local file and NODE:NAME:/PATH (exactly one of each)"
                    .to_string(),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Streams `local` as the multipart field `file`, never holding the whole file.
async fn upload(ctx: &Ctx, local: &str, to: &RemotePath) -> Result<(), CommandError> {
    let file = tokio::fs::File::open(local)
        .await
        .map_err(|e| local_io(local, e))?;
    let boundary = format!("grid-{:032x}", rand::random::<u128>());
    let filename = std::path::Path::new(local)
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\r', '\n'], "_"))
        .unwrap_or_else(|| "file".to_string());
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let chunks = futures::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let body = futures::stream::once(async move { Ok(head.into_bytes()) })
        .chain(chunks)
        .chain(futures::stream::once(async move { Ok(tail.into_bytes()) }));
    let path = format!(
        "{}/filesystem?path={}",
        base(&to.node, &to.name),
        segment(&to.path)
    );
    ctx.client
        .send_body(
            Method::POST,
            &path,
            &format!("multipart/form-data; boundary={boundary}"),
            reqwest::Body::wrap_stream(body),
        )
        .await?;
    Ok(())
}

/// Streams a container file into `local` (written to a temporary name, renamed when complete).
async fn download(ctx: &Ctx, from: &RemotePath, local: &str) -> Result<(), CommandError> {
    let path = format!(
        "{}/filesystem?path={}",
        base(&from.node, &from.name),
        segment(&from.path)
    );
    let resp = ctx
        .client
        .send::<()>(Method::GET, &path, None, None)
        .await?;
    let partial = format!("{local}.grid-partial");
    let mut out = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| local_io(&partial, e))?;
    let mut body = resp.bytes_stream();
    let result = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| ApiError::Request {
                method: Method::GET,
                url: format!("{}{path}", ctx.client.base()),
                source,
            })?;
            out.write_all(&chunk)
                .await
                .map_err(|e| local_io(&partial, e))?;
        }
        out.flush().await.map_err(|e| local_io(&partial, e))?;
        tokio::fs::rename(&partial, local)
            .await
            .map_err(|e| local_io(local, e))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_need_node_name_and_absolute_path() {
        assert_eq!(
            remote_path("n1:web:/etc/hosts"),
            Some(RemotePath {
                node: "n1".into(),
                name: "web".into(),
                path: "/etc/hosts".into()
            })
        );
        assert_eq!(remote_path("./a:b:/c"), None);
        assert_eq!(remote_path("n1:web:etc"), None);
        assert_eq!(remote_path("/tmp/file"), None);
        assert_eq!(remote_path("n1::/x"), None);
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("512").expect("plain"), 512);
        assert_eq!(parse_size("256M").expect("mega"), 256 << 20);
        assert_eq!(parse_size("1g").expect("giga"), 1 << 30);
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }
}
