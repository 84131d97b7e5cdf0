//! Tests of the apply loop with a fake controller over a real redb store.

use super::*;
use crate::store::redb::RedbStore;
use serde_json::json;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Longest wait for something that must happen.
const WAIT: Duration = Duration::from_secs(10);

const KIND: &str = "fake";

/// A controller that reports every call, fails on `{"fail": true}` and blocks on
/// `{"block": true}` until the test adds a permit to `gate`.
struct Fake {
    calls: mpsc::UnboundedSender<(String, Option<u64>)>,
    gate: Arc<Semaphore>,
    resync: Duration,
    apply_timeout: Duration,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight_per_name: Mutex<usize>,
}

impl Fake {
    fn enter(&self, name: &str) {
        let mut m = self
            .in_flight
            .lock()
            .expect("in-flight lock is never poisoned");
        let n = m.entry(name.to_string()).or_insert(0);
        *n += 1;
        let mut max = self
            .max_in_flight_per_name
            .lock()
            .expect("max lock is never poisoned");
        *max = (*max).max(*n);
    }

    fn leave(&self, name: &str) {
        let mut m = self
            .in_flight
            .lock()
            .expect("in-flight lock is never poisoned");
        if let Some(n) = m.get_mut(name) {
            *n -= 1;
        }
    }
}

impl Controller for Fake {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn apply<'a>(
        &'a self,
        name: &'a str,
        desired: Option<&'a Desired>,
        _last: Option<&'a Observed>,
    ) -> BoxFuture<'a, Result<Observed, ApplyError>> {
        Box::pin(async move {
            self.enter(name);
            let _ = self
                .calls
                .send((name.to_string(), desired.map(|d| d.generation)));
            let spec = desired.map(|d| d.spec.clone()).unwrap_or(Value::Null);
            if spec.get("block").is_some() {
                let permit = self.gate.acquire().await.expect("gate is never closed");
                permit.forget();
            }
            self.leave(name);
            if spec.get("fail").is_some() {
                return Err(ApplyError::Failed("boom".into()));
            }
            Ok(Observed::new("ok", json!({ "spec": spec })))
        })
    }

    fn resync_interval(&self) -> Duration {
        self.resync
    }

    fn apply_timeout(&self) -> Duration {
        self.apply_timeout
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<dyn StateStore>,
    fake: Arc<Fake>,
    calls: mpsc::UnboundedReceiver<(String, Option<u64>)>,
}

fn setup(resync: Duration) -> Setup {
    setup_with(resync, DEFAULT_APPLY_TIMEOUT)
}

fn setup_with(resync: Duration, apply_timeout: Duration) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(&dir.path().join("s.redb")).expect("open store");
    let (tx, calls) = mpsc::unbounded_channel();
    let fake = Arc::new(Fake {
        calls: tx,
        gate: Arc::new(Semaphore::new(0)),
        resync,
        apply_timeout,
        in_flight: Mutex::new(HashMap::new()),
        max_in_flight_per_name: Mutex::new(0),
    });
    Setup {
        _dir: dir,
        store: Arc::new(store),
        fake,
        calls,
    }
}

impl Setup {
    fn spawn(&self) -> ReconcilerHandle {
        Reconciler::new(self.store.clone(), vec![self.fake.clone()]).spawn()
    }

    /// Reads calls until one equals `want`.
    async fn expect_call(&mut self, want: (&str, Option<u64>)) {
        let wait = async {
            while let Some((name, generation)) = self.calls.recv().await {
                if name == want.0 && generation == want.1 {
                    return;
                }
            }
            panic!("controller dropped");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("no call {want:?} within {WAIT:?}"));
    }

    /// Waits until the observed record of `name` is gone.
    async fn expect_observed_removed(&self, name: &str) {
        let key = observed_key(KIND, name);
        let wait = async {
            let snap = self.store.snapshot(&key).await.expect("snapshot");
            if !snap.kvs.iter().any(|kv| kv.key == key) {
                return;
            }
            let mut w = self.store.watch(&key, snap.revision).await.expect("watch");
            while let Some(ev) = w.next().await {
                let ev = ev.expect("watch event");
                if ev.kv.key == key && ev.kind == WatchEventKind::Delete {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("observed record of {name} not removed"));
    }
}

#[tokio::test]
async fn applies_on_put_on_resync_and_on_delete() {
    let mut s = setup(Duration::from_millis(100));
    let handle = s.spawn();
    let store_arc = s.store.clone();
    let store = &*store_arc;

    let g1 = write_desired(store, KIND, "a", json!({"v": 1}))
        .await
        .expect("write");
    assert_eq!(g1, 1);
    let o = wait_observed(store, KIND, "a", g1, WAIT)
        .await
        .expect("observed");
    assert_eq!((o.observed_generation, o.status.as_str()), (1, "ok"));
    assert_eq!(o.data, json!({"spec": {"v": 1}}));
    assert!(o.updated_at_ms > 0);

    // Nothing changes, yet the record is applied again and again (resync).
    s.expect_call(("a", Some(1))).await;
    s.expect_call(("a", Some(1))).await;
    s.expect_call(("a", Some(1))).await;

    let g2 = write_desired(store, KIND, "a", json!({"v": 2}))
        .await
        .expect("write");
    assert_eq!(g2, 2);
    let o = wait_observed(store, KIND, "a", g2, WAIT)
        .await
        .expect("observed");
    assert_eq!(o.data, json!({"spec": {"v": 2}}));

    assert!(delete_desired(store, KIND, "a").await.expect("delete"));
    s.expect_call(("a", None)).await;
    s.expect_observed_removed("a").await;
    assert!(get_observed(store, KIND, "a").await.expect("get").is_none());

    handle.shutdown().await;
}

#[tokio::test]
async fn wait_observed_reports_the_apply_error() {
    let s = setup(Duration::from_secs(60));
    let handle = s.spawn();
    let store = &*s.store;
    let g = write_desired(store, KIND, "bad", json!({"fail": true}))
        .await
        .expect("write");
    match wait_observed(store, KIND, "bad", g, WAIT).await {
        Err(WaitError::Failed(msg)) => assert_eq!(msg, "boom"),
        other => panic!("expected the apply error, got {other:?}"),
    }
    let o = get_observed(store, KIND, "bad")
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(
        (o.status.as_str(), o.observed_generation),
        (STATUS_ERROR, g)
    );

    // A fixed spec clears the error.
    let g2 = write_desired(store, KIND, "bad", json!({}))
        .await
        .expect("write");
    let o = wait_observed(store, KIND, "bad", g2, WAIT)
        .await
        .expect("fixed");
    assert_eq!(o.error, None);
    handle.shutdown().await;
}

#[tokio::test]
async fn wait_observed_times_out() {
    let s = setup(Duration::from_secs(60));
    let store = &*s.store;
    let started = tokio::time::Instant::now();
    match wait_observed(store, KIND, "nobody", 3, Duration::from_millis(150)).await {
        Err(WaitError::Timeout {
            name, generation, ..
        }) => assert_eq!((name.as_str(), generation), ("nobody", 3)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn names_apply_concurrently_and_each_name_serially() {
    let mut s = setup(Duration::from_secs(60));
    let handle = s.spawn();
    let store = s.store.clone();

    let slow1 = write_desired(&*store, KIND, "slow", json!({"block": true}))
        .await
        .expect("write");
    s.expect_call(("slow", Some(slow1))).await;
    // "slow" is stuck in its apply; "fast" goes through meanwhile.
    let g = write_desired(&*store, KIND, "fast", json!({}))
        .await
        .expect("write");
    wait_observed(&*store, KIND, "fast", g, WAIT)
        .await
        .expect("fast applied while slow blocks");

    // Two more changes of "slow" while it is busy: they wait, and coalesce.
    write_desired(&*store, KIND, "slow", json!({"block": true, "n": 2}))
        .await
        .expect("write");
    let slow3 = write_desired(&*store, KIND, "slow", json!({"block": true, "n": 3}))
        .await
        .expect("write");
    s.fake.gate.add_permits(3);
    let o = wait_observed(&*store, KIND, "slow", slow3, WAIT)
        .await
        .expect("latest generation applied");
    assert_eq!(o.data, json!({"spec": {"block": true, "n": 3}}));
    assert_eq!(
        *s.fake
            .max_in_flight_per_name
            .lock()
            .expect("max lock is never poisoned"),
        1,
        "two applies of one name overlapped"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn observed_records_without_desired_are_cleaned_at_start() {
    let mut s = setup(Duration::from_secs(60));
    let ghost = Observed {
        observed_generation: 4,
        ..Observed::new("ok", Value::Null)
    };
    put_json(&*s.store, &observed_key(KIND, "ghost"), &ghost)
        .await
        .expect("put");
    let handle = s.spawn();
    s.expect_call(("ghost", None)).await;
    s.expect_observed_removed("ghost").await;
    handle.shutdown().await;
}

#[tokio::test]
async fn generations_continue_after_a_leftover_observed_record() {
    let s = setup(Duration::from_secs(60));
    let store = &*s.store;
    let left = Observed {
        observed_generation: 7,
        ..Observed::new("ok", Value::Null)
    };
    put_json(store, &observed_key(KIND, "x"), &left)
        .await
        .expect("put");
    // No reconciler runs: a waiter on the new generation must not take the old outcome.
    let g = write_desired(store, KIND, "x", json!({}))
        .await
        .expect("write");
    assert_eq!(g, 8);
    assert!(matches!(
        wait_observed(store, KIND, "x", g, Duration::from_millis(100)).await,
        Err(WaitError::Timeout { .. })
    ));
}

#[tokio::test]
async fn concurrent_writers_get_distinct_generations() {
    let s = setup(Duration::from_secs(60));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = s.store.clone();
        tasks.push(tokio::spawn(async move {
            write_desired(&*store, KIND, "c", json!({ "i": i }))
                .await
                .expect("write")
        }));
    }
    let mut gens = Vec::new();
    for t in tasks {
        gens.push(t.await.expect("task"));
    }
    gens.sort_unstable();
    assert_eq!(gens, (1..=8).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_stuck_apply_times_out_as_an_apply_error() {
    let mut s = setup_with(Duration::from_secs(60), Duration::from_millis(200));
    let handle = s.spawn();
    let store = s.store.clone();
    let g = write_desired(&*store, KIND, "stuck", json!({"block": true}))
        .await
        .expect("write");
    match wait_observed(&*store, KIND, "stuck", g, WAIT).await {
        Err(WaitError::Failed(msg)) => {
            assert_eq!(msg, "apply of fake/stuck did not finish within 0.2 s");
        }
        other => panic!("expected the timeout as apply error, got {other:?}"),
    }
    let o = get_observed(&*store, KIND, "stuck")
        .await
        .expect("get")
        .expect("recorded");
    assert_eq!(
        (o.status.as_str(), o.observed_generation),
        (STATUS_ERROR, g)
    );
    // The name's worker is free again: the next change is applied.
    let g2 = write_desired(&*store, KIND, "stuck", json!({}))
        .await
        .expect("write");
    s.expect_call(("stuck", Some(g2))).await;
    let o = wait_observed(&*store, KIND, "stuck", g2, WAIT)
        .await
        .expect("applied after the timeout");
    assert_eq!(o.error, None);
    handle.shutdown().await;
}

#[tokio::test]
async fn generations_are_never_reused_across_a_delete() {
    let s = setup(Duration::from_secs(60));
    let store = &*s.store;
    // Without a reconciler no observed record is ever written: only the counter remembers.
    assert_eq!(
        write_desired(store, KIND, "d", json!({}))
            .await
            .expect("write"),
        1
    );
    assert_eq!(
        write_desired(store, KIND, "d", json!({"v": 2}))
            .await
            .expect("write"),
        2
    );
    assert!(delete_desired(store, KIND, "d").await.expect("delete"));
    assert_eq!(
        write_desired(store, KIND, "d", json!({}))
            .await
            .expect("write"),
        3
    );
    assert_eq!(
        get_json::<u64>(store, &generation_key(KIND, "d"))
            .await
            .expect("get")
            .map(|v| v.value),
        Some(3)
    );
    // Another name has its own counter.
    assert_eq!(
        write_desired(store, KIND, "e", json!({}))
            .await
            .expect("write"),
        1
    );

    // With the reconciler: the observed record is removed on delete, the next generation still
    // goes on, and its outcome is waited for (not taken from the old one).
    let handle = s.spawn();
    let store = s.store.clone();
    wait_observed(&*store, KIND, "d", 3, WAIT)
        .await
        .expect("observed");
    assert!(delete_desired(&*store, KIND, "d").await.expect("delete"));
    s.expect_observed_removed("d").await;
    let g = write_desired(&*store, KIND, "d", json!({"v": 4}))
        .await
        .expect("write");
    assert_eq!(g, 4);
    let o = wait_observed(&*store, KIND, "d", g, WAIT)
        .await
        .expect("observed");
    assert_eq!(o.data, json!({"spec": {"v": 4}}));
    handle.shutdown().await;
}
