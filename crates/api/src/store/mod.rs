//! The state store: etcd-shaped operations on byte values under string keys.
//!
//! Desired state of managed resources and the reconciler's outcomes live here (Redis is transport
//! only). Every write bumps one store-wide revision; each key carries its create revision, mod
//! revision and version, as in etcd, so callers can compare-and-swap, run multi-key transactions
//! and watch a prefix from a revision (replayed from the history, then live). The embedded backend
//! is [`redb::RedbStore`]; a distributed backend (etcd) implements the same [`StateStore`] trait
//! and must pass the same conformance suite (`conformance.rs`, run by each backend's tests).

pub mod redb;

#[cfg(test)]
pub(crate) mod conformance;

use futures::Stream;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::pin::Pin;

/// Largest value accepted, in bytes: etcd refuses requests over 1.5 MiB, and so does every backend.
pub const MAX_VALUE_SIZE: usize = 1536 * 1024;

/// What can go wrong in a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare on a key's mod revision failed (0 = the key must not exist; `actual` 0 = absent).
    #[error("conflict on key {key}: expected mod revision {expected}, found {actual}")]
    Conflict {
        /// The key.
        key: String,
        /// The mod revision the caller expected.
        expected: u64,
        /// The key's mod revision now (0 when it does not exist).
        actual: u64,
    },
    /// A value is over [`MAX_VALUE_SIZE`].
    #[error("value of key {key} is {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// The key.
        key: String,
        /// Size of the refused value.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A watch asked for changes the history no longer holds: list again, then watch from there.
    #[error("revision {requested} is compacted, the oldest kept change is at revision {oldest}")]
    Compacted {
        /// The revision the watch was to start after.
        requested: u64,
        /// The oldest revision still in the history.
        oldest: u64,
    },
    /// A key is empty.
    #[error("keys must not be empty")]
    EmptyKey,
    /// A transaction names the same key in more than one operation.
    #[error("transaction writes key {key} more than once")]
    DuplicateKeyInTxn {
        /// The key.
        key: String,
    },
    /// A stored value does not decode as the JSON type the caller asked for (or does not encode).
    #[error("value of key {key} is not the expected json: {source}")]
    Json {
        /// The key.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The backend failed (I/O, corruption, a lost connection).
    #[error("state store {op} failed: {message}")]
    Backend {
        /// The operation, e.g. `put` or `watch`.
        op: &'static str,
        /// The backend's error text.
        message: String,
    },
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A key with its value and etcd-style revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (empty in delete events).
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the last write of the key (of the delete, in delete events).
    pub mod_revision: u64,
    /// Puts since the key was created (1 after the first put; 0 in delete events).
    pub version: u64,
}

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    /// The key was created or replaced.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: WatchEventKind,
    /// The key after the change (its value empty for a delete).
    pub kv: KeyValue,
    /// Revision of the write (several events share it when a transaction wrote several keys).
    pub revision: u64,
}

/// The changes under a prefix, in revision order. An `Err` item ends the stream: after
/// [`StoreError::Compacted`] the caller lists again and watches from the listing's revision.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// Keys under a prefix and the revision they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
    /// The store revision of the read: watch from it to see every later change.
    pub revision: u64,
}

/// A condition of a transaction: `key`'s mod revision equals `mod_revision` (0 = absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// The expected mod revision; 0 means the key must not exist.
    pub mod_revision: u64,
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Delete a key (nothing happens when it does not exist).
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// The key the operation writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A multi-key transaction: when every compare holds, `success` is applied, else `failure`;
/// either way atomically, at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes when every compare holds.
    pub success: Vec<Op>,
    /// Writes when a compare fails.
    pub failure: Vec<Op>,
}

/// Outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held (and `success` was applied).
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged when it wrote nothing).
    pub revision: u64,
}

/// An etcd-shaped key-value store. Object safe: used as `Arc<dyn StateStore>`.
///
/// Every method returns a boxed future so that the trait stays object safe without macros.
pub trait StateStore: Send + Sync + 'static {
    /// The key, if it exists.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>>>;

    /// Creates or replaces `key`; returns the new store revision.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64>>;

    /// Replaces `key` only when its mod revision is `expected_mod_revision` (0 = creates it only
    /// when absent); returns the new revision or [`StoreError::Conflict`].
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected_mod_revision: u64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64>>;

    /// Deletes `key` (only when its mod revision is `expected_mod_revision`, if given; a missing
    /// key then is a [`StoreError::Conflict`] with `actual` 0). Returns whether it existed.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_mod_revision: Option<u64>,
    ) -> BoxFuture<'a, Result<bool>>;

    /// The keys starting with `prefix`, sorted by key.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<KeyValue>>>;

    /// Like [`StateStore::list`], with the revision the listing was read at.
    fn snapshot<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Snapshot>>;

    /// Every change under `prefix` with a revision above `from_revision`: first the history,
    /// then live. [`StoreError::Compacted`] when the history no longer reaches back that far.
    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from_revision: u64,
    ) -> BoxFuture<'a, Result<WatchStream>>;

    /// Runs a transaction atomically.
    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult>>;

    /// The revision of the last write (0 for an empty store).
    fn current_revision(&self) -> BoxFuture<'_, Result<u64>>;
}

/// A JSON value read from the store with the revisions of its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// Mod revision of the key: pass it to [`cas_json`] to replace exactly this version.
    pub mod_revision: u64,
    /// Create revision of the key.
    pub create_revision: u64,
}

/// Refuses empty keys and values over [`MAX_VALUE_SIZE`]; backends call it before writing.
pub fn check_write(key: &str, value: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::EmptyKey);
    }
    if value.len() > MAX_VALUE_SIZE {
        return Err(StoreError::TooLarge {
            key: key.to_string(),
            size: value.len(),
            max: MAX_VALUE_SIZE,
        });
    }
    Ok(())
}

/// Decodes the JSON value of a key.
pub fn decode_json<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>> {
    let value = serde_json::from_slice(&kv.value).map_err(|source| StoreError::Json {
        key: kv.key.clone(),
        source,
    })?;
    Ok(Versioned {
        value,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
    })
}

fn encode_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| StoreError::Json {
        key: key.to_string(),
        source,
    })
}

/// Reads `key` as JSON.
pub async fn get_json<T: DeserializeOwned>(
    store: &dyn StateStore,
    key: &str,
) -> Result<Option<Versioned<T>>> {
    store.get(key).await?.as_ref().map(decode_json).transpose()
}

/// Writes `value` as JSON under `key`; returns the new revision.
pub async fn put_json<T: Serialize + ?Sized>(
    store: &dyn StateStore,
    key: &str,
    value: &T,
) -> Result<u64> {
    store.put(key, encode_json(key, value)?).await
}

/// Writes `value` as JSON under `key` if its mod revision is `expected_mod_revision`
/// (0 = absent); returns the new revision.
pub async fn cas_json<T: Serialize + ?Sized>(
    store: &dyn StateStore,
    key: &str,
    expected_mod_revision: u64,
    value: &T,
) -> Result<u64> {
    store
        .compare_and_swap(key, expected_mod_revision, encode_json(key, value)?)
        .await
}
