//! Policy tables (pure) and the service against a real SoftHSM token with a settable
//! clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::policy::{self, backoff_seconds};
use super::*;
use crate::hsm::{Hsm, HsmSettings};
use crate::otp::rfc_vectors;
use crate::store::{Store, StoreOptions, EMBEDDED_FILE};
use crate::testing::DevEnv;

/// The tenant the tests' credentials belong to.
const T: &str = "tenant-a";

fn record(kind: OtpKind) -> CredentialRecord {
    CredentialRecord {
        tenant: T.into(),
        id: "c".into(),
        subject: None,
        kind,
        algorithm: HashAlgorithm::Sha1,
        digits: 6,
        period_seconds: if kind == OtpKind::Totp { 30 } else { 0 },
        t0: 0,
        wrapped_seed: vec![1; 40],
        master_key_version: 1,
        seed_binding: None,
        issuer: String::new(),
        account_name: String::new(),
        last_accepted: None,
        next_counter: 0,
        drift_steps: 0,
        failures: 0,
        failure_times: Vec::new(),
        locked_until: 0,
        hard_locked: false,
        disabled: false,
        created_at: 0,
        updated_at: 0,
    }
}

fn outcome(u: Update<Outcome>) -> Outcome {
    match u {
        Update::Write(o) | Update::Keep(o) | Update::Delete(o) => o,
    }
}

/// One attempt at `now` with a wrong code (`None`) or the code of step `matched`, as the
/// service decides it: the gate first, then the decision on the record.
fn attempt(rec: &mut CredentialRecord, matched: Option<u64>, now: u64, p: &Policy) -> Outcome {
    match policy::gate(rec, now, p) {
        Some(refused) => refused,
        None => outcome(policy::apply_verify(rec, matched, now, p)),
    }
}

/// An attacker who knows only the id sends a wrong code as soon as the credential takes
/// one (one second after a plain rejection, at the end of each lock): what each failure
/// answers, with the default policy.
#[test]
fn lockout_table_with_default_policy() {
    let p = Policy::default();
    assert_eq!(
        (p.failure_window_seconds, p.hard_lockout_threshold),
        (86_400, 0)
    );
    let mut rec = record(OtpKind::Totp);
    let start = 1_000_000;
    let mut now = start;
    // (failure number, seconds since the first, failures counted, remaining, retry_after)
    let table: &[(u32, u64, u32, u32, u32)] = &[
        (1, 0, 1, 4, 0),
        (2, 1, 2, 3, 0),
        (4, 3, 4, 1, 0),
        (5, 4, 5, 0, 30),
        (6, 34, 6, 0, 60),
        (7, 94, 7, 0, 120),
        (10, 934, 10, 0, 960),
        (15, 30_694, 15, 0, 30_720),
        (16, 61_414, 16, 0, 61_440),
        // A day after the first failures they no longer count: back to the start.
        (17, 122_854, 2, 3, 0),
        (20, 122_857, 5, 0, 30),
    ];
    let mut expected = table.iter();
    let mut row = expected.next();
    for n in 1..=20u32 {
        let o = attempt(&mut rec, None, now, &p);
        assert_eq!(o.verdict, Verdict::Rejected, "failure {n}");
        assert!(!rec.hard_locked, "the hard lock is off by default");
        if let Some(&(at, since, counted, remaining, retry)) = row {
            if at == n {
                let got = (
                    now - start,
                    policy::counted_failures(&rec, now, &p),
                    o.remaining_attempts,
                    o.retry_after_seconds,
                );
                assert_eq!(got, (since, counted, remaining, retry), "failure {n}");
                row = expected.next();
            }
        }
        if rec.locked_until > now {
            // While locked, every attempt (even the right code) is refused without
            // counting, and says how long to wait.
            let before = rec.failure_times.clone();
            let o = attempt(&mut rec, Some(99), now + 1, &p);
            assert_eq!(
                (
                    o.verdict,
                    o.remaining_attempts,
                    u64::from(o.retry_after_seconds)
                ),
                (Verdict::Locked, 0, rec.locked_until - now - 1),
                "failure {n}"
            );
            assert_eq!(rec.failure_times, before);
            now = rec.locked_until;
        } else {
            now += 1;
        }
    }
    assert!(row.is_none(), "every row checked");
}

/// Each lockout rule, as a row: a policy, failures at given seconds, then what the
/// credential answers at a later second.
#[test]
fn lockout_rules_table() {
    let small = Policy {
        failure_window_seconds: 100,
        lockout_threshold: 3,
        base_backoff_seconds: 10,
        max_backoff_seconds: 40,
        ..Policy::default()
    };
    let hard = Policy {
        hard_lockout_threshold: 5,
        ..small.clone()
    };
    struct Row {
        rule: &'static str,
        policy: Policy,
        failures: Vec<u64>,
        at: u64,
        // (verdict of a wrong code at `at`, remaining, retry_after, hard locked after)
        expect: (Verdict, u32, u32, bool),
    }
    let rows = vec![
        Row {
            rule: "failures inside the window count",
            policy: small.clone(),
            failures: vec![0, 10],
            at: 99,
            expect: (Verdict::Rejected, 0, 10, false),
        },
        Row {
            rule: "a failure exactly a window old no longer counts",
            policy: small.clone(),
            failures: vec![0, 10],
            at: 100,
            expect: (Verdict::Rejected, 1, 0, false),
        },
        Row {
            rule: "all failures older than the window: a fresh start",
            policy: small.clone(),
            failures: vec![0, 10],
            at: 500,
            expect: (Verdict::Rejected, 2, 0, false),
        },
        Row {
            rule: "inside a back-off: locked, not counted",
            policy: small.clone(),
            failures: vec![0, 1, 2],
            at: 5,
            expect: (Verdict::Locked, 0, 7, false),
        },
        Row {
            rule: "after a back-off, the next counted failure locks again, doubled",
            policy: small.clone(),
            failures: vec![0, 1, 2],
            at: 12,
            expect: (Verdict::Rejected, 0, 20, false),
        },
        Row {
            rule: "the back-off is capped",
            policy: small.clone(),
            failures: vec![0, 1, 2, 12, 32],
            at: 80,
            expect: (Verdict::Rejected, 0, 40, false),
        },
        Row {
            rule: "the hard lock is off by default: never reached",
            policy: small.clone(),
            failures: vec![0, 1, 2, 12, 32, 72],
            at: 99,
            expect: (Verdict::Locked, 0, 13, false),
        },
        Row {
            rule: "hard lock on: reached by failures inside one window",
            policy: hard.clone(),
            failures: vec![0, 1, 2, 12],
            at: 32,
            expect: (Verdict::Rejected, 0, 0, true),
        },
        Row {
            rule: "hard lock on: not reached when earlier failures left the window",
            policy: hard.clone(),
            failures: vec![0, 1, 2, 12],
            at: 101,
            expect: (Verdict::Rejected, 0, 10, false),
        },
        Row {
            rule: "hard lock on: a slow drip never reaches it",
            policy: hard.clone(),
            failures: (0..50).map(|i| i * 100).collect(),
            at: 5_000,
            expect: (Verdict::Rejected, 2, 0, false),
        },
    ];
    for row in rows {
        let p = &row.policy;
        let mut rec = record(OtpKind::Hotp);
        for &t in &row.failures {
            let o = attempt(&mut rec, None, t, p);
            assert_eq!(
                o.verdict,
                Verdict::Rejected,
                "{}: setup failure at {t}",
                row.rule
            );
        }
        let o = attempt(&mut rec, None, row.at, p);
        let got = (
            o.verdict,
            o.remaining_attempts,
            o.retry_after_seconds,
            rec.hard_locked,
        );
        assert_eq!(got, row.expect, "{}", row.rule);
        if rec.hard_locked {
            let later = attempt(&mut rec, Some(1), row.at + 1_000_000, p);
            assert_eq!(
                (later.verdict, later.retry_after_seconds),
                (Verdict::Locked, 0),
                "{}: the hard lock never expires",
                row.rule
            );
        }
    }
}

/// `remaining_attempts` says how many wrong codes are answered REJECTED before the next
/// lock, at every point: the count is checked against what actually happens.
#[test]
fn remaining_attempts_are_truthful() {
    let p = Policy {
        failure_window_seconds: 1_000,
        ..Policy::default()
    };
    let mut rec = record(OtpKind::Hotp);
    let mut now = 0;
    for round in 0..40 {
        let said = policy::gate(&rec, now, &p).map_or_else(
            || policy::remaining(&rec, now, &p),
            |o| o.remaining_attempts,
        );
        // Spend them: exactly `said` rejections, the last of which locks.
        for k in 1..=said {
            let o = attempt(&mut rec, None, now, &p);
            assert_eq!(o.verdict, Verdict::Rejected, "round {round}, attempt {k}");
            assert_eq!(o.remaining_attempts, said - k, "round {round}, attempt {k}");
            now += 7;
        }
        assert!(
            rec.locked_until > now - 7,
            "round {round}: locked after {said}"
        );
        // Wait out the lock, and in some rounds long enough for failures to leave
        // the window.
        now = rec.locked_until + if round % 4 == 3 { 900 } else { 0 };
    }
}

#[test]
fn lock_changes_are_reported_for_the_audit_record() {
    use policy::{LockChange, LockState};
    let p = Policy {
        hard_lockout_threshold: 6,
        ..Policy::default()
    };
    let mut rec = record(OtpKind::Hotp);
    let mut changes = Vec::new();
    let mut now = 100;
    for _ in 0..6 {
        let before = LockState::of(&rec);
        attempt(&mut rec, None, now, &p);
        changes.push(before.change(&rec));
        now = rec.locked_until.max(now + 1);
    }
    assert_eq!(
        changes,
        vec![
            None,
            None,
            None,
            None,
            Some(LockChange::Temporary {
                until: 134,
                failures: 5
            }),
            Some(LockChange::Hard { failures: 6 }),
        ]
    );
    // A refusal while locked changes nothing.
    let before = LockState::of(&rec);
    attempt(&mut rec, None, now, &p);
    assert_eq!(before.change(&rec), None);
}

/// OWASP ASVS 2.2.1 (at most 100 failed attempts per hour on one account) and the
/// attacker's rate over a month, with the default policy: an attacker at full speed.
#[test]
fn default_policy_bounds_an_attacker() {
    let p = Policy::default();
    let mut rec = record(OtpKind::Totp);
    let start = 1_000_000u64;
    let mut now = start;
    let mut failures = Vec::new();
    while now < start + 30 * 86_400 {
        if let Some(o) = policy::gate(&rec, now, &p) {
            assert_eq!(o.verdict, Verdict::Locked);
            now = rec.locked_until;
            continue;
        }
        let o = attempt(&mut rec, None, now, &p);
        assert_eq!(o.verdict, Verdict::Rejected);
        failures.push(now);
        now += 1;
    }
    let most_within = |span: u64| {
        (0..failures.len())
            .map(|i| failures[i..].partition_point(|&t| t < failures[i] + span))
            .max()
            .unwrap_or(0)
    };
    assert_eq!(most_within(3_600), 11, "per hour (ASVS 2.2.1: <= 100)");
    assert_eq!(most_within(86_400), 16, "per day");
    assert_eq!(failures.len(), 304, "in 30 days");
    assert!(!rec.hard_locked);
    // The attacker stops: the lock ends by itself, and a window later nothing counts.
    let quiet = rec.locked_until + u64::from(p.failure_window_seconds);
    assert_eq!(policy::gate(&rec, rec.locked_until, &p), None);
    assert_eq!(policy::remaining(&rec, quiet, &p), p.lockout_threshold);
}

#[test]
fn backoff_doubles_and_is_capped() {
    let p = Policy {
        base_backoff_seconds: 10,
        max_backoff_seconds: 100,
        ..Policy::default()
    };
    let got: Vec<u32> = (5..=10).map(|f| backoff_seconds(f, &p)).collect();
    assert_eq!(got, vec![10, 20, 40, 80, 100, 100]);
    assert_eq!(backoff_seconds(u32::MAX, &p), 100);
}

#[test]
fn success_resets_failures_and_replay_is_not_counted() {
    let p = Policy::default();
    let mut rec = record(OtpKind::Totp);
    for _ in 0..3 {
        policy::apply_verify(&mut rec, None, 100, &p);
    }
    assert_eq!((rec.failures, rec.failure_times.len()), (3, 3));
    let o = outcome(policy::apply_verify(&mut rec, Some(7), 100, &p));
    assert_eq!(o.verdict, Verdict::Accepted);
    assert_eq!((rec.failures, rec.last_accepted), (0, Some(7)));
    assert!(
        rec.failure_times.is_empty(),
        "a success forgets every failure"
    );
    for step in [7, 6] {
        let u = policy::apply_verify(&mut rec, Some(step), 100, &p);
        assert!(
            matches!(
                u,
                Update::Keep(Outcome {
                    verdict: Verdict::Replayed,
                    ..
                })
            ),
            "step {step}"
        );
    }
    assert_eq!(rec.failures, 0);
    assert_eq!(
        outcome(policy::apply_verify(&mut rec, Some(8), 100, &p)).verdict,
        Verdict::Accepted
    );
}

#[test]
fn gate_table() {
    let p = Policy::default();
    let mut disabled = record(OtpKind::Hotp);
    disabled.disabled = true;
    let mut hard = record(OtpKind::Hotp);
    hard.hard_locked = true;
    let mut soft = record(OtpKind::Hotp);
    soft.locked_until = 160;
    let cases = [
        (record(OtpKind::Hotp), None),
        (disabled, Some((Verdict::Disabled, 0))),
        (hard, Some((Verdict::Locked, 0))),
        (soft.clone(), Some((Verdict::Locked, 60))),
    ];
    for (rec, expected) in cases {
        let got = policy::gate(&rec, 100, &p).map(|o| (o.verdict, o.retry_after_seconds));
        assert_eq!(got, expected, "{rec:?}");
    }
    assert_eq!(
        policy::gate(&soft, 160, &p),
        None,
        "the lock ends at locked_until"
    );
}

#[test]
fn windows() {
    let p = Policy::default();
    let mut totp = record(OtpKind::Totp);
    assert_eq!(policy::verify_window(&totp, 300, &p).expect("w"), 9..=11);
    totp.drift_steps = -3;
    assert_eq!(policy::verify_window(&totp, 300, &p).expect("w"), 6..=8);
    assert_eq!(policy::resync_window(&totp, 300, &p).expect("w"), 0..=20);
    let mut hotp = record(OtpKind::Hotp);
    hotp.next_counter = 5;
    assert_eq!(policy::verify_window(&hotp, 0, &p).expect("w"), 5..=15);
    hotp.last_accepted = Some(4);
    assert_eq!(
        policy::verify_window(&hotp, 0, &p).expect("w"),
        4..=15,
        "includes the last accepted, to say REPLAYED"
    );
    assert_eq!(policy::resync_window(&hotp, 0, &p).expect("w"), 5..=1005);
}

#[test]
fn resync_records_drift_and_reanchors_counter() {
    let p = Policy::default();
    let mut totp = record(OtpKind::Totp);
    let o = outcome(policy::apply_resync(&mut totp, Some(105), 100, 3000, &p));
    assert_eq!(o.verdict, Verdict::Accepted);
    assert_eq!((totp.drift_steps, totp.last_accepted), (5, Some(105)));
    let o = outcome(policy::apply_resync(&mut totp, Some(105), 100, 3000, &p));
    assert_eq!(o.verdict, Verdict::Replayed);
    let mut slow = record(OtpKind::Totp);
    policy::apply_resync(&mut slow, Some(96), 100, 3000, &p);
    assert_eq!(slow.drift_steps, -4);
    let mut hotp = record(OtpKind::Hotp);
    policy::apply_resync(&mut hotp, Some(501), 0, 3000, &p);
    assert_eq!((hotp.next_counter, hotp.last_accepted), (502, Some(501)));
    let o = outcome(policy::apply_resync(&mut hotp, None, 0, 3000, &p));
    assert_eq!(
        (o.verdict, hotp.failures),
        (Verdict::Rejected, 1),
        "a failed resync counts"
    );
}

struct Fixture {
    _env: DevEnv,
    _dir: tempfile::TempDir,
    hsm: Hsm,
    now: Arc<AtomicU64>,
    store: Arc<Store>,
    clock: Clock,
    service: Arc<Credentials<Store>>,
}

async fn fixture(policy: Policy) -> Fixture {
    let env = DevEnv::new();
    let settings = HsmSettings {
        module: env.config.hsm.module.clone(),
        token: env.config.token(),
        sessions: 2,
        queue_capacity: 1024,
        seed_cache_capacity: 64,
    };
    let hsm = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open_redb(&dir.path().join(EMBEDDED_FILE), StoreOptions::default()).expect("store"),
    );
    ensure_master_key(&hsm, store.as_ref(), 1)
        .await
        .expect("master key");
    binding::migrate(&hsm, store.as_ref(), 500)
        .await
        .expect("binding key");
    let now = Arc::new(AtomicU64::new(1_700_000_000));
    let clock_now = now.clone();
    let clock: Clock = Clock::from_secs_fn(move || clock_now.load(Ordering::SeqCst));
    let service = Arc::new(Credentials::new(
        hsm.clone(),
        store.clone(),
        policy,
        1,
        clock.clone(),
    ));
    Fixture {
        _env: env,
        _dir: dir,
        hsm,
        now,
        store,
        clock,
        service,
    }
}

/// The fixture with an audit log; checkpoints only on request.
async fn audited_fixture(policy: Policy) -> (Fixture, Arc<crate::audit::log::AuditLog>) {
    let mut f = fixture(policy.clone()).await;
    let log = crate::audit::log::AuditLog::open(
        f.store.clone(),
        f.hsm.clone(),
        u64::MAX,
        f.clock.clone(),
    )
    .await
    .expect("audit log");
    let service = Credentials::new(f.hsm.clone(), f.store.clone(), policy, 1, f.clock.clone())
        .with_audit(log.clone());
    f.service = Arc::new(service);
    (f, log)
}

/// The records of the log, parsed.
async fn records(log: &crate::audit::log::AuditLog) -> Vec<crate::audit::AuditRecord> {
    let (jsonl, _) = log.export_range(1, usize::MAX).await.expect("export");
    std::str::from_utf8(&jsonl)
        .expect("utf-8")
        .lines()
        .map(|l| crate::audit::AuditRecord::from_json_line(l).expect("record"))
        .collect()
}

fn result_of(r: &crate::audit::AuditRecord) -> &str {
    r.details
        .as_ref()
        .and_then(|d| d.get("result"))
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

fn import(id: &str, kind: OtpKind, alg: HashAlgorithm, digits: u32, seed: &[u8]) -> NewCredential {
    NewCredential {
        id: Some(id.into()),
        kind,
        algorithm: alg,
        digits,
        period_seconds: 0,
        seed: Some(Zeroizing::new(seed.to_vec())),
        reveal_seed: false,
        issuer: "Test".into(),
        account_name: "alice".into(),
        initial_counter: 0,
        subject: None,
    }
}

fn soft_code(seed: &[u8], alg: HashAlgorithm, factor: u64, digits: u32) -> String {
    let ring_alg = match alg {
        HashAlgorithm::Sha1 => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        HashAlgorithm::Sha256 => ring::hmac::HMAC_SHA256,
        HashAlgorithm::Sha512 => ring::hmac::HMAC_SHA512,
    };
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring_alg, seed),
        &otp::moving_factor(factor),
    );
    let d = Digits::new(digits).expect("digits");
    format!(
        "{:0width$}",
        otp::truncate(tag.as_ref(), d),
        width = digits as usize
    )
}

/// Deleting a credential destroys its unwrapped seed in every worker's cache (before
/// that worker's next operation), instead of leaving it in the HSM until evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_destroys_the_cached_seed() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    f.service
        .create(T, import("d", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed))
        .await
        .expect("create");
    let code = soft_code(seed, HashAlgorithm::Sha1, 0, 6);
    let o = f.service.verify(T, "d", &code).await.expect("verify");
    assert_eq!(o.verdict, Verdict::Accepted);
    let cached = f.hsm.seed_cache_stats().2;
    assert!(cached >= 1, "cached after the verification");
    f.service.delete(T, "d").await.expect("delete");
    // Keep both workers busy until each has run once more.
    for _ in 0..100 {
        if f.hsm.seed_cache_stats().2 < cached {
            break;
        }
        let mut ops = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let hsm = f.hsm.clone();
            ops.spawn(async move { hsm.random(8).await.map(|_| ()) });
        }
        while let Some(r) = ops.join_next().await {
            r.expect("join").expect("random");
        }
    }
    assert_eq!(f.hsm.seed_cache_stats().2, cached - 1);
}

#[tokio::test]
async fn rfc4226_vectors_through_the_hsm() {
    let f = fixture(Policy::default()).await;
    f.service
        .create(
            T,
            import(
                "rfc4226",
                OtpKind::Hotp,
                HashAlgorithm::Sha1,
                6,
                rfc_vectors::RFC4226_SEED,
            ),
        )
        .await
        .expect("create");
    for v in rfc_vectors::RFC4226_VECTORS.iter() {
        let o = f
            .service
            .verify(T, "rfc4226", &format!("{:06}", v.code))
            .await
            .expect("verify");
        assert_eq!(o.verdict, Verdict::Accepted, "counter {}", v.counter);
    }
    let last = format!(
        "{:06}",
        rfc_vectors::RFC4226_VECTORS.last().expect("vectors").code
    );
    assert_eq!(
        f.service
            .verify(T, "rfc4226", &last)
            .await
            .expect("verify")
            .verdict,
        Verdict::Replayed
    );
    let first = format!("{:06}", rfc_vectors::RFC4226_VECTORS[0].code);
    assert_eq!(
        f.service
            .verify(T, "rfc4226", &first)
            .await
            .expect("verify")
            .verdict,
        Verdict::Rejected
    );
}

#[tokio::test]
async fn rfc6238_vectors_through_the_hsm() {
    let f = fixture(Policy::default()).await;
    for alg in [
        HashAlgorithm::Sha1,
        HashAlgorithm::Sha256,
        HashAlgorithm::Sha512,
    ] {
        let id = format!("rfc6238-{}", alg.uri_name());
        f.service
            .create(
                T,
                import(&id, OtpKind::Totp, alg, 8, rfc_vectors::rfc6238_seed(alg)),
            )
            .await
            .expect("create");
        let mut vectors: Vec<_> = rfc_vectors::RFC6238_VECTORS
            .iter()
            .filter(|v| v.algorithm == alg)
            .collect();
        vectors.sort_by_key(|v| v.unix_time);
        assert_eq!(vectors.len(), 6);
        for v in vectors {
            f.now.store(v.unix_time, Ordering::SeqCst);
            let code = format!("{:08}", v.code);
            let o = f.service.verify(T, &id, &code).await.expect("verify");
            assert_eq!(o.verdict, Verdict::Accepted, "{alg:?} at {}", v.unix_time);
            assert_eq!(
                f.service
                    .verify(T, &id, &code)
                    .await
                    .expect("verify")
                    .verdict,
                Verdict::Replayed
            );
        }
    }
}

#[tokio::test]
async fn totp_window_edges_and_short_seed() {
    let f = fixture(Policy::default()).await;
    // A 10-byte seed: SoftHSM needs it padded to the digest length; the codes must be
    // those of the unpadded seed.
    let seed = b"0123456789";
    f.service
        .create(
            T,
            import("short", OtpKind::Totp, HashAlgorithm::Sha256, 6, seed),
        )
        .await
        .expect("create");
    let now = f.now.load(Ordering::SeqCst);
    let step = now / 30;
    let two_ahead = soft_code(seed, HashAlgorithm::Sha256, step + 2, 6);
    let one_ahead = soft_code(seed, HashAlgorithm::Sha256, step + 1, 6);
    let current = soft_code(seed, HashAlgorithm::Sha256, step, 6);
    if two_ahead != one_ahead && two_ahead != current {
        assert_eq!(
            f.service
                .verify(T, "short", &two_ahead)
                .await
                .expect("v")
                .verdict,
            Verdict::Rejected
        );
    }
    assert_eq!(
        f.service
            .verify(T, "short", &one_ahead)
            .await
            .expect("v")
            .verdict,
        Verdict::Accepted
    );
    // step+1 accepted: the current step's code is now a replay, even though it is right.
    assert_eq!(
        f.service
            .verify(T, "short", &current)
            .await
            .expect("v")
            .verdict,
        Verdict::Replayed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_accept_a_code_once() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    f.service
        .create(
            T,
            import("race", OtpKind::Totp, HashAlgorithm::Sha1, 6, seed),
        )
        .await
        .expect("create");
    let code = soft_code(
        seed,
        HashAlgorithm::Sha1,
        f.now.load(Ordering::SeqCst) / 30,
        6,
    );
    let calls: Vec<_> = (0..32)
        .map(|_| {
            let s = f.service.clone();
            let code = code.clone();
            tokio::spawn(async move { s.verify(T, "race", &code).await.expect("verify").verdict })
        })
        .collect();
    let mut verdicts = Vec::new();
    for c in calls {
        verdicts.push(c.await.expect("join"));
    }
    let accepted = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
    let replayed = verdicts.iter().filter(|v| **v == Verdict::Replayed).count();
    assert_eq!((accepted, replayed), (1, 31), "{verdicts:?}");
}

#[tokio::test]
async fn locked_credentials_do_no_hsm_work_and_unlock() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    f.service
        .create(
            T,
            import("lock", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed),
        )
        .await
        .expect("create");
    let wrong = if soft_code(seed, HashAlgorithm::Sha1, 0, 6) == "000000" {
        "111111"
    } else {
        "000000"
    };
    for _ in 0..5 {
        assert_eq!(
            f.service.verify(T, "lock", wrong).await.expect("v").verdict,
            Verdict::Rejected
        );
    }
    let hsm_ops = f.hsm.completed();
    let right = soft_code(seed, HashAlgorithm::Sha1, 0, 6);
    let o = f.service.verify(T, "lock", &right).await.expect("v");
    assert_eq!((o.verdict, o.retry_after_seconds), (Verdict::Locked, 30));
    assert_eq!(
        f.hsm.completed(),
        hsm_ops,
        "a locked credential does no HSM work"
    );
    f.now.fetch_add(30, Ordering::SeqCst);
    assert_eq!(
        f.service
            .verify(T, "lock", &right)
            .await
            .expect("v")
            .verdict,
        Verdict::Accepted
    );

    let rec = f
        .service
        .update_state(T, "lock", Action::Disable)
        .await
        .expect("disable");
    assert!(rec.disabled);
    let next = soft_code(seed, HashAlgorithm::Sha1, 1, 6);
    assert_eq!(
        f.service.verify(T, "lock", &next).await.expect("v").verdict,
        Verdict::Disabled
    );
    f.service
        .update_state(T, "lock", Action::Enable)
        .await
        .expect("enable");
    assert_eq!(
        f.service.verify(T, "lock", &next).await.expect("v").verdict,
        Verdict::Accepted
    );
}

#[tokio::test]
async fn resync_through_the_hsm() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    f.service
        .create(
            T,
            import("hotp", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed),
        )
        .await
        .expect("create");
    // The token was pressed 500 times out of sight: beyond the look-ahead of 10.
    let far = soft_code(seed, HashAlgorithm::Sha1, 500, 6);
    assert_eq!(
        f.service.verify(T, "hotp", &far).await.expect("v").verdict,
        Verdict::Rejected
    );
    let (o, rec) = f
        .service
        .resync(
            T,
            "hotp",
            &soft_code(seed, HashAlgorithm::Sha1, 501, 6),
            &soft_code(seed, HashAlgorithm::Sha1, 502, 6),
        )
        .await
        .expect("resync");
    assert_eq!(o.verdict, Verdict::Accepted);
    assert_eq!((rec.next_counter, rec.failures), (503, 0));
    assert_eq!(
        f.service
            .verify(T, "hotp", &soft_code(seed, HashAlgorithm::Sha1, 503, 6))
            .await
            .expect("v")
            .verdict,
        Verdict::Accepted
    );

    f.service
        .create(
            T,
            import("totp", OtpKind::Totp, HashAlgorithm::Sha1, 6, seed),
        )
        .await
        .expect("create");
    let step = f.now.load(Ordering::SeqCst) / 30;
    // The authenticator's clock runs 5 steps (2.5 minutes) fast.
    let (o, rec) = f
        .service
        .resync(
            T,
            "totp",
            &soft_code(seed, HashAlgorithm::Sha1, step + 4, 6),
            &soft_code(seed, HashAlgorithm::Sha1, step + 5, 6),
        )
        .await
        .expect("resync");
    assert_eq!((o.verdict, rec.drift_steps), (Verdict::Accepted, 5));
    f.now.fetch_add(30, Ordering::SeqCst);
    assert_eq!(
        f.service
            .verify(
                T,
                "totp",
                &soft_code(seed, HashAlgorithm::Sha1, step + 6, 6)
            )
            .await
            .expect("v")
            .verdict,
        Verdict::Accepted,
        "verification follows the recorded drift"
    );
}

#[tokio::test]
async fn generated_seed_with_reveal_matches_its_uri() {
    let f = fixture(Policy::default()).await;
    let created = f
        .service
        .create(
            T,
            NewCredential {
                id: None,
                kind: OtpKind::Totp,
                algorithm: HashAlgorithm::Sha1,
                digits: 6,
                period_seconds: 30,
                seed: None,
                reveal_seed: true,
                issuer: "MitID".into(),
                account_name: "alice".into(),
                initial_counter: 0,
                subject: None,
            },
        )
        .await
        .expect("create");
    assert_eq!(created.record.id.len(), 32, "generated id");
    let uri = created.provisioning_uri.expect("uri");
    assert!(
        uri.starts_with("otpauth://totp/MitID:alice?secret="),
        "{}",
        uri.as_str()
    );
    let secret = uri
        .split("secret=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .expect("secret");
    let seed = data_encoding::BASE32_NOPAD
        .decode(secret.as_bytes())
        .expect("base32");
    let code = soft_code(
        &seed,
        HashAlgorithm::Sha1,
        f.now.load(Ordering::SeqCst) / 30,
        6,
    );
    assert_eq!(
        f.service
            .verify(T, &created.record.id, &code)
            .await
            .expect("v")
            .verdict,
        Verdict::Accepted
    );

    // Without reveal the seed is born in the HSM: no URI, and it verifies nothing we know.
    let hidden = f
        .service
        .create(
            T,
            NewCredential {
                id: Some("hidden".into()),
                kind: OtpKind::Hotp,
                algorithm: HashAlgorithm::Sha512,
                digits: 8,
                period_seconds: 0,
                seed: None,
                reveal_seed: false,
                issuer: String::new(),
                account_name: String::new(),
                initial_counter: 0,
                subject: None,
            },
        )
        .await
        .expect("create");
    assert!(hidden.provisioning_uri.is_none());
    assert!(hidden.record.wrapped_seed.len() >= 64 + 8);
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    let base = || import("x", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed);
    let cases: Vec<(&str, NewCredential, &str)> = vec![
        (
            "digits",
            NewCredential {
                digits: 9,
                ..base()
            },
            "digits",
        ),
        (
            "period on HOTP",
            NewCredential {
                period_seconds: 30,
                ..base()
            },
            "period_seconds",
        ),
        (
            "period too long",
            NewCredential {
                kind: OtpKind::Totp,
                period_seconds: 301,
                ..base()
            },
            "period_seconds",
        ),
        (
            "counter on TOTP",
            NewCredential {
                kind: OtpKind::Totp,
                initial_counter: 5,
                ..base()
            },
            "initial_counter",
        ),
        (
            "short seed",
            NewCredential {
                seed: Some(Zeroizing::new(vec![1; 9])),
                ..base()
            },
            "seed must be 10 to 64 bytes",
        ),
        (
            "long seed",
            NewCredential {
                seed: Some(Zeroizing::new(vec![1; 65])),
                ..base()
            },
            "seed must be",
        ),
        (
            "reveal import",
            NewCredential {
                reveal_seed: true,
                ..base()
            },
            "reveal_seed",
        ),
        (
            "bad id",
            NewCredential {
                id: Some("a b".into()),
                ..base()
            },
            "credential_id",
        ),
        (
            "long id",
            NewCredential {
                id: Some("a".repeat(129)),
                ..base()
            },
            "credential_id",
        ),
        (
            "colon issuer",
            NewCredential {
                issuer: "a:b".into(),
                ..base()
            },
            "issuer",
        ),
    ];
    for (name, new, expected) in cases {
        match f.service.create(T, new).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(expected), "{name}: {m}"),
            other => panic!("{name}: {:?}", other.map(|c| c.record.id)),
        }
    }
    f.service.create(T, base()).await.expect("create");
    assert!(matches!(
        f.service.create(T, base()).await,
        Err(Error::AlreadyExists(_))
    ));
    for code in ["12345", "1234567", "12345a", " 123456", "١٢٣٤٥٦"] {
        assert!(
            matches!(
                f.service.verify(T, "x", code).await,
                Err(Error::InvalidArgument(_))
            ),
            "{code:?}"
        );
    }
    assert!(matches!(
        f.service.verify(T, "nope", "123456").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        f.service.resync(T, "x", "123456", "12").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        f.service.delete(T, "nope").await,
        Err(Error::NotFound(_))
    ));
    f.service.delete(T, "x").await.expect("delete");
    assert!(matches!(
        f.service.get(T, "x").await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn accepted_codes_of_credentials_with_a_subject_leave_evidence() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    let with_subject = NewCredential {
        subject: Some("citizen:4711@login".into()),
        ..import("s", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed)
    };
    f.service.create(T, with_subject).await.expect("create");
    f.service
        .create(T, import("n", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed))
        .await
        .expect("create");
    let code = |c| soft_code(seed, HashAlgorithm::Sha1, c, 6);
    let wrong = if code(0) == "000000" {
        "111111"
    } else {
        "000000"
    };

    let rejected = f.service.verify_by(None, T, "s", wrong).await.expect("v");
    assert_eq!(
        (rejected.outcome.verdict, rejected.evidence_id),
        (Verdict::Rejected, None)
    );
    let now = f.now.load(Ordering::SeqCst);
    let accepted = f
        .service
        .verify_by(None, T, "s", &code(0))
        .await
        .expect("v");
    assert_eq!(accepted.outcome.verdict, Verdict::Accepted);
    let id = accepted.evidence_id.expect("evidence");
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let e = f
        .service
        .store
        .get_evidence(&id)
        .await
        .expect("read")
        .expect("durable with the accepted step");
    assert_eq!(
        e,
        EvidenceRecord {
            id: id.clone(),
            tenant: T.into(),
            credential_id: "s".into(),
            subject: "citizen:4711@login".into(),
            method: AuthMethod::Otp,
            auth_time: now,
            expires_at: now + DEFAULT_EVIDENCE_TTL_SECONDS,
            spent_at: None,
            txn_text_sha256: None,
        }
    );
    let replayed = f
        .service
        .verify_by(None, T, "s", &code(0))
        .await
        .expect("v");
    assert_eq!(
        (replayed.outcome.verdict, replayed.evidence_id),
        (Verdict::Replayed, None)
    );
    let second = f
        .service
        .verify_by(None, T, "s", &code(1))
        .await
        .expect("v");
    assert_ne!(
        second.evidence_id.expect("evidence"),
        id,
        "fresh per success"
    );

    // Without a subject an accepted code leaves nothing.
    let before = f.service.store.evidence_count().await.expect("count");
    let plain = f
        .service
        .verify_by(None, T, "n", &code(0))
        .await
        .expect("v");
    assert_eq!(
        (plain.outcome.verdict, plain.evidence_id),
        (Verdict::Accepted, None)
    );
    assert_eq!(
        f.service.store.evidence_count().await.expect("count"),
        before
    );

    // The configured lifetime.
    let service = Credentials::new(
        f.hsm.clone(),
        f.service.store.clone(),
        Policy::default(),
        1,
        Clock::from_secs_fn(move || now),
    )
    .with_evidence_ttl(30);
    let third = service
        .verify_by(None, T, "s", &code(2))
        .await
        .expect("v")
        .evidence_id
        .expect("evidence");
    let e = f
        .service
        .store
        .get_evidence(&third)
        .await
        .expect("read")
        .expect("e");
    assert_eq!(e.expires_at, now + 30);
}

#[tokio::test]
async fn another_tenants_credential_is_not_found_like_a_missing_one() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    let a = f
        .service
        .create(T, import("x", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed))
        .await
        .expect("create a");
    assert_eq!(a.record.tenant, T);
    // Tenant B may hold the same id: a different credential.
    let b = f
        .service
        .create(
            "tenant-b",
            NewCredential {
                subject: Some("b-subject".into()),
                ..import("x", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed)
            },
        )
        .await
        .expect("create b");
    assert_eq!(
        (b.record.tenant.as_str(), b.record.id.as_str()),
        ("tenant-b", "x")
    );
    let message = |e: Error| match e {
        Error::NotFound(m) => m,
        other => panic!("{other:?}"),
    };
    let missing = message(f.service.get(T, "y").await.expect_err("missing"));
    let code = soft_code(seed, HashAlgorithm::Sha1, 0, 6);
    // Tenant C sees neither: every operation answers as for an id nobody holds.
    let c = "tenant-c";
    let answers = [
        f.service.get(c, "y").await.map(|_| ()),
        f.service.get(c, "x").await.map(|_| ()),
        f.service.verify(c, "x", &code).await.map(|_| ()),
        f.service.resync(c, "x", &code, &code).await.map(|_| ()),
        f.service
            .update_state(c, "x", Action::Disable)
            .await
            .map(|_| ()),
        f.service
            .update_state(c, "x", Action::Unlock)
            .await
            .map(|_| ()),
        f.service.delete(c, "x").await,
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        let m = message(answer.expect_err("not found"));
        assert_eq!(m.replace("\"x\"", "\"y\""), missing, "operation {i}");
    }
    // Each tenant acts on its own.
    assert_eq!(
        f.service.verify(T, "x", &code).await.expect("a").verdict,
        Verdict::Accepted
    );
    assert_eq!(
        f.service
            .verify("tenant-b", "x", &code)
            .await
            .expect("b")
            .verdict,
        Verdict::Accepted,
        "B's credential is untouched by A's verification"
    );
    f.service.delete(T, "x").await.expect("delete a");
    assert!(f.service.get("tenant-b", "x").await.is_ok());
    let listed = f
        .service
        .list(Some("tenant-b"), None, 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subject.as_deref(), Some("b-subject"));
    assert!(f
        .service
        .list(Some(T), None, 10)
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn subjects_are_validated() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    for (subject, expected) in [
        (String::new(), "subject must be 1 to 128"),
        ("a".repeat(129), "subject must be 1 to 128"),
        ("has space".into(), "subject may contain only"),
        ("ü".into(), "subject may contain only"),
        ("a\nb".into(), "subject may contain only"),
    ] {
        let new = NewCredential {
            subject: Some(subject.clone()),
            ..import("v", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed)
        };
        match f.service.create(T, new).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(expected), "{subject:?}: {m}"),
            other => panic!("{subject:?}: {:?}", other.map(|c| c.record.id)),
        }
    }
    let ok = NewCredential {
        subject: Some(format!("A-z0.9_:@-{}", "x".repeat(118))),
        ..import("v", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed)
    };
    f.service
        .create(T, ok)
        .await
        .expect("128 characters of the alphabet");
    assert!(matches!(
        f.service.get("", "v").await,
        Err(Error::InvalidArgument(_))
    ));
}

/// Every attempt leaves exactly one record, written in exactly one write job: decided
/// verifications with their state, and the ones that end before (unknown id, malformed
/// code, locked, disabled) in an audit-only job. Lifecycle changes are recorded in the
/// commit of the change, by the actor who made it.
#[tokio::test]
async fn every_verification_outcome_and_lifecycle_change_is_recorded_once() {
    let (f, log) = audited_fixture(Policy::default()).await;
    let officer = Actor::new("officer-1", &"ab".repeat(32));
    let seed = rfc_vectors::RFC4226_SEED;
    f.service
        .create_by(
            Some(&officer),
            T,
            import("a", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed),
        )
        .await
        .expect("create");
    let right = |c| soft_code(seed, HashAlgorithm::Sha1, c, 6);
    let wrong = if right(0) == "000000" {
        "111111"
    } else {
        "000000"
    };

    let jobs = || f.store.stats().committed_jobs;
    let mut expected = Vec::new();
    let mut attempt = |id: &'static str, code: String, result: &'static str| {
        expected.push((id, result));
        (id, code)
    };
    let mut calls = vec![
        attempt("a", right(0), "accepted"),
        attempt("a", right(0), "replayed"),
        attempt("nobody", right(0), "not_found"),
        attempt("a", "12".into(), "invalid"),
    ];
    for _ in 0..5 {
        calls.push(attempt("a", wrong.into(), "rejected"));
    }
    calls.push(attempt("a", right(1), "locked"));
    for (id, code) in calls {
        let before = jobs();
        let _ = f.service.verify(T, id, &code).await;
        assert_eq!(jobs() - before, 1, "{id} {code}: one write job per call");
    }
    f.now.fetch_add(3600, Ordering::SeqCst);
    f.service
        .update_state_by(Some(&officer), "officer", T, "a", Action::Disable)
        .await
        .expect("disable");
    let before = jobs();
    assert_eq!(
        f.service
            .verify(T, "a", &right(1))
            .await
            .expect("v")
            .verdict,
        Verdict::Disabled
    );
    assert_eq!(jobs() - before, 1);
    f.service
        .update_state_by(Some(&officer), "officer", T, "a", Action::Unlock)
        .await
        .expect("unlock");
    f.service
        .delete_by(Some(&officer), T, "a")
        .await
        .expect("delete");
    assert!(f.service.delete_by(Some(&officer), T, "a").await.is_err());

    let recs = records(&log).await;
    let verifies: Vec<(&str, &str)> = recs
        .iter()
        .filter(|r| r.action == "credential.verify")
        .map(|r| (r.object.as_str(), result_of(r)))
        .collect();
    expected.push(("a", "disabled"));
    assert_eq!(verifies, expected);
    let lifecycle: Vec<(&str, &str)> = recs
        .iter()
        .filter(|r| r.action != "credential.verify")
        .map(|r| (r.action.as_str(), r.actor.subject.as_str()))
        .collect();
    assert_eq!(
        lifecycle,
        [
            ("credential.create", "officer-1"),
            ("credential.disable", "officer-1"),
            ("credential.unlock", "officer-1"),
            ("credential.delete", "officer-1"),
        ],
        "a change is recorded once, by its actor; a failed delete changes nothing"
    );
    let not_found = recs
        .iter()
        .find(|r| result_of(r) == "not_found")
        .expect("nf");
    assert_eq!(not_found.outcome, "denied");
    assert!(
        recs.iter().all(|r| !r.to_json_line().contains(&right(0))),
        "no code in the trail"
    );
}

/// Someone with write access to the store (not to the HSM) copies credential A's wrapped
/// seed into B's record, with and without A's binding: neither B's codes nor A's are
/// ever ACCEPTED for B, each attempt is refused as tampering (DATA_LOSS, audited
/// `tampered`) before any unwrap, even while A's unwrapped seed is in the cache, and
/// nothing is counted against B.
#[tokio::test]
async fn a_blob_moved_into_another_record_never_verifies() {
    let (f, log) = audited_fixture(Policy::default()).await;
    let seed_a = rfc_vectors::RFC4226_SEED;
    let seed_b = b"another-seed-of-20-b";
    for (id, seed) in [("a", seed_a), ("b", &seed_b[..])] {
        f.service
            .create(T, import(id, OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed))
            .await
            .expect("create");
    }
    let code = |seed: &[u8], c| soft_code(seed, HashAlgorithm::Sha1, c, 6);
    // A verifies, so A's unwrapped seed is cached.
    assert_eq!(
        f.service
            .verify(T, "a", &code(seed_a, 0))
            .await
            .expect("a")
            .verdict,
        Verdict::Accepted
    );
    let a = f.store.get(T, "a").await.expect("get").expect("a");
    let b_before = f.store.get(T, "b").await.expect("get").expect("b");
    let swaps: [(&str, Option<[u8; 32]>); 3] = [
        ("blob only", b_before.seed_binding),
        ("blob and A's binding", a.seed_binding),
        ("blob without a binding", None),
    ];
    for (swap, binding) in swaps {
        let (blob, version) = (a.wrapped_seed.clone(), a.master_key_version);
        f.store
            .update(T, "b", move |r| {
                r.wrapped_seed = blob;
                r.master_key_version = version;
                r.seed_binding = binding;
                Update::Write(())
            })
            .await
            .expect("tamper");
        let (hits, misses, entries) = f.hsm.seed_cache_stats();
        for (whose, c) in [("A's", code(seed_a, 1)), ("B's", code(seed_b, 0))] {
            let got = f.service.verify(T, "b", &c).await;
            assert!(
                matches!(got, Err(Error::Integrity(ref m)) if m.contains("\"b\" failed its integrity check")),
                "{swap}, {whose} code: {got:?}"
            );
            let status = tonic::Status::from(got.unwrap_err());
            assert_eq!(status.code(), tonic::Code::DataLoss, "{swap}");
            let last = records(&log).await.pop().expect("a record");
            assert_eq!(
                (last.action.as_str(), last.object.as_str(), result_of(&last)),
                ("credential.verify", "b", "tampered"),
                "{swap}, {whose} code"
            );
            assert_eq!(last.outcome, "failed: tampered", "{swap}");
            let resync = f
                .service
                .resync(T, "b", &code(seed_a, 2), &code(seed_a, 3))
                .await;
            assert!(
                matches!(resync, Err(Error::Integrity(_))),
                "{swap}: {resync:?}"
            );
        }
        let after = f.hsm.seed_cache_stats();
        assert_eq!(
            after.0, hits,
            "{swap}: A's cached seed was never used for B"
        );
        assert_eq!(after.2, entries, "{swap}: nothing was unwrapped");
        assert!(after.1 >= misses, "{swap}");
        let b_now = f.store.get(T, "b").await.expect("get").expect("b");
        assert_eq!(
            (b_now.failures, b_now.last_accepted, b_now.next_counter),
            (0, None, 0),
            "{swap}: nothing counted or consumed"
        );
    }
    // A itself is untouched and still verifies.
    assert_eq!(
        f.service
            .verify(T, "a", &code(seed_a, 1))
            .await
            .expect("a")
            .verdict,
        Verdict::Accepted
    );
    // Restoring B's own blob and binding makes B verify again.
    let b_back = b_before.clone();
    f.store
        .update(T, "b", move |r| {
            r.wrapped_seed = b_back.wrapped_seed.clone();
            r.master_key_version = b_back.master_key_version;
            r.seed_binding = b_back.seed_binding;
            Update::Write(())
        })
        .await
        .expect("restore");
    assert_eq!(
        f.service
            .verify(T, "b", &code(seed_b, 0))
            .await
            .expect("b")
            .verdict,
        Verdict::Accepted
    );
}

/// Records from before bindings get one at start-up, once; enrolments and re-wraps
/// always bind; after the migration an unbound record is refused.
#[tokio::test]
async fn start_up_migration_binds_existing_records_once() {
    let f = fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    for id in ["old-1", "old-2", "old-3"] {
        f.service
            .create(T, import(id, OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed))
            .await
            .expect("create");
        // As a store from before bindings holds it.
        f.store
            .update(T, id, |r| {
                r.seed_binding = None;
                Update::Write(())
            })
            .await
            .expect("unbind");
    }
    // The fixture migrated an empty store; a store from before bindings has no mark.
    let fresh = tempfile::tempdir().expect("tempdir");
    let old_store = Arc::new(
        Store::open_redb(&fresh.path().join(EMBEDDED_FILE), StoreOptions::default())
            .expect("store"),
    );
    let mut recs = f.store.list(None, None, 10).await.expect("list");
    recs.iter_mut().for_each(|r| r.seed_binding = None);
    old_store.insert_many(recs).await.expect("copy");
    let bound = binding::migrate(&f.hsm, old_store.as_ref(), 2)
        .await
        .expect("migrate");
    assert_eq!(bound, 3);
    assert_eq!(
        binding::migrate(&f.hsm, old_store.as_ref(), 2)
            .await
            .expect("again"),
        0,
        "one time only"
    );
    let migrated = Credentials::new(
        f.hsm.clone(),
        old_store.clone(),
        Policy::default(),
        1,
        f.clock.clone(),
    );
    assert_eq!(
        migrated
            .verify(T, "old-2", &soft_code(seed, HashAlgorithm::Sha1, 0, 6))
            .await
            .expect("verify")
            .verdict,
        Verdict::Accepted
    );
    // A record that lost its binding after the migration is refused.
    old_store
        .update(T, "old-3", |r| {
            r.seed_binding = None;
            Update::Write(())
        })
        .await
        .expect("unbind");
    let refused = migrated
        .verify(T, "old-3", &soft_code(seed, HashAlgorithm::Sha1, 0, 6))
        .await;
    assert!(matches!(refused, Err(Error::Integrity(_))), "{refused:?}");
}

/// The verification's record names the tenant and, for an accepted code, the evidence it
/// left, in the same commit as the accepted step and the evidence itself.
#[tokio::test]
async fn the_verification_record_carries_tenant_and_evidence() {
    let (f, log) = audited_fixture(Policy::default()).await;
    let seed = rfc_vectors::RFC4226_SEED;
    let new = NewCredential {
        subject: Some("citizen-7".into()),
        ..import("e", OtpKind::Hotp, HashAlgorithm::Sha1, 6, seed)
    };
    f.service.create(T, new).await.expect("create");
    let commits = f.store.commits();
    let v = f
        .service
        .verify_by(None, T, "e", &soft_code(seed, HashAlgorithm::Sha1, 0, 6))
        .await
        .expect("verify");
    assert_eq!(
        f.store.commits(),
        commits + 1,
        "step, evidence, record: one commit"
    );
    let evidence = v.evidence_id.expect("evidence");
    let missing = f.service.verify_by(None, "tenant-b", "e", "123456").await;
    assert!(matches!(missing, Err(Error::NotFound(_))));
    let recs = records(&log).await;
    let detail = |r: &crate::audit::AuditRecord, k: &str| {
        r.details
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let verifies: Vec<_> = recs
        .iter()
        .filter(|r| r.action == "credential.verify")
        .collect();
    assert_eq!(verifies.len(), 2);
    assert_eq!(detail(verifies[0], "tenant").as_deref(), Some(T));
    assert_eq!(detail(verifies[0], "evidence_id"), Some(evidence));
    assert_eq!(
        detail(verifies[1], "tenant").as_deref(),
        Some("tenant-b"),
        "the tenant that asked"
    );
    assert_eq!(detail(verifies[1], "evidence_id"), None);
    let created = recs
        .iter()
        .find(|r| r.action == "credential.create")
        .expect("create record");
    assert_eq!(detail(created, "tenant").as_deref(), Some(T));
}
