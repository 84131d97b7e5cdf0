//! Host built-ins: `info.*`, `process.*`, `filesystem.*` (registered by [`register`]).

use super::Registry;

/// Registers the host built-ins.
pub fn register(_reg: &mut Registry) {}
