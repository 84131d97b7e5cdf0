//! The embedded state store: one redb file in the data directory.
//!
//! Three tables: `kv` (key → revisions and value), `meta` (the current revision and the
//! compaction point) and `history` (revision → the events written at that revision, the newest
//! [`DEFAULT_HISTORY_LIMIT`] revisions kept). Every write is one redb write transaction that bumps
//! the revision; redb calls run on tokio's blocking pool. Committed events are broadcast to live
//! watchers in revision order; a watcher that falls behind the broadcast catches up from the
//! history, and gets [`StoreError::Compacted`] if the history no longer reaches back far enough.

use super::{
    Compare, KeyValue, Op, Result, Snapshot, StateStore, StoreError, Txn, TxnResult, WatchEvent,
    WatchEventKind, WatchStream, check_write,
};
use ::redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use futures::future::BoxFuture;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Revisions kept in the history by [`RedbStore::open`].
pub const DEFAULT_HISTORY_LIMIT: u64 = 10_000;

/// Committed batches buffered for live watchers before a slow one has to catch up from history.
const BROADCAST_CAPACITY: usize = 1024;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// The events of one revision.
#[derive(Debug)]
struct Batch {
    revision: u64,
    events: Vec<WatchEvent>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held from the start of a write transaction until its batch is broadcast, so that live
    /// watchers receive batches in revision order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<Batch>>,
    history_limit: u64,
}

/// The redb-backed [`StateStore`]. Cheap to clone.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn backend(op: &'static str) -> impl Fn(::redb::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        message: e.to_string(),
    }
}

fn corrupt(op: &'static str, what: &str) -> StoreError {
    StoreError::Backend {
        op,
        message: format!("corrupt record: {what}"),
    }
}

/// Runs blocking redb work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend {
            op,
            message: format!("blocking task failed: {e}"),
        })?
}

// ---- record encoding -------------------------------------------------------------------------

/// A kv record: create revision, mod revision, version (u64 LE each), then the value.
fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    let mut r = Reader { bytes, op: "read" };
    let create_revision = r.u64()?;
    let mod_revision = r.u64()?;
    let version = r.u64()?;
    Ok(KeyValue {
        key: key.to_string(),
        value: r.bytes.to_vec(),
        create_revision,
        mod_revision,
        version,
    })
}

/// A history entry: per event, kind (u8), key, revisions, value (lengths as u32 LE).
fn encode_events(events: &[WatchEvent]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for ev in events {
        out.push(match ev.kind {
            WatchEventKind::Put => 1,
            WatchEventKind::Delete => 2,
        });
        put_bytes(&mut out, ev.kv.key.as_bytes())?;
        out.extend_from_slice(&ev.kv.create_revision.to_le_bytes());
        out.extend_from_slice(&ev.kv.mod_revision.to_le_bytes());
        out.extend_from_slice(&ev.kv.version.to_le_bytes());
        put_bytes(&mut out, &ev.kv.value)?;
    }
    Ok(out)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| corrupt("write", "field over 4 GiB"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn decode_events(revision: u64, bytes: &[u8]) -> Result<Vec<WatchEvent>> {
    let mut r = Reader {
        bytes,
        op: "history",
    };
    let mut events = Vec::new();
    while !r.bytes.is_empty() {
        let kind = match r.take(1)?[0] {
            1 => WatchEventKind::Put,
            2 => WatchEventKind::Delete,
            _ => return Err(corrupt("history", "unknown event kind")),
        };
        let key = String::from_utf8(r.sized()?.to_vec())
            .map_err(|_| corrupt("history", "key is not utf-8"))?;
        let create_revision = r.u64()?;
        let mod_revision = r.u64()?;
        let version = r.u64()?;
        let value = r.sized()?.to_vec();
        events.push(WatchEvent {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
                version,
            },
            revision,
        });
    }
    Ok(events)
}

struct Reader<'a> {
    bytes: &'a [u8],
    op: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(corrupt(self.op, "truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn sized(&mut self) -> Result<&'a [u8]> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        let n = usize::try_from(u32::from_le_bytes(a))
            .map_err(|_| corrupt(self.op, "length overflows usize"))?;
        self.take(n)
    }
}

// ---- the store -------------------------------------------------------------------------------

/// What a write transaction did.
struct Applied {
    succeeded: bool,
    revision: u64,
    /// The first compare that failed: key, expected, actual.
    failed: Option<(String, u64, u64)>,
    /// Number of events written.
    changes: usize,
}

impl RedbStore {
    /// Opens (or creates) the store in the file at `path`, keeping
    /// [`DEFAULT_HISTORY_LIMIT`] revisions of history.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_history(path, DEFAULT_HISTORY_LIMIT)
    }

    /// Opens (or creates) the store at `path`, keeping the newest `history_limit` revisions
    /// (at least 1) of history for watchers.
    pub fn open_with_history(path: &Path, history_limit: u64) -> Result<Self> {
        let open_err = |e: ::redb::Error| StoreError::Backend {
            op: "open",
            message: format!("{}: {e}", path.display()),
        };
        let db = Database::create(path).map_err(|e| open_err(e.into()))?;
        let w = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            w.open_table(KV).map_err(|e| open_err(e.into()))?;
            w.open_table(META).map_err(|e| open_err(e.into()))?;
            w.open_table(HISTORY).map_err(|e| open_err(e.into()))?;
        }
        w.commit().map_err(|e| open_err(e.into()))?;
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                write_lock: Mutex::new(()),
                events,
                history_limit: history_limit.max(1),
            }),
        })
    }

    /// The file of the store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Inner {
    fn read_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        let err = backend("get");
        let r = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = r.open_table(KV).map_err(|e| err(e.into()))?;
        let got = t.get(key).map_err(|e| err(e.into()))?;
        got.map(|v| decode_record(key, v.value())).transpose()
    }

    fn read_prefix(&self, prefix: &str) -> Result<Snapshot> {
        let err = backend("list");
        let r = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| err(e.into()))?;
        let revision = meta
            .get(META_REVISION)
            .map_err(|e| err(e.into()))?
            .map(|v| v.value())
            .unwrap_or(0);
        let t = r.open_table(KV).map_err(|e| err(e.into()))?;
        let mut kvs = Vec::new();
        for item in t.range::<&str>(prefix..).map_err(|e| err(e.into()))? {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            kvs.push(decode_record(key, v.value())?);
        }
        Ok(Snapshot { kvs, revision })
    }

    fn read_revision(&self) -> Result<u64> {
        let err = backend("revision");
        let r = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| err(e.into()))?;
        Ok(meta
            .get(META_REVISION)
            .map_err(|e| err(e.into()))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// The batches after revision `after`, and the revision the read saw (every batch up to it
    /// is included).
    fn read_history(&self, after: u64) -> Result<(Vec<Batch>, u64)> {
        let err = backend("watch");
        let r = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| err(e.into()))?;
        let get = |k: &str| -> Result<u64> {
            Ok(meta
                .get(k)
                .map_err(|e| err(e.into()))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let revision = get(META_REVISION)?;
        let compacted = get(META_COMPACTED)?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted + 1,
            });
        }
        let h = r.open_table(HISTORY).map_err(|e| err(e.into()))?;
        let mut batches = Vec::new();
        for item in h
            .range(after.saturating_add(1)..)
            .map_err(|e| err(e.into()))?
        {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let rev = k.value();
            batches.push(Batch {
                revision: rev,
                events: decode_events(rev, v.value())?,
            });
        }
        Ok((batches, revision))
    }

    fn write(&self, txn: Txn) -> Result<Applied> {
        for op in txn.success.iter().chain(&txn.failure) {
            match op {
                Op::Put { key, value } => check_write(key, value)?,
                Op::Delete { key } => check_write(key, &[])?,
            }
        }
        for ops in [&txn.success, &txn.failure] {
            let mut seen = HashSet::new();
            for op in ops {
                if !seen.insert(op.key()) {
                    return Err(StoreError::DuplicateKeyInTxn {
                        key: op.key().to_string(),
                    });
                }
            }
        }
        let err = backend("write");
        // The lock guards no data, so a poisoned lock is still usable.
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let w = self.db.begin_write().map_err(|e| err(e.into()))?;
        let (applied, batch) = {
            let mut meta = w.open_table(META).map_err(|e| err(e.into()))?;
            let mut kv = w.open_table(KV).map_err(|e| err(e.into()))?;
            let revision = meta
                .get(META_REVISION)
                .map_err(|e| err(e.into()))?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut failed = None;
            for Compare { key, mod_revision } in &txn.compares {
                let actual = match kv.get(key.as_str()).map_err(|e| err(e.into()))? {
                    Some(v) => decode_record(key, v.value())?.mod_revision,
                    None => 0,
                };
                if actual != *mod_revision {
                    failed = Some((key.clone(), *mod_revision, actual));
                    break;
                }
            }
            let succeeded = failed.is_none();
            let ops = if succeeded { txn.success } else { txn.failure };
            let new_rev = revision + 1;
            let mut events = Vec::new();
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        let old = match kv.get(key.as_str()).map_err(|e| err(e.into()))? {
                            Some(v) => Some(decode_record(&key, v.value())?),
                            None => None,
                        };
                        let rec = KeyValue {
                            create_revision: old.as_ref().map_or(new_rev, |o| o.create_revision),
                            mod_revision: new_rev,
                            version: old.as_ref().map_or(1, |o| o.version + 1),
                            key,
                            value,
                        };
                        kv.insert(rec.key.as_str(), encode_record(&rec).as_slice())
                            .map_err(|e| err(e.into()))?;
                        events.push(WatchEvent {
                            kind: WatchEventKind::Put,
                            kv: rec,
                            revision: new_rev,
                        });
                    }
                    Op::Delete { key } => {
                        let old = match kv.remove(key.as_str()).map_err(|e| err(e.into()))? {
                            Some(v) => Some(decode_record(&key, v.value())?),
                            None => None,
                        };
                        if let Some(old) = old {
                            events.push(WatchEvent {
                                kind: WatchEventKind::Delete,
                                kv: KeyValue {
                                    key,
                                    value: Vec::new(),
                                    create_revision: old.create_revision,
                                    mod_revision: new_rev,
                                    version: 0,
                                },
                                revision: new_rev,
                            });
                        }
                    }
                }
            }
            if events.is_empty() {
                (
                    Applied {
                        succeeded,
                        revision,
                        failed,
                        changes: 0,
                    },
                    None,
                )
            } else {
                meta.insert(META_REVISION, new_rev)
                    .map_err(|e| err(e.into()))?;
                let mut history = w.open_table(HISTORY).map_err(|e| err(e.into()))?;
                history
                    .insert(new_rev, encode_events(&events)?.as_slice())
                    .map_err(|e| err(e.into()))?;
                let mut compacted = None;
                while history.len().map_err(|e| err(e.into()))? > self.history_limit {
                    match history.pop_first().map_err(|e| err(e.into()))? {
                        Some((k, _)) => compacted = Some(k.value()),
                        None => break,
                    }
                }
                if let Some(c) = compacted {
                    meta.insert(META_COMPACTED, c).map_err(|e| err(e.into()))?;
                }
                (
                    Applied {
                        succeeded,
                        revision: new_rev,
                        failed,
                        changes: events.len(),
                    },
                    Some(Batch {
                        revision: new_rev,
                        events,
                    }),
                )
            }
        };
        match batch {
            None => w.abort().map_err(|e| err(e.into()))?,
            Some(batch) => {
                w.commit().map_err(|e| err(e.into()))?;
                // No receiver is not an error: nobody watches right now.
                let _ = self.events.send(Arc::new(batch));
            }
        }
        Ok(applied)
    }
}

impl RedbStore {
    async fn write(&self, op: &'static str, txn: Txn) -> Result<Applied> {
        let inner = self.inner.clone();
        blocking(op, move || inner.write(txn)).await
    }
}

/// Live state of one watch stream.
struct WatchState {
    inner: Arc<Inner>,
    prefix: String,
    /// Every batch up to this revision has been queued (or filtered out).
    last: u64,
    queue: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<Arc<Batch>>,
    done: bool,
}

impl WatchState {
    fn push(&mut self, batch: &Batch) {
        self.queue.extend(
            batch
                .events
                .iter()
                .filter(|e| e.kv.key.starts_with(&self.prefix))
                .cloned(),
        );
        self.last = self.last.max(batch.revision);
    }

    async fn catch_up(&mut self) -> Result<()> {
        let inner = self.inner.clone();
        let after = self.last;
        let (batches, seen) = blocking("watch", move || inner.read_history(after)).await?;
        for b in &batches {
            self.push(b);
        }
        self.last = self.last.max(seen);
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let caught_up = match self.rx.recv().await {
                Ok(batch) if batch.revision <= self.last => Ok(()),
                Ok(batch) if batch.revision == self.last + 1 => {
                    self.push(&batch);
                    Ok(())
                }
                // A gap (should not happen: batches are sent in order) or a lag: the history
                // has every committed batch.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            if let Err(e) = caught_up {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

impl StateStore for RedbStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            let key = key.to_string();
            blocking("get", move || inner.read_kv(&key)).await
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let txn = Txn {
                success: vec![Op::Put {
                    key: key.to_string(),
                    value,
                }],
                ..Txn::default()
            };
            Ok(self.write("put", txn).await?.revision)
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected_mod_revision: u64,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let txn = Txn {
                compares: vec![Compare {
                    key: key.to_string(),
                    mod_revision: expected_mod_revision,
                }],
                success: vec![Op::Put {
                    key: key.to_string(),
                    value,
                }],
                failure: Vec::new(),
            };
            let a = self.write("compare_and_swap", txn).await?;
            match a.failed {
                None => Ok(a.revision),
                Some((key, expected, actual)) => Err(StoreError::Conflict {
                    key,
                    expected,
                    actual,
                }),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_mod_revision: Option<u64>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let txn = Txn {
                compares: expected_mod_revision
                    .map(|mod_revision| Compare {
                        key: key.to_string(),
                        mod_revision,
                    })
                    .into_iter()
                    .collect(),
                success: vec![Op::Delete {
                    key: key.to_string(),
                }],
                failure: Vec::new(),
            };
            let a = self.write("delete", txn).await?;
            match a.failed {
                None => Ok(a.changes > 0),
                Some((key, expected, actual)) => Err(StoreError::Conflict {
                    key,
                    expected,
                    actual,
                }),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<KeyValue>>> {
        Box::pin(async move { Ok(self.snapshot(prefix).await?.kvs) })
    }

    fn snapshot<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Snapshot>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            let prefix = prefix.to_string();
            blocking("list", move || inner.read_prefix(&prefix)).await
        })
    }

    fn watch<'a>(
        &'a self,
        prefix: &'a str,
        from_revision: u64,
    ) -> BoxFuture<'a, Result<WatchStream>> {
        Box::pin(async move {
            // Subscribe before reading the history so that no batch falls between the two.
            let rx = self.inner.events.subscribe();
            let mut state = WatchState {
                inner: self.inner.clone(),
                prefix: prefix.to_string(),
                last: from_revision,
                queue: VecDeque::new(),
                rx,
                done: false,
            };
            state.catch_up().await?;
            let stream = futures::stream::unfold(state, |mut s| async move {
                s.next().await.map(|item| (item, s))
            });
            Ok(Box::pin(stream) as WatchStream)
        })
    }

    fn txn(&self, txn: Txn) -> BoxFuture<'_, Result<TxnResult>> {
        Box::pin(async move {
            let a = self.write("txn", txn).await?;
            Ok(TxnResult {
                succeeded: a.succeeded,
                revision: a.revision,
            })
        })
    }

    fn current_revision(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            blocking("revision", move || inner.read_revision()).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        Fixture { _dir: dir, path }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redb_passes_the_conformance_suite() {
        let f = fixture();
        let store = RedbStore::open(&f.path).expect("open");
        conformance::run(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redb_concurrent_cas_increments_are_exact() {
        let f = fixture();
        let store = RedbStore::open(&f.path).expect("open");
        conformance::concurrent_cas(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn watch_from_compacted_revision_fails() {
        let f = fixture();
        let store = RedbStore::open_with_history(&f.path, 5).expect("open");
        conformance::compaction(Arc::new(store), 5).await;
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_revision() {
        let f = fixture();
        let rev = {
            let store = RedbStore::open(&f.path).expect("open");
            store.put("a", b"1".to_vec()).await.expect("put");
            store.put("b", b"2".to_vec()).await.expect("put");
            assert!(store.delete("b", None).await.expect("delete"), "b existed");
            store.current_revision().await.expect("revision")
        };
        assert_eq!(rev, 3);
        let store = RedbStore::open(&f.path).expect("reopen");
        assert_eq!(store.current_revision().await.expect("revision"), 3);
        let a = store.get("a").await.expect("get").expect("a kept");
        assert_eq!(a.value, b"1");
        assert_eq!(a.mod_revision, 1);
        assert!(store.get("b").await.expect("get").is_none());
        assert_eq!(store.put("c", b"3".to_vec()).await.expect("put"), 4);
        // The history survives too: a watch from 0 replays all four changes.
        let mut w = store.watch("", 0).await.expect("watch");
        let mut revs = Vec::new();
        for _ in 0..4 {
            revs.push(conformance::next_event(&mut w).await.revision);
        }
        assert_eq!(revs, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn lagged_watcher_catches_up_from_history() {
        let f = fixture();
        let store = RedbStore::open(&f.path).expect("open");
        let mut w = store.watch("k/", 0).await.expect("watch");
        // More batches than the broadcast holds, while the watcher reads nothing.
        let n = BROADCAST_CAPACITY as u64 + 50;
        let txn = |i: u64| Txn {
            success: vec![Op::Put {
                key: format!("k/{}", i % 7),
                value: i.to_le_bytes().to_vec(),
            }],
            ..Txn::default()
        };
        for i in 0..n {
            store.write("put", txn(i)).await.expect("put");
        }
        for want in 1..=n {
            let ev = conformance::next_event(&mut w).await;
            assert_eq!(ev.revision, want, "no event may be missed after a lag");
        }
    }

    #[test]
    fn history_encoding_round_trips_and_refuses_truncation() {
        let events = vec![
            WatchEvent {
                kind: WatchEventKind::Put,
                kv: KeyValue {
                    key: "a/é".into(),
                    value: vec![0, 1, 2],
                    create_revision: 3,
                    mod_revision: 7,
                    version: 2,
                },
                revision: 7,
            },
            WatchEvent {
                kind: WatchEventKind::Delete,
                kv: KeyValue {
                    key: "b".into(),
                    value: Vec::new(),
                    create_revision: 1,
                    mod_revision: 7,
                    version: 0,
                },
                revision: 7,
            },
        ];
        let bytes = encode_events(&events).expect("encode");
        assert_eq!(decode_events(7, &bytes).expect("decode"), events);
        assert!(decode_events(7, &bytes[..bytes.len() - 1]).is_err());
        assert!(decode_record("k", &[1, 2, 3]).is_err());
    }
}
