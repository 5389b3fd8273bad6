//! The load generator behind `hsmctl bench` (a library, so benches can drive the service too).
//!
//! Closed loop (`--concurrency C`): C callers send as fast as replies come back.
//! Open loop (`--rate R`): requests are scheduled at a fixed rate whatever the service
//! does, and latency is measured from the *intended* send time, so queueing inside the
//! generator or the service is not hidden (coordinated omission).
//!
//! Latencies go into an HdrHistogram (microseconds, 3 significant digits). Requests that
//! complete during the warm-up are not counted.
//!
//! Several targets (`--addr A --addr B`, e.g. two instances over one shared store): each
//! request goes to the next target in turn (round robin per request, over one connection
//! per target); credentials are created and deleted through the first target. The
//! summary counts the measured requests per target.
//!
//! `verify-hotp` sends every credential's codes in counter order and never has two
//! requests of one credential in flight at once (a caller skips to a credential that is
//! free), so with at least as many credentials as requests in flight every answer is
//! ACCEPTED: the summary's `accepted_share` says whether it was.
//!
//! `approve` (issue 13) plays a login with the app authenticator: up front it activates
//! `--credentials` devices (one per subject, each a P-256 key the generator holds, as a
//! phone would); each request then creates a LOGIN challenge for a subject with no
//! request in flight (one pending challenge per subject), answers it APPROVE with the
//! binding code and the device's signature over the payload, reads the approval's
//! evidence id from the challenge (GetChallenge, as the login service does; the answer
//! to the device does not carry it) and signs an assertion citing it: latency of the
//! four calls. The app's check of
//! the server signature runs on the phone and is not part of it. Its `accepted_share` is
//! the share of APPROVED logins. The devices are revoked at the end. The service's
//! `[devices] max_challenges_per_minute` (default 10 per subject) bounds it: at most
//! `credentials x max / 60` approvals per second.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto as pb;
use crate::{ClientConfig, ClientError, HsmClient};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// `hsmctl bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// A target endpoint (`https://HOST:PORT`); repeat it for several instances, which
    /// then get the requests in turn (round robin per request). Default: `--endpoint`.
    #[arg(long = "addr", value_name = "ENDPOINT")]
    addr: Vec<String>,
    /// What each request does.
    #[arg(long, value_enum, default_value = "verify-totp")]
    scenario: Scenario,
    /// Closed loop: callers in flight (ignored with --rate).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop: requests per second, scheduled whatever the latency.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to measure, after the warm-up (e.g. 20s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many measured requests instead (whichever comes first).
    #[arg(long)]
    count: Option<u64>,
    /// Warm-up before measuring; its requests are not counted.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Credentials created up front (verify scenarios), or devices activated up front
    /// (approve, one subject each); deleted or revoked at the end.
    #[arg(long, default_value_t = 100)]
    credentials: usize,
    /// How requests pick a credential.
    #[arg(long, value_enum, default_value = "uniform")]
    distribution: Distribution,
    /// Share of requests with a wrong code (0..1). Wrong codes count towards lockout.
    #[arg(long, default_value_t = 0.0)]
    wrong_share: f64,
    /// sign-assertion and mixed: the signing key (empty: the service's default key).
    #[arg(long, default_value = "")]
    signing_key: String,
    /// sign-assertion and mixed: the acr claim.
    #[arg(
        long,
        default_value = "https://data.gov.dk/concept/core/nsis/Substantial"
    )]
    acr: String,
    /// Write a picture (SVG): latency over time and the latency histogram.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl BenchArgs {
    /// The arguments `hsmctl bench` would get from these flags, e.g.
    /// `["--scenario", "sign-assertion", "--concurrency", "4"]` (for library callers).
    pub fn from_flags<I, T>(flags: I) -> Result<BenchArgs, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("bench"))
            .chain(flags.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv)
            .map(|w| w.args)
            .map_err(|e| e.to_string())
    }
}

/// Workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// VerifyCode on TOTP credentials (window 1: three HMACs each).
    VerifyTotp,
    /// VerifyCode on HOTP credentials, every credential's codes in order and one request
    /// per credential in flight: the accepted path (the service computes the HMACs from
    /// the last accepted counter to the next one plus the look-ahead: 12 with the
    /// default look-ahead of 10).
    VerifyHotp,
    /// SignAssertion alone, unbound (the caller's `[[client]]` rule needs
    /// `unbound_assertions = true`; otherwise every call is FAILED_PRECONDITION).
    SignAssertion,
    /// VerifyCode (TOTP) then, for an ACCEPTED code, SignAssertion citing its evidence,
    /// as one login does; latency of the pair.
    Mixed,
    /// A login with the app: CreateChallenge, AnswerChallenge (APPROVE, signed with a
    /// generator-held device key), GetChallenge (its evidence id), SignAssertion citing
    /// the approval's evidence; latency of the four.
    Approve,
}

/// How a credential is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    /// Every credential equally often.
    Uniform,
    /// Power law: half the requests go to the first eighth of the credentials.
    Skewed,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, ms or m"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// One credential the generator knows the seed of.
struct Cred {
    id: String,
    seed: Vec<u8>,
    hotp_counter: AtomicU64,
    /// A verify-hotp request of this credential is in flight.
    busy: AtomicBool,
}

/// One activated device the generator holds the key of (`approve`).
struct BenchDevice {
    subject: String,
    device_id: String,
    key: crate::app::DeviceKey,
    /// A login of this subject is in flight (one pending challenge per subject).
    busy: AtomicBool,
}

/// One endpoint the generator sends to, and its connection.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://HOST:PORT`, as given.
    pub endpoint: String,
    /// The connected client.
    pub client: HsmClient,
}

/// Connect to every `--addr` of `args` (or to `base.endpoint` when there is none) with the
/// CA, certificate and key of `base`.
pub async fn connect_targets(
    base: &ClientConfig,
    args: &BenchArgs,
) -> Result<Vec<Target>, ClientError> {
    let endpoints = if args.addr.is_empty() {
        vec![base.endpoint.clone()]
    } else {
        args.addr.clone()
    };
    let mut targets = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let client = base
            .clone()
            .with_endpoint(endpoint.clone())
            .connect()
            .await?;
        targets.push(Target { endpoint, client });
    }
    Ok(targets)
}

/// Everything a request needs.
struct Workload {
    targets: Vec<Target>,
    next_target: AtomicUsize,
    args: BenchArgs,
    creds: Vec<Cred>,
    devices: Vec<BenchDevice>,
    rng: AtomicU64,
}

/// One finished request.
struct Sample {
    done: Instant,
    latency_us: u64,
    outcome: String,
    target: usize,
}

/// Run the bench against `targets` (round robin) and print the summary.
pub async fn run(
    targets: &[Target],
    args: &BenchArgs,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    let summary = measure(targets, args, json_out).await?;
    if json_out {
        println!("{summary}");
    } else {
        print_summary(&summary);
    }
    Ok(ExitCode::SUCCESS)
}

/// Run the bench against `targets` (round robin per request; at least one) and write
/// `--plot` if asked; return the summary that `hsmctl bench --json` prints, without
/// printing it. `quiet` hides the progress bar.
pub async fn measure(
    targets: &[Target],
    args: &BenchArgs,
    quiet: bool,
) -> Result<Value, ClientError> {
    let Some(first) = targets.first() else {
        return Err(usage("at least one target endpoint is needed"));
    };
    if !(0.0..=1.0).contains(&args.wrong_share) {
        return Err(usage("--wrong-share must be between 0 and 1"));
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(usage("--rate must be a positive number"));
    }
    if args.concurrency == 0 || args.credentials == 0 {
        return Err(usage("--concurrency and --credentials must be at least 1"));
    }
    let (creds, devices) = if args.scenario == Scenario::Approve {
        (Vec::new(), setup_devices(&first.client, args).await?)
    } else {
        (setup(&first.client, args).await?, Vec::new())
    };
    let workload = Arc::new(Workload {
        targets: targets.to_vec(),
        next_target: AtomicUsize::new(0),
        args: args.clone(),
        creds,
        devices,
        rng: AtomicU64::new(seed_u64()),
    });
    let progress = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new((args.warmup + args.duration).as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}")
                .expect("template"),
        );
        bar
    });
    let report = drive(workload.clone(), progress.clone()).await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    cleanup(&workload).await;
    let summary = report.summary(args, targets);
    if let Some(path) = &args.plot {
        report
            .plot(path)
            .map_err(|e| usage(&format!("--plot {}: {e}", path.display())))?;
    }
    Ok(summary)
}

fn usage(m: &str) -> ClientError {
    ClientError::Status(tonic::Status::invalid_argument(m.to_owned()))
}

fn seed_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    u64::from_le_bytes(b) | 1
}

/// Create the credentials (imported with seeds made here, so codes can be computed).
async fn setup(client: &HsmClient, args: &BenchArgs) -> Result<Vec<Cred>, ClientError> {
    let kind = match args.scenario {
        Scenario::VerifyHotp => pb::OtpKind::Hotp,
        Scenario::SignAssertion => return Ok(Vec::new()),
        _ => pb::OtpKind::Totp,
    };
    let run = format!("{:x}", seed_u64() & 0xffff_ffff);
    let mut creds = Vec::with_capacity(args.credentials);
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..args.credentials {
        let mut seed = vec![0u8; 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .expect("system RNG");
        let id = format!("bench-{run}-{i}");
        let mut c = client.credentials();
        let req = pb::CreateCredentialRequest {
            credential_id: id.clone(),
            kind: kind as i32,
            seed: seed.clone(),
            // As a login service enrols them: accepted codes leave evidence.
            subject: subject_of(&id),
            ..Default::default()
        };
        pending.spawn(async move { c.create_credential(req).await.map(|_| ()) });
        creds.push(Cred {
            id,
            seed,
            hotp_counter: AtomicU64::new(0),
            busy: AtomicBool::new(false),
        });
        if pending.len() >= 32 {
            if let Some(r) = pending.join_next().await {
                r.expect("join")?;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r.expect("join")?;
    }
    Ok(creds)
}

/// Activate `--credentials` devices, one per new subject, each with a key made here.
async fn setup_devices(
    client: &HsmClient,
    args: &BenchArgs,
) -> Result<Vec<BenchDevice>, ClientError> {
    let run = format!("{:x}", seed_u64() & 0xffff_ffff);
    let mut devices = Vec::with_capacity(args.credentials);
    let mut pending = tokio::task::JoinSet::new();
    let activate = |pending: &mut tokio::task::JoinSet<_>, i: usize| {
        let subject = format!("bench-{run}-app-{i}");
        let mut d = client.devices();
        pending.spawn(async move {
            let begun = d
                .begin_activation(pb::BeginActivationRequest {
                    subject: subject.clone(),
                    display_name: "bench phone".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let key = crate::app::DeviceKey::generate();
            let device = d
                .complete_activation(pb::CompleteActivationRequest {
                    activation_id: begun.activation_id,
                    activation_code: begun.activation_code,
                    public_key: key.public_sec1(),
                    signature: key.sign(&begun.payload),
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(BenchDevice {
                subject,
                device_id: device.device_id,
                key,
                busy: AtomicBool::new(false),
            })
        });
    };
    for i in 0..args.credentials {
        activate(&mut pending, i);
        if pending.len() >= 32 {
            if let Some(r) = pending.join_next().await {
                devices.push(r.expect("join")?);
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        devices.push(r.expect("join")?);
    }
    Ok(devices)
}

/// Delete the credentials again (32 at a time, through the first target), and revoke
/// the devices.
async fn cleanup(w: &Workload) {
    let mut pending = tokio::task::JoinSet::new();
    for dev in &w.devices {
        let mut client = w.targets[0].client.devices();
        let req = pb::RevokeDeviceRequest {
            device_id: dev.device_id.clone(),
            tenant: String::new(),
        };
        pending.spawn(async move {
            let _ = client.revoke_device(req).await;
        });
        if pending.len() >= 32 {
            let _ = pending.join_next().await;
        }
    }
    while pending.join_next().await.is_some() {}
    let mut pending = tokio::task::JoinSet::new();
    for c in &w.creds {
        let mut client = w.targets[0].client.credentials();
        let req = pb::DeleteCredentialRequest {
            credential_id: c.id.clone(),
            tenant: String::new(),
        };
        pending.spawn(async move {
            let _ = client.delete_credential(req).await;
        });
        if pending.len() >= 32 {
            let _ = pending.join_next().await;
        }
    }
    while pending.join_next().await.is_some() {}
}

impl Workload {
    fn next_random(&self) -> u64 {
        // xorshift64*, shared: good enough to spread requests, and lock-free.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&self) -> f64 {
        (self.next_random() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&self) -> usize {
        let u = self.unit();
        let f = match self.args.distribution {
            Distribution::Uniform => u,
            Distribution::Skewed => u * u * u,
        };
        ((f * self.creds.len() as f64) as usize).min(self.creds.len() - 1)
    }

    /// verify-hotp: the picked credential, or the next one after it that has no request in
    /// flight, marked busy until the guard drops (so its codes reach the service in
    /// counter order). When every credential is busy (more in flight than credentials),
    /// the picked one, unguarded: its answers may then be REPLAYED, which the summary's
    /// `accepted_share` shows.
    fn pick_free(&self) -> (&Cred, Option<BusyGuard<'_>>) {
        let start = self.pick();
        let n = self.creds.len();
        for k in 0..n {
            let c = &self.creds[(start + k) % n];
            if c.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return (c, Some(BusyGuard(&c.busy)));
            }
        }
        (&self.creds[start], None)
    }

    /// One request of the scenario to the next target in turn; the outcome name (verdict
    /// or gRPC code) and the target's index.
    async fn one(&self) -> (String, usize) {
        let t = self.next_target.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        let client = &self.targets[t].client;
        let outcome = match self.args.scenario {
            Scenario::VerifyTotp | Scenario::VerifyHotp => self.verify(client).await.0,
            Scenario::SignAssertion => self.sign(client, None).await,
            Scenario::Approve => self.approve(client).await,
            Scenario::Mixed => 'mixed: {
                // As a login does: an accepted code, then an assertion citing its evidence.
                let (v, evidence) = self.verify(client).await;
                if let Some(evidence) = evidence {
                    let s = self.sign(client, Some(&evidence)).await;
                    if s != "OK" {
                        break 'mixed format!("sign {s}");
                    }
                }
                v
            }
        };
        (outcome, t)
    }

    /// A verification: the outcome name, and for an ACCEPTED code its evidence (id and
    /// subject).
    async fn verify(&self, client: &HsmClient) -> (String, Option<(String, String)>) {
        let (cred, _busy) = if self.args.scenario == Scenario::VerifyHotp {
            self.pick_free()
        } else {
            (&self.creds[self.pick()], None)
        };
        let wrong = self.unit() < self.args.wrong_share;
        let factor = match self.args.scenario {
            Scenario::VerifyHotp => cred.hotp_counter.fetch_add(1, Ordering::Relaxed),
            _ => now_secs() / 30,
        };
        let mut code = code(&cred.seed, factor);
        if wrong {
            // Another valid-looking code: the last digit moved by one.
            let last = code.pop().and_then(|c| c.to_digit(10)).unwrap_or(0);
            code.push(char::from_digit((last + 1) % 10, 10).unwrap_or('0'));
        }
        let r = client
            .credentials()
            .verify_code(pb::VerifyCodeRequest {
                credential_id: cred.id.clone(),
                code,
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                let name = pb::VerifyResult::try_from(r.result)
                    .map(|v| {
                        v.as_str_name()
                            .trim_start_matches("VERIFY_RESULT_")
                            .to_owned()
                    })
                    .unwrap_or_else(|_| "UNKNOWN".into());
                let evidence =
                    (!r.evidence_id.is_empty()).then(|| (r.evidence_id, subject_of(&cred.id)));
                (name, evidence)
            }
            Err(s) => (format!("{:?}", s.code()), None),
        }
    }

    /// approve: a device of a subject without a login in flight (or, when all are busy,
    /// the picked one: its older challenge is then cancelled, which the outcomes show).
    fn pick_device(&self) -> (&BenchDevice, Option<BusyGuard<'_>>) {
        let n = self.devices.len();
        let start = ((self.unit() * n as f64) as usize).min(n - 1);
        for k in 0..n {
            let d = &self.devices[(start + k) % n];
            if d.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return (d, Some(BusyGuard(&d.busy)));
            }
        }
        (&self.devices[start], None)
    }

    /// One login with the app: challenge, signed approval, assertion. The outcome:
    /// APPROVED when all three succeeded, else the step and what it answered.
    async fn approve(&self, client: &HsmClient) -> String {
        let (dev, _busy) = self.pick_device();
        let mut approvals = client.approvals();
        let c = match approvals
            .create_challenge(pb::CreateChallengeRequest {
                subject: dev.subject.clone(),
                text: "Log in to bench.example".into(),
                service_provider: "bench.example".into(),
                purpose: pb::ChallengePurpose::Login as i32,
                ttl_seconds: 0,
            })
            .await
        {
            Ok(c) => c.into_inner(),
            Err(s) => return format!("create {:?}", s.code()),
        };
        // The login page's two digits (the citizen picks them in the app).
        let binding = if c.binding_code.is_empty() {
            match approvals
                .get_challenge(pb::GetChallengeRequest {
                    challenge_id: c.challenge_id.clone(),
                })
                .await
            {
                Ok(g) => g.into_inner().binding_code,
                Err(s) => return format!("get {:?}", s.code()),
            }
        } else {
            c.binding_code.clone()
        };
        let answered = match approvals
            .answer_challenge(crate::app::answer_request(
                &dev.key,
                &dev.device_id,
                &c.challenge_id,
                &c.payload,
                pb::ChallengeDecision::Approve,
                &binding,
            ))
            .await
        {
            Ok(a) => a.into_inner(),
            Err(s) => return format!("answer {:?}", s.code()),
        };
        if answered.state != pb::ChallengeState::Approved as i32 {
            return crate::app::state_name(answered.state);
        }
        // The answer goes back to the device, without the evidence: the login service
        // reads it from the challenge (as `hsmctl approval wait` does).
        let evidence_id = match approvals
            .get_challenge(pb::GetChallengeRequest {
                challenge_id: c.challenge_id.clone(),
            })
            .await
        {
            Ok(g) => g.into_inner().evidence_id,
            Err(s) => return format!("get {:?}", s.code()),
        };
        if evidence_id.is_empty() {
            return "approved without evidence".into();
        }
        let evidence = (evidence_id, dev.subject.clone());
        match self.sign(client, Some(&evidence)).await.as_str() {
            "OK" => "APPROVED".into(),
            other => format!("sign {other}"),
        }
    }

    /// An assertion citing `evidence` (id, subject), or unbound (the caller's rule must
    /// say `unbound_assertions = true`): the outcome name.
    async fn sign(&self, client: &HsmClient, evidence: Option<&(String, String)>) -> String {
        let (evidence_id, subject) = match evidence {
            Some((id, subject)) => (id.clone(), subject.clone()),
            None => (String::new(), "bench-subject".to_owned()),
        };
        let r = client
            .signing()
            .sign_assertion(pb::SignAssertionRequest {
                key: self.args.signing_key.clone(),
                subject,
                audience: vec!["https://rp.example".into()],
                acr: self.args.acr.clone(),
                evidence_id,
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => "OK".into(),
            Err(s) => format!("{:?}", s.code()),
        }
    }
}

/// Clears a credential's busy mark when its verify-hotp request is done.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The subject the generator enrols credential `id` for.
fn subject_of(id: &str) -> String {
    format!("bench-{id}")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// HMAC-SHA-1, 6 digits (RFC 4226 dynamic truncation).
fn code(seed: &[u8], factor: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed);
    let mac = ring::hmac::sign(&key, &factor.to_be_bytes());
    let mac = mac.as_ref();
    let off = usize::from(mac[mac.len() - 1] & 0x0f);
    let bin = u32::from_be_bytes([mac[off] & 0x7f, mac[off + 1], mac[off + 2], mac[off + 3]]);
    format!("{:06}", bin % 1_000_000)
}

/// What a run measured.
struct Report {
    measured: Duration,
    histogram: Histogram<u64>,
    /// Per second of measurement: (requests, histogram).
    per_second: Vec<Histogram<u64>>,
    outcomes: BTreeMap<String, u64>,
    /// Measured requests per target (index of `--addr`).
    per_target: Vec<u64>,
    dropped: u64,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn drive(w: Arc<Workload>, progress: Option<indicatif::ProgressBar>) -> Report {
    let start = Instant::now();
    let measure_from = start + w.args.warmup;
    let end = measure_from + w.args.duration;
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let measured_count = Arc::new(AtomicU64::new(0));
    let limit = w.args.count.unwrap_or(u64::MAX);
    let dropped = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());

    let producer = {
        let w = w.clone();
        let measured_count = measured_count.clone();
        let dropped = dropped.clone();
        tokio::spawn(async move {
            match w.args.rate {
                None => {
                    let mut callers = tokio::task::JoinSet::new();
                    for _ in 0..w.args.concurrency {
                        let w = w.clone();
                        let tx = tx.clone();
                        let measured_count = measured_count.clone();
                        callers.spawn(async move {
                            while Instant::now() < end
                                && measured_count.load(Ordering::Relaxed) < limit
                            {
                                let sent = Instant::now();
                                let (outcome, target) = w.one().await;
                                let done = Instant::now();
                                if done >= measure_from {
                                    measured_count.fetch_add(1, Ordering::Relaxed);
                                }
                                let latency_us = (done - sent).as_micros() as u64;
                                if tx
                                    .send(Sample {
                                        done,
                                        latency_us,
                                        outcome,
                                        target,
                                    })
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        });
                    }
                    while callers.join_next().await.is_some() {}
                }
                Some(rate) => {
                    let interval = Duration::from_secs_f64(1.0 / rate);
                    let in_flight = Arc::new(AtomicU64::new(0));
                    const MAX_IN_FLIGHT: u64 = 20_000;
                    let mut i: u64 = 0;
                    loop {
                        let intended = start + interval.mul_f64(i as f64);
                        if intended >= end || measured_count.load(Ordering::Relaxed) >= limit {
                            break;
                        }
                        tokio::time::sleep_until(intended.into()).await;
                        i += 1;
                        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                            // The service is this far behind: the generator would only
                            // measure its own backlog from here on.
                            dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let w = w.clone();
                        let tx = tx.clone();
                        let in_flight = in_flight.clone();
                        let measured_count = measured_count.clone();
                        tokio::spawn(async move {
                            let (outcome, target) = w.one().await;
                            let done = Instant::now();
                            in_flight.fetch_sub(1, Ordering::Relaxed);
                            if done >= measure_from {
                                measured_count.fetch_add(1, Ordering::Relaxed);
                            }
                            // From the intended send time: a late send is latency too.
                            let latency_us = (done - intended).as_micros() as u64;
                            let _ = tx.send(Sample {
                                done,
                                latency_us,
                                outcome,
                                target,
                            });
                        });
                    }
                    drop(tx);
                }
            }
        })
    };
    let targets = w.targets.len();
    let stop_progress = stop.clone();
    let ticker = progress.map(|bar| {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        let t = start.elapsed();
                        bar.set_position(t.as_secs());
                        bar.set_message(if t < w.args.warmup { "warming up".to_owned() } else { "measuring".to_owned() });
                    }
                    _ = stop_progress.notified() => return,
                }
            }
        })
    });

    let mut report = Report {
        measured: Duration::ZERO,
        histogram: new_histogram(),
        per_second: Vec::new(),
        outcomes: BTreeMap::new(),
        per_target: vec![0; targets],
        dropped: 0,
    };
    let mut last_done = measure_from;
    while let Some(s) = rx.recv().await {
        if s.done < measure_from {
            continue;
        }
        last_done = last_done.max(s.done);
        let v = s.latency_us.clamp(1, 60_000_000);
        let _ = report.histogram.record(v);
        let second = (s.done - measure_from).as_secs() as usize;
        while report.per_second.len() <= second {
            report.per_second.push(new_histogram());
        }
        let _ = report.per_second[second].record(v);
        *report.outcomes.entry(s.outcome).or_default() += 1;
        report.per_target[s.target] += 1;
    }
    let _ = producer.await;
    stop.notify_one();
    if let Some(t) = ticker {
        let _ = t.await;
    }
    report.measured = (last_done - measure_from).max(Duration::from_millis(1));
    report.dropped = dropped.load(Ordering::Relaxed);
    report
}

impl Report {
    fn summary(&self, args: &BenchArgs, targets: &[Target]) -> Value {
        let h = &self.histogram;
        let ms = |v: u64| v as f64 / 1000.0;
        let requests = h.len();
        let (outcomes, errors): (BTreeMap<_, _>, BTreeMap<_, _>) = self
            .outcomes
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .partition(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        // Verify scenarios: the share of measured requests answered ACCEPTED.
        let accepted_share = match args.scenario {
            Scenario::SignAssertion => Value::Null,
            _ if requests == 0 => Value::Null,
            Scenario::Approve => {
                json!(outcomes.get("APPROVED").copied().unwrap_or(0) as f64 / requests as f64)
            }
            _ => json!(outcomes.get("ACCEPTED").copied().unwrap_or(0) as f64 / requests as f64),
        };
        let per_target: Vec<Value> = targets
            .iter()
            .zip(&self.per_target)
            .map(|(t, n)| json!({ "endpoint": t.endpoint, "requests": n }))
            .collect();
        json!({
            "scenario": args.scenario.to_possible_value().map(|v| v.get_name().to_owned()),
            "mode": if args.rate.is_some() { "open" } else { "closed" },
            "concurrency": if args.rate.is_some() { Value::Null } else { json!(args.concurrency) },
            "rate": args.rate,
            "credentials": if args.scenario == Scenario::SignAssertion { 0 } else { args.credentials },
            "warmup_seconds": args.warmup.as_secs_f64(),
            "duration_seconds": self.measured.as_secs_f64(),
            "requests": requests,
            "throughput_per_second": requests as f64 / self.measured.as_secs_f64(),
            "latency_ms": {
                "p50": ms(h.value_at_quantile(0.50)),
                "p90": ms(h.value_at_quantile(0.90)),
                "p99": ms(h.value_at_quantile(0.99)),
                "p999": ms(h.value_at_quantile(0.999)),
                "max": ms(h.max()),
                "mean": h.mean() / 1000.0,
            },
            "outcomes": outcomes,
            "accepted_share": accepted_share,
            "errors": errors,
            "targets": per_target,
            "dropped": self.dropped,
        })
    }

    /// Two panels in one SVG: p50/p99 latency per second, and the latency histogram.
    fn plot(&self, path: &std::path::Path) -> Result<(), String> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(400);
        let secs = self.per_second.len().max(1) as f64;
        let p = |q: f64| -> Vec<(f64, f64)> {
            self.per_second
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_empty())
                .map(|(i, h)| (i as f64 + 0.5, h.value_at_quantile(q) as f64 / 1000.0))
                .collect()
        };
        let (p50, p99) = (p(0.5), p(0.99));
        let y_max = p99.iter().map(|(_, y)| *y).fold(0.1f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&top)
            .caption(
                "latency over time (ms): p50 and p99 per second",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..secs, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(p50, &BLUE))
            .map_err(|e| e.to_string())?
            .label("p50");
        chart
            .draw_series(LineSeries::new(p99, &RED))
            .map_err(|e| e.to_string())?
            .label("p99");

        // Histogram of latencies in 50 buckets up to the p99.9.
        let h = &self.histogram;
        let hi = (h.value_at_quantile(0.999).max(1)) as f64 / 1000.0;
        let buckets = 50usize;
        let width = hi / buckets as f64;
        let mut counts = vec![0u64; buckets];
        for v in h.iter_recorded() {
            let ms = v.value_iterated_to() as f64 / 1000.0;
            let b = ((ms / width) as usize).min(buckets - 1);
            counts[b] += v.count_at_value();
        }
        let c_max = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&bottom)
            .caption("latency histogram (ms, up to p99.9)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..hi, 0f64..c_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("requests")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, c)| {
                let x0 = i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, *c as f64)], BLUE.mix(0.6).filled())
            }))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn print_summary(s: &Value) {
    let l = &s["latency_ms"];
    println!(
        "{} ({} loop{}): {} requests in {:.1} s = {:.0}/s",
        s["scenario"].as_str().unwrap_or(""),
        s["mode"].as_str().unwrap_or(""),
        match (s["concurrency"].as_u64(), s["rate"].as_f64()) {
            (_, Some(r)) => format!(", {r}/s scheduled"),
            (Some(c), _) => format!(", {c} callers"),
            _ => String::new(),
        },
        s["requests"],
        s["duration_seconds"].as_f64().unwrap_or(0.0),
        s["throughput_per_second"].as_f64().unwrap_or(0.0)
    );
    println!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        l["p50"].as_f64().unwrap_or(0.0),
        l["p90"].as_f64().unwrap_or(0.0),
        l["p99"].as_f64().unwrap_or(0.0),
        l["p999"].as_f64().unwrap_or(0.0),
        l["max"].as_f64().unwrap_or(0.0)
    );
    println!("outcomes: {}", s["outcomes"]);
    if let Some(share) = s["accepted_share"].as_f64() {
        println!("accepted: {:.2}%", 100.0 * share);
    }
    if let Some(targets) = s["targets"].as_array().filter(|t| t.len() > 1) {
        for t in targets {
            println!(
                "target {}: {} requests",
                t["endpoint"].as_str().unwrap_or(""),
                t["requests"]
            );
        }
    }
    if s["errors"].as_object().is_some_and(|e| !e.is_empty()) {
        println!("errors by status: {}", s["errors"]);
    }
    if s["dropped"].as_u64().unwrap_or(0) > 0 {
        println!(
            "dropped by the generator (too far behind): {}",
            s["dropped"]
        );
    }
}
