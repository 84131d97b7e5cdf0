//! The conformance suite every [`StateStore`] backend must pass, written once against
//! `Arc<dyn StateStore>` so that the redb and etcd backends run the same checks.
//!
//! Each function expects an empty store.

use super::{
    Compare, MAX_VALUE_SIZE, Op, StateStore, StoreError, Txn, WatchEvent, WatchEventKind,
    WatchStream, cas_json, get_json, put_json,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for an event that must come.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// The next event of a watch, failing the test when none comes or the stream errs.
pub(crate) async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {EVENT_WAIT:?}"),
    }
}

/// Runs every single-client check in turn, each on its own prefix.
pub(crate) async fn run(store: Arc<dyn StateStore>) {
    put_get_and_revisions(&*store).await;
    compare_and_swap(&*store).await;
    delete(&*store).await;
    list_by_prefix(&*store).await;
    txn_all_or_nothing(&*store).await;
    watch_order_and_replay(&*store).await;
    too_large_and_empty_keys(&*store).await;
    json_helpers(&*store).await;
}

async fn put_get_and_revisions(s: &dyn StateStore) {
    let r0 = s.current_revision().await.expect("revision");
    assert!(s.get("pg/a").await.expect("get").is_none());
    let r1 = s.put("pg/a", b"one".to_vec()).await.expect("put");
    assert!(r1 > r0);
    let kv = s.get("pg/a").await.expect("get").expect("exists");
    assert_eq!(kv.value, b"one");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r1, 1)
    );
    let r2 = s.put("pg/a", b"two".to_vec()).await.expect("put");
    assert!(r2 > r1);
    let kv = s.get("pg/a").await.expect("get").expect("exists");
    assert_eq!(kv.value, b"two");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2)
    );
    assert_eq!(s.current_revision().await.expect("revision"), r2);
    // An empty value is a value.
    s.put("pg/empty", Vec::new()).await.expect("put empty");
    let kv = s.get("pg/empty").await.expect("get").expect("exists");
    assert!(kv.value.is_empty());
}

async fn compare_and_swap(s: &dyn StateStore) {
    // 0 = create only if absent.
    let r1 = s
        .compare_and_swap("cas/k", 0, b"1".to_vec())
        .await
        .expect("create");
    match s.compare_and_swap("cas/k", 0, b"x".to_vec()).await {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => assert_eq!((key.as_str(), expected, actual), ("cas/k", 0, r1)),
        other => panic!("create over an existing key must conflict, got {other:?}"),
    }
    let r2 = s
        .compare_and_swap("cas/k", r1, b"2".to_vec())
        .await
        .expect("swap");
    assert!(r2 > r1);
    match s.compare_and_swap("cas/k", r1, b"3".to_vec()).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (r1, r2)),
        other => panic!("stale cas must conflict, got {other:?}"),
    }
    match s.compare_and_swap("cas/absent", 5, b"3".to_vec()).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 0),
        other => panic!("cas on an absent key must conflict, got {other:?}"),
    }
    let kv = s.get("cas/k").await.expect("get").expect("exists");
    assert_eq!(kv.value, b"2");
    assert!(s.get("cas/absent").await.expect("get").is_none());
    // A conflict writes nothing.
    assert_eq!(s.current_revision().await.expect("revision"), r2);
}

async fn delete(s: &dyn StateStore) {
    assert!(!s.delete("del/none", None).await.expect("delete absent"));
    let r1 = s.put("del/a", b"a".to_vec()).await.expect("put");
    assert!(s.delete("del/a", None).await.expect("delete"));
    assert!(s.get("del/a").await.expect("get").is_none());
    assert!(!s.delete("del/a", None).await.expect("delete again"));

    let r2 = s.put("del/b", b"b".to_vec()).await.expect("put");
    assert!(r2 > r1);
    match s.delete("del/b", Some(r1)).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (r1, r2)),
        other => panic!("delete with a stale revision must conflict, got {other:?}"),
    }
    assert!(s.get("del/b").await.expect("get").is_some());
    assert!(
        s.delete("del/b", Some(r2))
            .await
            .expect("delete at revision")
    );
    match s.delete("del/b", Some(r2)).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 0),
        other => panic!("delete at a revision of an absent key must conflict, got {other:?}"),
    }
    // A re-created key starts over.
    let r3 = s.put("del/b", b"again".to_vec()).await.expect("put");
    let kv = s.get("del/b").await.expect("get").expect("exists");
    assert_eq!((kv.create_revision, kv.version), (r3, 1));
}

async fn list_by_prefix(s: &dyn StateStore) {
    for k in ["ls/b", "ls/a", "ls/c/d", "ls", "lt/a", "ls-other", "lr/z"] {
        s.put(k, k.as_bytes().to_vec()).await.expect("put");
    }
    let keys: Vec<String> = s
        .list("ls/")
        .await
        .expect("list")
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, vec!["ls/a", "ls/b", "ls/c/d"]);
    let kvs = s.list("ls/c/").await.expect("list");
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].value, b"ls/c/d");
    assert!(s.list("nothing/").await.expect("list").is_empty());
    let snap = s.snapshot("ls/").await.expect("snapshot");
    assert_eq!(snap.kvs.len(), 3);
    assert_eq!(snap.revision, s.current_revision().await.expect("revision"));
}

async fn txn_all_or_nothing(s: &dyn StateStore) {
    let ra = s.put("tx/a", b"a1".to_vec()).await.expect("put");
    let rb = s.put("tx/b", b"b1".to_vec()).await.expect("put");
    let put = |k: &str, v: &str| Op::Put {
        key: k.to_string(),
        value: v.as_bytes().to_vec(),
    };

    // One stale compare: nothing of `success` happens, `failure` does.
    let before = s.current_revision().await.expect("revision");
    let res = s
        .txn(Txn {
            compares: vec![
                Compare {
                    key: "tx/a".into(),
                    mod_revision: ra,
                },
                Compare {
                    key: "tx/b".into(),
                    mod_revision: ra,
                },
            ],
            success: vec![put("tx/a", "a2"), Op::Delete { key: "tx/b".into() }],
            failure: vec![put("tx/failed", "yes")],
        })
        .await
        .expect("txn");
    assert!(!res.succeeded);
    assert_eq!(res.revision, before + 1);
    assert_eq!(s.get("tx/a").await.expect("get").expect("a").value, b"a1");
    assert!(s.get("tx/b").await.expect("get").is_some());
    assert!(s.get("tx/failed").await.expect("get").is_some());

    // Every compare holds: every write happens, at one revision.
    let res = s
        .txn(Txn {
            compares: vec![
                Compare {
                    key: "tx/a".into(),
                    mod_revision: ra,
                },
                Compare {
                    key: "tx/b".into(),
                    mod_revision: rb,
                },
                Compare {
                    key: "tx/new".into(),
                    mod_revision: 0,
                },
            ],
            success: vec![
                put("tx/a", "a2"),
                Op::Delete { key: "tx/b".into() },
                put("tx/new", "n"),
            ],
            failure: Vec::new(),
        })
        .await
        .expect("txn");
    assert!(res.succeeded);
    let a = s.get("tx/a").await.expect("get").expect("a");
    let n = s.get("tx/new").await.expect("get").expect("new");
    assert_eq!(
        (a.value.as_slice(), a.mod_revision),
        (&b"a2"[..], res.revision)
    );
    assert_eq!(n.mod_revision, res.revision);
    assert!(s.get("tx/b").await.expect("get").is_none());
    assert_eq!(s.current_revision().await.expect("revision"), res.revision);

    // A transaction that writes nothing does not bump the revision.
    let res2 = s
        .txn(Txn {
            compares: vec![Compare {
                key: "tx/a".into(),
                mod_revision: 1,
            }],
            success: Vec::new(),
            failure: vec![Op::Delete {
                key: "tx/absent".into(),
            }],
        })
        .await
        .expect("txn");
    assert!(!res2.succeeded);
    assert_eq!(res2.revision, res.revision);

    // Writing one key twice is refused, and nothing is written.
    let dup = s
        .txn(Txn {
            success: vec![put("tx/d", "1"), put("tx/d", "2")],
            ..Txn::default()
        })
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateKeyInTxn { .. })));
    assert!(s.get("tx/d").await.expect("get").is_none());

    // A too-large value anywhere refuses the whole transaction.
    let big = s
        .txn(Txn {
            success: vec![
                put("tx/small", "1"),
                Op::Put {
                    key: "tx/big".into(),
                    value: vec![0; MAX_VALUE_SIZE + 1],
                },
            ],
            ..Txn::default()
        })
        .await;
    assert!(matches!(big, Err(StoreError::TooLarge { .. })));
    assert!(s.get("tx/small").await.expect("get").is_none());
}

async fn watch_order_and_replay(s: &dyn StateStore) {
    let start = s.current_revision().await.expect("revision");
    let mut live = s.watch("w/", start).await.expect("watch");
    let r1 = s.put("w/a", b"1".to_vec()).await.expect("put");
    s.put("other/x", b"ignored".to_vec()).await.expect("put");
    let r2 = s.put("w/b", b"2".to_vec()).await.expect("put");
    let r3 = s.put("w/a", b"3".to_vec()).await.expect("put");
    assert!(s.delete("w/b", None).await.expect("delete"));
    let r4 = s.current_revision().await.expect("revision");
    let txn = s
        .txn(Txn {
            success: vec![
                Op::Put {
                    key: "w/c".into(),
                    value: b"c".to_vec(),
                },
                Op::Delete { key: "w/a".into() },
            ],
            ..Txn::default()
        })
        .await
        .expect("txn");

    let expect = [
        (WatchEventKind::Put, "w/a", &b"1"[..], r1),
        (WatchEventKind::Put, "w/b", b"2", r2),
        (WatchEventKind::Put, "w/a", b"3", r3),
        (WatchEventKind::Delete, "w/b", b"", r4),
        (WatchEventKind::Put, "w/c", b"c", txn.revision),
        (WatchEventKind::Delete, "w/a", b"", txn.revision),
    ];
    let check = |ev: &WatchEvent, (kind, key, value, rev): (WatchEventKind, &str, &[u8], u64)| {
        assert_eq!(
            (
                ev.kind,
                ev.kv.key.as_str(),
                ev.kv.value.as_slice(),
                ev.revision
            ),
            (kind, key, value, rev)
        );
    };
    for e in expect {
        check(&next_event(&mut live).await, e);
    }
    // The put carries the key's revisions; the delete carries the delete's revision.
    // Replay from an older revision: only the changes after it, then live ones.
    let mut replay = s.watch("w/", r2).await.expect("watch from r2");
    for e in &expect[2..] {
        check(&next_event(&mut replay).await, *e);
    }
    let r5 = s.put("w/z", b"z".to_vec()).await.expect("put");
    check(
        &next_event(&mut replay).await,
        (WatchEventKind::Put, "w/z", b"z", r5),
    );
    check(
        &next_event(&mut live).await,
        (WatchEventKind::Put, "w/z", b"z", r5),
    );
    // A watch on one exact key sees only keys starting with it.
    let mut one = s.watch("w/z", r5).await.expect("watch");
    s.put("w/y", b"y".to_vec()).await.expect("put");
    let r6 = s.put("w/z", b"z2".to_vec()).await.expect("put");
    check(
        &next_event(&mut one).await,
        (WatchEventKind::Put, "w/z", b"z2", r6),
    );
}

async fn too_large_and_empty_keys(s: &dyn StateStore) {
    let exact = vec![7u8; MAX_VALUE_SIZE];
    s.put("big/ok", exact)
        .await
        .expect("a value of exactly the limit is accepted");
    match s.put("big/no", vec![0; MAX_VALUE_SIZE + 1]).await {
        Err(StoreError::TooLarge { key, size, max }) => {
            assert_eq!(
                (key.as_str(), size, max),
                ("big/no", MAX_VALUE_SIZE + 1, MAX_VALUE_SIZE)
            )
        }
        other => panic!("too large value must be refused, got {other:?}"),
    }
    assert!(matches!(
        s.compare_and_swap("big/no", 0, vec![0; MAX_VALUE_SIZE + 1])
            .await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(s.get("big/no").await.expect("get").is_none());
    assert!(matches!(
        s.put("", b"x".to_vec()).await,
        Err(StoreError::EmptyKey)
    ));
}

async fn json_helpers(s: &dyn StateStore) {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Doc {
        n: u32,
    }
    assert!(get_json::<Doc>(s, "json/d").await.expect("get").is_none());
    let r1 = cas_json(s, "json/d", 0, &Doc { n: 1 })
        .await
        .expect("create");
    let got = get_json::<Doc>(s, "json/d")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((got.value, got.mod_revision), (Doc { n: 1 }, r1));
    let r2 = put_json(s, "json/d", &Doc { n: 2 }).await.expect("put");
    assert!(matches!(
        cas_json(s, "json/d", r1, &Doc { n: 3 }).await,
        Err(StoreError::Conflict { .. })
    ));
    cas_json(s, "json/d", r2, &Doc { n: 3 }).await.expect("cas");
    s.put("json/bad", b"not json".to_vec()).await.expect("put");
    assert!(matches!(
        get_json::<Doc>(s, "json/bad").await,
        Err(StoreError::Json { .. })
    ));
}

/// 8 tasks each increment one counter 25 times with compare-and-swap; the count must be exact.
pub(crate) async fn concurrent_cas(store: Arc<dyn StateStore>) {
    const TASKS: u64 = 8;
    const EACH: u64 = 25;
    let key = "conc/counter";
    put_json(&*store, key, &0u64).await.expect("init");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..EACH {
                loop {
                    let cur = get_json::<u64>(&*store, key)
                        .await
                        .expect("get")
                        .expect("counter exists");
                    match cas_json(&*store, key, cur.mod_revision, &(cur.value + 1)).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("cas failed: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let end = get_json::<u64>(&*store, key)
        .await
        .expect("get")
        .expect("counter exists");
    assert_eq!(end.value, TASKS * EACH);
}

/// With a history of `limit` revisions, a watch from before the oldest kept one fails with
/// [`StoreError::Compacted`]; a watch from inside the history works.
pub(crate) async fn compaction(store: Arc<dyn StateStore>, limit: u64) {
    let s = &*store;
    let first = s.put("cmp/k", b"0".to_vec()).await.expect("put");
    for i in 1..(limit * 3) {
        s.put("cmp/k", i.to_string().into_bytes())
            .await
            .expect("put");
    }
    let now = s.current_revision().await.expect("revision");
    match s.watch("cmp/", first).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, first);
            assert!(oldest > first && oldest <= now);
        }
        Ok(_) => panic!("watch from a compacted revision must fail"),
        Err(e) => panic!("expected compacted, got {e}"),
    }
    let mut w = s
        .watch("cmp/", now - 1)
        .await
        .expect("watch inside history");
    let ev = next_event(&mut w).await;
    assert_eq!(ev.revision, now);
    // The data itself is never compacted.
    let kv = s.get("cmp/k").await.expect("get").expect("exists");
    assert_eq!(kv.version, limit * 3);
}
