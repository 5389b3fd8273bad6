//! The store conformance suite: one set of cases, written once against the storage
//! interface ([`Store`] over a [`hsm_service::store::Backend`], the unit of work's
//! [`Txn`]/[`ReadTxn`], and the domain modules' own record functions on top), run with the
//! same assertions against every backend. A case is `async fn case(env: &Env)`; the
//! `conformance!` macro at the bottom instantiates each one per backend, so a failure is
//! named `redb::<case>` or `postgres::<case>`.
//!
//! "Instances": [`Env::handle`] spreads a case's concurrent jobs over the env's store
//! handles. The embedded store has one (an embedded file serves one process); PostgreSQL
//! gets two [`Store`]s (two committers, two connections, two audit chains) on one
//! database, as two service instances would be, so every exactly-once case is also
//! decided across instances.
//!
//! PostgreSQL cases need `HSM_TEST_POSTGRES_URL` (`scripts/test.sh` starts a private
//! cluster and exports it): without it they print one line and pass, except under
//! `CI=true`, where they fail.
//!
//! Every case runs on a plain test thread with a runtime of its own, and the env is
//! dropped after that runtime, off any runtime: a blocking database client must not be
//! dropped on a runtime worker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hsm_service::audit::{self, Actor, Event};
use hsm_service::ceremony::record::{self as ceremony, Approval, CeremonyRecord, CeremonyState};
use hsm_service::ceremony::record::{Change, Officer};
use hsm_service::ceremony::shares::{self, KekRecord};
use hsm_service::common::AuthMethod;
use hsm_service::credentials::policy::{self, Policy, Verdict};
use hsm_service::otp::{HashAlgorithm, OtpKind};
use hsm_service::store::events;
use hsm_service::store::evidence::{self, Spend, PURGE_GRACE_SECONDS};
use hsm_service::store::{
    ops, CredentialRecord, CredentialStore, EvidenceRecord, KeyRange, ReadTxn, Rollback, Store,
    StoreError, StoreOptions, Table, DEFAULT_CHAIN,
};

/// Unix seconds every case calls "now".
const NOW: u64 = 1_750_000_000;

/// The tenant of every credential here.
const TENANT: &str = "conformance";

// ---------------------------------------------------------------------------------------
// Environments
// ---------------------------------------------------------------------------------------

/// One service instance's view: its store and the audit chain it appends to.
struct Handle {
    store: Arc<Store>,
    chain: String,
}

/// The stores a case runs against, and what keeps their storage alive (dropped last).
struct Env {
    handles: Vec<Handle>,
    _storage: Box<dyn std::any::Any>,
}

impl Env {
    /// The first instance's store.
    fn store(&self) -> &Arc<Store> {
        &self.handles[0].store
    }

    /// The instance job `i` runs on (round robin).
    fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Every chain some instance appends to.
    fn chains(&self) -> Vec<String> {
        let set: BTreeSet<String> = self.handles.iter().map(|h| h.chain.clone()).collect();
        set.into_iter().collect()
    }
}

/// An embedded store in a temporary directory.
fn redb_env() -> Option<Env> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open_redb(&dir.path().join("store.redb"), StoreOptions::default())
        .expect("open the embedded store");
    Some(Env {
        handles: vec![Handle {
            store: Arc::new(store),
            chain: DEFAULT_CHAIN.to_owned(),
        }],
        _storage: Box::new(dir),
    })
}

/// Two instances on one fresh PostgreSQL database (chains `default` and `second`);
/// `None` (after one printed line) without a test cluster, a panic under `CI=true`.
fn postgres_env() -> Option<Env> {
    let pg = hsm_service::store::postgres::testing::test_postgres_store()?;
    let second = pg.db.store("second");
    Some(Env {
        handles: vec![
            Handle {
                store: pg.store,
                chain: DEFAULT_CHAIN.to_owned(),
            },
            Handle {
                store: second,
                chain: "second".to_owned(),
            },
        ],
        _storage: Box::new(pg.db),
    })
}

/// Runs one case on a runtime of its own, then drops the env off the runtime.
fn run_case<'a, Fut: Future<Output = ()> + 'a>(env: &'a Env, case: impl FnOnce(&'a Env) -> Fut) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(case(env));
    drop(rt);
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Retries `op` while it answers [`StoreError::Aborted`] (a batch rolled back, e.g. a
/// conflict with another instance: nothing of it was written, and the error says it is
/// safe to retry). Any other answer is returned.
async fn retrying<T, Fut>(mut op: impl FnMut() -> Fut) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0u64;
    loop {
        match op().await {
            Err(StoreError::Aborted(_)) if attempt < 100 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(1 + attempt % 8)).await;
            }
            other => return other,
        }
    }
}

/// Spawns `n` futures, the `i`th made by `make(i)`, and waits for all of them (in order).
async fn spawn_all<T, Fut>(n: usize, make: impl Fn(usize) -> Fut) -> Vec<T>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("a job panicked"));
    }
    out
}

/// Runs `n` write jobs at once, job `i` made by `make(i)` and sent to [`Env::handle`]`(i)`
/// (each makes exactly one `Store::write` before it is answered): every instance's
/// committer is held (see [`gate`]) until all its jobs are queued, so they contend for
/// real: the jobs of one instance share one batch, and the batches of the instances
/// run at the same time. Answers in job order.
async fn concurrently<T, Fut>(env: &Env, n: usize, make: impl Fn(usize) -> Fut) -> Vec<T>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut gates = Vec::new();
    for h in &env.handles {
        gates.push(gate(&h.store).await);
    }
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let k = env.handles.len();
    for (j, h) in env.handles.iter().enumerate() {
        wait_queued(&h.store, (j..n).step_by(k).count()).await;
    }
    for (release, _) in &gates {
        release.send(()).expect("the gate waits");
    }
    for (_, task) in gates {
        task.await.expect("the gate job");
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("a job panicked"));
    }
    out
}

/// A meeting point of `n` jobs on different committers; gives up after a few seconds
/// (a backend whose read blocks until the other commits must not hang the suite).
struct Rendezvous {
    arrived: std::sync::Mutex<usize>,
    all: std::sync::Condvar,
    n: usize,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous {
            arrived: std::sync::Mutex::new(0),
            all: std::sync::Condvar::new(),
            n,
        }
    }

    fn wait(&self) {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all.notify_all();
        let (_guard, _timeout) = self
            .all
            .wait_timeout_while(arrived, Duration::from_secs(3), |a| *a < self.n)
            .unwrap();
    }
}

fn credential(id: &str) -> CredentialRecord {
    CredentialRecord {
        tenant: TENANT.to_owned(),
        id: id.to_owned(),
        subject: Some(format!("subject-of-{id}")),
        kind: OtpKind::Totp,
        algorithm: HashAlgorithm::Sha1,
        digits: 6,
        period_seconds: 30,
        t0: 0,
        wrapped_seed: vec![0x5a; 40],
        master_key_version: 1,
        seed_binding: Some([7; 32]),
        issuer: "Conformance".to_owned(),
        account_name: id.to_owned(),
        last_accepted: Some(100),
        next_counter: 0,
        drift_steps: 0,
        failures: 0,
        failure_times: Vec::new(),
        locked_until: 0,
        hard_locked: false,
        disabled: false,
        created_at: NOW - 3600,
        updated_at: NOW - 3600,
    }
}

fn evidence_record(id: &str, expires_at: u64) -> EvidenceRecord {
    EvidenceRecord {
        id: id.to_owned(),
        tenant: TENANT.to_owned(),
        credential_id: "c1".to_owned(),
        subject: "citizen".to_owned(),
        method: AuthMethod::Otp,
        auth_time: expires_at.saturating_sub(300),
        expires_at,
        spent_at: None,
        txn_text_sha256: None,
    }
}

fn officer(i: usize) -> Officer {
    Officer {
        subject: format!("officer-{i}"),
        fingerprint: format!("{i:064x}"),
    }
}

fn event(action: &'static str, object: &str) -> Event {
    Event::new(NOW * 1000, Actor::service(), action, object)
}

/// Every record of `chain` (seq, line), committed.
async fn chain_records(store: &Store, chain: &str) -> Vec<(u64, Vec<u8>)> {
    let chain = chain.to_owned();
    store
        .read(move |txn| Ok(txn.audit_range(&chain, 1, usize::MAX)?))
        .await
        .expect("read the audit chain")
}

/// Checks that `chain` holds seqs 1..=n without a gap and verifies with the audit
/// module's own verifier; returns its records.
async fn verified_chain(store: &Store, chain: &str) -> Vec<audit::AuditRecord> {
    let records = chain_records(store, chain).await;
    let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=records.len() as u64).collect();
    assert_eq!(seqs, expected, "chain {chain:?}: seqs are not 1..=n");
    let mut jsonl = Vec::new();
    for (_, line) in &records {
        jsonl.extend_from_slice(line);
        jsonl.push(b'\n');
    }
    let report = audit::verify(jsonl.as_slice(), &HashMap::new());
    assert!(report.is_ok(), "chain {chain:?} does not verify: {report}");
    assert_eq!(report.records, records.len() as u64);
    records
        .iter()
        .map(|(_, l)| {
            audit::AuditRecord::from_json_line(std::str::from_utf8(l).expect("utf-8 line"))
                .expect("a parseable record")
        })
        .collect()
}

/// Number of audit records of every chain of `env`.
async fn audit_total(env: &Env) -> u64 {
    let mut n = 0;
    for chain in env.chains() {
        let c = chain.clone();
        n += env
            .store()
            .read(move |txn| Ok(txn.audit_count(&c)?))
            .await
            .expect("audit count");
    }
    n
}

/// Occupies `store`'s committer with a job that blocks until the returned sender is
/// dropped or sent to, so that the jobs queued meanwhile form the next batch.
async fn gate(store: &Arc<Store>) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let s = store.clone();
    let task = tokio::spawn(async move {
        s.write(move |_txn| {
            started_tx.send(()).expect("the test waits for the gate");
            let _ = release_rx.recv();
            Ok::<(), Rollback>(())
        })
        .await
        .expect("the gate job commits");
    });
    tokio::task::spawn_blocking(move || {
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the gate job did not start")
    })
    .await
    .expect("waiting for the gate");
    (release, task)
}

/// Waits until `n` jobs wait in `store`'s queue.
async fn wait_queued(store: &Store, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.queued() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} jobs queued",
            store.queued()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn counter_value(bytes: Option<Vec<u8>>) -> Result<u64, Rollback> {
    match bytes {
        None => Ok(0),
        Some(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Rollback(StoreError::Corrupt("counter".into()))),
    }
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// Compare-and-set: a read of a key inside a unit of work, then a write of it, cannot be
/// overtaken by another job (of the same batch, of another batch, of another instance).
/// Each job returns what it read: those must be exactly 0..N, and the counter N.
async fn locking_read_then_write_is_not_overtaken(env: &Env) {
    const N: usize = 64;
    const KEY: &str = "conformance.counter";
    let seen = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        async move {
            retrying(|| {
                store.write(|txn| {
                    let current = counter_value(txn.get(Table::Meta, KEY)?)?;
                    txn.put(Table::Meta, KEY, (current + 1).to_string().as_bytes())?;
                    Ok(current)
                })
            })
            .await
            .expect("increment")
        }
    })
    .await;
    // And once more without holding the committers: batches form as they come.
    let free = spawn_all(N, |i| {
        let store = env.handle(i).store.clone();
        async move {
            retrying(|| {
                store.write(|txn| {
                    let current = counter_value(txn.get(Table::Meta, KEY)?)?;
                    txn.put(Table::Meta, KEY, (current + 1).to_string().as_bytes())?;
                    Ok(current)
                })
            })
            .await
            .expect("increment")
        }
    })
    .await;
    let seen: BTreeSet<u64> = seen.into_iter().chain(free).collect();
    assert_eq!(
        seen,
        (0..2 * N as u64).collect::<BTreeSet<_>>(),
        "two jobs read the same counter value: a read was overtaken"
    );
    for h in &env.handles {
        let v = h.store.get_meta(KEY).await.expect("read the counter");
        assert_eq!(counter_value(v).unwrap(), 2 * N as u64, "lost update");
    }
}

/// An insert of a taken key is refused (and `insert_many` is all or nothing); an insert
/// of one key by many jobs on every instance at once: exactly one wins, and its record
/// is the one stored.
async fn insert_of_a_taken_key_is_refused(env: &Env) {
    let store = env.store();
    store
        .insert(credential("taken"))
        .await
        .expect("first insert");
    let mut again = credential("taken");
    again.subject = Some("someone else".into());
    assert_eq!(store.insert(again).await, Err(StoreError::AlreadyExists));
    let kept = store.get(TENANT, "taken").await.unwrap().expect("kept");
    assert_eq!(kept.subject.as_deref(), Some("subject-of-taken"));
    assert_eq!(
        store
            .insert_many(vec![credential("fresh"), credential("taken")])
            .await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(store.get(TENANT, "fresh").await.unwrap(), None);
    assert_eq!(
        store.update(TENANT, "missing", |_| policy_keep()).await,
        Err(StoreError::NotFound)
    );

    // The first job of each instance waits, after its read found the key absent, until
    // every instance's has read it: all of them then believe it absent at once, and the
    // backend alone must keep more than one from committing.
    const N: usize = 32;
    let all_read = Arc::new(Rendezvous::new(env.handles.len()));
    let answers = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        let all_read = (i < env.handles.len()).then(|| all_read.clone());
        async move {
            let mut all_read = all_read;
            retrying(|| {
                let mut rec = credential("raced");
                rec.subject = Some(format!("job-{i}"));
                let wait = all_read.take();
                store.write(move |txn| {
                    let inserted = ops::insert(txn, &rec)?;
                    if let Some(w) = wait {
                        w.wait();
                    }
                    Ok(inserted)
                })
            })
            .await
            .and_then(|r| r)
        }
    })
    .await;
    let winners: Vec<usize> = (0..N).filter(|&i| answers[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "inserts that won: {winners:?}");
    for (i, a) in answers.iter().enumerate() {
        if i != winners[0] {
            assert_eq!(a, &Err(StoreError::AlreadyExists), "job {i}");
        }
    }
    for h in &env.handles {
        let stored = h.store.get(TENANT, "raced").await.unwrap().expect("stored");
        assert_eq!(stored.subject, Some(format!("job-{}", winners[0])));
    }
    assert_eq!(store.count().await.unwrap(), 2);
}

fn policy_keep() -> hsm_service::store::Update<()> {
    hsm_service::store::Update::Keep(())
}

/// 32 concurrent verifications of one valid code (the credential policy's own
/// `apply_verify`, through `update_with`, spread over every instance): exactly one
/// ACCEPTED, and only its effects (written in the same unit of work) are stored.
async fn replay_under_32_way_concurrency(env: &Env) {
    const N: usize = 32;
    const STEP: u64 = 101;
    let store = env.store();
    store.insert(credential("replayed")).await.unwrap();
    let verdicts = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        async move {
            retrying(|| {
                store.update_with(
                    TENANT,
                    "replayed",
                    |rec| policy::apply_verify(rec, Some(STEP), NOW, &Policy::default()),
                    move |outcome, txn| {
                        if outcome.verdict == Verdict::Accepted {
                            txn.put(Table::Meta, &format!("conformance.accepted/{i:02}"), b"")?;
                        }
                        Ok(())
                    },
                )
            })
            .await
            .expect("verify")
            .verdict
        }
    })
    .await;
    let accepted: Vec<usize> = (0..N)
        .filter(|&i| verdicts[i] == Verdict::Accepted)
        .collect();
    assert_eq!(accepted.len(), 1, "accepted by jobs {accepted:?}");
    assert!(
        verdicts
            .iter()
            .all(|v| matches!(v, Verdict::Accepted | Verdict::Replayed)),
        "{verdicts:?}"
    );
    let markers = store
        .read(|txn| Ok(ops::meta_with_prefix(txn, "conformance.accepted/")?))
        .await
        .unwrap();
    let markers: Vec<String> = markers.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        markers,
        vec![format!("conformance.accepted/{:02}", accepted[0])],
        "the effects of exactly the accepted verification are stored"
    );
    for h in &env.handles {
        let rec = h.store.get(TENANT, "replayed").await.unwrap().unwrap();
        assert_eq!(rec.last_accepted, Some(STEP));
    }
    // A later step is still accepted once; an earlier one is a replay.
    let again = store
        .update(TENANT, "replayed", |rec| {
            policy::apply_verify(rec, Some(STEP), NOW, &Policy::default())
        })
        .await
        .unwrap();
    assert_eq!(again.verdict, Verdict::Replayed);
}

/// Concurrent failures are counted exactly (no lost update): with the default policy,
/// 32 wrong codes at once give exactly `lockout_threshold` REJECTED (each seeing its own
/// count) and LOCKED for the rest; with a high threshold, 40 wrong codes count 40.
async fn lockout_counts_are_exact(env: &Env) {
    let store = env.store();
    let default = Policy::default();
    store.insert(credential("locking")).await.unwrap();
    let outcomes = concurrently(env, 32, |i| {
        let store = env.handle(i).store.clone();
        async move {
            retrying(|| {
                store.update(TENANT, "locking", |rec| {
                    policy::apply_verify(rec, None, NOW, &Policy::default())
                })
            })
            .await
            .expect("verify")
        }
    })
    .await;
    let rejected = outcomes
        .iter()
        .filter(|o| o.verdict == Verdict::Rejected)
        .count();
    let locked = outcomes
        .iter()
        .filter(|o| o.verdict == Verdict::Locked)
        .count();
    let verdicts: Vec<Verdict> = outcomes.iter().map(|o| o.verdict).collect();
    assert_eq!(rejected, default.lockout_threshold as usize, "{verdicts:?}");
    assert_eq!(rejected + locked, 32, "{verdicts:?}");
    let rec = store.get(TENANT, "locking").await.unwrap().unwrap();
    assert_eq!(rec.failures, default.lockout_threshold);
    assert_eq!(rec.failure_times.len(), default.lockout_threshold as usize);
    assert!(rec.locked_until > NOW, "locked after the threshold");

    const N: usize = 40;
    let lenient = Policy {
        lockout_threshold: 1000,
        ..Policy::default()
    };
    store.insert(credential("counting")).await.unwrap();
    let remaining = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        let p = lenient.clone();
        async move {
            retrying(|| {
                let p = p.clone();
                store.update(TENANT, "counting", move |rec| {
                    policy::apply_verify(rec, None, NOW, &p)
                })
            })
            .await
            .expect("verify")
            .remaining_attempts
        }
    })
    .await;
    let remaining: BTreeSet<u32> = remaining.into_iter().collect();
    assert_eq!(
        remaining,
        (1000 - N as u32..1000).collect::<BTreeSet<_>>(),
        "each failure saw its own count"
    );
    for h in &env.handles {
        let rec = h.store.get(TENANT, "counting").await.unwrap().unwrap();
        assert_eq!(rec.failures, N as u32, "lost failure counts");
        assert_eq!(rec.failure_times.len(), N);
    }
}

/// One evidence record spent by 32 concurrent jobs over every instance: exactly one
/// spends it, and the record says when.
async fn evidence_is_spent_exactly_once(env: &Env) {
    const N: usize = 32;
    let store = env.store();
    let e = evidence_record("0123456789abcdef0123456789abcdef", NOW + 300);
    let id = e.id.clone();
    store
        .write(move |txn| evidence::insert_in(txn, &e, NOW))
        .await
        .unwrap();
    let spent = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        let id = id.clone();
        async move {
            retrying(|| {
                let id = id.clone();
                store.write(move |txn| {
                    evidence::spend_in(txn, &id, |cur| match cur {
                        Some(e) if e.spent_at.is_none() && e.expires_at > NOW => {
                            Spend::Spend(NOW + i as u64, true)
                        }
                        _ => Spend::Refuse(false),
                    })
                })
            })
            .await
            .expect("spend")
            .expect("the evidence exists")
        }
    })
    .await;
    let winners: Vec<usize> = (0..N).filter(|&i| spent[i]).collect();
    assert_eq!(winners.len(), 1, "spent by jobs {winners:?}");
    for h in &env.handles {
        let rec = h.store.get_evidence(&id).await.unwrap().expect("kept");
        assert_eq!(rec.spent_at, Some(NOW + winners[0] as u64));
    }
}

/// Expired evidence is purged through the expiry index, oldest first (the index's key
/// order is expiry order, whatever the number of digits), from both tables.
async fn expired_evidence_is_purged_through_the_expiry_index(env: &Env) {
    let store = env.store();
    let stale_at = NOW - PURGE_GRACE_SECONDS - 1;
    // Inserted out of order; expiry times of different lengths.
    let stale: [(u64, &str); 6] = [
        (stale_at, "e6"),
        (5, "e1"),
        (123_456, "e4"),
        (40, "e2"),
        (stale_at - 1, "e5"),
        (300, "e3"),
    ];
    let fresh = [(NOW + 300, "f1"), (NOW + 10, "f0")];
    store
        .write(move |txn| {
            for (at, id) in stale.iter().chain(&fresh) {
                // `now` = 0: nothing is stale yet, nothing is purged by these inserts.
                evidence::insert_in(txn, &evidence_record(id, *at), 0)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(store.evidence_count().await.unwrap(), 8);
    let purged = store
        .write(|txn| evidence::purge_in(txn, NOW, 4))
        .await
        .unwrap();
    assert_eq!(purged, 4);
    let mut left = Vec::new();
    for id in ["e1", "e2", "e3", "e4", "e5", "e6", "f0", "f1"] {
        if store.get_evidence(id).await.unwrap().is_some() {
            left.push(id);
        }
    }
    assert_eq!(left, ["e5", "e6", "f0", "f1"], "the four oldest went first");
    let index = store
        .read(|txn| Ok(txn.scan(Table::EvidenceExpiry, &KeyRange::all(), usize::MAX)?))
        .await
        .unwrap();
    let indexed: Vec<String> = index.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        indexed,
        vec![
            evidence::expiry_key(stale_at - 1, "e5"),
            evidence::expiry_key(stale_at, "e6"),
            evidence::expiry_key(NOW + 10, "f0"),
            evidence::expiry_key(NOW + 300, "f1"),
        ]
    );
    // The next insert purges the rest of the stale ones.
    store
        .write(|txn| evidence::insert_in(txn, &evidence_record("f2", NOW + 300), NOW))
        .await
        .unwrap();
    assert_eq!(store.evidence_count().await.unwrap(), 3);
    assert_eq!(store.get_evidence("e6").await.unwrap(), None);
    let expiry_count = store
        .read(|txn| Ok(txn.count(Table::EvidenceExpiry)?))
        .await
        .unwrap();
    assert_eq!(expiry_count, 3);
}

/// A ceremony's claim (proposed -> executing, the transition `ceremony::execute` makes
/// with the same record function, audited in the same unit of work), tried by 32 jobs
/// over every instance: exactly one claims it, and exactly one audit record says so.
async fn ceremony_is_claimed_once(env: &Env) {
    const N: usize = 32;
    let id = "c".repeat(64);
    let rec = CeremonyRecord {
        id: id.clone(),
        canonical_plan: "plan".into(),
        plan_toml: "plan = true".into(),
        proposed_by: officer(100),
        proposed_at: NOW - 60,
        approvals: vec![
            Approval {
                officer: officer(101),
                approved_at: NOW - 30,
            },
            Approval {
                officer: officer(102),
                approved_at: NOW - 20,
            },
        ],
        state: CeremonyState::Proposed,
        executed_by: None,
        executed_at: 0,
        executed_on: String::new(),
        failure: String::new(),
        transcript_json: String::new(),
    };
    let key = id.clone();
    env.store()
        .write(move |txn| ceremony::update(txn, &key, |_| Change::Write(Box::new(rec), ())))
        .await
        .unwrap();
    let before = audit_total(env).await;
    let claims = concurrently(env, N, |i| {
        let h = env.handle(i);
        let (store, chain, id) = (h.store.clone(), h.chain.clone(), id.clone());
        async move {
            retrying(|| {
                let (chain, id) = (chain.clone(), id.clone());
                store.write(move |txn| {
                    let claimed = ceremony::update(txn, &id, |current| match current {
                        Some(mut rec) if rec.state == CeremonyState::Proposed => {
                            rec.state = CeremonyState::Executing;
                            rec.executed_by = Some(officer(i));
                            rec.executed_at = NOW;
                            Change::Write(Box::new(rec), true)
                        }
                        _ => Change::Keep(false),
                    })?;
                    if claimed {
                        audit::log::append_in(txn, &chain, event("ceremony.execute", &id))?;
                    }
                    Ok(claimed)
                })
            })
            .await
            .expect("claim")
        }
    })
    .await;
    let winners: Vec<usize> = (0..N).filter(|&i| claims[i]).collect();
    assert_eq!(winners.len(), 1, "claimed by jobs {winners:?}");
    for h in &env.handles {
        let id = id.clone();
        let rec = h
            .store
            .read(move |txn| ceremony::load(txn, &id))
            .await
            .unwrap()
            .expect("the ceremony");
        assert_eq!(rec.state, CeremonyState::Executing);
        assert_eq!(rec.executed_by, Some(officer(winners[0])));
    }
    assert_eq!(audit_total(env).await, before + 1);
}

/// Appends through `audit::log::append_in` from 64 concurrent jobs (on every instance,
/// each to its own chain): every chain holds seqs 1..n without a gap and verifies, and
/// every job's record is there once. A job rolled back leaves no record, and the next
/// append continues the chain.
async fn audit_chain_is_continuous(env: &Env) {
    const N: usize = 64;
    let seqs = concurrently(env, N, |i| {
        let h = env.handle(i);
        let (store, chain) = (h.store.clone(), h.chain.clone());
        async move {
            retrying(|| {
                let chain = chain.clone();
                store.write(move |txn| {
                    Ok(audit::log::append_in(
                        txn,
                        &chain,
                        event("conformance.append", &format!("job-{i}")),
                    )?
                    .seq)
                })
            })
            .await
            .expect("append")
        }
    })
    .await;
    let mut objects = BTreeMap::new();
    for chain in env.chains() {
        let records = verified_chain(env.store(), &chain).await;
        for r in records {
            *objects.entry(r.object.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(objects.len(), N, "every job's record is stored");
    assert!(objects.values().all(|&n| n == 1), "{objects:?}");
    assert!(seqs.iter().all(|&s| (1..=N as u64).contains(&s)));

    // Rolled back: nothing stays, and the chain goes on from its committed head.
    let h = &env.handles[0];
    let count_before = chain_records(&h.store, &h.chain).await.len() as u64;
    let chain = h.chain.clone();
    let failed = h
        .store
        .write(move |txn| -> Result<(), Rollback> {
            audit::log::append_in(txn, &chain, event("conformance.rolled-back", "x"))?;
            Err(Rollback(StoreError::Invalid("planted failure".into())))
        })
        .await;
    assert_eq!(failed, Err(StoreError::Invalid("planted failure".into())));
    let chain = h.chain.clone();
    let next = h
        .store
        .write(move |txn| {
            Ok(audit::log::append_in(txn, &chain, event("conformance.after", "y"))?.seq)
        })
        .await
        .unwrap();
    assert_eq!(next, count_before + 1, "the rolled-back record left a gap");
    let records = verified_chain(&h.store, &h.chain).await;
    assert!(records
        .iter()
        .all(|r| r.action != "conformance.rolled-back"));
    let chains = h.store.read(|txn| Ok(txn.audit_chains()?)).await.unwrap();
    assert_eq!(chains, env.chains());
    let chain = h.chain.clone();
    let last = h
        .store
        .read(move |txn| Ok(txn.audit_last(&chain)?))
        .await
        .unwrap()
        .expect("a head");
    assert_eq!(last.0, next);
}

/// Backup KEK records (`ceremony::shares::record_kek` / `load_keks`) round-trip, a label
/// is recorded once, and each record is audited in the same commit.
async fn kek_records_round_trip(env: &Env) {
    let h = &env.handles[0];
    let rec = |label: &str, threshold: u8| KekRecord {
        label: label.to_owned(),
        check: shares::kek_check_value(label.as_bytes()),
        threshold,
        shares: 5,
        created_at: NOW,
    };
    assert!(shares::load_keks(&h.store).await.unwrap().is_empty());
    shares::record_kek(&h.store, &h.chain, rec("kek-b", 3), Actor::service())
        .await
        .unwrap();
    let other = env.handle(1);
    shares::record_kek(
        &other.store,
        &other.chain,
        rec("kek-a", 2),
        Actor::service(),
    )
    .await
    .unwrap();
    let again = shares::record_kek(&h.store, &h.chain, rec("kek-a", 4), Actor::service()).await;
    assert!(
        matches!(again, Err(hsm_service::Error::AlreadyExists(_))),
        "{again:?}"
    );
    for h in &env.handles {
        let keks = shares::load_keks(&h.store).await.unwrap();
        let labels: Vec<&String> = keks.keys().collect();
        assert_eq!(labels, ["kek-a", "kek-b"]);
        assert_eq!(keks["kek-a"], rec("kek-a", 2));
        assert_eq!(keks["kek-b"], rec("kek-b", 3));
    }
    let mut audited = 0;
    for chain in env.chains() {
        audited += verified_chain(env.store(), &chain)
            .await
            .iter()
            .filter(|r| r.action == "backup-kek.create")
            .count();
    }
    assert_eq!(audited, 2, "one audit record per recorded KEK");
}

/// A job returning `Err(Rollback)` rolls back its whole batch: nothing of any job that
/// ran in it (credential, meta, evidence, audit record) is stored; those jobs are told
/// `Aborted`, the job itself its error, and the job queued after it runs in the next
/// batch and commits.
async fn rolled_back_batch_leaves_nothing(env: &Env) {
    let h = &env.handles[0];
    let store = &h.store;
    let audit_before = chain_records(store, &h.chain).await.len();
    let (release, gate_task) = gate(store).await;
    let spawn = |name: &'static str, fail: bool| {
        let (store, chain) = (store.clone(), h.chain.clone());
        tokio::spawn(async move {
            store
                .write(move |txn| {
                    if let Err(e) = ops::insert(txn, &credential(name))? {
                        return Err(Rollback(e));
                    }
                    txn.put(Table::Meta, &format!("conformance.rb/{name}"), b"1")?;
                    evidence::insert_in(
                        txn,
                        &evidence_record(&format!("ev-{name}"), NOW + 60),
                        NOW,
                    )?;
                    audit::log::append_in(txn, &chain, event("conformance.batch", name))?;
                    if fail {
                        return Err(Rollback(StoreError::Invalid("planted failure".into())));
                    }
                    Ok(())
                })
                .await
        })
    };
    let a = spawn("a", false);
    wait_queued(store, 1).await;
    let b = spawn("b", true);
    wait_queued(store, 2).await;
    let c = spawn("c", false);
    wait_queued(store, 3).await;
    release.send(()).unwrap();
    gate_task.await.unwrap();
    assert!(
        matches!(a.await.unwrap(), Err(StoreError::Aborted(_))),
        "a job of the rolled-back batch"
    );
    assert_eq!(
        b.await.unwrap(),
        Err(StoreError::Invalid("planted failure".into()))
    );
    assert_eq!(c.await.unwrap(), Ok(()), "the job after the failed one");
    for name in ["a", "b"] {
        assert_eq!(
            store.get(TENANT, name).await.unwrap(),
            None,
            "credential {name}"
        );
        assert_eq!(
            store
                .get_meta(&format!("conformance.rb/{name}"))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store.get_evidence(&format!("ev-{name}")).await.unwrap(),
            None
        );
    }
    assert!(store.get(TENANT, "c").await.unwrap().is_some());
    assert_eq!(store.evidence_count().await.unwrap(), 1);
    let records = verified_chain(store, &h.chain).await;
    assert_eq!(records.len(), audit_before + 1);
    assert_eq!(records.last().unwrap().object, "c");
}

/// Scans return keys in bytewise (UTF-8) order, inside a write (own writes merged in)
/// and in a snapshot; bounds and paging with `KeyRange { after: true }` are exact.
async fn scan_order_is_bytewise_and_paging_exact(env: &Env) {
    const KEYS: &[&str] = &[
        "b", "a\u{0}b", "aa", "\u{7f}", "a/b", "é", "B", "a0", "😀", "a", "z", "a\u{0}", "~",
        "\u{ffff}", "ab", "a\u{1}",
    ];
    let store = env.store();
    store
        .write(|txn| {
            for k in KEYS {
                txn.put(Table::CeremonyKeys, k, k.as_bytes())?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let mut sorted: Vec<String> = KEYS.iter().map(|k| (*k).to_owned()).collect();
    sorted.sort();
    let all = |txn: &mut dyn ReadTxn| -> Result<Vec<String>, StoreError> {
        Ok(txn
            .scan(Table::CeremonyKeys, &KeyRange::all(), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(k.as_bytes(), v.as_slice(), "value of {k:?}");
                k
            })
            .collect())
    };
    assert_eq!(store.read(all).await.unwrap(), sorted);

    // Paging: pages of 3 after the last key seen reassemble the table exactly.
    let mut paged = Vec::new();
    let mut range = KeyRange::all();
    loop {
        let r = range.clone();
        let page = store
            .read(move |txn| Ok(txn.scan(Table::CeremonyKeys, &r, 3)?))
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        assert!(paged.len() < KEYS.len(), "paging does not end: {paged:?}");
        range = KeyRange {
            start: page.last().unwrap().0.clone(),
            after: true,
            end: None,
        };
        paged.extend(page.into_iter().map(|(k, _)| k));
    }
    assert_eq!(paged, sorted);

    let scan = |range: KeyRange| {
        store.read(move |txn| {
            Ok(txn
                .scan(Table::CeremonyKeys, &range, usize::MAX)?
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>())
        })
    };
    let expect = |range: &KeyRange| -> Vec<String> {
        sorted
            .iter()
            .filter(|k| range.contains(k))
            .cloned()
            .collect()
    };
    let ranges = [
        KeyRange::prefix("a"),
        KeyRange::prefix("a\u{0}"),
        KeyRange {
            start: "a0".into(),
            after: false,
            end: Some("b".into()),
        },
        KeyRange {
            start: "a0".into(),
            after: true,
            end: Some("é".into()),
        },
        KeyRange {
            start: "a-missing".into(),
            after: true,
            end: None,
        },
        KeyRange {
            start: "z".into(),
            after: true,
            end: None,
        },
    ];
    for r in ranges {
        let want = expect(&r);
        assert_eq!(scan(r.clone()).await.unwrap(), want, "range {r:?}");
    }
    assert_eq!(
        scan(KeyRange::prefix("a")).await.unwrap(),
        ["a", "a\u{0}", "a\u{0}b", "a\u{1}", "a/b", "a0", "aa", "ab"]
    );

    // Inside a write: its own puts and deletes are part of the scan and the count.
    let seen = store
        .write(|txn| {
            txn.put(Table::CeremonyKeys, "ab0", b"ab0")?;
            assert!(txn.delete(Table::CeremonyKeys, "b")?);
            assert!(!txn.delete(Table::CeremonyKeys, "never")?);
            let keys: Vec<String> = txn
                .scan(Table::CeremonyKeys, &KeyRange::prefix("a"), usize::MAX)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            let after_ab = txn.scan(
                Table::CeremonyKeys,
                &KeyRange {
                    start: "ab".into(),
                    after: true,
                    end: None,
                },
                2,
            )?;
            Ok((keys, after_ab, txn.count(Table::CeremonyKeys)?))
        })
        .await
        .unwrap();
    assert_eq!(
        seen.0,
        ["a", "a\u{0}", "a\u{0}b", "a\u{1}", "a/b", "a0", "aa", "ab", "ab0"]
    );
    let after_ab: Vec<&str> = seen.1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(after_ab, ["ab0", "z"], "the deleted key is not scanned");
    assert_eq!(seen.2, KEYS.len() as u64);
    let mut now_sorted: Vec<String> = sorted.into_iter().filter(|k| k != "b").collect();
    now_sorted.push("ab0".into());
    now_sorted.sort();
    assert_eq!(store.read(all).await.unwrap(), now_sorted);
}

/// Meta keys starting with `store.` belong to the store: refused through the handle and
/// inside a unit of work (which stays clean and commits); other keys round-trip.
async fn meta_reserved_prefix_is_refused(env: &Env) {
    let store = env.store();
    assert!(matches!(
        store.put_meta("store.schema_version", b"99".to_vec()).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.put_meta("", b"x".to_vec()).await,
        Err(StoreError::Invalid(_))
    ));
    let inner = store
        .write(|txn| {
            let refused = ops::put_meta(txn, "store.planted", b"x")?;
            ops::put_meta(txn, "conformance.after-refusal", b"y")?.map_err(Rollback)?;
            Ok(refused)
        })
        .await
        .unwrap();
    assert!(matches!(inner, Err(StoreError::Invalid(_))), "{inner:?}");
    assert_eq!(store.get_meta("store.planted").await.unwrap(), None);
    assert_eq!(
        store.get_meta("conformance.after-refusal").await.unwrap(),
        Some(b"y".to_vec())
    );
    store
        .put_meta("conformance.k", vec![0, 1, 2, 255])
        .await
        .unwrap();
    for h in &env.handles {
        assert_eq!(
            h.store.get_meta("conformance.k").await.unwrap(),
            Some(vec![0, 1, 2, 255])
        );
    }
    assert_eq!(store.get_meta("conformance.none").await.unwrap(), None);
}

/// `Txn::insert_new` of a new key commits; of a taken key (committed earlier, or by
/// another instance) it fails its batch, at once or at the commit, and nothing of the
/// batch is written.
async fn insert_new_of_a_taken_key_fails_its_batch(env: &Env) {
    let store = env.store();
    store
        .write(|txn| txn.insert_new(Table::Meta, "conformance.new", b"1"))
        .await
        .expect("a new key");
    for h in &env.handles {
        assert_eq!(
            h.store.get_meta("conformance.new").await.unwrap(),
            Some(b"1".to_vec())
        );
    }
    let other = env.handle(env.handles.len() - 1).store.clone();
    let refused = other
        .write(|txn| {
            txn.put(Table::Meta, "conformance.beside", b"2")?;
            txn.insert_new(Table::Meta, "conformance.new", b"3")
        })
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        store.get_meta("conformance.new").await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(store.get_meta("conformance.beside").await.unwrap(), None);
}

/// A read is one snapshot: a commit that lands while it runs is invisible to it (and
/// does not wait for it), and readers never see half of a batch.
async fn read_snapshot_is_consistent(env: &Env) {
    let store = env.store().clone();
    store
        .write(|txn| {
            txn.put(Table::Meta, "conformance.x", b"0")?;
            txn.put(Table::Meta, "conformance.y", b"0")?;
            Ok(())
        })
        .await
        .unwrap();
    let (read_started_tx, read_started_rx) = std::sync::mpsc::channel::<()>();
    let (write_done_tx, write_done_rx) = std::sync::mpsc::channel::<()>();
    let reader = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            store.read_blocking(move |txn| {
                let x = txn.get(Table::Meta, "conformance.x")?;
                read_started_tx.send(()).unwrap();
                write_done_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the write committed while the read was open");
                let y = txn.get(Table::Meta, "conformance.y")?;
                let n = txn.count(Table::Meta)?;
                Ok((x, y, n))
            })
        })
    };
    tokio::task::spawn_blocking(move || read_started_rx.recv().unwrap())
        .await
        .unwrap();
    let count_before = store.read(|txn| Ok(txn.count(Table::Meta)?)).await.unwrap();
    store
        .write(|txn| {
            txn.put(Table::Meta, "conformance.x", b"1")?;
            txn.put(Table::Meta, "conformance.y", b"1")?;
            txn.put(Table::Meta, "conformance.z", b"1")?;
            Ok(())
        })
        .await
        .unwrap();
    write_done_tx.send(()).unwrap();
    let (x, y, n) = reader.await.unwrap().unwrap();
    assert_eq!(x.as_deref(), Some(&b"0"[..]));
    assert_eq!(y.as_deref(), Some(&b"0"[..]), "the read saw a later commit");
    assert_eq!(n, count_before, "the read's count saw a later commit");

    // Readers on every instance while one writer moves x and y together.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 2..60u32 {
                let v = i.to_string();
                store
                    .write(move |txn| {
                        txn.put(Table::Meta, "conformance.x", v.as_bytes())?;
                        txn.put(Table::Meta, "conformance.y", v.as_bytes())?;
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        })
    };
    let readers = spawn_all(4, |i| {
        let store = env.handle(i).store.clone();
        async move {
            for _ in 0..40 {
                let (x, y) = store
                    .read(|txn| {
                        Ok((
                            txn.get(Table::Meta, "conformance.x")?,
                            txn.get(Table::Meta, "conformance.y")?,
                        ))
                    })
                    .await
                    .unwrap();
                assert_eq!(x, y, "a read saw half of a batch");
            }
        }
    });
    readers.await;
    writer.await.unwrap();
}

/// Group commit: writes queued while the committer is busy share one commit.
async fn concurrent_writes_share_commits(env: &Env) {
    const N: usize = 64;
    for (n, h) in env.handles.iter().enumerate() {
        let store = &h.store;
        let before = store.stats();
        let (release, gate_task) = gate(store).await;
        let jobs: Vec<_> = (0..N)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |txn| {
                            txn.put(Table::Meta, &format!("conformance.gc/{n}/{i:03}"), b"1")?;
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        wait_queued(store, N).await;
        release.send(()).unwrap();
        gate_task.await.unwrap();
        for j in jobs {
            j.await.unwrap().expect("committed");
        }
        let after = store.stats();
        let commits = after.commits - before.commits;
        assert_eq!(after.committed_jobs - before.committed_jobs, N as u64 + 1);
        assert!(commits < N as u64, "{} jobs took {commits} commits", N + 1);
        assert_eq!(
            commits, 2,
            "the gate's commit and one for the {N} queued jobs"
        );
        let keys = store
            .read(move |txn| Ok(ops::meta_with_prefix(txn, &format!("conformance.gc/{n}/"))?))
            .await
            .unwrap();
        assert_eq!(keys.len(), N);
    }
}

fn new_event(object: &str) -> events::NewEvent {
    events::NewEvent {
        time_ms: NOW * 1000,
        kind: "credential.used".into(),
        tenant: TENANT.into(),
        subject: "citizen-1".into(),
        object_id: object.into(),
        critical: false,
        notify: false,
        details_json: "{}".into(),
    }
}

/// Event seqs follow commit order without holes, whatever the concurrency (on
/// PostgreSQL: two instances): concurrent appends get `head+1 ..= head+n`, each exactly
/// once; a reader polling snapshots meanwhile never sees a hole below the head it read;
/// a rolled-back append frees its seq; a slow transaction holding seq `n` makes every
/// other instance's append wait, so nothing commits `n + 1` before `n`.
async fn event_seqs_follow_commit_order(env: &Env) {
    const N: usize = 48;
    let start = env
        .store()
        .read(|txn| Ok(events::head(txn)?))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (env.store().clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = start;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (head, got) = store
                    .read(move |txn| {
                        let head = events::head(txn)?;
                        Ok((head, events::range(txn, seen + 1, usize::MAX)?))
                    })
                    .await
                    .unwrap();
                let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
                let want: Vec<u64> = (seen + 1..=head).collect();
                assert_eq!(seqs, want, "a snapshot holds every seq up to its head");
                seen = head;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            seen
        })
    };
    let seqs = concurrently(env, N, |i| {
        let store = env.handle(i).store.clone();
        async move {
            retrying(|| {
                let store = store.clone();
                async move {
                    store
                        .write(move |txn| events::append_in(txn, &new_event(&format!("e{i}"))))
                        .await
                }
            })
            .await
            .expect("append")
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    let got: BTreeSet<u64> = seqs.iter().copied().collect();
    let want: BTreeSet<u64> = (start + 1..=start + N as u64).collect();
    assert_eq!(got, want, "each seq exactly once");
    let stored = env
        .store()
        .read(move |txn| Ok(events::range(txn, start + 1, usize::MAX)?))
        .await
        .unwrap();
    for e in &stored {
        let i = seqs.iter().position(|s| *s == e.seq).unwrap();
        assert_eq!(e.event.object_id, format!("e{i}"), "seq {}", e.seq);
    }

    // A rolled-back append frees its seq.
    let failed = env
        .store()
        .write(|txn| {
            events::append_in(txn, &new_event("rolled-back"))?;
            Err::<(), _>(Rollback(StoreError::Invalid("planted".into())))
        })
        .await;
    assert!(failed.is_err());
    let next = env
        .store()
        .write(|txn| events::append_in(txn, &new_event("after")))
        .await
        .unwrap();
    assert_eq!(next, start + N as u64 + 1);

    // A slow transaction holds its seq; the other instance's append waits for it.
    let last = env.handles.len() - 1;
    let slow = {
        let store = env.handles[0].store.clone();
        tokio::spawn(async move {
            store
                .write(|txn| {
                    let seq = events::append_in(txn, &new_event("slow"))?;
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(seq)
                })
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast_started = std::time::Instant::now();
    let fast = env.handles[last]
        .store
        .write(|txn| events::append_in(txn, &new_event("fast")))
        .await
        .unwrap();
    let waited = fast_started.elapsed();
    let slow_seq = slow.await.unwrap();
    assert_eq!(slow_seq, next + 1);
    assert_eq!(fast, next + 2, "the later transaction gets the later seq");
    // It waited for the slow one's head lock (held 300 ms, from 50 ms before it began).
    // (Comparing the two tasks' completion instants raced: both wake at the same commit.)
    assert!(
        waited >= Duration::from_millis(200),
        "and commits after the slow one (waited {waited:?})"
    );
}

// ---------------------------------------------------------------------------------------
// Instantiation per backend
// ---------------------------------------------------------------------------------------

macro_rules! conformance {
    ($backend:ident, $env:path, [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[test]
                fn $case() {
                    let Some(env) = $env() else { return };
                    super::run_case(&env, super::$case);
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($case:ident),* $(,)?) => {
        conformance!(redb, super::redb_env, [$($case),*]);
        conformance!(postgres, super::postgres_env, [$($case),*]);
    };
}

every_backend!(
    locking_read_then_write_is_not_overtaken,
    insert_of_a_taken_key_is_refused,
    replay_under_32_way_concurrency,
    lockout_counts_are_exact,
    evidence_is_spent_exactly_once,
    expired_evidence_is_purged_through_the_expiry_index,
    ceremony_is_claimed_once,
    audit_chain_is_continuous,
    kek_records_round_trip,
    rolled_back_batch_leaves_nothing,
    scan_order_is_bytewise_and_paging_exact,
    meta_reserved_prefix_is_refused,
    insert_new_of_a_taken_key_fails_its_batch,
    read_snapshot_is_consistent,
    concurrent_writes_share_commits,
    event_seqs_follow_commit_order,
);
