//! `grid nodes` and `grid node <id> ...`.

use super::{CommandError, Ctx, println_out};
use crate::api_client::segment;
use crate::output;
use grid_proto::api::{
    CoreStateResult, CpuInfo, DiskInfo, JobListItem, MemInfo, NicInfo, Node, OsInfo, Process,
};
use std::process::ExitCode;

/// What `grid node <id>` shows or does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum NodeAction {
    /// The node itself (id, hostname, status).
    Show,
    /// Memory.
    Mem,
    /// CPUs.
    Cpus,
    /// Mounted disks.
    Disks,
    /// Network interfaces.
    Nics,
    /// Operating system.
    Info,
    /// Usage of the node agent and its jobs.
    State,
    /// Running jobs.
    Jobs,
    /// Host processes.
    Processes,
    /// Reboot the node (ends every job and workload).
    Reboot,
    /// Check that the node agent answers; exits 1 when it does not.
    Ping,
}

/// `grid nodes`.
pub async fn list(ctx: &Ctx) -> Result<ExitCode, CommandError> {
    if let Some(nodes) = ctx.get_or_print::<Vec<Node>>("/nodes").await? {
        println_out(&output::nodes(&nodes))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `grid node <id> <action>`.
pub async fn node(ctx: &Ctx, id: &str, action: NodeAction) -> Result<ExitCode, CommandError> {
    let base = format!("/nodes/{}", segment(id));
    let text = match action {
        NodeAction::Show => ctx
            .get_or_print::<Node>(&base)
            .await?
            .map(|n| output::node(&n)),
        NodeAction::Mem => ctx
            .get_or_print::<MemInfo>(&format!("{base}/mem"))
            .await?
            .map(|m| output::mem(&m)),
        NodeAction::Cpus => ctx
            .get_or_print::<Vec<CpuInfo>>(&format!("{base}/cpus"))
            .await?
            .map(|c| output::cpus(&c)),
        NodeAction::Disks => ctx
            .get_or_print::<Vec<DiskInfo>>(&format!("{base}/disks"))
            .await?
            .map(|d| output::disks(&d)),
        NodeAction::Nics => ctx
            .get_or_print::<Vec<NicInfo>>(&format!("{base}/nics"))
            .await?
            .map(|n| output::nics(&n)),
        NodeAction::Info => ctx
            .get_or_print::<OsInfo>(&format!("{base}/info"))
            .await?
            .map(|o| output::os_info(&o)),
        NodeAction::State => ctx
            .get_or_print::<CoreStateResult>(&format!("{base}/state"))
            .await?
            .map(|s| output::core_state(&s)),
        NodeAction::Jobs => ctx
            .get_or_print::<Vec<JobListItem>>(&format!("{base}/jobs"))
            .await?
            .map(|j| output::jobs(&j)),
        NodeAction::Processes => ctx
            .get_or_print::<Vec<Process>>(&format!("{base}/processes"))
            .await?
            .map(|p| output::processes(&p)),
        NodeAction::Reboot => {
            ctx.client
                .post_bytes::<()>(&format!("{base}/reboot"), None)
                .await?;
            (!ctx.json).then(|| format!("node {id}: reboot requested"))
        }
        NodeAction::Ping => {
            let path = format!("{base}/ping");
            let bytes = ctx.client.post_bytes::<()>(&path, None).await?;
            let alive: bool = ctx.client.decode(reqwest::Method::POST, &path, &bytes)?;
            let text = if ctx.json {
                alive.to_string()
            } else if alive {
                format!("node {id}: alive")
            } else {
                format!("node {id}: no answer")
            };
            println_out(&text)?;
            return Ok(if alive {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };
    if let Some(text) = text {
        println_out(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}
