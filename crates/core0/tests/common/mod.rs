//! Helpers shared by core0's integration tests: drive the agent with raw Redis commands only.

use grid_proto::wire::CommandResult;
use serde_json::Value;

/// Pushes a command on `core:default`, as any client of the protocol does.
pub fn push(c: &mut redis::Connection, cmd: Value) {
    let _: i64 = redis::cmd("RPUSH")
        .arg("core:default")
        .arg(cmd.to_string())
        .query(c)
        .expect("rpush command");
}

/// Waits up to `secs` for the result of job `id` without consuming it.
pub fn result(c: &mut redis::Connection, id: &str, secs: u64) -> CommandResult {
    let key = format!("result:{id}");
    let text: Option<String> = redis::cmd("BRPOPLPUSH")
        .arg(&key)
        .arg(&key)
        .arg(secs)
        .query(c)
        .expect("brpoplpush");
    serde_json::from_str(&text.unwrap_or_else(|| panic!("no result for {id} within {secs}s")))
        .expect("result json")
}
