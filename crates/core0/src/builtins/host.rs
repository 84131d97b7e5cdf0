//! Host built-ins: `info.*`, `process.*`, `filesystem.*` (registered by [`register`]).
//!
//! Each handler decodes its arguments, runs the blocking `/proc`, `/sys` or file work on the
//! blocking pool, and returns the encoded result or the error's text.

use super::{Registry, decode, encode};
use crate::{fs, info, procs};
use grid_proto::args::{
    FsChmodArgs, FsChownArgs, FsFdArgs, FsMoveArgs, FsOpenArgs, FsPathArgs, FsWriteArgs,
    ProcessKillArgs, ProcessListArgs,
};
use grid_proto::commands as cmd;
use serde::Serialize;
use serde_json::Value;
use std::fmt::Display;

/// Runs `f` on the blocking pool and encodes its result; an error becomes its text.
async fn blocking<T, E, F>(f: F) -> Result<Value, String>
where
    T: Serialize + Send + 'static,
    E: Display + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => encode(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("internal error: {e}")),
    }
}

/// Registers the host built-ins.
pub fn register(reg: &mut Registry) {
    reg.add(cmd::INFO_CPU, |_, _| blocking(info::cpus));
    reg.add(cmd::INFO_MEM, |_, _| blocking(info::mem));
    reg.add(cmd::INFO_DISK, |_, _| blocking(info::disks));
    reg.add(cmd::INFO_NIC, |_, _| blocking(info::nics));
    reg.add(cmd::INFO_OS, |ctx, _| {
        let id = ctx.instance_id.clone();
        blocking(move || info::os(&id))
    });
    reg.add(cmd::INFO_PORT, |_, _| blocking(info::ports));
    reg.add(cmd::INFO_VERSION, |_, _| async { encode(info::version()) });

    reg.add(cmd::PROCESS_LIST, |_, args| async move {
        let a: ProcessListArgs = decode(args)?;
        blocking(move || procs::list(a.pid)).await
    });
    reg.add(cmd::PROCESS_KILL, |_, args| async move {
        let a: ProcessKillArgs = decode(args)?;
        blocking(move || procs::kill(a.pid, a.signal).map(|()| Value::Null)).await
    });

    reg.add(cmd::FS_OPEN, |ctx, args| async move {
        let a: FsOpenArgs = decode(args)?;
        blocking(move || ctx.fs.open(&a)).await
    });
    reg.add(cmd::FS_READ, |ctx, args| async move {
        let a: FsFdArgs = decode(args)?;
        blocking(move || ctx.fs.read(&a.fd)).await
    });
    reg.add(cmd::FS_WRITE, |ctx, args| async move {
        let a: FsWriteArgs = decode(args)?;
        blocking(move || ctx.fs.write(&a.fd, &a.block).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_CLOSE, |ctx, args| async move {
        let a: FsFdArgs = decode(args)?;
        blocking(move || ctx.fs.close(&a.fd).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_EXISTS, |_, args| async move {
        let a: FsPathArgs = decode(args)?;
        blocking(move || fs::exists(&a.path)).await
    });
    reg.add(cmd::FS_LIST, |_, args| async move {
        let a: FsPathArgs = decode(args)?;
        blocking(move || fs::list(&a.path)).await
    });
    reg.add(cmd::FS_MKDIR, |_, args| async move {
        let a: FsPathArgs = decode(args)?;
        blocking(move || fs::mkdir(&a.path).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_REMOVE, |_, args| async move {
        let a: FsPathArgs = decode(args)?;
        blocking(move || fs::remove(&a.path).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_MOVE, |_, args| async move {
        let a: FsMoveArgs = decode(args)?;
        blocking(move || fs::rename(&a.path, &a.destination).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_CHMOD, |_, args| async move {
        let a: FsChmodArgs = decode(args)?;
        blocking(move || fs::chmod(&a.path, a.mode, a.recursive).map(|()| Value::Null)).await
    });
    reg.add(cmd::FS_CHOWN, |_, args| async move {
        let a: FsChownArgs = decode(args)?;
        blocking(move || fs::chown(&a.path, &a.user, &a.group, a.recursive).map(|()| Value::Null))
            .await
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_host_command() {
        let mut reg = Registry::new();
        register(&mut reg);
        for name in [
            cmd::INFO_CPU,
            cmd::INFO_MEM,
            cmd::INFO_DISK,
            cmd::INFO_NIC,
            cmd::INFO_OS,
            cmd::INFO_PORT,
            cmd::INFO_VERSION,
            cmd::PROCESS_LIST,
            cmd::PROCESS_KILL,
            cmd::FS_OPEN,
            cmd::FS_READ,
            cmd::FS_WRITE,
            cmd::FS_CLOSE,
            cmd::FS_EXISTS,
            cmd::FS_LIST,
            cmd::FS_MKDIR,
            cmd::FS_REMOVE,
            cmd::FS_MOVE,
            cmd::FS_CHMOD,
            cmd::FS_CHOWN,
        ] {
            assert!(reg.contains(name), "{name} registered");
        }
    }

    #[tokio::test]
    async fn blocking_encodes_results_and_error_text() {
        let mem = blocking(info::mem).await.expect("info.mem");
        assert!(mem["total"].as_u64().is_some_and(|t| t > 0));
        assert!(mem.get("usedPercent").is_some());
        let err = blocking(|| procs::kill(1, 15).map(|()| Value::Null))
            .await
            .expect_err("pid 1 is refused");
        assert_eq!(err, "invalid pid 1: must be greater than 1");
    }
}
