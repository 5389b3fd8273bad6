//! The service's Prometheus metrics: one registry for the process, the families in it,
//! and the small functions the modules call to move them.
//!
//! A leaf, like `common`: it imports nothing from the crate, so `hsm`, `store`, `audit`,
//! `events` and the domain modules record their figures here without importing upwards
//! (`tests/layering.rs` checks that). The registry is a process-wide static: one
//! process is one service instance, and the HSM pool, the group committer and the
//! audit log then need no handle passed down to them. (Test processes that run several
//! servers see their figures summed; tests compare before and after.)
//!
//! Labels are closed sets of `&'static str` chosen by the code (method names from the
//! role table, gRPC code names, verdicts, PKCS#11 function and return-value names,
//! challenge states), never text from a request: no credential id, subject, code, key
//! or tenant ever becomes a label (privacy, and a bounded number of series).
//!
//! `[metrics] listen` serves [`encode`] at `GET /metrics` (see `server::metrics_http`);
//! the README lists every family.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Where the metrics endpoint serves [`encode`].
pub const PATH: &str = "/metrics";

/// The `Content-Type` of [`encode`]'s output (the Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A label set of `N` fixed names with values the code chose.
type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// Latency buckets (seconds) of a gRPC call: 250 µs to 10 s.
const RPC_BUCKETS: [f64; 15] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Latency buckets (seconds) of one HSM job or one commit: 25 µs to 1 s.
const FAST_BUCKETS: [f64; 15] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];
/// Jobs per commit batch.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
/// Event lag buckets (seconds): 1 ms to 1 min.
const LAG_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

/// The `result` values of `hsm_verify_results_total` (the VerifyResult verdicts).
pub const VERIFY_RESULTS: [&str; 5] = ["accepted", "rejected", "replayed", "locked", "disabled"];
/// The `state` values of `hsm_challenges_total` (ChallengeState of devices.proto).
pub const CHALLENGE_STATES: [&str; 6] = [
    "pending",
    "approved",
    "denied",
    "reported",
    "expired",
    "cancelled",
];

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

/// Every family, registered once.
struct Metrics {
    registry: Registry,
    rpc_requests: Family<Labels<2>, Counter>,
    rpc_duration: HistogramFamily<2>,
    verify_results: Family<Labels<1>, Counter>,
    hsm_queue_depth: Gauge,
    hsm_queue_wait: Histogram,
    hsm_job_duration: Histogram,
    hsm_rejected_busy: Counter,
    /// Owned values: the names are built from cryptoki's enums (a closed set).
    hsm_errors: Family<[(&'static str, String); 2], Counter>,
    hsm_sessions_replaced: Counter,
    seed_cache_hits: Counter,
    seed_cache_misses: Counter,
    seed_cache_evictions: Counter,
    store_batch_size: Histogram,
    store_commit_duration: Histogram,
    store_failed_batches: Counter,
    audit_records: Counter,
    audit_checkpoints: Counter,
    event_lag: Histogram,
    event_watches_open: Gauge,
    event_delivered: Counter,
    challenges: Family<Labels<1>, Counter>,
    /// Plain sums for [`summary`] (a family cannot be summed through its public API).
    sums: Sums,
}

#[derive(Default)]
struct Sums {
    rpc_requests: AtomicU64,
    rpc_failed: AtomicU64,
    hsm_errors: AtomicU64,
    commits: AtomicU64,
    committed_jobs: AtomicU64,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc_histogram),
            verify_results: Family::default(),
            hsm_queue_depth: Gauge::default(),
            hsm_queue_wait: Histogram::new(FAST_BUCKETS),
            hsm_job_duration: Histogram::new(FAST_BUCKETS),
            hsm_rejected_busy: Counter::default(),
            hsm_errors: Family::default(),
            hsm_sessions_replaced: Counter::default(),
            seed_cache_hits: Counter::default(),
            seed_cache_misses: Counter::default(),
            seed_cache_evictions: Counter::default(),
            store_batch_size: Histogram::new(BATCH_BUCKETS),
            store_commit_duration: Histogram::new(FAST_BUCKETS),
            store_failed_batches: Counter::default(),
            audit_records: Counter::default(),
            audit_checkpoints: Counter::default(),
            event_lag: Histogram::new(LAG_BUCKETS),
            event_watches_open: Gauge::default(),
            event_delivered: Counter::default(),
            challenges: Family::default(),
            sums: Sums::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        r.register(
            "hsm_rpc_requests",
            "gRPC calls answered, by method (hsm.v1 methods, health, reflection; any other path is \"unknown\") and gRPC status code",
            m.rpc_requests.clone(),
        );
        r.register_with_unit(
            "hsm_rpc_duration",
            "Time from a gRPC call's arrival to its last response frame (a stream: its whole life), by method and status",
            Unit::Seconds,
            m.rpc_duration.clone(),
        );
        r.register(
            "hsm_verify_results",
            "VerifyCode verdicts, by result (accepted, rejected, replayed, locked, disabled)",
            m.verify_results.clone(),
        );
        r.register(
            "hsm_pool_queue_depth",
            "HSM jobs waiting for a session right now",
            m.hsm_queue_depth.clone(),
        );
        r.register_with_unit(
            "hsm_pool_queue_wait",
            "Time an HSM job waited in the queue before a session took it",
            Unit::Seconds,
            m.hsm_queue_wait.clone(),
        );
        r.register_with_unit(
            "hsm_pool_job_duration",
            "Time an HSM job ran on its session (the PKCS#11 calls, including a retry on a replaced session)",
            Unit::Seconds,
            m.hsm_job_duration.clone(),
        );
        r.register(
            "hsm_pool_rejected_busy",
            "HSM jobs refused because the queue was full (answered RESOURCE_EXHAUSTED/UNAVAILABLE)",
            m.hsm_rejected_busy.clone(),
        );
        r.register(
            "hsm_pkcs11_errors",
            "PKCS#11 calls that returned an error, by function (C_Sign, ...) and return value (CKR_...)",
            m.hsm_errors.clone(),
        );
        r.register(
            "hsm_pool_sessions_replaced",
            "HSM sessions dropped and reopened after a session or device error",
            m.hsm_sessions_replaced.clone(),
        );
        r.register(
            "hsm_seed_cache_hits",
            "Seed lookups answered by an unwrapped session object",
            m.seed_cache_hits.clone(),
        );
        r.register(
            "hsm_seed_cache_misses",
            "Seed lookups that had to unwrap the seed",
            m.seed_cache_misses.clone(),
        );
        r.register(
            "hsm_seed_cache_evictions",
            "Unwrapped seeds destroyed to make room (least recently used)",
            m.seed_cache_evictions.clone(),
        );
        r.register(
            "hsm_store_batch_size",
            "Write jobs per committed group-commit batch",
            m.store_batch_size.clone(),
        );
        r.register_with_unit(
            "hsm_store_commit_duration",
            "Time of one group commit (the backend's commit: fsync or database round trip)",
            Unit::Seconds,
            m.store_commit_duration.clone(),
        );
        r.register(
            "hsm_store_failed_batches",
            "Group-commit batches rolled back or failed to commit",
            m.store_failed_batches.clone(),
        );
        r.register(
            "hsm_audit_records",
            "Audit records durably appended (checkpoints included)",
            m.audit_records.clone(),
        );
        r.register(
            "hsm_audit_checkpoints",
            "Signed audit checkpoints appended",
            m.audit_checkpoints.clone(),
        );
        r.register_with_unit(
            "hsm_event_lag",
            "Time from an event's creation (its time_ms) to its delivery on a watch",
            Unit::Seconds,
            m.event_lag.clone(),
        );
        r.register(
            "hsm_event_watches_open",
            "Open WatchEvents streams",
            m.event_watches_open.clone(),
        );
        r.register(
            "hsm_events_delivered",
            "Events sent on watches",
            m.event_delivered.clone(),
        );
        r.register(
            "hsm_challenges",
            "App-approval challenges entering a state, by state",
            m.challenges.clone(),
        );
        // Every verdict and challenge state from the start (zeros), so a dashboard sees the
        // series before the first one happens.
        for result in VERIFY_RESULTS {
            let _ = m.verify_results.get_or_create(&[("result", result)]);
        }
        for state in CHALLENGE_STATES {
            let _ = m.challenges.get_or_create(&[("state", state)]);
        }
        Metrics { registry: r, ..m }
    }
}

/// The whole registry in the Prometheus text format ([`CONTENT_TYPE`]).
pub fn encode() -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &METRICS.registry);
    out
}

/// The name of a gRPC status code as metrics label it (`OK`, `INVALID_ARGUMENT`, ...).
pub fn grpc_code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("UNKNOWN")
}

/// One gRPC call answered: `method` from a fixed table, `status` from
/// [`grpc_code_name`].
pub fn rpc(method: &'static str, status: &'static str, elapsed: Duration) {
    let m = &*METRICS;
    let labels = [("method", method), ("status", status)];
    m.rpc_requests.get_or_create(&labels).inc();
    m.rpc_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    m.sums.rpc_requests.fetch_add(1, Ordering::Relaxed);
    if status != "OK" {
        m.sums.rpc_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A VerifyCode verdict: `accepted`, `rejected`, `replayed`, `locked` or `disabled`.
pub fn verify_result(result: &'static str) {
    METRICS
        .verify_results
        .get_or_create(&[("result", result)])
        .inc();
}

/// An app-approval challenge entered `state` (`pending`, `approved`, `denied`,
/// `expired`, ...: the states of the challenge lifecycle, never an id or a subject).
pub fn challenge_state(state: &'static str) {
    METRICS.challenges.get_or_create(&[("state", state)]).inc();
}

/// A job entered the HSM queue.
pub fn hsm_job_queued() {
    METRICS.hsm_queue_depth.inc();
}

/// A job counted by [`hsm_job_queued`] did not enter the queue after all (full, closed).
pub fn hsm_job_not_queued() {
    METRICS.hsm_queue_depth.dec();
}

/// A session took a job off the HSM queue after `waited`.
pub fn hsm_job_started(waited: Duration) {
    METRICS.hsm_queue_depth.dec();
    METRICS.hsm_queue_wait.observe(waited.as_secs_f64());
}

/// A job ran for `elapsed` on its session.
pub fn hsm_job_finished(elapsed: Duration) {
    METRICS.hsm_job_duration.observe(elapsed.as_secs_f64());
}

/// A job was refused: the HSM queue was full.
pub fn hsm_rejected_busy() {
    METRICS.hsm_rejected_busy.inc();
}

/// A PKCS#11 call failed: `function` (`C_Sign`) returned `rv` (`CKR_DEVICE_ERROR`). Both
/// are names of the PKCS#11 specification's closed sets (`hsm::error` spells them).
pub fn pkcs11_error(function: String, rv: String) {
    METRICS
        .hsm_errors
        .get_or_create(&[("function", function), ("rv", rv)])
        .inc();
    METRICS.sums.hsm_errors.fetch_add(1, Ordering::Relaxed);
}

/// An HSM session was dropped and a new one opened.
pub fn hsm_session_replaced() {
    METRICS.hsm_sessions_replaced.inc();
}

/// A seed lookup found an unwrapped handle.
pub fn seed_cache_hit() {
    METRICS.seed_cache_hits.inc();
}

/// A seed lookup had to unwrap.
pub fn seed_cache_miss() {
    METRICS.seed_cache_misses.inc();
}

/// An unwrapped seed was destroyed to make room.
pub fn seed_cache_eviction() {
    METRICS.seed_cache_evictions.inc();
}

/// A group-commit batch of `jobs` write jobs committed; the commit took `elapsed`.
pub fn store_committed(jobs: usize, elapsed: Duration) {
    let m = &*METRICS;
    m.store_batch_size.observe(jobs as f64);
    m.store_commit_duration.observe(elapsed.as_secs_f64());
    m.sums.commits.fetch_add(1, Ordering::Relaxed);
    m.sums
        .committed_jobs
        .fetch_add(jobs as u64, Ordering::Relaxed);
}

/// A group-commit batch was rolled back or failed to commit.
pub fn store_batch_failed() {
    METRICS.store_failed_batches.inc();
}

/// `n` audit records were durably appended (counted at commit, whoever wrote them).
pub fn audit_records(n: u64) {
    if n > 0 {
        METRICS.audit_records.inc_by(n);
    }
}

/// A signed audit checkpoint was appended.
pub fn audit_checkpoint() {
    METRICS.audit_checkpoints.inc();
}

/// An event created at `created_ms` (Unix ms) was sent on a watch at `now_ms`.
pub fn event_delivered(created_ms: u64, now_ms: u64) {
    let lag = now_ms.saturating_sub(created_ms);
    METRICS.event_lag.observe(lag as f64 / 1000.0);
    METRICS.event_delivered.inc();
}

/// Held by an open watch: the open-watches gauge counts the live ones.
#[derive(Debug)]
#[must_use = "the watch counts as open while this lives"]
pub struct OpenWatch(());

impl OpenWatch {
    /// A watch opened.
    pub fn new() -> OpenWatch {
        METRICS.event_watches_open.inc();
        OpenWatch(())
    }
}

impl Default for OpenWatch {
    fn default() -> Self {
        OpenWatch::new()
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        METRICS.event_watches_open.dec();
    }
}

/// The main figures, for `GetStatus` (and `hsmctl status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// gRPC calls answered.
    pub rpc_requests: u64,
    /// gRPC calls answered with a status other than OK.
    pub rpc_failed: u64,
    /// VerifyCode verdicts ACCEPTED.
    pub verify_accepted: u64,
    /// VerifyCode verdicts other than ACCEPTED.
    pub verify_not_accepted: u64,
    /// PKCS#11 errors.
    pub hsm_errors: u64,
    /// HSM sessions replaced.
    pub hsm_sessions_replaced: u64,
    /// Seed cache hits.
    pub seed_cache_hits: u64,
    /// Seed cache misses.
    pub seed_cache_misses: u64,
    /// Seed cache evictions.
    pub seed_cache_evictions: u64,
    /// Group commits.
    pub commits: u64,
    /// Write jobs in those commits.
    pub committed_jobs: u64,
    /// Audit records appended.
    pub audit_records: u64,
    /// Audit checkpoints appended.
    pub audit_checkpoints: u64,
    /// Open event watches.
    pub event_watches_open: u64,
}

/// The main figures now.
pub fn summary() -> Summary {
    let m = &*METRICS;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let verdict = |r: &'static str| {
        m.verify_results
            .get(&[("result", r)])
            .map_or(0, |c| c.get())
    };
    let accepted = verdict("accepted");
    let not_accepted = VERIFY_RESULTS[1..].iter().copied().map(verdict).sum();
    Summary {
        rpc_requests: load(&m.sums.rpc_requests),
        rpc_failed: load(&m.sums.rpc_failed),
        verify_accepted: accepted,
        verify_not_accepted: not_accepted,
        hsm_errors: load(&m.sums.hsm_errors),
        hsm_sessions_replaced: m.hsm_sessions_replaced.get(),
        seed_cache_hits: m.seed_cache_hits.get(),
        seed_cache_misses: m.seed_cache_misses.get(),
        seed_cache_evictions: m.seed_cache_evictions.get(),
        commits: load(&m.sums.commits),
        committed_jobs: load(&m.sums.committed_jobs),
        audit_records: m.audit_records.get(),
        audit_checkpoints: m.audit_checkpoints.get(),
        event_watches_open: u64::try_from(m.event_watches_open.get()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_family_with_its_labels() {
        rpc(
            "hsm.v1.CredentialService/VerifyCode",
            "OK",
            Duration::from_millis(3),
        );
        verify_result("accepted");
        pkcs11_error("C_Sign".into(), "CKR_DEVICE_ERROR".into());
        let _w = OpenWatch::new();
        let text = encode();
        for needle in [
            "# TYPE hsm_rpc_requests_total counter",
            "hsm_rpc_requests_total{method=\"hsm.v1.CredentialService/VerifyCode\",status=\"OK\"}",
            "# TYPE hsm_rpc_duration_seconds histogram",
            "hsm_rpc_duration_seconds_bucket{method=\"hsm.v1.CredentialService/VerifyCode\",status=\"OK\",le=\"0.005\"}",
            "hsm_verify_results_total{result=\"accepted\"}",
            "hsm_pkcs11_errors_total{function=\"C_Sign\",rv=\"CKR_DEVICE_ERROR\"}",
            "\nhsm_event_watches_open ",
            "hsm_store_commit_duration_seconds_count",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Other tests of this process move the same registry: at least ours.
        let open = text
            .lines()
            .find_map(|l| l.strip_prefix("hsm_event_watches_open "))
            .and_then(|v| v.parse::<i64>().ok());
        assert!(open >= Some(1), "{open:?}");
        assert!(summary().rpc_requests >= 1);
    }

    #[test]
    fn code_names_follow_the_grpc_table() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(8), "RESOURCE_EXHAUSTED");
        assert_eq!(grpc_code_name(16), "UNAUTHENTICATED");
        assert_eq!(grpc_code_name(17), "UNKNOWN");
        assert_eq!(grpc_code_name(-1), "UNKNOWN");
    }
}
