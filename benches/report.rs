//! `benches/report`: the physical limits of one machine, measured in one run —
//! HMAC-SHA1 ×12 (one HOTP verification with the default look-ahead), HMAC-SHA1 ×3
//! (one TOTP window) and ECDSA P-256 signing in software (ring) and through SoftHSM
//! directly via cryptoki (no service around it), on 1 and 2 threads — then the
//! in-process dev service end to end over mTLS gRPC with `hsm_client::load` in a
//! process of its own, each row the median of interleaved runs: the headline
//! VerifyCode rows on the accepted path (in-order HOTP codes over 2,000 credentials,
//! every answer ACCEPTED, checked: a row with fewer fails the report), the old
//! TOTP rows (almost all REPLAYED, labelled so), SignAssertion ES256, at 1 to 128 in
//! flight, durable and without fsync, an open loop at half the accepted peak; the
//! accepted path at 64 in flight with WatchEvents streams open (one follower, whose
//! commit-to-delivery lag is measured, or 1,000 idle watchers; group `events`); logins
//! with the app authenticator (challenge, signed approval, assertion; group `approve`)
//! against SoftHSM-direct ECDSA P-256 signing (the challenge and assertion signatures)
//! and software ECDSA P-256 verification (`p256`, the device signature); and the
//! targets as ratios measured in this run.
//!
//! The end-to-end rows are the table [`SERIES`]: one line per backend, instance count
//! and path. Usage: `report [--quick] [--out DIR]` (default `target/report/`).
//! Writes `report.md` and `report.svg` (e2e throughput by concurrency, with
//! the SoftHSM-direct and software limits on 2 threads as horizontal lines); exits 1
//! (after writing them) when an accepted-path row was not ~100% ACCEPTED.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use hsm_benches::{session_hmac_key, Bench};
use hsm_service::otp;

/// DER of the P-256 curve OID, for CKA_EC_PARAMS.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// One measured operation: completed operations per second on `threads` threads.
struct Row {
    family: &'static str,
    op: String,
    threads: usize,
    ops_per_s: f64,
}

/// Run `op` on `threads` threads for `warmup + dur`; count only after warm-up.
fn measure<S: Send + 'static>(
    threads: usize,
    warmup: Duration,
    dur: Duration,
    make: impl Fn() -> S + Send + Sync + 'static,
    op: impl Fn(&mut S, u64) + Send + Sync + 'static,
) -> f64 {
    let make = Arc::new(make);
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (make, op, barrier) = (make.clone(), op.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut state = make();
                barrier.wait();
                let start = Instant::now();
                let mut i = 0u64;
                while start.elapsed() < warmup {
                    op(&mut state, i);
                    i += 1;
                }
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < dur {
                    op(&mut state, i + n);
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    barrier.wait();
    handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .sum()
}

/// First argument of the report re-executed as the load generator of one run.
const LOAD_CHILD: &str = "--load-child";

/// HMACs the service computes per HOTP verification in steady state with the default
/// policy: from the last accepted counter to the next counter plus the look-ahead
/// (`credentials::policy::verify_window`), so `hotp_look_ahead + 2` = 12 (a fresh
/// credential's first verification computes one fewer).
fn hotp_hmacs() -> u64 {
    u64::from(hsm_service::config::CredentialsConfig::default().hotp_look_ahead) + 2
}

/// HMACs of one TOTP verification with the default window of ±1 step.
fn totp_hmacs() -> u64 {
    2 * u64::from(hsm_service::config::CredentialsConfig::default().totp_window) + 1
}

fn hmac_op(n: u64) -> String {
    format!("HMAC-SHA1 ×{n}")
}

const ECDSA: &str = "ECDSA P-256 sign";
/// Software only: the service's check of a device signature (`p256`).
const ECDSA_VERIFY: &str = "ECDSA P-256 verify";

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some(LOAD_CHILD) => return load_child(std::env::args().skip(2).collect()),
        Some(SERVICE_CHILD) => return service_child(std::env::args().skip(2).collect()),
        Some(WATCH_CHILD) => return watch_child(std::env::args().skip(2).collect()),
        _ => {}
    }
    let mut quick = false;
    let mut out = PathBuf::from("target/report");
    let mut only = Only::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            "--only" => only.group = Some(args.next().expect("--only GROUP")),
            "--concurrency" => {
                only.concurrency = Some(
                    args.next()
                        .and_then(|c| c.parse().ok())
                        .expect("--concurrency N"),
                )
            }
            other => {
                eprintln!(
                    "report: unknown argument {other:?} (usage: report [--quick] [--out DIR] \
                     [--only accepted|replayed|sign|events|approve] [--concurrency N])"
                );
                std::process::exit(2);
            }
        }
    }
    // A filtered run is about its end-to-end rows: the limits in short.
    let (warmup, dur) = if quick || only.group.is_some() {
        (Duration::from_millis(20), Duration::from_millis(100))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    let bench = Arc::new(Bench::new(1));
    let seed: Vec<u8> = (0u8..20).collect();
    let mut rows = Vec::new();
    for threads in [1, 2] {
        for n in [hotp_hmacs(), totp_hmacs()] {
            let s = seed.clone();
            rows.push(Row {
                family: "software (ring)",
                op: hmac_op(n),
                threads,
                ops_per_s: measure(
                    threads,
                    warmup,
                    dur,
                    move || ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &s),
                    move |k, i| {
                        for f in i * n..(i + 1) * n {
                            std::hint::black_box(ring::hmac::sign(k, &otp::moving_factor(f)));
                        }
                    },
                ),
            });
        }
        rows.push(Row {
            family: "software (ring)",
            op: ECDSA.into(),
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                || {
                    let rng = ring::rand::SystemRandom::new();
                    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
                    let pkcs8 =
                        ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("keygen");
                    let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                        .expect("key");
                    (key, rng)
                },
                |(key, rng), i| {
                    std::hint::black_box(key.sign(rng, &i.to_be_bytes()).expect("sign"));
                },
            ),
        });
        rows.push(Row {
            family: "software (p256)",
            op: ECDSA_VERIFY.into(),
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                || {
                    // A device's key and one of its answers (an approval's payload size).
                    let key = hsm_client::app::DeviceKey::generate();
                    let msg = vec![0x5a; 300];
                    let sig = key.sign(&msg);
                    let public = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_sec1())
                        .expect("point");
                    (public, msg, sig)
                },
                |(public, msg, sig), _| {
                    use p256::ecdsa::signature::Verifier;
                    // As the service does: parse the DER strictly, then verify.
                    let sig = p256::ecdsa::Signature::from_der(sig).expect("DER");
                    public
                        .verify(std::hint::black_box(msg), &sig)
                        .expect("verifies");
                },
            ),
        });
        for n in [hotp_hmacs(), totp_hmacs()] {
            let (b, s) = (bench.clone(), seed.clone());
            rows.push(Row {
                family: "SoftHSM direct",
                op: hmac_op(n),
                threads,
                ops_per_s: measure(
                    threads,
                    warmup,
                    dur,
                    move || {
                        let session = b.direct_session();
                        let key = session_hmac_key(&session, &s);
                        (session, key)
                    },
                    move |(session, key), i| {
                        for f in i * n..(i + 1) * n {
                            std::hint::black_box(
                                session
                                    .sign(&Mechanism::Sha1Hmac, *key, &otp::moving_factor(f))
                                    .expect("hmac"),
                            );
                        }
                    },
                ),
            });
        }
        let b = bench.clone();
        rows.push(Row {
            family: "SoftHSM direct",
            op: ECDSA.into(),
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                move || {
                    let session = b.direct_session();
                    let (_public, private) = session
                        .generate_key_pair(
                            &Mechanism::EccKeyPairGen,
                            &[
                                Attribute::Token(true),
                                Attribute::EcParams(P256_OID.to_vec()),
                                Attribute::Verify(true),
                            ],
                            &[
                                Attribute::Token(true),
                                Attribute::Private(true),
                                Attribute::Sensitive(true),
                                Attribute::Sign(true),
                            ],
                        )
                        .expect("token P-256 key");
                    (session, private)
                },
                |(session, key), i| {
                    let mut digest = [0u8; 32];
                    digest[..8].copy_from_slice(&i.to_be_bytes());
                    std::hint::black_box(
                        session
                            .sign(&Mechanism::Ecdsa, *key, &digest)
                            .expect("ecdsa"),
                    );
                },
            ),
        });
    }
    drop(bench);
    let (e2e, skipped) = end_to_end(quick, &only);
    let mut md = markdown(&rows, quick);
    md.push_str(&e2e_markdown(&rows, &e2e, skipped.as_deref()));
    print!("{md}");
    std::fs::create_dir_all(&out).expect("--out directory");
    std::fs::write(out.join("report.md"), &md).expect("write report.md");
    plot(&out.join("report.svg"), &rows, &e2e).expect("write report.svg");
    let failed: Vec<String> = e2e
        .iter()
        .filter(|r| !r.accepted_ok())
        .map(|r| format!("{} (worst run: {})", r.name(), r.worst_outcomes))
        .collect();
    if !failed.is_empty() {
        eprintln!(
            "report: accepted-path rows below {:.1}% ACCEPTED: {}",
            100.0 * ACCEPTED_MIN,
            failed.join("; ")
        );
        std::process::exit(1);
    }
}

/// First line of a command's standard output, if it ran and printed one.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().next()?.trim().to_owned();
    (out.status.success() && !line.is_empty()).then_some(line)
}

fn markdown(rows: &[Row], quick: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "# Physical limits{}\n\nnproc {nproc}, CPU {cpu}, {}, {}\n\n",
        if quick {
            " (--quick: figures meaningless)"
        } else {
            ""
        },
        command_line("softhsm2-util", &["--version"]).map_or_else(
            || "SoftHSM version unknown".into(),
            |v| format!("SoftHSM {v}")
        ),
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| format!(
            "unix time {}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ))
    );
    md.push_str(
        "| operation | threads | software ops/s | SoftHSM-direct ops/s | direct / software |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|\n");
    for sw in rows
        .iter()
        .filter(|r| r.family.starts_with("software") && r.op != ECDSA_VERIFY)
    {
        let direct = rows
            .iter()
            .find(|r| r.family.starts_with("SoftHSM") && r.op == sw.op && r.threads == sw.threads)
            .map_or(0.0, |r| r.ops_per_s);
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.1}% |\n",
            sw.op,
            sw.threads,
            sw.ops_per_s,
            direct,
            100.0 * direct / sw.ops_per_s
        ));
    }
    for r in rows.iter().filter(|r| r.op == ECDSA_VERIFY) {
        md.push_str(&format!(
            "| {} ({}) | {} | {:.0} | - (public-key operation, in software) | - |\n",
            r.op, r.family, r.threads, r.ops_per_s
        ));
    }
    md
}

/// What the calls of an end-to-end row do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// VerifyCode with in-order HOTP codes (`--scenario verify-hotp`), one request per
    /// credential in flight: every answer ACCEPTED, the login path. The headline.
    HotpAccepted,
    /// VerifyCode with the current TOTP step's code (`--scenario verify-totp`): the first
    /// use per credential and 30 s step is ACCEPTED, every later one REPLAYED.
    TotpReplayed,
    /// SignAssertion ES256, unbound (`--scenario sign-assertion`).
    SignAssertion,
    /// A login with the app (`--scenario approve`): CreateChallenge (signed in the HSM),
    /// AnswerChallenge APPROVE (device signature verified in software), GetChallenge
    /// (the evidence id), SignAssertion citing the approval's evidence (bound: the
    /// generator refuses an approval without evidence). Every login must be APPROVED.
    Approve,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::HotpAccepted => "VerifyCode, accepted (HOTP in order)",
            Path::TotpReplayed => "VerifyCode, mostly REPLAYED (TOTP current step)",
            Path::SignAssertion => "SignAssertion ES256",
            Path::Approve => "App login (challenge, approve, assertion)",
        }
    }

    /// The generator's `--scenario`.
    fn scenario(self) -> &'static str {
        match self {
            Path::HotpAccepted => "verify-hotp",
            Path::TotpReplayed => "verify-totp",
            Path::SignAssertion => "sign-assertion",
            Path::Approve => "approve",
        }
    }

    /// Credentials the generator creates for a run (all of them fit the dev seed cache).
    fn credentials(self, quick: bool) -> usize {
        match (self, quick) {
            (Path::HotpAccepted, false) => 2000,
            (Path::HotpAccepted, true) => 50,
            // Devices (one subject each), activated per run.
            (Path::Approve, true) => 20,
            _ => 200,
        }
    }

    /// The SoftHSM-direct operation of the same HSM work per call.
    fn limit_op(self) -> String {
        match self {
            Path::HotpAccepted => hmac_op(hotp_hmacs()),
            Path::TotpReplayed => hmac_op(totp_hmacs()),
            Path::SignAssertion | Path::Approve => ECDSA.to_owned(),
        }
    }

    /// SoftHSM signatures per call: an app login has two (the challenge's and the
    /// assertion's).
    fn hsm_ops(self) -> f64 {
        match self {
            Path::Approve => 2.0,
            _ => 1.0,
        }
    }
}

/// The store the service instances of a row run on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    /// The embedded redb store, durable (one fsync per group commit): the default.
    Redb,
    /// redb without fsync (`DevEnv::start_without_fsync_bench_only`): bench only, the
    /// cost of durability.
    RedbNoFsync,
    /// PostgreSQL on a private cluster of this run (`scripts/postgres.sh`, fsync and
    /// `synchronous_commit` on), each instance a process of its own (this binary
    /// re-executed, [`service_child`]) over one token and one database, with its own
    /// `[store] instance` (audit chain) and listening address.
    Postgres,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::RedbNoFsync => "redb, no fsync (bench only)",
            Backend::Postgres => "postgres",
        }
    }
}

/// How a row loads the service.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    /// Closed loop: one row per concurrency (`--quick`: 1 and 4 only).
    Closed,
    /// Open loop at half the best closed-loop throughput of the same path, backend and
    /// instance count (that series must come earlier in [`SERIES`]).
    OpenAtHalfPeak,
}

/// One line of the end-to-end table's row set: a path, on a backend, over some instances
/// (the load generator goes round robin over them), under a load. The series of one
/// `group` are interleaved run by run, so the ratios between them see the same drift.
struct Series {
    path: Path,
    backend: Backend,
    instances: usize,
    load: Load,
    group: &'static str,
    watch: Watch,
}

/// WatchEvents streams open on the service during a run (group `events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    /// None: the same run as the accepted rows, for the ratio.
    Unwatched,
    /// One follower of every event from the head on (`follow = true`, no filter),
    /// measuring the lag from each event's `time_ms` to its receipt.
    Follower,
    /// [`IDLE_WATCHERS`] followers of a subject that has no events (from the head on).
    Idle,
}

/// Idle watchers of the `events` group (`--quick`: 20); the default `max_watchers` is
/// 1,024 (the follower and these fit).
const IDLE_WATCHERS: usize = 1000;

impl Watch {
    fn label(self) -> &'static str {
        match self {
            Watch::Unwatched => "no watcher",
            Watch::Follower => "1 follower (lag measured)",
            Watch::Idle => "idle watchers",
        }
    }
}

/// `s` with `watch` streams open during its runs.
const fn watched(mut s: Series, watch: Watch) -> Series {
    s.watch = watch;
    s
}

const fn series(
    path: Path,
    backend: Backend,
    instances: usize,
    load: Load,
    group: &'static str,
) -> Series {
    Series {
        path,
        backend,
        instances,
        load,
        group,
        watch: Watch::Unwatched,
    }
}

use Backend::{Postgres, Redb, RedbNoFsync};
use Load::{Closed, OpenAtHalfPeak};
use Path::{Approve, HotpAccepted, SignAssertion, TotpReplayed};

/// The end-to-end rows, in the order run (groups run one after another). Adding a backend
/// or an instance count is one line here (and, for a new backend, its arm in
/// [`start_service`]).
const SERIES: &[Series] = &[
    series(HotpAccepted, Redb, 1, Closed, "accepted"),
    series(HotpAccepted, RedbNoFsync, 1, Closed, "accepted"),
    series(HotpAccepted, Postgres, 1, Closed, "accepted"),
    series(HotpAccepted, Postgres, 2, Closed, "accepted"),
    series(HotpAccepted, Redb, 1, OpenAtHalfPeak, "accepted"),
    series(TotpReplayed, Redb, 1, Closed, "replayed"),
    series(TotpReplayed, RedbNoFsync, 1, Closed, "replayed"),
    series(SignAssertion, Redb, 1, Closed, "sign"),
    series(SignAssertion, Postgres, 1, Closed, "sign"),
    series(SignAssertion, Postgres, 2, Closed, "sign"),
    // Issue 12: VerifyCode with the event stream read while it runs, at 64 in flight
    // (`--quick`: 4); a section of its own in the report.
    series(HotpAccepted, Redb, 1, Closed, "events"),
    watched(
        series(HotpAccepted, Redb, 1, Closed, "events"),
        Watch::Follower,
    ),
    watched(series(HotpAccepted, Redb, 1, Closed, "events"), Watch::Idle),
    series(HotpAccepted, Postgres, 1, Closed, "events"),
    watched(
        series(HotpAccepted, Postgres, 1, Closed, "events"),
        Watch::Follower,
    ),
    watched(
        series(HotpAccepted, Postgres, 1, Closed, "events"),
        Watch::Idle,
    ),
    // Issue 13: a login with the app authenticator; a section of its own in the report.
    series(Approve, Redb, 1, Closed, "approve"),
    series(Approve, Postgres, 1, Closed, "approve"),
];

/// `[devices] max_challenges_per_minute` of the bench's services (the most the config
/// allows; the default 10 per subject would bound the app logins at 200 devices to 33/s:
/// the push-fatigue limit, not the service, is not what the `approve` rows measure).
const APPROVE_CHALLENGES_PER_MINUTE: u32 = 1000;

/// In flight of the `events` group (unless `--concurrency`).
const EVENTS_IN_FLIGHT: usize = 64;

/// `--only GROUP` / `--concurrency N`: a subset of the end-to-end rows (an A/B of one
/// path), the limits measured in short.
#[derive(Default)]
struct Only {
    group: Option<String>,
    concurrency: Option<usize>,
}

/// Closed-loop concurrencies of the end-to-end rows.
const CONCURRENCIES: [usize; 5] = [1, 4, 16, 64, 128];
/// Runs per end-to-end row; the row is their median.
const ROUNDS: usize = 3;
/// An accepted-path row fails unless every run's share of ACCEPTED answers is at least
/// this.
const ACCEPTED_MIN: f64 = 0.999;

/// One end-to-end row (mTLS gRPC, in-process dev service, `hsm_client::load`): the
/// median of its interleaved runs.
struct E2e {
    path: Path,
    backend: Backend,
    instances: usize,
    concurrency: Option<usize>,
    rate: Option<f64>,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Verdicts and gRPC errors with their counts, e.g. `ACCEPTED 400, REPLAYED 9600`.
    outcomes: String,
    /// Share of ACCEPTED answers of this run (of the median run, once a row).
    accepted_share: f64,
    /// The lowest share of ACCEPTED answers over the row's runs.
    accepted_min: f64,
    /// The outcomes of the run with that lowest share (what a failed row names).
    worst_outcomes: String,
    /// Throughput of every run of this row, in the order run (the row is the median).
    runs_ops_per_s: Vec<f64>,
    /// CPU of the processes during the (median) run.
    cpu: Cpu,
    /// PostgreSQL rows: what the database executed during the (median) run.
    pg: Option<PgStats>,
    /// Requests of the run, warm-up included (measured requests scaled by
    /// (warm-up + duration) / duration).
    requests: f64,
    /// Wall time of the run, set-up included.
    wall_s: f64,
    /// The row's group and the watch streams open during its runs.
    group: &'static str,
    watch: Watch,
    /// Streams the watch child held open (idle watchers: [`IDLE_WATCHERS`]).
    streams: u64,
    /// Follower rows: commit-to-delivery lag (event `time_ms` to receipt) of the
    /// (median) run.
    lag: Option<Lag>,
    /// p99 of every run of this row, in the order run.
    runs_p99_ms: Vec<f64>,
}

/// What the watch child saw during one run.
#[derive(Clone, Copy, Debug, Default)]
struct Lag {
    p50_ms: f64,
    p99_ms: f64,
    events: u64,
}

impl E2e {
    fn load(&self) -> String {
        match (self.concurrency, self.rate) {
            (Some(c), _) => format!("closed, {c} in flight"),
            (None, Some(rate)) => format!("open, {rate:.0}/s"),
            _ => String::new(),
        }
    }

    fn name(&self) -> String {
        format!(
            "{} on {} x{}, {}",
            self.path.label(),
            self.backend.label(),
            self.instances,
            self.load()
        )
    }

    /// False for an accepted-path (or app login) row with a run below [`ACCEPTED_MIN`]
    /// (ACCEPTED, or APPROVED).
    fn accepted_ok(&self) -> bool {
        !matches!(self.path, Path::HotpAccepted | Path::Approve)
            || self.accepted_min >= ACCEPTED_MIN
    }
}

/// The median run of `runs` (by throughput for closed loop, by p99 for open loop), with
/// every run's throughput and the lowest ACCEPTED share attached.
fn median(mut runs: Vec<E2e>) -> E2e {
    let all: Vec<f64> = runs.iter().map(|r| r.ops_per_s).collect();
    let p99s: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
    let worst = runs
        .iter()
        .min_by(|a, b| a.accepted_share.total_cmp(&b.accepted_share));
    let accepted_min = worst.map_or(f64::INFINITY, |r| r.accepted_share);
    let worst_outcomes = worst.map(|r| r.outcomes.clone()).unwrap_or_default();
    let key = |r: &E2e| {
        if r.rate.is_some() {
            r.p99_ms
        } else {
            r.ops_per_s
        }
    };
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mut m = runs.swap_remove(runs.len() / 2);
    m.runs_ops_per_s = all;
    m.runs_p99_ms = p99s;
    m.accepted_min = accepted_min;
    m.worst_outcomes = worst_outcomes;
    m
}

/// The service instances of one (backend, instance count), all over one store.
struct Service {
    backend: Backend,
    instances: usize,
    /// In-process servers (redb).
    servers: Vec<hsm_service::server::RunningServer>,
    /// Instances in processes of their own (PostgreSQL), killed on drop.
    children: Vec<ServiceChild>,
    /// The PostgreSQL database of the instances (dropped after them: field order).
    db: Option<hsm_service::store::postgres::testing::TestDatabase>,
    env: hsm_service::testing::DevEnv,
}

impl Service {
    /// The instances' gRPC addresses.
    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.servers
            .iter()
            .map(|s| s.local_addr())
            .chain(self.children.iter().map(|c| c.addr))
            .collect()
    }

    /// Process ids of the instances (this process for in-process ones).
    fn pids(&self) -> Vec<u32> {
        if self.children.is_empty() {
            vec![std::process::id()]
        } else {
            self.children.iter().map(|c| c.child.id()).collect()
        }
    }
}

/// One instance in a process of its own: this binary as [`service_child`]. Closing its
/// standard input stops it.
struct ServiceChild {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
}

/// First argument of the report re-executed as one service instance over PostgreSQL.
const SERVICE_CHILD: &str = "--service-child";

/// `report --service-child DIR URL INSTANCE`: the dev service of the data directory DIR
/// (its `config.toml`: token, PINs, PKI) with `[store] backend = "postgres"`, `url =
/// URL`, `instance = INSTANCE`, on 127.0.0.1:0, `login-service` allowed unbound
/// assertions (as [`start_service`] does in process). Prints `listening ADDR`, serves
/// until its standard input closes.
fn service_child(args: Vec<String>) {
    let [dir, url, instance] = args.as_slice() else {
        eprintln!("report: {SERVICE_CHILD} DIR URL INSTANCE");
        std::process::exit(2);
    };
    let path = std::path::Path::new(dir).join("config.toml");
    let mut config = hsm_service::config::Config::load(&path).expect("dev config.toml");
    config.server.listen = "127.0.0.1:0".parse().expect("address");
    config.store = hsm_service::config::StoreConfig {
        backend: hsm_service::config::StoreBackendKind::Postgres,
        url: Some(url.clone()),
        instance: Some(instance.clone()),
        ..hsm_service::config::StoreConfig::default()
    };
    for rule in &mut config.clients {
        if rule.cn.as_deref() == Some("login-service") {
            rule.unbound_assertions = true;
        }
    }
    config.devices.max_challenges_per_minute = APPROVE_CHALLENGES_PER_MINUTE;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt
        .block_on(hsm_service::server::start(config))
        .expect("the service starts on PostgreSQL");
    println!("listening {}", server.local_addr());
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    rt.block_on(server.shutdown()).expect("shutdown");
}

/// Starts instance `instance` of `env` over the database `url` (see [`service_child`]).
fn spawn_service_child(
    env: &hsm_service::testing::DevEnv,
    url: &str,
    instance: &str,
) -> ServiceChild {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg(SERVICE_CHILD)
        .arg(env.dir.path())
        .arg(url)
        .arg(instance)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start a service instance");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the instance's address");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("instance {instance} did not start: {line:?}"));
    ServiceChild { child, addr }
}

/// Start `instances` service instances over one store of `backend` (PostgreSQL: a
/// database of its own on `cluster`). The sign-assertion rows measure signing itself:
/// unbound (no VerifyCode first).
async fn start_service(
    backend: Backend,
    instances: usize,
    cluster: Option<&hsm_benches::PgCluster>,
) -> Service {
    let mut env = hsm_service::testing::DevEnv::new();
    env.allow_unbound_assertions("login-service");
    env.config.devices.max_challenges_per_minute = APPROVE_CHALLENGES_PER_MINUTE;
    let (servers, children, db) = match backend {
        Backend::Redb | Backend::RedbNoFsync => {
            assert_eq!(
                instances, 1,
                "a redb store is one process's file: one instance only"
            );
            let server = if backend == Backend::Redb {
                env.start().await
            } else {
                env.start_without_fsync_bench_only().await
            };
            (vec![server], Vec::new(), None)
        }
        Backend::Postgres => {
            let cluster = cluster.expect("a PostgreSQL cluster for the postgres rows");
            let db = cluster.database();
            // One after another: the first one applies the migrations and makes what
            // is missing; the others find it.
            let children = (1..=instances)
                .map(|i| spawn_service_child(&env, &db.url, &format!("bench-{i}")))
                .collect();
            (Vec::new(), children, Some(db))
        }
    };
    Service {
        backend,
        instances,
        servers,
        children,
        db,
        env,
    }
}

/// The end-to-end rows of [`SERIES`]. The services run in this process, each up for the
/// whole run; each run's load generator is this binary re-executed ([`load_child`]), its
/// own process as `hsmctl bench` is (the generator in the service's process, even on a
/// runtime of its own, measured VerifyCode about 20% and the open loop's p99 about 60%
/// worse than `hsmctl bench` against the same service). The runs of one group are
/// interleaved (series by series, round by round, at each concurrency), so drift of this
/// shared machine hits both sides of a ratio alike.
fn end_to_end(quick: bool, only: &Only) -> (Vec<E2e>, Option<String>) {
    // Declared first, so dropped (stopped) after every service and database on it.
    let cluster = if SERIES.iter().any(|s| s.backend == Postgres) {
        match hsm_benches::PgCluster::start() {
            Ok(c) => Some(c),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true: the PostgreSQL rows must run: {e}")
            }
            Err(e) => {
                eprintln!("report: PostgreSQL rows skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    let skipped = (cluster.is_none() && SERIES.iter().any(|s| s.backend == Postgres)).then(|| {
        "PostgreSQL rows skipped: no cluster could be started (scripts/postgres.sh install)"
            .to_owned()
    });
    let series: Vec<&Series> = SERIES
        .iter()
        .filter(|s| s.backend != Postgres || cluster.is_some())
        .filter(|s| only.group.as_deref().is_none_or(|g| g == s.group))
        .collect();
    let service_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("service runtime");
    let (warmup, dur) = if quick {
        ("50ms", "200ms")
    } else {
        ("1s", "4s")
    };
    let rounds = if quick { 2 } else { ROUNDS };
    let concurrencies: Vec<usize> = match only.concurrency {
        Some(c) => vec![c],
        None if quick => vec![1, 4],
        None => CONCURRENCIES.to_vec(),
    };
    let mut services: Vec<Service> = Vec::new();
    for s in &series {
        if !services
            .iter()
            .any(|v| v.backend == s.backend && v.instances == s.instances)
        {
            services.push(service_rt.block_on(start_service(
                s.backend,
                s.instances,
                cluster.as_ref(),
            )));
        }
    }
    // One run of `s`: closed loop at `concurrency` in flight, or open loop at `rate`.
    let run = |s: &Series, concurrency: Option<usize>, rate: Option<f64>| {
        // The service without fsync leaves its writes dirty in the page cache; without
        // this the kernel writes them back during later runs, whichever service those
        // drive (it cost later rows up to a quarter of their throughput).
        let synced = std::process::Command::new("sync").status();
        assert!(synced.is_ok_and(|st| st.success()), "sync");
        let service = services
            .iter()
            .find(|v| v.backend == s.backend && v.instances == s.instances)
            .expect("started above");
        let (load, value) = match rate {
            Some(r) => ("--rate", format!("{r:.0}")),
            None => ("--concurrency", concurrency.unwrap_or(1).to_string()),
        };
        let mut flags: Vec<String> = [
            "--scenario",
            s.path.scenario(),
            load,
            &value,
            "--warmup",
            warmup,
            "--duration",
            dur,
            "--credentials",
            &s.path.credentials(quick).to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        for addr in service.addrs() {
            flags.push("--addr".into());
            flags.push(format!("https://{addr}"));
        }
        if let Some(db) = &service.db {
            db.execute("SELECT pg_stat_statements_reset()");
        }
        let pg_before = cluster
            .as_ref()
            .map(|c| ticks(&c.pids()))
            .unwrap_or_default();
        let service_before = hsm_benches::cpu_seconds(&service.pids());
        let watcher = (s.watch != Watch::Unwatched).then(|| {
            let idle = if quick { 20 } else { IDLE_WATCHERS };
            spawn_watch_child(&service.env, service.addrs()[0], s.watch, idle)
        });
        let started = Instant::now();
        let mut r = run_one(&service.env, &flags);
        let wall = started.elapsed().as_secs_f64();
        if let Some((lag, streams)) = watcher.map(finish_watch_child) {
            (r.lag, r.streams) = (Some(lag), streams);
        }
        (r.group, r.watch) = (s.group, s.watch);
        r.wall_s = wall;
        let pg = cluster.as_ref().map_or(0.0, |c| {
            let after = ticks(&c.pids());
            after
                .iter()
                .map(|(pid, t)| t - pg_before.get(pid).copied().unwrap_or(0).min(*t))
                .sum::<u64>() as f64
                / hsm_benches::clock_ticks_per_second()
        });
        r.cpu = Cpu {
            service: (hsm_benches::cpu_seconds(&service.pids()) - service_before) / wall,
            postgres: pg / wall,
            load: r.cpu.load / wall,
        };
        if let Some(db) = &service.db {
            r.pg = db.query_text(PG_STATS_SQL).map(|t| PgStats::parse(&t));
        }
        (r.path, r.backend, r.instances) = (s.path, s.backend, s.instances);
        (r.concurrency, r.rate) = (concurrency, rate);
        r
    };
    let mut rows: Vec<E2e> = Vec::new();
    let mut groups: Vec<&str> = series.iter().map(|s| s.group).collect();
    groups.dedup();
    for group in groups {
        let closed: Vec<&Series> = series
            .iter()
            .copied()
            .filter(|s| s.group == group && s.load == Load::Closed)
            .collect();
        let in_group = match (group, only.concurrency) {
            ("events", None) => vec![if quick { 4 } else { EVENTS_IN_FLIGHT }],
            _ => concurrencies.clone(),
        };
        for &c in &in_group {
            let mut samples: Vec<Vec<E2e>> = closed.iter().map(|_| Vec::new()).collect();
            for _ in 0..rounds {
                for (i, s) in closed.iter().enumerate() {
                    samples[i].push(run(s, Some(c), None));
                }
            }
            rows.extend(samples.into_iter().map(median));
        }
        let open: Vec<(&Series, f64)> = series
            .iter()
            .copied()
            .filter(|s| s.group == group && s.load == Load::OpenAtHalfPeak)
            .map(|s| {
                let peak = rows
                    .iter()
                    .filter(|r| {
                        (r.path, r.backend, r.instances) == (s.path, s.backend, s.instances)
                            && r.concurrency.is_some()
                    })
                    .map(|r| r.ops_per_s)
                    .fold(0.0, f64::max);
                (s, (peak / 2.0).max(1.0))
            })
            .collect();
        let mut samples: Vec<Vec<E2e>> = open.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, (s, rate)) in open.iter().enumerate() {
                samples[i].push(run(s, None, Some(*rate)));
            }
        }
        rows.extend(samples.into_iter().map(median));
    }
    service_rt.block_on(async {
        for service in &mut services {
            for server in service.servers.drain(..) {
                server.shutdown().await.expect("shutdown");
            }
        }
    });
    drop(services);
    drop(cluster);
    (rows, skipped)
}

/// CPU ticks so far of each live process of `pids`.
fn ticks(pids: &[u32]) -> std::collections::HashMap<u32, u64> {
    pids.iter()
        .filter_map(|p| hsm_benches::proc_stat(*p).map(|s| (*p, s.cpu_ticks)))
        .collect()
}

/// CPU used during one run, in cores (CPU seconds per second of the run's wall time,
/// set-up and warm-up included): the service instances together, every PostgreSQL
/// process, the load generator. The machine has `nproc` of them.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    service: f64,
    postgres: f64,
    load: f64,
}

/// What `pg_stat_statements` saw in the row's database during one run (set-up, warm-up
/// and clean-up included): statements executed, COMMITs, the locking credential read, and
/// the time the server spent executing.
const PG_STATS_SQL: &str = "SELECT concat_ws('|', \
       coalesce(sum(calls), 0), \
       coalesce(sum(calls) FILTER (WHERE query = 'COMMIT'), 0), \
       coalesce(sum(calls) FILTER (WHERE query = 'BEGIN'), 0), \
       coalesce(sum(calls) FILTER (WHERE query LIKE 'SELECT %FOR UPDATE'), 0), \
       coalesce(sum(total_exec_time) FILTER (WHERE query LIKE 'SELECT %FOR UPDATE'), 0), \
       coalesce(sum(total_exec_time), 0)) \
     FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())";

#[derive(Clone, Copy, Debug, Default)]
struct PgStats {
    statements: f64,
    commits: f64,
    /// `BEGIN` of a write batch (a read snapshot begins `BEGIN READ ONLY ...`).
    batches: f64,
    locking_reads: f64,
    locking_read_ms: f64,
    exec_ms: f64,
}

impl PgStats {
    fn parse(text: &str) -> PgStats {
        let v: Vec<f64> = text.split('|').map(|x| x.parse().unwrap_or(0.0)).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        PgStats {
            statements: at(0),
            commits: at(1),
            batches: at(2),
            locking_reads: at(3),
            locking_read_ms: at(4),
            exec_ms: at(5),
        }
    }
}

/// One run: this binary re-executed as the load generator, as the dev identity
/// `login-service` of `env`, with `flags` (its `--addr` the instances); its summary JSON
/// (that of `hsmctl bench --json`). Path, backend and load are the caller's to fill in.
fn run_one(env: &hsm_service::testing::DevEnv, flags: &[String]) -> E2e {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg(LOAD_CHILD)
        .arg(env.dir.path())
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the load generator");
    assert!(out.status.success(), "load generator failed: {flags:?}");
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("load generator summary JSON");
    E2e {
        path: Path::SignAssertion,
        backend: Backend::Redb,
        instances: 0,
        concurrency: None,
        rate: None,
        ops_per_s: s["throughput_per_second"].as_f64().unwrap_or(0.0),
        p50_ms: s["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        p99_ms: s["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        outcomes: ["outcomes", "errors"]
            .iter()
            .filter_map(|k| s[*k].as_object())
            .flatten()
            .map(|(name, n)| format!("{name} {}", n.as_u64().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        accepted_share: s["accepted_share"].as_f64().unwrap_or(0.0),
        accepted_min: 0.0,
        worst_outcomes: String::new(),
        runs_ops_per_s: Vec::new(),
        cpu: Cpu {
            load: s["cpu_seconds"].as_f64().unwrap_or(0.0),
            ..Cpu::default()
        },
        pg: None,
        requests: {
            let (n, w, d) = (
                s["requests"].as_f64().unwrap_or(0.0),
                s["warmup_seconds"].as_f64().unwrap_or(0.0),
                s["duration_seconds"].as_f64().unwrap_or(1.0),
            );
            n * (w + d) / d.max(1e-9)
        },
        wall_s: 0.0,
        group: "",
        watch: Watch::Unwatched,
        lag: None,
        streams: 0,
        runs_p99_ms: Vec::new(),
    }
}

/// `report --load-child DIR FLAGS...`: one load run (`hsm_client::load`, the `hsmctl
/// bench` generator) as `login-service` of the dev directory DIR against the `--addr`
/// targets of FLAGS; prints the summary JSON.
fn load_child(args: Vec<String>) {
    let [dir, flags @ ..] = args.as_slice() else {
        eprintln!("report: {LOAD_CHILD} DIR FLAGS...");
        std::process::exit(2);
    };
    let bench = hsm_client::load::BenchArgs::from_flags(flags).expect("bench flags");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let summary = rt.block_on(async {
        let base = hsm_client::ClientConfig::dev(std::path::Path::new(dir), "login-service");
        let targets = hsm_client::load::connect_targets(&base, &bench)
            .await
            .expect("connect");
        hsm_client::load::measure(&targets, &bench, true)
            .await
            .expect("load run")
    });
    let mut summary = summary;
    summary["cpu_seconds"] = serde_json::json!(hsm_benches::cpu_seconds(&[std::process::id()]));
    println!("{summary}");
}

impl E2e {
    /// A copy of the row (the figures; `Cpu`/`PgStats`/`Lag` are `Copy`).
    fn clone_row(&self) -> E2e {
        E2e {
            outcomes: self.outcomes.clone(),
            worst_outcomes: self.worst_outcomes.clone(),
            runs_ops_per_s: self.runs_ops_per_s.clone(),
            runs_p99_ms: self.runs_p99_ms.clone(),
            ..*self
        }
    }
}

/// `report --watch-child DIR ADDR WATCH IDLE`: WatchEvents streams as `notifier` of the
/// dev directory DIR against ADDR, from the head on: `follower` (one stream of every
/// event) or `idle` (IDLE streams of a subject without events, over 10 connections).
/// Prints `ready` once every stream is open, then, when its standard input closes, one
/// JSON line: the lag from each event's `time_ms` to its receipt (p50, p99 in ms), the
/// events received and the streams still open.
fn watch_child(args: Vec<String>) {
    let [dir, addr, watch, idle] = args.as_slice() else {
        eprintln!("report: {WATCH_CHILD} DIR ADDR follower|idle IDLE");
        std::process::exit(2);
    };
    let idle: usize = idle.parse().expect("IDLE");
    let follower = watch == "follower";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(async move {
        let base = hsm_client::ClientConfig::dev(std::path::Path::new(dir), "notifier")
            .with_endpoint(addr.clone());
        let first = base.connect().await.expect("connect");
        let head = first
            .events()
            .list_events(hsm_client::proto::ListEventsRequest {
                from_seq: 0,
                limit: 1,
                kinds: Vec::new(),
                subject: String::new(),
            })
            .await
            .expect("ListEvents")
            .into_inner()
            .head_seq;
        let from_seq = head + 1;
        let (streams, subject) = if follower {
            (1, String::new())
        } else {
            (idle, "bench-subject-without-events".to_owned())
        };
        let mut channels = vec![first];
        let connections = if follower { 1 } else { 10 };
        while channels.len() < connections {
            channels.push(base.connect().await.expect("connect"));
        }
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let lags = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
        for i in 0..streams {
            let mut stream = channels[i % connections]
                .events()
                .watch_events(hsm_client::proto::WatchEventsRequest {
                    from_seq,
                    follow: true,
                    kinds: Vec::new(),
                    subject: subject.clone(),
                })
                .await
                .expect("WatchEvents")
                .into_inner();
            let (open, lags) = (open.clone(), lags.clone());
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                while let Ok(Some(batch)) = stream.message().await {
                    if batch.events.is_empty() {
                        continue;
                    }
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .expect("clock after 1970")
                        .as_secs_f64()
                        * 1000.0;
                    let mut l = lags.lock().expect("lags");
                    l.extend(batch.events.iter().map(|e| now_ms - e.time_ms as f64));
                }
                open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        println!("ready");
        // Until the parent closes our standard input.
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        })
        .await
        .expect("stdin");
        let mut l = std::mem::take(&mut *lags.lock().expect("lags"));
        l.sort_by(f64::total_cmp);
        let at = |q: f64| {
            l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        serde_json::json!({
            "lag_p50_ms": at(0.5),
            "lag_p99_ms": at(0.99),
            "events": l.len(),
            "open": open.load(std::sync::atomic::Ordering::SeqCst),
            "streams": streams,
        })
    });
    println!("{out}");
    // The streams' tasks are still reading: do not wait for them.
    rt.shutdown_background();
}

const WATCH_CHILD: &str = "--watch-child";

/// Start the watch child for a run of `watch` against `addr`; returns once its streams
/// are open.
fn spawn_watch_child(
    env: &hsm_service::testing::DevEnv,
    addr: std::net::SocketAddr,
    watch: Watch,
    idle: usize,
) -> std::process::Child {
    use std::io::BufRead;
    let kind = if watch == Watch::Follower {
        "follower"
    } else {
        "idle"
    };
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg(WATCH_CHILD)
        .arg(env.dir.path())
        .arg(format!("https://{addr}"))
        .arg(kind)
        .arg(idle.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the watch child");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("watch child ready");
    assert_eq!(line.trim(), "ready", "watch child did not start");
    child
}

/// Close the watch child's standard input and read what it saw.
fn finish_watch_child(mut child: std::process::Child) -> (Lag, u64) {
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("watch child");
    assert!(out.status.success(), "watch child failed");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("watch child JSON");
    assert_eq!(
        s["open"], s["streams"],
        "a watch stream ended during the run: {s}"
    );
    let lag = Lag {
        p50_ms: s["lag_p50_ms"].as_f64().unwrap_or(f64::NAN),
        p99_ms: s["lag_p99_ms"].as_f64().unwrap_or(f64::NAN),
        events: s["events"].as_u64().unwrap_or(0),
    };
    (lag, s["streams"].as_u64().unwrap_or(0))
}

/// The `events` group: VerifyCode (accepted) with and without WatchEvents streams open,
/// interleaved run by run.
fn events_markdown(runs: &[&E2e]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n## Event stream (issue 12): VerifyCode accepted (HOTP) while WatchEvents streams are open\n\n\
         The runs of these rows were interleaved. Lag: from an event's `time_ms` (set by the\n\
         service when the verification's unit of work is built) to its receipt by a follower\n\
         (`follow = true`, from the head, its own process, same machine clock), over every\n\
         event of the median run. Idle watchers follow a subject without events.\n\n\
         | backend | instances | load | watchers | ops/s | p50 ms | p99 ms | lag p50 / p99 ms (events) | ACCEPTED | runs ops/s | runs p99 ms |\n\
         |---|---:|---|---|---:|---:|---:|---|---:|---|---|\n",
    );
    let join = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for r in runs {
        let lag = r.lag.filter(|_| r.watch == Watch::Follower);
        let lag = lag.map_or("-".to_owned(), |l| {
            format!("{:.1} / {:.1} ({})", l.p50_ms, l.p99_ms, l.events)
        });
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {lag} | {:.2}% | {} | {} |\n",
            r.backend.label(),
            r.instances,
            r.load(),
            match r.watch {
                Watch::Idle => format!("{} {}", r.streams, r.watch.label()),
                w => w.label().to_owned(),
            },
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            100.0 * r.accepted_min,
            join(&r.runs_ops_per_s, 0),
            join(&r.runs_p99_ms, 2),
        ));
    }
    md
}

/// The `approve` group: app logins against the HSM and software limits of their work.
fn approve_markdown(rows: &[Row], runs: &[&E2e]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let limit = |family: &str, op: &str| {
        rows.iter()
            .find(|r| r.family.starts_with(family) && r.op == op && r.threads == 2)
            .map_or(f64::NAN, |r| r.ops_per_s)
    };
    let sign = limit("SoftHSM", ECDSA);
    let verify = limit("software (p256)", ECDSA_VERIFY);
    let mut md = format!(
        "\n## App authenticator (issue 13): a login with the app\n\n\
         Each call of these rows is one login: CreateChallenge (the payload signed in the\n\
         HSM, ECDSA P-256), AnswerChallenge APPROVE with the binding code, signed by a device\n\
         key the generator holds (the service verifies it in software, `p256`), GetChallenge\n\
         for the approval's evidence id, and SignAssertion ES256 citing that evidence (bound,\n\
         though this run's login service may sign unbound); a row fails unless every login\n\
         was APPROVED. Limits of the same work measured in this run on 2 threads:\n\
         SoftHSM-direct {ECDSA} {sign:.0}/s (two per login: {:.0} logins/s), software\n\
         {ECDSA_VERIFY} (`p256`) {verify:.0}/s.\n\n\
         | backend | instances | load | logins/s | p50 ms | p99 ms | e2e / (SoftHSM-direct ECDSA ÷ 2) | e2e / p256 verify | APPROVED | outcomes | CPU cores svc / pg / load | runs logins/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|\n",
        sign / Approve.hsm_ops()
    );
    for r in runs {
        let all = r
            .runs_ops_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let approved = if r.accepted_ok() {
            format!("{:.2}%", 100.0 * r.accepted_min)
        } else {
            format!("{:.2}% FAIL", 100.0 * r.accepted_min)
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1}% | {:.1}% | {approved} | {} | {:.2} / {:.2} / {:.2} | {all} |\n",
            r.backend.label(),
            r.instances,
            r.load(),
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            100.0 * r.ops_per_s * Approve.hsm_ops() / sign,
            100.0 * r.ops_per_s / verify,
            r.outcomes,
            r.cpu.service,
            r.cpu.postgres,
            r.cpu.load,
        ));
    }
    md
}

fn e2e_markdown(rows: &[Row], all_runs: &[E2e], skipped: Option<&str>) -> String {
    let (events, runs): (Vec<&E2e>, Vec<&E2e>) = all_runs.iter().partition(|r| r.group == "events");
    let (approve, runs): (Vec<&E2e>, Vec<&E2e>) = runs.into_iter().partition(|r| r.path == Approve);
    let runs: Vec<E2e> = runs.into_iter().map(E2e::clone_row).collect();
    let runs = runs.as_slice();
    let direct = |op: &str| {
        rows.iter()
            .find(|r| r.family.starts_with("SoftHSM") && r.op == op && r.threads == 2)
            .map_or(f64::NAN, |r| r.ops_per_s)
    };
    let mut md = String::from(
        "\n## End to end (mTLS gRPC, in-process dev service)\n\n\
         Each row is the median of its runs (last column, ops/s in the order run); the\n\
         runs of rows compared with each other were interleaved. The headline VerifyCode\n\
         rows are the accepted path (in-order HOTP codes, every answer must be ACCEPTED);\n\
         the TOTP rows send the current step's code, so almost every answer is REPLAYED.\n\
         Durable in every row but the no-fsync one. redb instances run in the report's\n\
         process; PostgreSQL instances (a private cluster of this run, fsync and\n\
         synchronous_commit on) each in a process of their own over one token and one\n\
         database, the load generator going round robin over them. CPU: cores used during\n\
         the median run (CPU seconds / wall seconds, set-up included) by the service\n\
         instances together / every PostgreSQL process / the load generator.\n\n\
         | path | backend | instances | load | ops/s | p50 ms | p99 ms | e2e / direct (2 threads) | direct limit | ACCEPTED | outcomes | CPU cores svc / pg / load | runs ops/s |\n\
         |---|---|---:|---|---:|---:|---:|---:|---|---:|---|---|---|\n",
    );
    if let Some(why) = skipped {
        md = format!("\n{why}\n{md}");
    }
    for r in runs {
        let all = r
            .runs_ops_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let accepted = match r.path {
            Path::SignAssertion => "-".to_owned(),
            Path::HotpAccepted if !r.accepted_ok() => format!(
                "{:.2}% FAIL (lowest run {:.2}%)",
                100.0 * r.accepted_share,
                100.0 * r.accepted_min
            ),
            _ => format!("{:.2}%", 100.0 * r.accepted_share),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1}% | {} | {accepted} | {} | {:.2} / {:.2} / {:.2} | {all} |\n",
            r.path.label(),
            r.backend.label(),
            r.instances,
            r.load(),
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            100.0 * r.ops_per_s / direct(&r.path.limit_op()),
            r.path.limit_op(),
            r.outcomes,
            r.cpu.service,
            r.cpu.postgres,
            r.cpu.load,
        ));
    }
    md.push_str(&pg_markdown(runs));
    md.push_str(&events_markdown(&events));
    md.push_str(&approve_markdown(rows, &approve));
    let peak = |path: Path, backend: Backend| {
        runs.iter()
            .filter(|r| {
                r.path == path
                    && r.backend == backend
                    && r.instances == 1
                    && r.concurrency.is_some()
            })
            .map(|r| r.ops_per_s)
            .fold(0.0, f64::max)
    };
    let hotp = peak(HotpAccepted, Redb) / direct(&HotpAccepted.limit_op());
    let totp = peak(TotpReplayed, Redb) / direct(&TotpReplayed.limit_op());
    let sign = peak(SignAssertion, Redb) / direct(ECDSA);
    let cost = 1.0 - peak(HotpAccepted, Redb) / peak(HotpAccepted, RedbNoFsync);
    let p99 = runs
        .iter()
        .find(|r| r.path == HotpAccepted && r.backend == Redb && r.rate.is_some())
        .map_or(f64::NAN, |r| r.p99_ms);
    md.push_str(
        "\n## Targets\n\nBest closed-loop row of each path on redb, one instance.\n\n\
         | target | measured | met |\n|---|---:|---|\n",
    );
    let row = |name: &str, measured: String, met: bool, by: String| {
        format!(
            "| {name} | {measured} | {} |\n",
            if met {
                "met".to_owned()
            } else {
                format!("missed by {by}")
            }
        )
    };
    md.push_str(&row(
        &format!(
            "VerifyCode accepted (HOTP) e2e ≥ 50% of SoftHSM-direct {}",
            HotpAccepted.limit_op()
        ),
        format!("{:.1}%", 100.0 * hotp),
        hotp >= 0.5,
        format!("{:.1} points", 100.0 * (0.5 - hotp)),
    ));
    md.push_str(&row(
        &format!(
            "VerifyCode mostly REPLAYED (TOTP; the pre-issue-11 measure) e2e ≥ 50% of SoftHSM-direct {}",
            TotpReplayed.limit_op()
        ),
        format!("{:.1}%", 100.0 * totp),
        totp >= 0.5,
        format!("{:.1} points", 100.0 * (0.5 - totp)),
    ));
    md.push_str(&row(
        "SignAssertion ES256 e2e ≥ 70% of SoftHSM-direct ECDSA",
        format!("{:.1}%", 100.0 * sign),
        sign >= 0.7,
        format!("{:.1} points", 100.0 * (0.7 - sign)),
    ));
    md.push_str(&row(
        "durable group commit costs ≤ 20% of VerifyCode accepted throughput",
        format!("{:.1}%", 100.0 * cost),
        cost <= 0.2,
        format!("{:.1} points", 100.0 * (cost - 0.2)),
    ));
    md.push_str(&row(
        "open loop at half the accepted peak: VerifyCode accepted p99 ≤ 5 ms",
        format!("{p99:.2} ms"),
        p99 <= 5.0,
        format!("{:.2} ms", p99 - 5.0),
    ));
    let in_flight = target_in_flight(runs);
    let at = |path: Path, backend: Backend, instances: usize| {
        runs.iter()
            .find(|r| {
                (r.path, r.backend, r.instances, r.concurrency)
                    == (path, backend, instances, Some(in_flight))
            })
            .map(|r| r.ops_per_s)
    };
    for path in [HotpAccepted, SignAssertion] {
        let (Some(redb), Some(one), Some(two)) = (
            at(path, Redb, 1),
            at(path, Postgres, 1),
            at(path, Postgres, 2),
        ) else {
            continue;
        };
        let pg = one / redb;
        md.push_str(&row(
            &format!(
                "{}: PostgreSQL, one instance, ≥ 60% of redb at {in_flight} in flight",
                path.label()
            ),
            format!("{:.1}% ({one:.0} / {redb:.0} ops/s)", 100.0 * pg),
            pg >= 0.6,
            format!("{:.1} points", 100.0 * (0.6 - pg)),
        ));
        let scale = two / one;
        md.push_str(&row(
            &format!(
                "{}: PostgreSQL, two instances together not slower than one at {in_flight} in flight",
                path.label()
            ),
            format!("{:.2}× ({two:.0} / {one:.0} ops/s)", scale),
            scale >= 1.0,
            format!("{:.1}%", 100.0 * (1.0 - scale)),
        ));
    }
    md
}

/// Concurrency of the PostgreSQL targets.
const PG_TARGET_IN_FLIGHT: usize = 64;

/// [`PG_TARGET_IN_FLIGHT`], or the highest concurrency run when it was not (`--quick`).
fn target_in_flight(runs: &[E2e]) -> usize {
    let all = || runs.iter().filter_map(|r| r.concurrency);
    if all().any(|c| c == PG_TARGET_IN_FLIGHT) {
        PG_TARGET_IN_FLIGHT
    } else {
        all().max().unwrap_or(PG_TARGET_IN_FLIGHT)
    }
}

/// What bounds the PostgreSQL rows: per closed-loop row at [`PG_TARGET_IN_FLIGHT`] in
/// flight (and the redb row beside it), the CPU of each side and what the database
/// executed.
fn pg_markdown(runs: &[E2e]) -> String {
    let in_flight = target_in_flight(runs);
    let pg_rows: Vec<&E2e> = runs
        .iter()
        .filter(|r| r.concurrency == Some(in_flight) && r.backend != RedbNoFsync)
        .filter(|r| r.path != TotpReplayed)
        .collect();
    if !pg_rows.iter().any(|r| r.pg.is_some()) {
        return String::new();
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "\n## What bounds the PostgreSQL rows ({in_flight} in flight)\n\n\
         The median run of each row. CPU in cores of the {nproc} this machine has (CPU\n\
         seconds / wall seconds of the run); the database columns are `pg_stat_statements`\n\
         in the row's database over the whole run (its credential set-up and clean-up\n\
         included): statements and COMMITs (of read snapshots and of write batches alike)\n\
         per request (requests of the run, warm-up included), requests per write batch (a\n\
         batch's `BEGIN`; about the group commit's jobs per commit), mean time of the locking credential\n\
         read (pg_stat_statements does not time a COMMIT's WAL flush, so no COMMIT column), and the share of the run\n\
         the server spent executing statements.\n\n\
         | path | backend | instances | ops/s | CPU service | CPU postgres | CPU load | CPU total | statements / request | COMMITs / request | requests / batch | locking read ms | executing |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in pg_rows {
        let total = r.cpu.service + r.cpu.postgres + r.cpu.load;
        let db = match r.pg {
            Some(p) => {
                let requests = r.requests.max(1.0);
                format!(
                    "{:.1} | {:.1} | {:.1} | {:.3} | {:.0}%",
                    p.statements / requests,
                    p.commits / requests,
                    requests / p.batches.max(1.0),
                    p.locking_read_ms / p.locking_reads.max(1.0),
                    100.0 * p.exec_ms / 1000.0 / r.wall_s.max(1e-9),
                )
            }
            None => "- | - | - | - | -".to_owned(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {total:.2} | {db} |\n",
            r.path.label(),
            r.backend.label(),
            r.instances,
            r.ops_per_s,
            r.cpu.service,
            r.cpu.postgres,
            r.cpu.load,
        ));
    }
    md
}

/// One panel per path: e2e throughput by concurrency (log2 x), one line per backend and
/// instance count, with the SoftHSM-direct (red) and software (green) limits of the same
/// HSM work on 2 threads as horizontal lines.
fn plot(path: &std::path::Path, rows: &[Row], runs: &[E2e]) -> Result<(), String> {
    use plotters::prelude::*;
    let paths = [HotpAccepted, TotpReplayed, SignAssertion];
    let root = SVGBackend::new(path, (1000, 400 * paths.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let limit = |family: &str, op: &str| {
        rows.iter()
            .find(|r| r.family.starts_with(family) && r.op == op && r.threads == 2)
            .map_or(0.0, |r| r.ops_per_s)
    };
    let colours = [BLUE, MAGENTA, CYAN, BLACK, YELLOW];
    for (area, p) in root.split_evenly((paths.len(), 1)).iter().zip(paths) {
        let op = p.limit_op();
        let mut lines: Vec<(Backend, usize)> = Vec::new();
        for r in runs.iter().filter(|r| r.path == p) {
            if !lines.contains(&(r.backend, r.instances)) {
                lines.push((r.backend, r.instances));
            }
        }
        let series = |(backend, instances): (Backend, usize)| -> Vec<(f64, f64)> {
            runs.iter()
                .filter(|r| r.path == p && r.backend == backend && r.instances == instances)
                .filter_map(|r| r.concurrency.map(|c| ((c as f64).log2(), r.ops_per_s)))
                .collect()
        };
        let (direct, software) = (limit("SoftHSM", &op), limit("software", &op));
        let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| series(*l)).collect();
        let x_max = all.iter().map(|p| p.0).fold(1.0f64, f64::max);
        let y_max = all.iter().map(|p| p.1).fold(direct.max(software), f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: e2e ops/s by concurrency (log2) vs limits of {op}",
                    p.label()
                ),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1.0))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("log2(in flight)")
            .y_desc("ops/s")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, l) in lines.iter().enumerate() {
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(series(*l), &colour))
                .map_err(|e| e.to_string())?
                .label(format!("{} x{}", l.0.label(), l.1))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        chart
            .draw_series(LineSeries::new([(0.0, direct), (x_max, direct)], &RED))
            .map_err(|e| e.to_string())?
            .label("SoftHSM direct")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_series(LineSeries::new(
                [(0.0, software), (x_max, software)],
                &GREEN,
            ))
            .map_err(|e| e.to_string())?
            .label("software")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(path: Path, ops_per_s: f64, accepted_share: f64) -> E2e {
        E2e {
            path,
            backend: Backend::Redb,
            instances: 1,
            concurrency: Some(64),
            rate: None,
            ops_per_s,
            p50_ms: 1.0,
            p99_ms: 2.0,
            outcomes: String::new(),
            accepted_share,
            accepted_min: 0.0,
            worst_outcomes: String::new(),
            runs_ops_per_s: Vec::new(),
            cpu: Cpu::default(),
            pg: None,
            requests: 0.0,
            wall_s: 0.0,
            group: "accepted",
            watch: Watch::Unwatched,
            lag: None,
            streams: 0,
            runs_p99_ms: Vec::new(),
        }
    }

    #[test]
    fn an_accepted_row_fails_when_any_run_was_not_all_accepted() {
        // The median run is all ACCEPTED, another run is not: the row fails.
        let row = median(vec![
            run(HotpAccepted, 100.0, 1.0),
            run(HotpAccepted, 200.0, 1.0),
            run(HotpAccepted, 300.0, 0.98),
        ]);
        assert_eq!(row.ops_per_s, 200.0);
        assert_eq!(row.runs_ops_per_s, [100.0, 200.0, 300.0]);
        assert!(!row.accepted_ok(), "{}", row.name());
        let row = median(vec![
            run(HotpAccepted, 100.0, 1.0),
            run(HotpAccepted, 200.0, 0.9995),
        ]);
        assert!(row.accepted_ok());
        // The replayed path is expected to be mostly REPLAYED.
        let row = median(vec![run(TotpReplayed, 100.0, 0.01)]);
        assert!(row.accepted_ok());
    }

    #[test]
    fn every_series_can_start_and_open_loops_follow_their_closed_loop() {
        for (i, s) in SERIES.iter().enumerate() {
            if s.load == Load::OpenAtHalfPeak {
                assert!(
                    SERIES[..i].iter().any(|c| c.load == Load::Closed
                        && c.group == s.group
                        && (c.path, c.backend, c.instances) == (s.path, s.backend, s.instances)),
                    "open loop {i} has no closed-loop series before it in its group"
                );
            }
            // Groups are contiguous (they run one after another).
            if i > 0 && SERIES[i - 1].group != s.group {
                assert!(
                    !SERIES[..i].iter().any(|p| p.group == s.group),
                    "group {} split",
                    s.group
                );
            }
            assert!(s.instances >= 1);
        }
    }

    #[test]
    fn the_hotp_limit_is_the_services_window() {
        // Default look-ahead 10, from the last accepted counter: 12 HMACs; TOTP ±1: 3.
        assert_eq!(HotpAccepted.limit_op(), "HMAC-SHA1 ×12");
        assert_eq!(TotpReplayed.limit_op(), "HMAC-SHA1 ×3");
    }
}
