//! `grid-api`: the HTTP/JSON front of a grid of core0 nodes.
//!
//! The HTTP layer ([`http`]) translates requests into core0 commands on a node (direct
//! endpoints) or into desired records in the [`store`] that only the [`reconcile`] loop applies
//! to nodes (managed resources). [`server::serve`] wires it all together; [`server::app`] gives
//! the router alone for in-process tests.

pub mod archive;
pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod openapi;
pub mod reconcile;
pub mod server;
pub mod shutdown;
pub mod store;
