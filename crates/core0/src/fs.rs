//! `filesystem.*`: open-file table and path operations.

/// Files opened by `filesystem.open`, keyed by fd (a UUID), closed after 5 idle minutes.
#[derive(Debug, Default)]
pub struct FsTable {}
