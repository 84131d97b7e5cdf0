//! Agent built-ins: `core.ping`, `core.state`, `core.reboot`, `job.list`, `job.kill`,
//! `job.killall` (registered by [`register`]).

use super::{Ctx, Registry, decode, encode};
use grid_proto::args::{JobKillArgs, JobListArgs};
use grid_proto::commands::{CORE_PING, CORE_REBOOT, CORE_STATE, JOB_KILL, JOB_KILLALL, JOB_LIST};
use serde_json::Value;

/// `Version: <crate version> @Revision: <GRID_GIT_REV at build time, or unknown>`.
pub fn version() -> String {
    format!(
        "Version: {} @Revision: {}",
        env!("CARGO_PKG_VERSION"),
        option_env!("GRID_GIT_REV").unwrap_or("unknown")
    )
}

/// Registers the agent built-ins.
pub fn register(reg: &mut Registry) {
    reg.add(CORE_PING, |_ctx, _args| async move {
        encode(format!("PONG {}", version()))
    });
    // Both read /proc for every job: off the async threads.
    reg.add(CORE_STATE, |ctx: Ctx, _args| async move {
        let state = blocking(move || ctx.jobs.usage()).await?;
        encode(state)
    });
    reg.add(JOB_LIST, |ctx: Ctx, args| async move {
        let a: JobListArgs = decode(args)?;
        let jobs = blocking(move || ctx.jobs.list(a.id.as_deref()))
            .await?
            .map_err(|e| e.to_string())?;
        encode(jobs)
    });
    reg.add(JOB_KILL, |ctx: Ctx, args| async move {
        let a: JobKillArgs = decode(args)?;
        let found = ctx.jobs.kill(&a.id, a.signal).map_err(|e| e.to_string())?;
        encode(found)
    });
    reg.add(JOB_KILLALL, |ctx: Ctx, _args| async move {
        ctx.jobs.killall(Some(&ctx.job_id), false);
        encode(true)
    });
    reg.add(
        CORE_REBOOT,
        |ctx: Ctx, _args| async move { reboot(ctx).await },
    );
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("task failed: {e}"))
}

async fn reboot(ctx: Ctx) -> Result<Value, String> {
    if ctx.power.allow_host_reboot {
        tracing::warn!("host reboot requested");
        ctx.jobs.killall(Some(&ctx.job_id), true);
        tokio::task::spawn_blocking(host_reboot)
            .await
            .map_err(|e| format!("reboot task failed: {e}"))??;
        return Ok(Value::Null);
    }
    tracing::warn!("safe reboot requested");
    ctx.power.request_safe_reboot(&ctx.job_id)?;
    Ok(Value::Null)
}

/// sync(2) then reboot(2); returns only on failure.
fn host_reboot() -> Result<(), String> {
    // SAFETY: sync(2) and reboot(2) take no pointers; reboot returns only on failure.
    let rc = unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT)
    };
    if rc < 0 {
        return Err(format!(
            "reboot failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
