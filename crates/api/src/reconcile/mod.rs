//! The apply loop: the only code that changes nodes for managed resources.
//!
//! Handlers write a desired record (`desired/<kind>/<name>`, JSON [`Desired`] with a new
//! generation from the name's counter at `generations/<kind>/<name>`, which outlives deletes) and
//! wait for its outcome with [`wait_observed`]. A [`Reconciler`] runs one task
//! per [`Controller`]: it lists and watches the controller's `desired/<kind>/` prefix, calls
//! [`Controller::apply`] for every change (one apply at a time per name, several names at once,
//! bounded), re-applies every record each [`Controller::resync_interval`], and records the
//! outcome at `observed/<kind>/<name>` (JSON [`Observed`]). A deleted record gets
//! `apply(name, None)` and its observed record removed. Applies run in the reconciler's tasks,
//! never in a request's, so a client hanging up never interrupts one.

pub mod containers;
pub mod nodes;

use crate::store::{
    Compare, Op, StateStore, StoreError, Txn, Versioned, WatchEventKind, decode_json, get_json,
    put_json,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// Applies running at once per controller, by default.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Compare-and-swap attempts of [`write_desired`] before it gives up.
const MAX_CAS_ATTEMPTS: usize = 64;

/// Wait before listing again after the store failed.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest an apply may take unless its controller says otherwise
/// ([`Controller::apply_timeout`]).
pub const DEFAULT_APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Status recorded when an apply failed.
pub const STATUS_ERROR: &str = "error";

/// Status recorded when the apply of a deletion failed (the observed record is kept).
pub const STATUS_DELETING: &str = "deleting";

/// Errors of the reconcile helpers.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// Too many concurrent writers kept changing a desired record.
    #[error("desired record {key} kept changing, gave up after {attempts} attempts")]
    Contention {
        /// The key.
        key: String,
        /// Attempts made.
        attempts: usize,
    },
}

/// Why an apply failed; the message is recorded in the observed record.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The spec of the desired record does not decode.
    #[error("invalid spec of {kind}/{name}: {source}")]
    InvalidSpec {
        /// The controller's kind.
        kind: &'static str,
        /// The resource.
        name: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The node the resource lives on cannot be reached.
    #[error("node {node} is unreachable: {message}")]
    Unreachable {
        /// The node id.
        node: String,
        /// What failed.
        message: String,
    },
    /// The apply did not finish in time and was abandoned (it runs again on the next change or
    /// resync: applies are idempotent).
    #[error("apply of {kind}/{name} did not finish within {} s", after.as_secs_f64())]
    TimedOut {
        /// The controller's kind.
        kind: &'static str,
        /// The resource.
        name: String,
        /// The controller's apply timeout.
        after: Duration,
    },
    /// The apply failed for a reason of the controller's.
    #[error("{0}")]
    Failed(String),
}

/// Why [`wait_observed`] returned without success.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The generation was not observed in time (the apply goes on in the reconciler).
    #[error("{kind}/{name} generation {generation} was not applied in time")]
    Timeout {
        /// The kind.
        kind: String,
        /// The resource.
        name: String,
        /// The generation waited for.
        generation: u64,
    },
    /// The apply failed: the recorded error.
    #[error("{0}")]
    Failed(String),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

/// A desired record, at `desired/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// Bumped on every change of `spec`; never reused for a name, even across a delete.
    pub generation: u64,
    /// The resource's spec, as the controller reads it.
    pub spec: Value,
}

impl Desired {
    /// The spec decoded as `T`; [`ApplyError::InvalidSpec`] naming `kind/name` when it does not fit.
    pub fn decode<T: serde::de::DeserializeOwned>(
        &self,
        kind: &'static str,
        name: &str,
    ) -> Result<T, ApplyError> {
        serde_json::from_value(self.spec.clone()).map_err(|source| ApplyError::InvalidSpec {
            kind,
            name: name.to_string(),
            source,
        })
    }
}

/// The outcome of the last apply, at `observed/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The generation the outcome belongs to (set by the reconciler).
    pub observed_generation: u64,
    /// Controller-defined status, e.g. `running`; [`STATUS_ERROR`] when the apply failed.
    pub status: String,
    /// The error of the last apply, if it failed.
    pub error: Option<String>,
    /// Controller-defined data about the resource.
    pub data: Value,
    /// When the outcome last changed, ms since the epoch (set by the reconciler).
    pub updated_at_ms: i64,
}

impl Observed {
    /// A successful outcome with `status` and `data` (generation and time are filled in by the
    /// reconciler).
    pub fn new(status: impl Into<String>, data: Value) -> Self {
        Self {
            observed_generation: 0,
            status: status.into(),
            error: None,
            data,
            updated_at_ms: 0,
        }
    }

    /// An outcome recording `error` with a status (e.g. a node that is `halted`).
    pub fn with_error(status: impl Into<String>, error: impl Into<String>, data: Value) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::new(status, data)
        }
    }

    /// Whether two outcomes say the same, ignoring when they were recorded.
    fn same_as(&self, other: &Observed) -> bool {
        self.observed_generation == other.observed_generation
            && self.status == other.status
            && self.error == other.error
            && self.data == other.data
    }
}

/// Applies one kind of resource to the nodes. Object safe: used as `Arc<dyn Controller>`.
pub trait Controller: Send + Sync + 'static {
    /// The kind, e.g. `nodes`: records live under `desired/<kind>/`.
    fn kind(&self) -> &'static str;

    /// Makes the world match `desired` (`None`: the record was deleted, remove the resource).
    /// Called again for every change and every resync interval, so it must be idempotent.
    /// `last` is the outcome recorded before (a hint: the world may have changed since).
    fn apply<'a>(
        &'a self,
        name: &'a str,
        desired: Option<&'a Desired>,
        last: Option<&'a Observed>,
    ) -> BoxFuture<'a, Result<Observed, ApplyError>>;

    /// How often every record is applied again when nothing changed.
    fn resync_interval(&self) -> Duration;

    /// How long one apply may take before it is abandoned and [`ApplyError::TimedOut`] recorded,
    /// so a stuck node never freezes a name's worker.
    fn apply_timeout(&self) -> Duration {
        DEFAULT_APPLY_TIMEOUT
    }
}

/// `desired/<kind>/`.
pub fn desired_prefix(kind: &str) -> String {
    format!("desired/{kind}/")
}

/// `desired/<kind>/<name>`.
pub fn desired_key(kind: &str, name: &str) -> String {
    format!("desired/{kind}/{name}")
}

/// `generations/<kind>/<name>`: the last generation given to a name (JSON number). It outlives
/// the desired record, so a generation is never reused for a name, even across a delete.
pub fn generation_key(kind: &str, name: &str) -> String {
    format!("generations/{kind}/{name}")
}

/// `observed/<kind>/`.
pub fn observed_prefix(kind: &str) -> String {
    format!("observed/{kind}/")
}

/// `observed/<kind>/<name>`.
pub fn observed_key(kind: &str, name: &str) -> String {
    format!("observed/{kind}/{name}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The desired record of a resource, with its revisions.
pub async fn get_desired(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
) -> Result<Option<Versioned<Desired>>, ReconcileError> {
    Ok(get_json(store, &desired_key(kind, name)).await?)
}

/// The observed record of a resource.
pub async fn get_observed(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
) -> Result<Option<Observed>, ReconcileError> {
    Ok(get_json::<Observed>(store, &observed_key(kind, name))
        .await?
        .map(|v| v.value))
}

/// Replaces the desired record `current` (as read; `None` = absent) with `spec` at the next
/// generation, with a compare-and-swap: [`StoreError::Conflict`] when it changed meanwhile.
/// Returns the new generation.
///
/// The generation comes from the name's counter at [`generation_key`], bumped in the same
/// transaction and kept when the record is deleted, so a generation is never reused for a name
/// and a waiter never mistakes an old outcome for the new one. (It also continues after any
/// observed record left from before the counter existed.)
pub async fn cas_desired(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
    current: Option<&Versioned<Desired>>,
    spec: Value,
) -> Result<u64, ReconcileError> {
    let key = desired_key(kind, name);
    let gen_key = generation_key(kind, name);
    let counter = get_json::<u64>(store, &gen_key).await?;
    let expected = current.map_or(0, |c| c.mod_revision);
    let mut last = counter.as_ref().map_or(0, |c| c.value);
    match current {
        Some(cur) => last = last.max(cur.value.generation),
        None => {
            if let Some(o) = get_observed(store, kind, name).await? {
                last = last.max(o.observed_generation);
            }
        }
    }
    let generation = last + 1;
    let counter_rev = counter.as_ref().map_or(0, |c| c.mod_revision);
    let json = |k: &str, v: Result<Vec<u8>, serde_json::Error>| {
        v.map_err(|source| StoreError::Json {
            key: k.to_string(),
            source,
        })
    };
    let txn = Txn {
        compares: vec![
            Compare {
                key: key.clone(),
                mod_revision: expected,
            },
            Compare {
                key: gen_key.clone(),
                mod_revision: counter_rev,
            },
        ],
        success: vec![
            Op::Put {
                value: json(&key, serde_json::to_vec(&Desired { generation, spec }))?,
                key: key.clone(),
            },
            Op::Put {
                value: json(&gen_key, serde_json::to_vec(&generation))?,
                key: gen_key.clone(),
            },
        ],
        failure: Vec::new(),
    };
    if store.txn(txn).await?.succeeded {
        return Ok(generation);
    }
    // Name the key that changed meanwhile.
    let actual = store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
    let conflict = if actual != expected {
        StoreError::Conflict {
            key,
            expected,
            actual,
        }
    } else {
        StoreError::Conflict {
            actual: store.get(&gen_key).await?.map_or(0, |kv| kv.mod_revision),
            key: gen_key,
            expected: counter_rev,
        }
    };
    Err(conflict.into())
}

/// Writes `spec` as the desired state of `<kind>/<name>` with a new generation and returns it.
pub async fn write_desired(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<u64, ReconcileError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let current = get_desired(store, kind, name).await?;
        match cas_desired(store, kind, name, current.as_ref(), spec.clone()).await {
            Err(ReconcileError::Store(StoreError::Conflict { .. })) => continue,
            other => return other,
        }
    }
    Err(ReconcileError::Contention {
        key: desired_key(kind, name),
        attempts: MAX_CAS_ATTEMPTS,
    })
}

/// Deletes the desired record of `<kind>/<name>`; returns whether it existed. The reconciler then
/// applies the deletion and removes the observed record.
pub async fn delete_desired(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
) -> Result<bool, ReconcileError> {
    Ok(store.delete(&desired_key(kind, name), None).await?)
}

/// What an observed record means for a waiter on `generation`.
fn settled(o: Observed, generation: u64) -> Option<Result<Observed, WaitError>> {
    if o.observed_generation < generation {
        return None;
    }
    Some(match &o.error {
        Some(e) => Err(WaitError::Failed(e.clone())),
        None => Ok(o),
    })
}

/// Waits until `<kind>/<name>` is observed at `generation` or later (its outcome) or an error is
/// recorded for it ([`WaitError::Failed`]), at most `timeout` ([`WaitError::Timeout`]).
pub async fn wait_observed(
    store: &dyn StateStore,
    kind: &str,
    name: &str,
    generation: u64,
    timeout: Duration,
) -> Result<Observed, WaitError> {
    let key = observed_key(kind, name);
    let wait = async {
        loop {
            let snap = store.snapshot(&key).await?;
            if let Some(kv) = snap.kvs.iter().find(|kv| kv.key == key)
                && let Some(done) = settled(decode_json::<Observed>(kv)?.value, generation)
            {
                return done;
            }
            let mut events = match store.watch(&key, snap.revision).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) if ev.kv.key == key && ev.kind == WatchEventKind::Put => {
                        if let Some(done) =
                            settled(decode_json::<Observed>(&ev.kv)?.value, generation)
                        {
                            return done;
                        }
                    }
                    Ok(_) => {}
                    Err(StoreError::Compacted { .. }) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            // The watch ended: read again and watch from there.
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(r) => r,
        Err(_) => Err(WaitError::Timeout {
            kind: kind.to_string(),
            name: name.to_string(),
            generation,
        }),
    }
}

/// Runs the controllers' apply loops (see the module docs).
pub struct Reconciler {
    store: Arc<dyn StateStore>,
    controllers: Vec<Arc<dyn Controller>>,
    concurrency: usize,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<_> = self.controllers.iter().map(|c| c.kind()).collect();
        f.debug_struct("Reconciler").field("kinds", &kinds).finish()
    }
}

/// The running reconciler. Dropping it stops the loops too (in-flight applies still finish);
/// [`ReconcilerHandle::shutdown`] also waits for them.
#[derive(Debug)]
pub struct ReconcilerHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ReconcilerHandle {
    /// Stops taking changes, lets in-flight applies finish and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "reconciler task failed");
            }
        }
    }
}

impl Drop for ReconcilerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Reconciler {
    /// A reconciler of `controllers` over `store`.
    pub fn new(store: Arc<dyn StateStore>, controllers: Vec<Arc<dyn Controller>>) -> Self {
        Self {
            store,
            controllers,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// Sets how many applies of one controller may run at once (at least 1).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Starts one task per controller.
    pub fn spawn(self) -> ReconcilerHandle {
        let (stop, _) = watch::channel(false);
        let tasks = self
            .controllers
            .into_iter()
            .map(|controller| {
                let ctx = Arc::new(Ctx {
                    store: self.store.clone(),
                    controller,
                    permits: Semaphore::new(self.concurrency),
                    stop: stop.subscribe(),
                });
                tokio::spawn(run_controller(ctx))
            })
            .collect();
        ReconcilerHandle { stop, tasks }
    }
}

/// What a controller's loop and its workers share.
struct Ctx {
    store: Arc<dyn StateStore>,
    controller: Arc<dyn Controller>,
    permits: Semaphore,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// A name's worker: the latest desired state goes in `tx`; the worker applies it when free.
struct Slot {
    tx: watch::Sender<Option<Desired>>,
    handle: JoinHandle<()>,
}

/// The controller loop's view of its names and their workers.
struct Dispatcher {
    ctx: Arc<Ctx>,
    /// The desired records as last read.
    known: HashMap<String, Desired>,
    workers: HashMap<String, Slot>,
    /// Workers finishing a deletion: a new worker for the name waits for the old one.
    retiring: HashMap<String, JoinHandle<()>>,
}

impl Dispatcher {
    fn dispatch(&mut self, name: &str, desired: Option<Desired>) {
        match desired {
            Some(d) => {
                if let Some(slot) = self.workers.get(name)
                    && !slot.handle.is_finished()
                {
                    slot.tx.send_replace(Some(d));
                    return;
                }
                let prev = self
                    .workers
                    .remove(name)
                    .map(|s| s.handle)
                    .or_else(|| self.retiring.remove(name));
                let (tx, rx) = watch::channel(Some(d));
                let handle = tokio::spawn(worker(self.ctx.clone(), name.to_string(), rx, prev));
                self.workers.insert(name.to_string(), Slot { tx, handle });
            }
            None => {
                let prev = match self.workers.remove(name) {
                    Some(slot) if !slot.handle.is_finished() => {
                        // The worker applies the deletion after what it is doing, then ends
                        // because its sender is gone.
                        slot.tx.send_replace(None);
                        self.retiring.insert(name.to_string(), slot.handle);
                        return;
                    }
                    Some(slot) => Some(slot.handle),
                    None => self.retiring.remove(name),
                };
                let (tx, rx) = watch::channel(None);
                let handle = tokio::spawn(worker(self.ctx.clone(), name.to_string(), rx, prev));
                drop(tx);
                self.retiring.insert(name.to_string(), handle);
            }
        }
    }

    /// Takes a fresh listing: dispatches every record, and deletions for names that are gone
    /// (including observed records left without a desired one).
    async fn resync(&mut self) -> Result<u64, StoreError> {
        let kind = self.ctx.controller.kind();
        let prefix = desired_prefix(kind);
        let snap = self.ctx.store.snapshot(&prefix).await?;
        let mut fresh = HashMap::new();
        for kv in &snap.kvs {
            let Some(name) = kv.key.strip_prefix(&prefix) else {
                continue;
            };
            match decode_json::<Desired>(kv) {
                Ok(d) => {
                    fresh.insert(name.to_string(), d.value);
                }
                Err(e) => tracing::warn!(kind, name, error = %e, "skipping bad desired record"),
            }
        }
        let observed = self.ctx.store.list(&observed_prefix(kind)).await?;
        let mut gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !fresh.contains_key(*n))
            .cloned()
            .collect();
        let oprefix = observed_prefix(kind);
        for kv in &observed {
            if let Some(name) = kv.key.strip_prefix(&oprefix)
                && !fresh.contains_key(name)
                && !gone.iter().any(|g| g == name)
            {
                gone.push(name.to_string());
            }
        }
        self.known = fresh;
        for name in gone {
            self.dispatch(&name, None);
        }
        let all: Vec<(String, Desired)> = self
            .known
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, d) in all {
            self.dispatch(&name, Some(d));
        }
        Ok(snap.revision)
    }

    /// Re-applies every known record and forgets finished deletions.
    fn tick(&mut self) {
        let all: Vec<(String, Desired)> = self
            .known
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, d) in all {
            self.dispatch(&name, Some(d));
        }
        self.retiring.retain(|_, h| !h.is_finished());
    }

    fn on_event(&mut self, key: &str, desired: Option<Desired>) {
        let prefix = desired_prefix(self.ctx.controller.kind());
        let Some(name) = key.strip_prefix(&prefix) else {
            return;
        };
        match &desired {
            Some(d) => self.known.insert(name.to_string(), d.clone()),
            None => self.known.remove(name),
        };
        self.dispatch(name, desired);
    }

    /// Stops every worker after its current apply and waits for them.
    async fn finish(self) {
        let handles = self
            .workers
            .into_values()
            .map(|s| s.handle)
            .chain(self.retiring.into_values());
        for h in handles {
            if let Err(e) = h.await {
                tracing::warn!(error = %e, "reconcile worker failed");
            }
        }
    }
}

async fn run_controller(ctx: Arc<Ctx>) {
    let kind = ctx.controller.kind();
    let mut stop = ctx.stop.clone();
    let mut d = Dispatcher {
        ctx: ctx.clone(),
        known: HashMap::new(),
        workers: HashMap::new(),
        retiring: HashMap::new(),
    };
    let mut ticker = tokio::time::interval(ctx.controller.resync_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    'outer: while !ctx.stopping() {
        let started = match d.resync().await {
            Ok(rev) => ctx.store.watch(&desired_prefix(kind), rev).await,
            Err(e) => Err(e),
        };
        let mut events = match started {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(kind, error = %e, "reconciler cannot read the store, retrying");
                tokio::select! {
                    _ = stop.changed() => break 'outer,
                    _ = tokio::time::sleep(RETRY_DELAY) => continue 'outer,
                }
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break 'outer,
                _ = ticker.tick() => d.tick(),
                ev = events.next() => match ev {
                    Some(Ok(ev)) => match ev.kind {
                        WatchEventKind::Put => match decode_json::<Desired>(&ev.kv) {
                            Ok(v) => d.on_event(&ev.kv.key, Some(v.value)),
                            Err(e) => tracing::warn!(kind, error = %e, "skipping bad desired record"),
                        },
                        WatchEventKind::Delete => d.on_event(&ev.kv.key, None),
                    },
                    Some(Err(e)) => {
                        tracing::info!(kind, error = %e, "desired watch ended, listing again");
                        continue 'outer;
                    }
                    None => continue 'outer,
                },
            }
        }
    }
    d.finish().await;
}

async fn worker(
    ctx: Arc<Ctx>,
    name: String,
    mut rx: watch::Receiver<Option<Desired>>,
    prev: Option<JoinHandle<()>>,
) {
    if let Some(prev) = prev
        && let Err(e) = prev.await
    {
        tracing::warn!(name, error = %e, "previous reconcile worker failed");
    }
    let mut last: Option<Observed> = None;
    loop {
        if ctx.stopping() {
            break;
        }
        let desired = rx.borrow_and_update().clone();
        {
            // The semaphore is never closed; failing to get a permit means shutting down.
            let Ok(_permit) = ctx.permits.acquire().await else {
                break;
            };
            if ctx.stopping() {
                break;
            }
            apply_once(&ctx, &name, desired.as_ref(), &mut last).await;
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// One apply and the record of its outcome.
async fn apply_once(ctx: &Ctx, name: &str, desired: Option<&Desired>, last: &mut Option<Observed>) {
    let kind = ctx.controller.kind();
    let store = &*ctx.store;
    let key = observed_key(kind, name);
    let after = ctx.controller.apply_timeout();
    if last.is_none() {
        // First apply of this worker: start from what an earlier worker or process recorded.
        match get_json::<Observed>(store, &key).await {
            Ok(v) => *last = v.map(|v| v.value),
            Err(e) => tracing::warn!(kind, name, error = %e, "cannot read observed record"),
        }
    }
    let outcome = tokio::time::timeout(after, ctx.controller.apply(name, desired, last.as_ref()))
        .await
        .unwrap_or_else(|_| {
            Err(ApplyError::TimedOut {
                kind,
                name: name.to_string(),
                after,
            })
        });
    let observed = match (desired, outcome) {
        (None, Ok(_)) => {
            if let Err(e) = store.delete(&key, None).await {
                tracing::warn!(kind, name, error = %e, "cannot remove observed record");
            }
            *last = None;
            return;
        }
        (None, Err(e)) => {
            tracing::warn!(kind, name, error = %e, "deletion failed");
            Observed {
                observed_generation: last.as_ref().map_or(0, |o| o.observed_generation),
                status: STATUS_DELETING.to_string(),
                error: Some(e.to_string()),
                data: last.as_ref().map_or(Value::Null, |o| o.data.clone()),
                updated_at_ms: 0,
            }
        }
        (Some(d), Ok(o)) => Observed {
            observed_generation: d.generation,
            ..o
        },
        (Some(d), Err(e)) => {
            tracing::debug!(kind, name, generation = d.generation, error = %e, "apply failed");
            Observed {
                observed_generation: d.generation,
                status: STATUS_ERROR.to_string(),
                error: Some(e.to_string()),
                data: last.as_ref().map_or(Value::Null, |o| o.data.clone()),
                updated_at_ms: 0,
            }
        }
    };
    if last.as_ref().is_some_and(|l| l.same_as(&observed)) {
        return;
    }
    let observed = Observed {
        updated_at_ms: now_ms(),
        ..observed
    };
    match put_json(store, &key, &observed).await {
        Ok(_) => *last = Some(observed),
        Err(e) => tracing::warn!(kind, name, error = %e, "cannot record observed state"),
    }
}

#[cfg(test)]
mod tests;
