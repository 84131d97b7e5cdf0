//! Wire types of the core0 command protocol and JSON types of the Grid API.
//!
//! This crate does no I/O. Both sides use it: `core0` consumes [`wire::Command`]s and produces
//! [`wire::CommandResult`]s, `grid-api` produces commands and maps results to the API types of
//! [`api`]. Field names are the original ones (see `shared/reference/core0-protocol.md` and
//! `grid-api-spec.md`), so an original client can talk to a Grid node.

pub mod api;
pub mod args;
pub mod commands;
pub mod ids;
pub mod info;
pub mod wire;

pub use ids::{IdError, JobId, NodeId};
pub use wire::{Command, CommandResult, State, StreamRecord};
