//! Tests of the embedded credential store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::test_support::{gate, rec, wait_queued, T};
use super::*;
use crate::otp::{HashAlgorithm, OtpKind};

fn key_of(r: &CredentialRecord) -> CredentialKey {
    CredentialKey {
        tenant: r.tenant.clone(),
        id: r.id.clone(),
    }
}

/// The engine the generic cases run on here (the conformance suite runs them on every
/// backend).
fn open_store(path: &std::path::Path, opts: StoreOptions) -> Result<Store, StoreError> {
    Store::open_redb(path, opts)
}

fn db_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join(EMBEDDED_FILE)
}

fn open_with(opts: StoreOptions) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&db_path(&dir), opts).unwrap();
    (dir, Arc::new(store))
}

fn open_tmp() -> (tempfile::TempDir, Arc<Store>) {
    open_with(StoreOptions::default())
}

/// Spawns an update that increments `failures` and returns the value it saw.
fn spawn_increment(
    store: &Arc<Store>,
    id: &str,
) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
    let (s, id) = (store.clone(), id.to_owned());
    tokio::spawn(async move {
        s.update(T, &id, |r| {
            let seen = r.failures;
            r.failures += 1;
            Update::Write(seen)
        })
        .await
    })
}

#[tokio::test]
async fn round_trip_list_delete_count() {
    let (_dir, store) = open_tmp();
    for id in ["d", "a", "c", "e", "b"] {
        store.insert(rec(id)).await.unwrap();
    }
    assert_eq!(store.count().await.unwrap(), 5);
    assert_eq!(store.get(T, "c").await.unwrap(), Some(rec("c")));
    assert_eq!(store.get(T, "zz").await.unwrap(), None);

    let mut pages = Vec::new();
    let mut after: Option<CredentialKey> = None;
    loop {
        let page = store.list(None, after.as_ref(), 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = Some(key_of(page.last().unwrap()));
        pages.push(page.into_iter().map(|r| r.id).collect::<Vec<_>>());
    }
    assert_eq!(pages, vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
    assert_eq!(
        store
            .list(None, Some(&key_of(&rec("b"))), 10)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(store.list(None, None, 0).await.unwrap().len(), 0);

    assert!(store.delete(T, "c").await.unwrap());
    assert!(!store.delete(T, "c").await.unwrap());
    assert_eq!(store.get(T, "c").await.unwrap(), None);
    assert_eq!(store.count().await.unwrap(), 4);
}

#[tokio::test]
async fn already_exists_not_found_invalid() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let mut other = rec("a");
    other.issuer = "someone else".into();
    assert_eq!(store.insert(other).await, Err(StoreError::AlreadyExists));
    assert_eq!(store.get(T, "a").await.unwrap(), Some(rec("a")));

    let r = store.update(T, "missing", |_| Update::Write(())).await;
    assert_eq!(r, Err(StoreError::NotFound));
    assert!(matches!(
        store.insert(rec("")).await,
        Err(StoreError::Invalid(_))
    ));
    let long = "x".repeat(MAX_ID_LEN + 1);
    assert!(matches!(
        store.insert(rec(&long)).await,
        Err(StoreError::Invalid(_))
    ));
    let r = store
        .update(T, "a", |r| {
            r.id = "b".into();
            Update::Write(())
        })
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    assert_eq!(store.get(T, "b").await.unwrap(), None);
}

#[tokio::test]
async fn insert_many_is_all_or_nothing() {
    let (_dir, store) = open_tmp();
    store.insert(rec("b")).await.unwrap();
    let r = store.insert_many(vec![rec("a"), rec("b"), rec("c")]).await;
    assert_eq!(r, Err(StoreError::AlreadyExists));
    let r = store.insert_many(vec![rec("x"), rec("x")]).await;
    assert_eq!(r, Err(StoreError::AlreadyExists));
    assert_eq!(store.count().await.unwrap(), 1);
    store.insert_many(vec![rec("a"), rec("c")]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 3);
}

#[tokio::test]
async fn update_keep_write_delete() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();

    let r = store
        .update(T, "a", |r| {
            r.failures = 99;
            Update::Keep("kept")
        })
        .await;
    assert_eq!(r, Ok("kept"));
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 0);

    let r = store
        .update(T, "a", |r| {
            r.failures = 3;
            r.last_accepted = Some(7);
            Update::Write(r.failures)
        })
        .await;
    assert_eq!(r, Ok(3));
    let got = store.get(T, "a").await.unwrap().unwrap();
    assert_eq!((got.failures, got.last_accepted), (3, Some(7)));

    assert_eq!(store.update(T, "a", |_| Update::Delete(())).await, Ok(()));
    assert_eq!(store.get(T, "a").await.unwrap(), None);
    assert_eq!(store.count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closure_sees_earlier_writes_of_same_batch() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let g = gate(&store).await;
    let before = store.commits();
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(spawn_increment(&store, "a"));
        wait_queued(&store, i + 1).await; // fixes the order
    }
    g.open().await;
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().unwrap());
    }
    assert_eq!(seen, (0..10).collect::<Vec<u32>>());
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 10);
    // gate batch + the one batch of ten updates
    assert_eq!(store.commits() - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replay_check_accepts_exactly_once() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.update(T, "a", |r| {
                if r.last_accepted.is_none_or(|l| 5 > l) {
                    r.last_accepted = Some(5);
                    Update::Write(true)
                } else {
                    Update::Keep(false)
                }
            })
            .await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(
        store.get(T, "a").await.unwrap().unwrap().last_accepted,
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_updates() {
    let (_dir, store) = open_tmp();
    let n = 200;
    let recs = (0..n).map(|i| rec(&format!("c{i}"))).collect();
    store.insert_many(recs).await.unwrap();

    // Natural load: updates queue up while the previous commit fsyncs.
    let before = store.commits();
    let tasks: Vec<_> = (0..n)
        .map(|i| spawn_increment(&store, &format!("c{i}")))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(0));
    }
    let commits = store.commits() - before;
    assert!(commits < n as u64, "{commits} commits for {n} updates");

    // Deterministic: everything queued behind a blocked commit is one batch.
    let g = gate(&store).await;
    let before = store.commits();
    let tasks: Vec<_> = (0..n)
        .map(|i| spawn_increment(&store, &format!("c{i}")))
        .collect();
    wait_queued(&store, n).await;
    g.open().await;
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(1));
    }
    assert_eq!(store.commits() - before, 2);
    let stats = store.stats();
    assert_eq!(stats.failed_batches, 0);
    assert!(stats.committed_jobs > 2 * n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_batch_bounds_batch_size() {
    let (_dir, store) = open_with(StoreOptions {
        max_batch: 8,
        ..StoreOptions::default()
    });
    store.insert(rec("a")).await.unwrap();
    let g = gate(&store).await;
    let before = store.commits();
    let tasks: Vec<_> = (0..40).map(|_| spawn_increment(&store, "a")).collect();
    wait_queued(&store, 40).await;
    g.open().await;
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.commits() - before, 1 + 40 / 8);
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_delay_and_non_durable_mode_work() {
    let (_dir, store) = open_with(StoreOptions {
        max_batch_delay: Duration::from_millis(2),
        durable: false,
        ..StoreOptions::default()
    });
    store.insert(rec("a")).await.unwrap();
    let tasks: Vec<_> = (0..50).map(|_| spawn_increment(&store, "a")).collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 50);
    assert!(store.commits() < 51);
}

#[tokio::test]
async fn durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let store = open_store(&path, StoreOptions::default()).unwrap();
        store.insert(rec("a")).await.unwrap();
        store
            .update(T, "a", |r| {
                r.last_accepted = Some(42);
                Update::Write(())
            })
            .await
            .unwrap();
        store.put_meta("master_key_version", vec![3]).await.unwrap();
    }
    let store = open_store(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        store.get(T, "a").await.unwrap().unwrap().last_accepted,
        Some(42)
    );
    assert_eq!(
        store.get_meta("master_key_version").await.unwrap(),
        Some(vec![3])
    );
    store.close().unwrap();
    // close() released the file: it can be opened again at once.
    let store = open_store(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.count().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_finishes_queued_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Arc::new(open_store(&path, StoreOptions::default()).unwrap());
    store.insert(rec("a")).await.unwrap();
    let g = gate(&store).await;
    let t = spawn_increment(&store, "a");
    wait_queued(&store, 1).await;
    // Nobody waits for the answers any more; only the store handle is left.
    t.abort();
    g.task.abort();
    let _ = t.await;
    let _ = g.task.await;
    let store = Arc::into_inner(store).expect("tasks released the store");
    let release = g.release;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        release.send(()).unwrap();
    });
    // Blocks until the gate batch and the queued update are committed.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    let store = open_store(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 1);
}

const CRASH_ENV: &str = "STORE_CRASH_CHILD_PATH";
const CRASH_ID_ENV: &str = "STORE_CRASH_CHILD_ID";
const CRASH_QUICK_REPAIR_ENV: &str = "STORE_CRASH_CHILD_QUICK_REPAIR";

/// Re-executes this test binary as a child that opens `path`, durably sets
/// `last_accepted = 1234` on `id`, prints a marker once the update's future
/// resolved, and aborts (no destructors, no clean close).
fn crash_child(path: &std::path::Path, id: &str, quick_repair: bool) {
    // Test path without the crate name, so it survives being moved.
    let module = module_path!().split_once("::").unwrap().1;
    let test_name = format!("{module}::crash_after_acknowledged_update_survives");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test_name.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_ENV, path)
        .env(CRASH_ID_ENV, id)
        .env(CRASH_QUICK_REPAIR_ENV, if quick_repair { "1" } else { "0" })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.trim() == "child-update-ok"),
        "child did not acknowledge: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "child was supposed to abort");
}

/// The child side of [`crash_child`]; returns only if this is not the child.
fn run_crash_child_if_asked() {
    let Ok(path) = std::env::var(CRASH_ENV) else {
        return;
    };
    let id = std::env::var(CRASH_ID_ENV).unwrap();
    let opts = StoreOptions {
        quick_repair: std::env::var(CRASH_QUICK_REPAIR_ENV).as_deref() == Ok("1"),
        ..StoreOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = open_store(path.as_ref(), opts).unwrap();
        store
            .update(T, &id, |r| {
                r.last_accepted = Some(1234);
                Update::Write(())
            })
            .await
            .unwrap();
        use std::io::Write;
        // Own line: libtest has already printed "test ... " without a newline.
        println!("\nchild-update-ok");
        std::io::stdout().flush().unwrap();
        std::process::abort();
    });
}

/// Child: acknowledges an update, then dies without any cleanup. Parent: the
/// acknowledged update must be in the file.
#[test]
fn crash_after_acknowledged_update_survives() {
    run_crash_child_if_asked();
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = open_store(&path, StoreOptions::default()).unwrap();
        rt.block_on(store.insert(rec("a"))).unwrap();
    }
    crash_child(&path, "a", false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = open_store(&path, StoreOptions::default()).unwrap();
    let got = rt.block_on(store.get(T, "a")).unwrap().unwrap();
    assert_eq!(got.last_accepted, Some(1234));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_commit_fails_every_job_of_the_batch() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let g = gate(&store).await;
    let tasks: Vec<_> = (0..10).map(|_| spawn_increment(&store, "a")).collect();
    wait_queued(&store, 10).await;
    // Fails the gate's batch (still open) and the batch of ten behind it.
    store.fail_next_commits(2);
    let g_task = g.task;
    g.release.send(()).unwrap();
    assert!(matches!(g_task.await.unwrap(), Err(StoreError::Backend(_))));
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            matches!(r, Err(StoreError::Backend(ref m)) if m.contains("commit failed")),
            "{r:?}"
        );
    }
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 0);
    assert_eq!(store.stats().failed_batches, 2);
    // The committer carries on.
    assert_eq!(spawn_increment(&store, "a").await.unwrap(), Ok(0));
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 1);
}

/// Queues A (increment), then `bad`, then C (increment) in one batch.
async fn batch_with_bad_job<F>(
    bad: F,
) -> (
    Result<u32, StoreError>,
    Result<(), StoreError>,
    Result<u32, StoreError>,
    Arc<Store>,
    tempfile::TempDir,
)
where
    F: FnOnce(&mut dyn Txn) -> Result<(), Rollback> + Send + 'static,
{
    let (dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    store.insert(rec("c")).await.unwrap();
    let g = gate(&store).await;
    let a = spawn_increment(&store, "a");
    wait_queued(&store, 1).await;
    let s = store.clone();
    let b = tokio::spawn(async move { s.write(bad).await });
    wait_queued(&store, 2).await;
    let c = spawn_increment(&store, "c");
    wait_queued(&store, 3).await;
    g.open().await;
    let (a, b, c) = (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());
    (a, b, c, store, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_job_aborts_batch_but_not_later_jobs() {
    let (a, b, c, store, _dir) = batch_with_bad_job(|txn| {
        // Writes, then gives up: the write must not survive.
        ops::update(txn, T, "c", |r| {
            r.failures = 77;
            Update::Write(())
        })??;
        Err(Rollback(StoreError::Invalid("changed my mind".into())))
    })
    .await;
    assert!(matches!(a, Err(StoreError::Aborted(_))), "{a:?}");
    assert_eq!(b, Err(StoreError::Invalid("changed my mind".into())));
    assert_eq!(c, Ok(0));
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 0);
    assert_eq!(store.get(T, "c").await.unwrap().unwrap().failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn panicking_write_job_does_not_kill_committer() {
    let (a, b, c, store, _dir) = batch_with_bad_job(|txn| {
        ops::update(txn, T, "c", |r| {
            r.failures = 77;
            Update::Write(())
        })??;
        panic!("job bug");
    })
    .await;
    assert!(matches!(a, Err(StoreError::Aborted(_))), "{a:?}");
    assert!(matches!(b, Err(StoreError::Aborted(_))), "{b:?}");
    assert_eq!(c, Ok(0));
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 0);
    assert_eq!(store.get(T, "c").await.unwrap().unwrap().failures, 1);
    assert_eq!(spawn_increment(&store, "a").await.unwrap(), Ok(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn panicking_update_closure_costs_only_its_own_call() {
    let (dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let _ = dir;
    let g = gate(&store).await;
    let before = store.commits();
    let a1 = spawn_increment(&store, "a");
    wait_queued(&store, 1).await;
    let s = store.clone();
    let bad = tokio::spawn(async move {
        s.update(T, "a", |r| -> Update<()> {
            r.failures = 1000;
            panic!("closure bug")
        })
        .await
    });
    wait_queued(&store, 2).await;
    let a2 = spawn_increment(&store, "a");
    wait_queued(&store, 3).await;
    g.open().await;
    assert_eq!(a1.await.unwrap(), Ok(0));
    assert!(matches!(bad.await.unwrap(), Err(StoreError::Aborted(_))));
    assert_eq!(a2.await.unwrap(), Ok(1));
    assert_eq!(store.get(T, "a").await.unwrap().unwrap().failures, 2);
    assert_eq!(store.commits() - before, 2);
}

#[tokio::test]
async fn generic_write_composes_with_ops_atomically() {
    let (_dir, store) = open_tmp();
    store.insert(rec("a")).await.unwrap();
    let r = store
        .write(|txn| {
            let seen = ops::update(txn, T, "a", |r| {
                r.failures += 1;
                Update::Write(r.failures)
            })??;
            ops::put_meta(txn, "last_touched", b"a")??;
            let missing = ops::update(txn, T, "nope", |_| Update::Write(()))?;
            Ok((seen, missing, ops::count(txn)?))
        })
        .await
        .unwrap();
    assert_eq!(r, (1, Err(StoreError::NotFound), 1));
    assert_eq!(
        store.get_meta("last_touched").await.unwrap(),
        Some(b"a".to_vec())
    );
    let n = store
        .read(|txn| Ok(txn.count(Table::Credentials)?))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn meta_reserved_keys_and_missing() {
    let (_dir, store) = open_tmp();
    assert_eq!(store.get_meta("nothing").await.unwrap(), None);
    let schema = store.get_meta("store.schema_version").await.unwrap();
    assert!(schema.is_some(), "the store records its schema");
    let r = store
        .put_meta("store.schema_version", vec![9, 9, 9, 9])
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    assert_eq!(
        store.get_meta("store.schema_version").await.unwrap(),
        schema
    );
    store.put_meta("k", vec![1, 2]).await.unwrap();
    store.put_meta("k", vec![3]).await.unwrap();
    assert_eq!(store.get_meta("k").await.unwrap(), Some(vec![3]));
}

#[tokio::test]
async fn corrupt_record_is_reported_without_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let garbage: Vec<u8> = vec![1, 0xde, 0xad, 0xbe, 0xef];
    {
        let store = open_store(&path, StoreOptions::default()).unwrap();
        store.insert(rec("good")).await.unwrap();
    }
    let store = open_store(&path, StoreOptions::default()).unwrap();
    store
        .write(move |txn| {
            txn.put(Table::Credentials, "tenant-a\0bad", &garbage)?;
            txn.put(Table::Credentials, "tenant-a\0badver", &[9u8, 1, 2])
        })
        .await
        .unwrap();
    drop(store);
    let store = open_store(&path, StoreOptions::default()).unwrap();
    let err = store.get(T, "bad").await.unwrap_err();
    let StoreError::Corrupt(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("\"bad\""), "{msg}");
    for b in ["dead", "beef", "222", "173", "190", "239"] {
        assert!(!msg.to_lowercase().contains(b), "{msg}");
    }
    let err = store.get(T, "badver").await.unwrap_err();
    assert!(err.to_string().contains("format version 9"), "{err}");
    assert!(matches!(
        store.update(T, "bad", |_| Update::Write(())).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.list(None, None, 10).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.get(T, "good").await.unwrap(), Some(rec("good")));
}

#[test]
fn encoding_round_trips_and_rejects_junk() {
    use super::record::{decode, encode};
    for (kind, algorithm) in [
        (OtpKind::Hotp, HashAlgorithm::Sha1),
        (OtpKind::Totp, HashAlgorithm::Sha256),
        (OtpKind::Hotp, HashAlgorithm::Sha512),
    ] {
        let mut r = rec("x");
        r.kind = kind;
        r.algorithm = algorithm;
        r.last_accepted = Some(u64::MAX);
        r.drift_steps = -3;
        r.wrapped_seed = (0..=255).collect();
        r.hard_locked = true;
        r.seed_binding = Some([0xb1; 32]);
        r.failure_times = vec![1, u64::MAX];
        r.failures = 2;
        let bytes = encode(&r);
        assert_eq!(bytes[0], 2, "format version byte");
        assert_eq!(decode(T, "x", &bytes).unwrap(), r);
        r.subject = None;
        assert_eq!(decode(T, "x", &encode(&r)).unwrap(), r, "no subject");
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(matches!(
            decode(T, "x", &extra),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode(T, "x", &bytes[..bytes.len() - 1]),
            Err(StoreError::Corrupt(_))
        ));
    }
    assert!(matches!(decode(T, "x", &[]), Err(StoreError::Corrupt(_))));
    // kind code 7
    let mut bytes = encode(&rec("x")).to_vec();
    bytes[1] = 7;
    let err = decode(T, "x", &bytes).unwrap_err();
    assert!(err.to_string().contains("kind code 7"), "{err}");
}

#[test]
fn format_1_records_still_decode() {
    use super::record::{decode, encode_v1};
    let mut old = rec("x");
    old.failures = 3;
    old.updated_at = 1_000;
    old.locked_until = 1_030;
    let got = decode(T, "x", &encode_v1(&old)).unwrap();
    // No binding yet (the start-up migration adds it); the failures count from the
    // record's last change.
    assert_eq!(got.seed_binding, None);
    assert_eq!(got.failure_times, vec![1_000; 3]);
    assert_eq!(got.failures, 3);
    let expected = CredentialRecord {
        failure_times: vec![1_000; 3],
        subject: None,
        ..old
    };
    assert_eq!(got, expected);
    // A huge old count keeps a bounded number of times.
    let mut many = rec("y");
    many.failures = u32::MAX;
    let got = decode(T, "y", &encode_v1(&many)).unwrap();
    assert_eq!(got.failure_times.len(), MAX_FAILURE_TIMES);
}

#[test]
fn debug_hides_wrapped_seed() {
    let mut r = rec("a");
    r.wrapped_seed = vec![0x42; 40];
    let s = format!("{r:?}");
    assert!(s.contains("<40 bytes>"), "{s}");
    assert!(!s.contains("66"), "{s}"); // 0x42 in decimal
    assert!(!s.contains("0x42") && !s.contains("[4"), "{s}");
}

#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&db_path(&dir), StoreOptions::default()).unwrap();
    is_send(&store.get(T, "a"));
    is_send(&store.list(None, None, 1));
    is_send(&store.update(T, "a", |_| Update::Keep(())));
    is_send(&store.insert(rec("a")));
    is_send(&store.write(|_| Ok::<_, Rollback>(())));
    is_send(&store.put_meta("k", vec![]));
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        max_batch: 0,
        ..StoreOptions::default()
    };
    assert!(matches!(
        open_store(&db_path(&dir), opts),
        Err(StoreError::Invalid(_))
    ));
}

// ---------------------------------------------------------------------------
// Scale (run explicitly): cargo test --release -- --ignored --nocapture
// ---------------------------------------------------------------------------

/// SplitMix64: deterministic pseudo-random numbers without a dependency.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// UUID-shaped id of credential `i`, in random key order like real ids.
fn scale_id(i: u64) -> String {
    let (a, b) = (splitmix(i), splitmix(i ^ 0xDEAD_BEEF));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn scale_rec(i: u64) -> CredentialRecord {
    let id = scale_id(i);
    let mut r = rec(&id);
    r.account_name = format!("citizen-{i:010}");
    r.wrapped_seed = splitmix(i).to_le_bytes().repeat(5); // 40 bytes
    r
}

/// Mean microseconds of (get, update, get+update) over `samples` random ids
/// out of the first `n`, one caller at a time (latency, not throughput).
async fn measure(store: &Store, n: u64, samples: u64, seed: u64) -> (f64, f64, f64) {
    let (mut tg, mut tu) = (Duration::ZERO, Duration::ZERO);
    for s in 0..samples {
        let id = scale_id(splitmix(seed ^ s) % n);
        let t = Instant::now();
        let r = store.get(T, &id).await.unwrap().expect("present");
        tg += t.elapsed();
        let t = Instant::now();
        store
            .update(T, &id, move |r| {
                r.failures += 1;
                r.updated_at += 1;
                Update::Write(())
            })
            .await
            .unwrap();
        tu += t.elapsed();
        assert_eq!(r.id, id);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / samples as f64;
    (us(tg), us(tu), us(tg + tu))
}

/// Concurrent updates: (updates per second, commits used).
async fn throughput(store: &Arc<Store>, n: u64, tasks: u64, per_task: u64) -> (f64, u64) {
    let before = store.commits();
    let t = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|k| {
            let s = store.clone();
            tokio::spawn(async move {
                for j in 0..per_task {
                    let id = scale_id(splitmix(k * 1_000_003 + j) % n);
                    s.update(T, &id, |r| {
                        r.failures += 1;
                        Update::Write(())
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let el = t.elapsed().as_secs_f64();
    ((tasks * per_task) as f64 / el, store.commits() - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale test: inserts 1,000,000 records; run with --release -- --ignored --nocapture"]
async fn scale_one_million() {
    const TOTAL: u64 = 1_000_000;
    const CHUNK: u64 = 10_000;
    const SAMPLES: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Arc::new(open_store(&path, StoreOptions::default()).unwrap());
    let file_per_cred = |n: u64| std::fs::metadata(&path).unwrap().len() as f64 / n as f64;

    let mut inserted = 0;
    let mut insert_time = Duration::ZERO;
    let insert_chunk = |store: Arc<Store>, from: u64| async move {
        let recs = (from..from + CHUNK).map(scale_rec).collect();
        let t = Instant::now();
        store.insert_many(recs).await.unwrap();
        t.elapsed()
    };
    insert_time += insert_chunk(store.clone(), 0).await;
    inserted += CHUNK;
    assert_eq!(store.count().await.unwrap(), inserted);
    let small = measure(&store, inserted, SAMPLES, 1).await;
    let small_tp = throughput(&store, inserted, 64, 100).await;
    let small_size = file_per_cred(inserted);

    while inserted < TOTAL {
        insert_time += insert_chunk(store.clone(), inserted).await;
        inserted += CHUNK;
    }
    assert_eq!(store.count().await.unwrap(), TOTAL);
    let big = measure(&store, TOTAL, SAMPLES, 2).await;
    let big_tp = throughput(&store, TOTAL, 64, 100).await;
    let big_size = file_per_cred(TOTAL);
    let file_bytes = std::fs::metadata(&path).unwrap().len();

    // Recovery after a crash: full repair (default) vs quick-repair.
    drop(Arc::into_inner(store).unwrap());
    let crash_id = scale_id(7);
    crash_child(&path, &crash_id, false);
    let t = Instant::now();
    let qr = open_store(
        &path,
        StoreOptions {
            quick_repair: true,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let full_repair = t.elapsed();
    let got = qr.get(T, &crash_id).await.unwrap().unwrap();
    assert_eq!(got.last_accepted, Some(1234));
    let quick = measure(&qr, TOTAL, 2_000, 4).await;
    let qr = Arc::new(qr);
    let quick_tp = throughput(&qr, TOTAL, 64, 100).await;
    drop(Arc::into_inner(qr).unwrap());
    crash_child(&path, &crash_id, true);
    let t = Instant::now();
    let nd = open_store(
        &path,
        StoreOptions {
            durable: false,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let quick_repair_open = t.elapsed();

    // fsync cost: the same measurement without fsync (bench-only mode).
    let nondurable = measure(&nd, TOTAL, SAMPLES, 3).await;
    let nd = Arc::new(nd);
    let nd_tp = throughput(&nd, TOTAL, 64, 100).await;

    println!("scale: bulk insert of {TOTAL} records in {CHUNK}-record transactions: {:.1} s ({:.0} records/s)",
        insert_time.as_secs_f64(), TOTAL as f64 / insert_time.as_secs_f64());
    for (label, n, (g, u, gu), (tp, commits), size) in [
        ("10k", CHUNK, small, small_tp, small_size),
        ("1M", TOTAL, big, big_tp, big_size),
    ] {
        println!(
            "scale: at {label:>3} records ({n}): mean get {g:.1} us, mean durable update {u:.1} us, get+update {gu:.1} us; \
             64 concurrent updaters: {tp:.0} updates/s with {commits} commits for 6400 updates; file {size:.1} bytes/credential"
        );
    }
    println!("scale: file size at 1M: {file_bytes} bytes");
    println!(
        "scale: reopen after a crash at 1M: full repair {:.0} ms; with quick_repair {:.1} ms",
        full_repair.as_secs_f64() * 1e3,
        quick_repair_open.as_secs_f64() * 1e3
    );
    println!(
        "scale: at 1M with quick_repair=true: get {:.1} us, update {:.1} us, get+update {:.1} us; 64 updaters: {:.0} updates/s, {} commits",
        quick.0, quick.1, quick.2, quick_tp.0, quick_tp.1
    );
    println!(
        "scale: at 1M with durable=false (bench only): get {:.1} us, update {:.1} us, get+update {:.1} us; 64 updaters: {:.0} updates/s, {} commits",
        nondurable.0, nondurable.1, nondurable.2, nd_tp.0, nd_tp.1
    );
}

#[tokio::test]
async fn ids_are_scoped_per_tenant() {
    let (_dir, store) = open_tmp();
    let mut b = rec("x");
    b.tenant = "tenant-b".into();
    b.failures = 7;
    store.insert(rec("x")).await.unwrap();
    store.insert(b.clone()).await.unwrap();
    assert_eq!(store.insert(rec("x")).await, Err(StoreError::AlreadyExists));
    assert_eq!(store.get(T, "x").await.unwrap(), Some(rec("x")));
    assert_eq!(store.get("tenant-b", "x").await.unwrap(), Some(b.clone()));
    // A tenant whose name is a prefix of another's sees nothing of it.
    assert_eq!(store.get("tenant", "x").await.unwrap(), None);
    assert_eq!(
        store.update("tenant-c", "x", |_| Update::Write(())).await,
        Err(StoreError::NotFound)
    );
    store.insert(rec("y")).await.unwrap();
    let mut z = rec("z");
    z.tenant = "tenant-a-longer".into();
    store.insert(z).await.unwrap();

    // One tenant's listing is a range scan of exactly its records, paged.
    let ids = |page: Vec<CredentialRecord>| -> Vec<(String, String)> {
        page.into_iter().map(|r| (r.tenant, r.id)).collect()
    };
    let a = store.list(Some(T), None, 10).await.unwrap();
    assert_eq!(ids(a), [(T.into(), "x".into()), (T.into(), "y".into())]);
    let first = store.list(Some(T), None, 1).await.unwrap();
    let after = key_of(&first[0]);
    assert_eq!(
        ids(store.list(Some(T), Some(&after), 10).await.unwrap()),
        [(T.into(), "y".into())]
    );
    // A cursor of another tenant does not leak into this tenant's range.
    let foreign = CredentialKey {
        tenant: "tenant-b".into(),
        id: "x".into(),
    };
    assert!(store
        .list(Some(T), Some(&foreign), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.list(Some("tenant-b"), None, 10).await.unwrap(),
        vec![b]
    );
    assert!(store
        .list(Some("nobody"), None, 10)
        .await
        .unwrap()
        .is_empty());
    // Every tenant: (tenant, id) order.
    assert_eq!(
        ids(store.list(None, None, 10).await.unwrap()),
        [
            (T.into(), "x".into()),
            (T.into(), "y".into()),
            ("tenant-a-longer".into(), "z".into()),
            ("tenant-b".into(), "x".into())
        ]
    );
    assert!(store.delete("tenant-b", "x").await.unwrap());
    assert_eq!(store.get(T, "x").await.unwrap(), Some(rec("x")));
    // Tenants and ids that cannot be keys are refused.
    let mut bad = rec("q");
    bad.tenant = "a\0b".into();
    assert!(matches!(
        store.insert(bad).await,
        Err(StoreError::Invalid(_))
    ));
    let mut bad = rec("q");
    bad.tenant = String::new();
    assert!(matches!(
        store.insert(bad).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.insert(rec("a\0b")).await,
        Err(StoreError::Invalid(_))
    ));
}

fn evidence_rec(id: &str, now: u64) -> EvidenceRecord {
    EvidenceRecord {
        id: id.into(),
        tenant: T.into(),
        credential_id: "x".into(),
        subject: "subject-x".into(),
        method: crate::common::AuthMethod::Otp,
        auth_time: now,
        expires_at: now + 120,
        spent_at: None,
        txn_text_sha256: None,
    }
}

#[tokio::test]
async fn evidence_rides_in_the_credential_update_and_is_spent_once() {
    use super::evidence::{spend_in, Spend};
    let (_dir, store) = open_tmp();
    store.insert(rec("x")).await.unwrap();
    let commits = store.commits();
    // Written in the same job (and commit) as the record change, only when asked.
    let e = evidence_rec("e1", 1_000);
    let seen = store
        .update_with(
            T,
            "x",
            |r| {
                r.last_accepted = Some(5);
                Update::Write(true)
            },
            move |accepted: &bool, txn: &mut dyn Txn| match accepted {
                true => evidence::insert_in(txn, &e, e.auth_time),
                false => Ok(()),
            },
        )
        .await
        .unwrap();
    assert!(seen);
    assert_eq!(store.commits(), commits + 1, "one commit for both");
    assert_eq!(
        store.get_evidence("e1").await.unwrap(),
        Some(evidence_rec("e1", 1_000))
    );
    assert_eq!(
        store.get(T, "x").await.unwrap().unwrap().last_accepted,
        Some(5)
    );
    // A rolled-back update leaves no evidence.
    store
        .update_with(
            T,
            "x",
            |_| Update::Keep(false),
            |_: &bool, _: &mut dyn Txn| Ok(()),
        )
        .await
        .unwrap();
    assert_eq!(store.evidence_count().await.unwrap(), 1);

    // 32 concurrent spends: the committer decides them one after the other.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .write(|txn| {
                    spend_in(txn, "e1", |e| match e {
                        Some(e) if e.spent_at.is_none() => Spend::Spend(1_001, true),
                        _ => Spend::Refuse(false),
                    })
                })
                .await
                .unwrap()
                .unwrap()
        });
    }
    let mut spent = 0;
    while let Some(r) = tasks.join_next().await {
        spent += usize::from(r.unwrap());
    }
    assert_eq!(spent, 1);
    assert_eq!(
        store.get_evidence("e1").await.unwrap().unwrap().spent_at,
        Some(1_001)
    );
    let missing = store
        .write(|txn| spend_in(txn, "nope", |e| Spend::Refuse(e.is_none())))
        .await
        .unwrap();
    assert_eq!(missing, Ok(true));
}

#[tokio::test]
async fn stale_evidence_is_purged_by_later_inserts() {
    use super::evidence::{insert_in, PURGE_GRACE_SECONDS, PURGE_PER_INSERT};
    let (_dir, store) = open_tmp();
    let old = 1_000u64;
    for i in 0..10 {
        let e = evidence_rec(&format!("old-{i}"), old);
        store
            .write(move |txn| insert_in(txn, &e, old))
            .await
            .unwrap();
    }
    assert_eq!(store.evidence_count().await.unwrap(), 10);
    // Still inside the grace period after expiry: nothing goes.
    let soon = old + 120 + PURGE_GRACE_SECONDS;
    let e = evidence_rec("soon", soon);
    store
        .write(move |txn| insert_in(txn, &e, soon))
        .await
        .unwrap();
    assert_eq!(store.evidence_count().await.unwrap(), 11);
    // Past it: each insert removes up to PURGE_PER_INSERT stale records, oldest first.
    let later = soon + 1;
    let e = evidence_rec("later-0", later);
    store
        .write(move |txn| insert_in(txn, &e, later))
        .await
        .unwrap();
    assert_eq!(
        store.evidence_count().await.unwrap(),
        12 - PURGE_PER_INSERT as u64
    );
    for i in 1..5 {
        let e = evidence_rec(&format!("later-{i}"), later);
        store
            .write(move |txn| insert_in(txn, &e, later))
            .await
            .unwrap();
    }
    // The ten stale ones are gone, the fresh ones stay.
    assert_eq!(store.evidence_count().await.unwrap(), 6);
    assert_eq!(store.get_evidence("old-3").await.unwrap(), None);
    assert!(store.get_evidence("soon").await.unwrap().is_some());
    assert!(store.get_evidence("later-4").await.unwrap().is_some());
}
