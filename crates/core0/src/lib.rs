//! core0, the Grid node agent.
//!
//! It consumes core0 protocol commands from a Redis list (`core:default`), runs them as tracked
//! jobs, and pushes their results back (`result:<id>`, `result:<id>:flag`, `stream:<id>`).
//! See `docs/ARCHITECTURE.md`.

pub mod agent;
pub mod builtins;
pub mod config;
pub mod containers;
pub mod fs;
pub mod identity;
pub mod info;
pub mod jobs;
pub mod net;
pub mod procs;
pub mod redis_server;
pub mod transport;
