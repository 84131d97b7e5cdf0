//! Built-in commands: the table from wire name to handler, and the context handlers get.
//!
//! A handler returns the JSON value that becomes the result's `data` (level 20), or an error
//! string that becomes `data` (as a JSON string) with state `ERROR`.

use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub mod containers;
pub mod core;
pub mod host;

/// What a handler's future yields: JSON data, or the error text.
pub type BuiltinFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;

/// A built-in command handler.
pub type Handler = Arc<dyn Fn(Ctx, Value) -> BuiltinFuture + Send + Sync>;

/// What every handler can reach.
#[derive(Clone)]
pub struct Ctx {
    /// The agent's instance id (new on every start and safe reboot).
    pub instance_id: Arc<str>,
    /// Open files of `filesystem.open`.
    pub fs: Arc<crate::fs::FsTable>,
    /// CPU-percent sampler shared by `job.list` and `core.state`.
    pub cpu: Arc<crate::procs::CpuMeter>,
    /// The job manager.
    pub jobs: Arc<crate::jobs::JobManager>,
    /// Id of the job this handler runs as (`job.killall` spares it).
    pub job_id: Arc<str>,
    /// Reboot requests to the agent (`core.reboot`).
    pub power: Arc<Power>,
}

/// What `core.reboot` may do, and where it sends a safe-reboot request.
#[derive(Debug)]
pub struct Power {
    /// Whether a real host reboot is allowed (`--allow-host-reboot`).
    pub allow_host_reboot: bool,
    requests: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Power {
    /// A power control that forwards safe-reboot requests (the id of the `core.reboot` job) to
    /// `requests`.
    pub fn new(
        allow_host_reboot: bool,
        requests: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            allow_host_reboot,
            requests: Some(requests),
        }
    }

    /// A power control with no agent behind it: safe-reboot requests fail.
    pub fn detached() -> Self {
        Self {
            allow_host_reboot: false,
            requests: None,
        }
    }

    /// Asks the agent for a safe reboot once the job `job_id` has published its result.
    pub fn request_safe_reboot(&self, job_id: &str) -> Result<(), String> {
        match &self.requests {
            Some(tx) => tx
                .send(job_id.to_string())
                .map_err(|_| "agent is shutting down".to_string()),
            None => Err("reboot is not available in this process".to_string()),
        }
    }
}

/// The command table.
#[derive(Default, Clone)]
pub struct Registry {
    map: HashMap<&'static str, Handler>,
}

impl Registry {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `name`; a later registration replaces an earlier one.
    pub fn add<F, Fut>(&mut self, name: &'static str, f: F)
    where
        F: Fn(Ctx, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        self.map
            .insert(name, Arc::new(move |ctx, args| Box::pin(f(ctx, args))));
    }

    /// The handler of `name`.
    pub fn get(&self, name: &str) -> Option<Handler> {
        self.map.get(name).cloned()
    }

    /// Whether `name` is a built-in.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// Decodes a command's arguments, treating `null` as an empty object.
pub fn decode<T: serde::de::DeserializeOwned + Default>(args: Value) -> Result<T, String> {
    if args.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(args).map_err(|e| format!("bad arguments: {e}"))
}

/// Serializes a handler's return value.
pub fn encode<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode result: {e}"))
}
