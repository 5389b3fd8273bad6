//! The PostgreSQL backend against a real server: each test has a database of its own
//! (see `testing`); without `HSM_TEST_POSTGRES_URL` they skip, except under `CI=true`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::testing::TestDatabase;
use super::PgBackend;
use crate::store::backend::Backend;
use crate::store::uow::{KeyRange, ReadTxn, Table, Txn};
use crate::store::StoreError;

/// Runs `f` in one batch and commits it.
fn write<T>(
    b: &PgBackend,
    f: impl FnOnce(&mut dyn Txn) -> Result<T, crate::store::Rollback>,
) -> Result<T, StoreError> {
    let mut txn = b.begin_batch()?;
    let out = f(&mut *txn).map_err(|r| r.0)?;
    txn.commit()?;
    Ok(out)
}

fn read<T>(b: &PgBackend, f: impl Fn(&mut dyn ReadTxn) -> Result<T, crate::store::Rollback>) -> T {
    let mut out = None;
    b.read(&mut |r| {
        out = Some(f(r).map_err(|e| e.0)?);
        Ok(())
    })
    .expect("read");
    out.expect("read ran")
}

fn get(b: &PgBackend, table: Table, key: &str) -> Option<Vec<u8>> {
    read(b, |r| r.get(table, key))
}

#[test]
fn migrations_apply_once_and_are_idempotent() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let b = db.backend("a");
    assert_eq!(b.kind(), "postgres");
    drop(b);
    let b = db.backend("a");
    drop(b);
    assert_eq!(
        db.query_text("SELECT count(*) FROM schema_migrations")
            .as_deref(),
        Some(super::SCHEMA_VERSION.to_string().as_str())
    );
    for t in Table::ALL {
        assert_eq!(
            db.query_text(&format!("SELECT to_regclass('{}') IS NOT NULL", t.name()))
                .as_deref(),
            Some("t"),
            "table {}",
            t.name()
        );
    }
}

#[test]
fn a_newer_schema_is_refused() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    drop(db.backend("a"));
    db.execute("INSERT INTO schema_migrations (version) VALUES (999)");
    let err = PgBackend::open(&db.options("a")).expect_err("refused");
    assert_eq!(
        err,
        StoreError::SchemaTooNew {
            found: 999,
            supported: super::SCHEMA_VERSION
        }
    );
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn a_url_with_a_password_is_refused() {
    let e = super::check_url("postgresql://hsm:secret@db.example/hsm").expect_err("refused");
    assert!(e.contains("password_file"), "{e}");
    assert!(!e.contains("secret"), "{e}");
    assert!(super::check_url("postgresql://hsm@db.example/hsm").is_ok());
    assert!(super::check_url("postgresql://hsm@db.example").is_err());
    assert!(super::check_url("not a url").is_err());
}

#[test]
fn own_writes_scans_deletes_and_nul_keys() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let b = db.backend("a");
    write(&b, |t| {
        t.put(Table::Credentials, "t\0b", b"2")?;
        t.put(Table::Credentials, "t\0a", b"1")?;
        t.put(Table::Credentials, "u\0a", b"3")?;
        assert_eq!(t.get(Table::Credentials, "t\0a")?, Some(b"1".to_vec()));
        // A scan inside the batch sees its own writes, bytewise ordered.
        let all = t.scan(Table::Credentials, &KeyRange::prefix("t\0"), 10)?;
        assert_eq!(
            all,
            vec![
                ("t\0a".to_owned(), b"1".to_vec()),
                ("t\0b".to_owned(), b"2".to_vec())
            ]
        );
        t.put(Table::Credentials, "t\0a", b"1b")?;
        assert!(t.delete(Table::Credentials, "u\0a")?);
        assert!(!t.delete(Table::Credentials, "nothing")?);
        assert_eq!(t.count(Table::Credentials)?, 2);
        Ok(())
    })
    .expect("batch");
    assert_eq!(get(&b, Table::Credentials, "t\0a"), Some(b"1b".to_vec()));
    assert_eq!(get(&b, Table::Credentials, "u\0a"), None);

    // Read as present, deleted, written again; read as absent, written, deleted.
    write(&b, |t| {
        assert!(t.delete(Table::Credentials, "t\0b")?);
        assert_eq!(t.get(Table::Credentials, "t\0b")?, None);
        t.put(Table::Credentials, "t\0b", b"again")?;
        assert_eq!(t.get(Table::Credentials, "new")?, None);
        t.put(Table::Credentials, "new", b"x")?;
        assert!(t.delete(Table::Credentials, "new")?);
        Ok(())
    })
    .expect("batch");
    assert_eq!(get(&b, Table::Credentials, "t\0b"), Some(b"again".to_vec()));
    assert_eq!(get(&b, Table::Credentials, "new"), None);

    let page = read(&b, |r| {
        r.scan(
            Table::Credentials,
            &KeyRange {
                start: "t\0a".into(),
                after: true,
                end: None,
            },
            1,
        )
    });
    assert_eq!(page, vec![("t\0b".to_owned(), b"again".to_vec())]);
    assert_eq!(read(&b, |r| r.count(Table::Credentials)), 2);
    // Only the event head, which migration 2 creates.
    assert_eq!(read(&b, |r| r.count(Table::Meta)), 1);

    // A failed job's batch leaves nothing behind.
    let mut txn = b.begin_batch().expect("begin");
    txn.put(Table::Meta, "m", b"v").expect("put");
    drop(txn);
    assert_eq!(get(&b, Table::Meta, "m"), None);
}

#[test]
fn locking_reads_make_concurrent_increments_exact() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = Arc::new(db.backend("a"));
    let b = Arc::new(db.backend("b"));
    write(&a, |t| t.put(Table::Meta, "counter", b"0")).expect("seed");

    // First: two batches read the same key at the same moment; the second read waits
    // for the first batch's commit, so exactly one of them sees the old value.
    let barrier = Arc::new(Barrier::new(2));
    let seen: Vec<Vec<u8>> = [a.clone(), b.clone()]
        .into_iter()
        .map(|backend| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut txn = backend.begin_batch().expect("begin");
                barrier.wait();
                let v = txn.get(Table::Meta, "counter").expect("get").expect("set");
                let n: u32 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                // Hold the lock a little, so the other batch really waits on it.
                std::thread::sleep(Duration::from_millis(100));
                txn.put(Table::Meta, "counter", (n + 1).to_string().as_bytes())
                    .expect("put");
                txn.commit().expect("commit");
                v
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let mut seen = seen;
    seen.sort();
    assert_eq!(
        seen,
        vec![b"0".to_vec(), b"1".to_vec()],
        "one saw the old value"
    );
    assert_eq!(get(&a, Table::Meta, "counter"), Some(b"2".to_vec()));

    // Then many read-modify-writes from both instances: none is lost.
    let per = 25;
    let handles: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|backend| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    loop {
                        let r = write(&backend, |t| {
                            let v = t.get(Table::Meta, "counter")?.expect("set");
                            let n: u32 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                            t.put(Table::Meta, "counter", (n + 1).to_string().as_bytes())
                        });
                        match r {
                            Ok(()) => break,
                            Err(StoreError::Aborted(_)) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(
        get(&a, Table::Meta, "counter"),
        Some((2 + 2 * per).to_string().into_bytes())
    );
}

#[test]
fn an_absent_key_inserted_by_two_batches_commits_once() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    let b = db.backend("b");
    let mut ta = a.begin_batch().expect("begin a");
    let mut tb = b.begin_batch().expect("begin b");
    assert_eq!(ta.get(Table::Credentials, "k").expect("get"), None);
    assert_eq!(tb.get(Table::Credentials, "k").expect("get"), None);
    ta.put(Table::Credentials, "k", b"a").expect("put");
    tb.put(Table::Credentials, "k", b"b").expect("put");
    ta.commit().expect("the first commits");
    let err = tb.commit().expect_err("the second must not overwrite");
    assert!(matches!(err, StoreError::Aborted(_)), "{err:?}");
    assert_eq!(get(&a, Table::Credentials, "k"), Some(b"a".to_vec()));

    // While the first is still open, the second's insert waits for it, then fails.
    let a = Arc::new(a);
    let mut ta = a.begin_batch().expect("begin a");
    assert_eq!(ta.get(Table::Credentials, "k2").expect("get"), None);
    ta.put(Table::Credentials, "k2", b"a").expect("put");
    ta.count(Table::Credentials).expect("flushes the insert");
    let waiter = std::thread::spawn(move || {
        let mut tb = b.begin_batch().expect("begin b");
        assert_eq!(tb.get(Table::Credentials, "k2").expect("get"), None);
        tb.put(Table::Credentials, "k2", b"b").expect("put");
        tb.commit()
    });
    std::thread::sleep(Duration::from_millis(200));
    ta.commit().expect("commit a");
    let err = waiter.join().expect("thread").expect_err("b fails");
    assert!(matches!(err, StoreError::Aborted(_)), "{err:?}");
    assert_eq!(get(&a, Table::Credentials, "k2"), Some(b"a".to_vec()));
}

#[test]
fn get_many_is_one_locking_read_with_gets_semantics() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    let b = Arc::new(db.backend("b"));
    write(&a, |t| t.put(Table::Credentials, "p", b"1")).expect("seed");
    let keys: Vec<String> = ["q", "p", "p", "r"].map(str::to_owned).to_vec();
    let mut ta = a.begin_batch().expect("begin a");
    ta.put(Table::Credentials, "r", b"own").expect("own write");
    assert_eq!(
        ta.get_many(Table::Credentials, &keys).expect("get_many"),
        [
            None,
            Some(b"1".to_vec()),
            Some(b"1".to_vec()),
            Some(b"own".to_vec())
        ]
    );
    // "p" is row-locked by it: another batch's locking read waits for the commit.
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let mut tb = b.begin_batch().expect("begin b");
            let seen = tb.get(Table::Credentials, "p").expect("get");
            tb.put(Table::Credentials, "p", b"3").expect("put");
            tb.commit().expect("commit b");
            (seen, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // "q" was read as absent: a plain INSERT.
    ta.put(Table::Credentials, "q", b"2").expect("put");
    ta.put(Table::Credentials, "p", b"2").expect("put");
    let committed = Instant::now();
    ta.commit().expect("commit a");
    let (seen, at) = waiter.join().expect("thread");
    assert_eq!(seen, Some(b"2".to_vec()), "b read after a's commit");
    assert!(at >= committed);
    assert_eq!(get(&a, Table::Credentials, "q"), Some(b"2".to_vec()));

    // A key read absent by get_many and inserted meanwhile by another batch: this
    // batch's plain INSERT is refused, never a silent overwrite.
    let mut ta = a.begin_batch().expect("begin a");
    let z = ["z".to_owned()];
    assert_eq!(
        ta.get_many(Table::Credentials, &z).expect("get_many"),
        [None]
    );
    write(&b, |t| t.put(Table::Credentials, "z", b"b")).expect("b inserts z");
    ta.put(Table::Credentials, "z", b"a").expect("put");
    let err = ta.commit().expect_err("must not overwrite");
    assert!(matches!(err, StoreError::Aborted(_)), "{err:?}");
    assert_eq!(get(&a, Table::Credentials, "z"), Some(b"b".to_vec()));
}

#[test]
fn prefetch_locks_like_get_and_answers_the_jobs_gets() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    let b = Arc::new(db.backend("b"));
    write(&a, |t| t.put(Table::Credentials, "p", b"1")).expect("seed");
    let mut ta = a.begin_batch().expect("begin a");
    let keys: Vec<String> = ["q", "p", "p"].map(str::to_owned).to_vec();
    ta.prefetch(Table::Credentials, &keys).expect("prefetch");
    // "p" is row-locked since the prefetch: another batch's locking read waits.
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let mut tb = b.begin_batch().expect("begin b");
            let seen = tb.get(Table::Credentials, "p").expect("get");
            tb.commit().expect("commit b");
            (seen, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Answered from the batch: the row changes behind it cannot happen (locked), and a
    // key prefetched as absent is flushed with a plain INSERT.
    assert_eq!(
        ta.get(Table::Credentials, "p").expect("get"),
        Some(b"1".to_vec())
    );
    assert_eq!(ta.get(Table::Credentials, "q").expect("get"), None);
    ta.put(Table::Credentials, "p", b"2").expect("put");
    let committed = Instant::now();
    ta.commit().expect("commit a");
    let (seen, at) = waiter.join().expect("thread");
    assert_eq!(seen, Some(b"2".to_vec()), "b read after a's commit");
    assert!(at >= committed);

    let mut ta = a.begin_batch().expect("begin a");
    ta.prefetch(Table::Credentials, &["z".to_owned()])
        .expect("prefetch");
    write(&b, |t| t.put(Table::Credentials, "z", b"b")).expect("b inserts z");
    assert_eq!(ta.get(Table::Credentials, "z").expect("get"), None);
    ta.put(Table::Credentials, "z", b"a").expect("put");
    let err = ta.commit().expect_err("must not overwrite");
    assert!(matches!(err, StoreError::Aborted(_)), "{err:?}");
    assert_eq!(get(&a, Table::Credentials, "z"), Some(b"b".to_vec()));
}

#[test]
fn insert_new_does_not_read_and_a_taken_key_fails_the_batch() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    write(&a, |t| t.put(Table::Evidence, "taken", b"1")).expect("seed");
    write(&a, |t| t.insert_new(Table::Evidence, "fresh", b"2")).expect("insert_new");
    assert_eq!(get(&a, Table::Evidence, "fresh"), Some(b"2".to_vec()));
    let mut ta = a.begin_batch().expect("begin");
    ta.insert_new(Table::Evidence, "taken", b"3")
        .expect("not read: refused at the flush");
    ta.put(Table::Evidence, "other", b"4").expect("put");
    let err = ta.commit().expect_err("the primary key refuses it");
    assert!(matches!(err, StoreError::Aborted(_)), "{err:?}");
    assert_eq!(get(&a, Table::Evidence, "taken"), Some(b"1".to_vec()));
    assert_eq!(get(&a, Table::Evidence, "other"), None);
    // A key this batch already holds is refused at once.
    let mut ta = a.begin_batch().expect("begin");
    ta.put(Table::Evidence, "mine", b"5").expect("put");
    let err = ta
        .insert_new(Table::Evidence, "mine", b"6")
        .expect_err("held");
    assert_eq!(err.0, StoreError::AlreadyExists);
}

#[test]
fn a_scan_in_a_batch_merges_its_unflushed_writes() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    write(&a, |t| {
        // Only this test's keys in meta: without the event head migration 2 creates.
        t.delete(Table::Meta, crate::store::events::HEAD_KEY)?;
        for k in ["b", "d", "f", "h"] {
            t.put(Table::Meta, k, k.as_bytes())?;
        }
        Ok(())
    })
    .expect("seed");
    let mut ta = a.begin_batch().expect("begin");
    ta.put(Table::Meta, "a", b"new").expect("put");
    ta.put(Table::Meta, "d", b"changed").expect("put");
    assert!(ta.delete(Table::Meta, "b").expect("delete"));
    ta.put(Table::Meta, "z", b"past the limit").expect("put");
    let keys = |rows: Vec<(String, Vec<u8>)>| -> Vec<(String, String)> {
        rows.into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).expect("utf-8")))
            .collect()
    };
    let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert_eq!(
        keys(ta.scan(Table::Meta, &KeyRange::all(), 3).expect("scan")),
        [kv("a", "new"), kv("d", "changed"), kv("f", "f")]
    );
    assert_eq!(
        keys(ta.scan(Table::Meta, &KeyRange::all(), 10).expect("scan")),
        [
            kv("a", "new"),
            kv("d", "changed"),
            kv("f", "f"),
            kv("h", "h"),
            kv("z", "past the limit")
        ]
    );
    let after_d = KeyRange {
        start: "d".into(),
        after: true,
        end: Some("y".into()),
    };
    assert_eq!(
        keys(ta.scan(Table::Meta, &after_d, 10).expect("scan")),
        [kv("f", "f"), kv("h", "h")]
    );
    // Nothing was flushed by the scans: another session still sees the old rows.
    assert_eq!(get(&a, Table::Meta, "a"), None);
    ta.commit().expect("commit");
    assert_eq!(get(&a, Table::Meta, "a"), Some(b"new".to_vec()));
    assert_eq!(get(&a, Table::Meta, "b"), None);
}

#[test]
fn get_committed_reads_the_committed_value() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("a");
    write(&a, |t| t.put(Table::Credentials, "k", b"v")).expect("seed");
    assert_eq!(
        a.get_committed(Table::Credentials, "k").expect("get"),
        Some(b"v".to_vec())
    );
    assert_eq!(
        a.get_committed(Table::Credentials, "none").expect("get"),
        None
    );
}

#[test]
fn a_taken_audit_seq_fails_the_batch() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let b = db.backend("a");
    write(&b, |t| {
        assert_eq!(t.audit_last("a")?, None);
        t.audit_put("a", 1, b"one")?;
        t.audit_put("a", 2, b"two")?;
        assert_eq!(t.audit_last("a")?, Some((2, b"two".to_vec())));
        assert_eq!(t.audit_count("a")?, 2);
        Ok(())
    })
    .expect("batch");
    let mut t = b.begin_batch().expect("begin");
    assert!(t.audit_put("a", 3, b"three").is_ok());
    assert!(
        t.audit_put("a", 3, b"again").is_err(),
        "taken in this batch"
    );
    drop(t);
    let mut t = b.begin_batch().expect("begin");
    t.audit_put("a", 2, b"other").expect("refused at the flush");
    t.put(Table::Meta, "with-it", b"x").expect("put");
    assert!(matches!(t.commit(), Err(StoreError::Aborted(_))));
    assert_eq!(
        get(&b, Table::Meta, "with-it"),
        None,
        "nothing of it committed"
    );

    write(&b, |t| t.audit_put("z", 1, b"z1")).expect("another chain");
    assert_eq!(read(&b, |r| r.audit_chains()), vec!["a", "z"]);
    assert_eq!(
        read(&b, |r| r.audit_range("a", 2, 10)),
        vec![(2, b"two".to_vec())]
    );
    assert_eq!(read(&b, |r| r.audit_last("a")), Some((2, b"two".to_vec())));
}

#[test]
fn a_read_is_one_snapshot() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let b = db.backend("a");
    write(&b, |t| t.put(Table::Meta, "k", b"old")).expect("seed");
    let mut first = None;
    let mut second = None;
    b.read(&mut |r| {
        first = r.get(Table::Meta, "k").map_err(|e| e.0)?;
        write(&b, |t| {
            t.put(Table::Meta, "k", b"new")?;
            t.put(Table::Meta, "k2", b"new")
        })?;
        second = r.get(Table::Meta, "k").map_err(|e| e.0)?;
        // "k" and the event head (migration 2).
        assert_eq!(r.count(Table::Meta).map_err(|e| e.0)?, 2);
        Ok(())
    })
    .expect("read");
    assert_eq!(first, Some(b"old".to_vec()));
    assert_eq!(second, Some(b"old".to_vec()));
    assert_eq!(get(&b, Table::Meta, "k"), Some(b"new".to_vec()));
}

#[test]
fn a_second_instance_with_the_same_chain_is_refused() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let a = db.backend("same");
    let err = PgBackend::open(&db.options("same")).expect_err("refused");
    assert!(err.to_string().contains("store.instance"), "{err}");
    drop(a);
    drop(db.backend("same"));
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connection_loss_fails_the_batch_then_recovers() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let b = db.backend("a");
    write(&b, |t| t.put(Table::Meta, "k", b"before")).expect("seed");
    assert_eq!(get(&b, Table::Meta, "k"), Some(b"before".to_vec()));
    assert!(b.healthy());

    // A batch in flight when every session dies: an error, never an Ok.
    let mut t = b.begin_batch().expect("begin");
    assert_eq!(
        t.get(Table::Meta, "k").expect("get"),
        Some(b"before".to_vec())
    );
    t.put(Table::Meta, "k", b"lost").expect("buffered");
    db.kill_sessions();
    let err = t.commit().expect_err("no commit without a database");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");

    // The next batch reconnects (and takes the chain lock again); reads get a fresh
    // pooled connection.
    write(&b, |t| t.put(Table::Meta, "k", b"after")).expect("reconnected");
    assert_eq!(get(&b, Table::Meta, "k"), Some(b"after".to_vec()));

    // Unreachable: batches and reads fail, health goes NOT_SERVING, then comes back.
    db.allow_connections(false);
    db.kill_sessions();
    let err = write(&b, |t| t.put(Table::Meta, "k", b"refused")).expect_err("refused");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    wait_for("unhealthy", || !b.healthy());
    let mut out = Ok(());
    let r = b.read(&mut |r| {
        out = r.get(Table::Meta, "k").map(|_| ());
        Ok(())
    });
    assert!(
        r.is_err() || out.is_err(),
        "a read without a database fails"
    );
    db.allow_connections(true);
    wait_for("healthy", || b.healthy());
    write(&b, |t| t.put(Table::Meta, "k", b"back")).expect("back");
    assert_eq!(get(&b, Table::Meta, "k"), Some(b"back".to_vec()));
}

#[test]
fn a_ca_file_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").expect("write");
    let mut o = super::PgOptions::new("postgresql://hsm@127.0.0.1:1/hsm", "a");
    o.ca_file = Some(ca);
    let err = PgBackend::open(&o).expect_err("refused before connecting");
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("holds no certificate")),
        "{err:?}"
    );
    o.ca_file = Some(dir.path().join("missing.pem"));
    let err = PgBackend::open(&o).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("store.ca_file")),
        "{err:?}"
    );
}

/// A throw-away CA certificate (PEM) that signed nothing the test cluster serves.
fn unrelated_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "not the database's CA");
    let cert = p.self_signed(&key).expect("self-signed");
    let path = dir.join("other-ca.pem");
    std::fs::write(&path, cert.pem()).expect("write CA");
    path
}

/// With `ca_file` set every session the backend opens (committer and pool) is TLS, and
/// the server's certificate was verified against that CA and the URL's host.
#[test]
fn tls_with_the_right_ca_verifies_the_server() {
    let (Some(db), Some(ca)) = (TestDatabase::create(), super::testing::cluster_ca()) else {
        return;
    };
    let mut o = db.options("tls");
    o.ca_file = Some(ca);
    let b = PgBackend::open(&o).expect("open over TLS");
    write(&b, |t| t.put(Table::Meta, "k", b"over tls")).expect("batch");
    assert_eq!(get(&b, Table::Meta, "k"), Some(b"over tls".to_vec()));
    let sessions = |ssl: bool| {
        db.query_text(&format!(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = '{}' AND a.application_name = 'hsm-service/tls' AND s.ssl = {ssl}",
            db.name
        ))
        .and_then(|n| n.parse::<u32>().ok())
        .expect("count")
    };
    // The committer and at least one pooled reader.
    assert!(sessions(true) >= 2, "TLS sessions: {}", sessions(true));
    assert_eq!(sessions(false), 0, "a plaintext session");
}

/// A server certificate from another CA: one clear error naming `store.ca_file`, and no
/// session reaches the database.
#[test]
fn tls_with_a_wrong_ca_is_refused() {
    let (Some(db), Some(_)) = (TestDatabase::create(), super::testing::cluster_ca()) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = db.options("tls");
    o.ca_file = Some(unrelated_ca(dir.path()));
    let err = PgBackend::open(&o).expect_err("refused");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(
        text.contains("store.ca_file") && text.contains("certificate"),
        "{text}"
    );

    // The right CA, but the URL names a host the certificate is not for (the address
    // is the cluster's, through `hostaddr`): refused as well.
    let (Some(at), Some(ca)) = (db.url.find("@127.0.0.1:"), super::testing::cluster_ca()) else {
        panic!("the test cluster's URL names 127.0.0.1: {}", db.url);
    };
    let mut o = db.options("tls");
    o.url = format!(
        "{}@not-the-database.example:{}?hostaddr=127.0.0.1",
        &db.url[..at],
        &db.url[at + "@127.0.0.1:".len()..]
    );
    o.ca_file = Some(ca);
    let err = PgBackend::open(&o).expect_err("refused");
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains("store.ca_file") && text.contains("NotValidForName"),
        "{text}"
    );

    assert_eq!(
        db.query_text(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND application_name = 'hsm-service/tls'",
            db.name
        ))
        .as_deref(),
        Some("0")
    );
}

/// A server that answers the TLS request "no" (as PostgreSQL with `ssl = off` does):
/// with `ca_file` set the backend refuses it and never falls back to plaintext: after
/// the 8-byte SSLRequest the server receives nothing (no start-up message, so no user
/// name, no password exchange).
#[test]
fn tls_to_a_server_without_tls_is_refused_not_downgraded() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Every connection: what it sent after refusing TLS.
            let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (mut s, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut first = [0u8; 8];
                s.read_exact(&mut first).expect("first message");
                s.write_all(b"N").expect("refuse TLS");
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                seen.push((first.to_vec(), rest));
            }
            seen
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = super::PgOptions::new(format!("postgresql://hsm@127.0.0.1:{port}/hsm"), "a");
    o.ca_file = Some(unrelated_ca(dir.path()));
    let err = PgBackend::open(&o).expect_err("refused");
    stop.store(true, Ordering::Relaxed);
    let seen = server.join().expect("server");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains("TLS"), "{text}");
    assert!(!seen.is_empty(), "the backend connected");
    for (first, rest) in &seen {
        assert_eq!(first, &SSL_REQUEST, "the first message asks for TLS");
        assert!(rest.is_empty(), "plaintext after a refused TLS: {rest:?}");
    }
}

/// A statement waiting longer than `statement_timeout` (a locking read behind another
/// instance's row lock) fails the batch with a retryable error; the same session then
/// serves the next batch.
#[test]
fn a_statement_over_the_timeout_fails_retryably_and_the_session_recovers() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let holder = db.backend("holder");
    write(&holder, |t| t.put(Table::Meta, "k", b"0")).expect("seed");
    let mut o = db.options("waiter");
    o.statement_timeout = Duration::from_millis(300);
    let waiter = PgBackend::open(&o).expect("open");
    let pid = || {
        db.query_text(&format!(
            "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'hsm-service/waiter'",
            db.name
        ))
    };
    let sessions_before = pid();

    let mut held = holder.begin_batch().expect("begin");
    assert_eq!(
        held.get(Table::Meta, "k").expect("lock"),
        Some(b"0".to_vec())
    );
    let started = Instant::now();
    let mut t = waiter.begin_batch().expect("begin");
    let err = t.get(Table::Meta, "k").expect_err("timed out").0;
    let waited = started.elapsed();
    drop(t);
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        matches!(&err, StoreError::Aborted(m) if m.contains("57014")),
        "{err:?}"
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    held.put(Table::Meta, "k", b"1").expect("buffered");
    held.commit().expect("holder commits");

    // The waiter's committer session survived the cancelled statement: no reconnect.
    write(&waiter, |t| {
        let v = t.get(Table::Meta, "k")?;
        assert_eq!(v, Some(b"1".to_vec()));
        t.put(Table::Meta, "k", b"2")
    })
    .expect("the next batch");
    assert_eq!(get(&holder, Table::Meta, "k"), Some(b"2".to_vec()));
    assert_eq!(pid(), sessions_before, "the same sessions");
}

mod store {
    //! The [`crate::store::Store`] handle (group commit, typed operations) over
    //! PostgreSQL, with two instances on one database.

    use std::sync::Arc;

    use crate::store::postgres::testing::{test_postgres_store, TestDatabase};
    use crate::store::test_support::{rec, T};
    use crate::store::{CredentialStore, Store, StoreError, Update};

    async fn two_instances() -> Option<(Arc<Store>, Arc<Store>, TestDatabase)> {
        tokio::task::spawn_blocking(|| {
            let db = TestDatabase::create()?;
            Some((db.store("one"), db.store("two"), db))
        })
        .await
        .expect("set-up")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn round_trip_through_the_store() {
        let Some(t) = tokio::task::spawn_blocking(test_postgres_store)
            .await
            .expect("set-up")
        else {
            return;
        };
        let store = t.store.clone();
        assert_eq!(store.kind(), "postgres");
        assert!(store.healthy());
        for id in ["b", "a", "c"] {
            store.insert(rec(id)).await.expect("insert");
        }
        assert_eq!(store.insert(rec("a")).await, Err(StoreError::AlreadyExists));
        assert_eq!(store.count().await.unwrap(), 3);
        assert_eq!(store.get(T, "a").await.unwrap(), Some(rec("a")));
        let ids: Vec<String> = store
            .list(Some(T), None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(store.delete(T, "b").await.unwrap());
        assert!(!store.delete(T, "b").await.unwrap());
        assert_eq!(store.count().await.unwrap(), 2);
        drop(store);
        drop(t);
    }

    /// The replay check of the hot path, 32 concurrent calls spread over two instances:
    /// exactly one accepts the step.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replay_check_accepts_exactly_once_across_two_instances() {
        let Some((one, two, _db)) = two_instances().await else {
            return;
        };
        one.insert(rec("a")).await.expect("insert");
        let mut tasks = Vec::new();
        for i in 0..32 {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
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
            if t.await.unwrap().expect("update") {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 1);
        assert_eq!(
            two.get(T, "a").await.unwrap().unwrap().last_accepted,
            Some(5)
        );
    }

    /// Failure counts from both instances add up exactly (no lost update).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failure_counts_are_exact_across_two_instances() {
        let Some((one, two, _db)) = two_instances().await else {
            return;
        };
        one.insert(rec("a")).await.expect("insert");
        let mut tasks = Vec::new();
        for i in 0..40 {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            tasks.push(tokio::spawn(async move {
                s.update(T, "a", |r| {
                    r.failures += 1;
                    Update::Write(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("update");
        }
        assert_eq!(one.get(T, "a").await.unwrap().unwrap().failures, 40);
    }

    /// The same new id created on both instances at once: one wins; every other call
    /// either sees it (AlreadyExists) or lost the race and was rolled back (Aborted,
    /// answered UNAVAILABLE: retry).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_concurrent_insert_of_an_id_wins() {
        let Some((one, two, _db)) = two_instances().await else {
            return;
        };
        let mut tasks = Vec::new();
        for i in 0..16u32 {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            tasks.push(tokio::spawn(async move {
                let mut r = rec("new");
                r.failures = i;
                (i, s.insert(r).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Ok(())) => winners.push(i),
                (_, Err(StoreError::AlreadyExists | StoreError::Aborted(_))) => {}
                (_, Err(e)) => panic!("{e}"),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let stored = two.get(T, "new").await.unwrap().expect("stored");
        assert_eq!(stored.failures, winners[0]);
    }
}
