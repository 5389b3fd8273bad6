//! `benches/report`: the physical limits of one machine, measured in one run —
//! HMAC-SHA1 ×3 (one TOTP window) and ECDSA P-256 signing in software (ring) and
//! through SoftHSM directly via cryptoki (no service around it), on 1 and 2
//! threads — then the in-process dev service end to end over mTLS gRPC with
//! `hsm_client::load` in a process of its own (VerifyCode TOTP and SignAssertion ES256
//! at 1 to 128 in flight, VerifyCode without durability, open loop at half the
//! peak; each row the median of interleaved runs), and the targets of issue #6 as
//! ratios measured in this run.
//!
//! Usage: `report [--quick] [--out DIR]` (default `target/report/`).
//! Writes `report.md` and `report.svg` (e2e throughput by concurrency, with
//! the SoftHSM-direct and software limits on 2 threads as horizontal lines).

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
    op: &'static str,
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

fn main() {
    if std::env::args().nth(1).as_deref() == Some(LOAD_CHILD) {
        load_child(std::env::args().skip(2).collect());
        return;
    }
    let mut quick = false;
    let mut out = PathBuf::from("target/report");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            other => {
                eprintln!(
                    "report: unknown argument {other:?} (usage: report [--quick] [--out DIR])"
                );
                std::process::exit(2);
            }
        }
    }
    let (warmup, dur) = if quick {
        (Duration::from_millis(20), Duration::from_millis(100))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    let bench = Arc::new(Bench::new(1));
    let seed: Vec<u8> = (0u8..20).collect();
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let s = seed.clone();
        rows.push(Row {
            family: "software (ring)",
            op: "HMAC-SHA1 ×3",
            threads,
            ops_per_s: measure(
                threads,
                warmup,
                dur,
                move || ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &s),
                |k, i| {
                    for f in [i, i + 1, i + 2] {
                        std::hint::black_box(ring::hmac::sign(k, &otp::moving_factor(f)));
                    }
                },
            ),
        });
        rows.push(Row {
            family: "software (ring)",
            op: "ECDSA P-256 sign",
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
        let (b, s) = (bench.clone(), seed.clone());
        rows.push(Row {
            family: "SoftHSM direct",
            op: "HMAC-SHA1 ×3",
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
                |(session, key), i| {
                    for f in [i, i + 1, i + 2] {
                        std::hint::black_box(
                            session
                                .sign(&Mechanism::Sha1Hmac, *key, &otp::moving_factor(f))
                                .expect("hmac"),
                        );
                    }
                },
            ),
        });
        let b = bench.clone();
        rows.push(Row {
            family: "SoftHSM direct",
            op: "ECDSA P-256 sign",
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
    let e2e = end_to_end(quick);
    let mut md = markdown(&rows, quick);
    md.push_str(&e2e_markdown(&rows, &e2e));
    print!("{md}");
    std::fs::create_dir_all(&out).expect("--out directory");
    std::fs::write(out.join("report.md"), &md).expect("write report.md");
    plot(&out.join("report.svg"), &rows, &e2e).expect("write report.svg");
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
    for sw in rows.iter().filter(|r| r.family.starts_with("software")) {
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
    md
}

/// One end-to-end row (mTLS gRPC, in-process dev service, `hsm_client::load`): the
/// median of its interleaved runs.
struct E2e {
    scenario: &'static str,
    durable: bool,
    concurrency: Option<usize>,
    rate: Option<f64>,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Verdicts and gRPC errors with their counts, e.g. `ACCEPTED 400, REPLAYED 9600`.
    outcomes: String,
    /// Throughput of every run of this row, in the order run (the row is the median).
    runs_ops_per_s: Vec<f64>,
}

/// The median run of `runs` (by throughput for closed loop, by p99 for open loop), with
/// every run's throughput attached.
fn median(mut runs: Vec<E2e>) -> E2e {
    let all: Vec<f64> = runs.iter().map(|r| r.ops_per_s).collect();
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
    m
}

/// Closed-loop concurrencies of the end-to-end rows.
const CONCURRENCIES: [usize; 5] = [1, 4, 16, 64, 128];
/// Runs per end-to-end row; the row is their median.
const ROUNDS: usize = 3;

/// The end-to-end rows. The services (durable, and the bench-only one without fsync)
/// run in this process; each run's load generator is this binary re-executed
/// ([`load_child`]), its own process as `hsmctl bench` is (the generator in the
/// service's process, even on a runtime of its own, measured VerifyCode about 20% and
/// the open loop's p99 about 60% worse than `hsmctl bench` against the same service).
/// Both services are up for the whole run, and every row's runs are interleaved with
/// the rows it is compared with (durable and not, round by round), so drift of this
/// shared machine hits both sides of a ratio alike.
fn end_to_end(quick: bool) -> Vec<E2e> {
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
    let concurrencies: &[usize] = if quick { &[1, 4] } else { &CONCURRENCIES };
    // The sign-assertion scenario measures signing itself: unbound (no VerifyCode first).
    let mut envs = [
        hsm_service::testing::DevEnv::new(),
        hsm_service::testing::DevEnv::new(),
    ];
    for env in &mut envs {
        env.allow_unbound_assertions("login-service");
    }
    let servers = service_rt.block_on(async {
        [
            envs[0].start().await,
            envs[1].start_without_fsync_bench_only().await,
        ]
    });
    // The generator's flags: `load` is `--concurrency` (closed loop) or `--rate`.
    let load_flags = |scenario: &'static str, load: &'static str, value: &str| {
        [
            "--scenario",
            scenario,
            load,
            value,
            "--warmup",
            warmup,
            "--duration",
            dur,
            "--credentials",
            "200",
        ]
        .map(str::to_owned)
    };
    let run = |durable: bool, flags: &[String], scenario, c, rate| {
        // The service without fsync leaves its writes dirty in the page cache; without
        // this the kernel writes them back during later runs, whichever service those
        // drive (it cost later rows up to a quarter of their throughput).
        let synced = std::process::Command::new("sync").status();
        assert!(synced.is_ok_and(|s| s.success()), "sync");
        let i = usize::from(!durable);
        run_one(&envs[i], &servers[i], flags, scenario, durable, c, rate)
    };
    let mut rows = Vec::new();
    for scenario in ["verify-totp", "sign-assertion"] {
        let durabilities: &[bool] = if scenario == "verify-totp" {
            &[true, false]
        } else {
            &[true]
        };
        for &c in concurrencies {
            let c_s = c.to_string();
            let flags = load_flags(scenario, "--concurrency", &c_s);
            let mut samples: Vec<Vec<E2e>> = durabilities.iter().map(|_| Vec::new()).collect();
            for _ in 0..rounds {
                for (i, &durable) in durabilities.iter().enumerate() {
                    samples[i].push(run(durable, &flags, scenario, Some(c), None));
                }
            }
            rows.extend(samples.into_iter().map(median));
        }
    }
    let peak = rows
        .iter()
        .filter(|r| r.scenario == "verify-totp" && r.durable)
        .map(|r| r.ops_per_s)
        .fold(0.0, f64::max);
    let rate = (peak / 2.0).max(1.0);
    let rate_s = format!("{rate:.0}");
    let flags = load_flags("verify-totp", "--rate", &rate_s);
    let open: Vec<E2e> = (0..rounds)
        .map(|_| run(true, &flags, "verify-totp", None, Some(rate)))
        .collect();
    rows.push(median(open));
    service_rt.block_on(async {
        for server in servers {
            server.shutdown().await.expect("shutdown");
        }
    });
    rows
}

/// One run: this binary re-executed as the load generator against `server`, as the dev
/// identity `login-service` of `env`; its summary JSON (that of `hsmctl bench --json`).
fn run_one(
    env: &hsm_service::testing::DevEnv,
    server: &hsm_service::server::RunningServer,
    flags: &[String],
    scenario: &'static str,
    durable: bool,
    concurrency: Option<usize>,
    rate: Option<f64>,
) -> E2e {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg(LOAD_CHILD)
        .arg(env.dir.path())
        .arg(format!("https://{}", server.local_addr()))
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the load generator");
    assert!(out.status.success(), "load generator failed: {flags:?}");
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("load generator summary JSON");
    E2e {
        scenario,
        durable,
        concurrency,
        rate,
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
        runs_ops_per_s: Vec::new(),
    }
}

/// `report --load-child DIR ENDPOINT FLAGS...`: one load run (`hsm_client::load`, the
/// `hsmctl bench` generator) as `login-service` of the dev directory DIR against
/// ENDPOINT; prints the summary JSON.
fn load_child(args: Vec<String>) {
    let [dir, endpoint, flags @ ..] = args.as_slice() else {
        eprintln!("report: {LOAD_CHILD} DIR ENDPOINT FLAGS...");
        std::process::exit(2);
    };
    let bench = hsm_client::load::BenchArgs::from_flags(flags).expect("bench flags");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let summary = rt.block_on(async {
        let client = hsm_client::ClientConfig::dev(std::path::Path::new(dir), "login-service")
            .with_endpoint(endpoint.clone())
            .connect()
            .await
            .expect("connect");
        hsm_client::load::measure(&client, &bench, true)
            .await
            .expect("load run")
    });
    println!("{summary}");
}

fn e2e_markdown(rows: &[Row], runs: &[E2e]) -> String {
    let direct = |op: &str| {
        rows.iter()
            .find(|r| r.family.starts_with("SoftHSM") && r.op == op && r.threads == 2)
            .map_or(f64::NAN, |r| r.ops_per_s)
    };
    let limit = |scenario: &str| {
        if scenario == "sign-assertion" {
            direct("ECDSA P-256 sign")
        } else {
            direct("HMAC-SHA1 ×3")
        }
    };
    let mut md = String::from(
        "\n## End to end (mTLS gRPC, in-process dev service)\n\n\
         Each row is the median of its runs (last column, ops/s in the order run); the\n\
         runs of rows compared with each other were interleaved.\n\n\
         | scenario | durable | load | ops/s | p50 ms | p99 ms | e2e / direct (2 threads) | outcomes | runs ops/s |\n\
         |---|---|---|---:|---:|---:|---:|---|---|\n",
    );
    for r in runs {
        let load = match (r.concurrency, r.rate) {
            (Some(c), _) => format!("closed, {c} in flight"),
            (None, Some(rate)) => format!("open, {rate:.0}/s"),
            _ => String::new(),
        };
        let all = r
            .runs_ops_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        md.push_str(&format!(
            "| {} | {} | {load} | {:.0} | {:.2} | {:.2} | {:.1}% | {} | {all} |\n",
            r.scenario,
            if r.durable { "yes" } else { "no (bench only)" },
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            100.0 * r.ops_per_s / limit(r.scenario),
            r.outcomes
        ));
    }
    let peak = |scenario: &str, durable: bool| {
        runs.iter()
            .filter(|r| r.scenario == scenario && r.durable == durable && r.concurrency.is_some())
            .map(|r| r.ops_per_s)
            .fold(0.0, f64::max)
    };
    let verify = peak("verify-totp", true) / direct("HMAC-SHA1 ×3");
    let sign = peak("sign-assertion", true) / direct("ECDSA P-256 sign");
    let cost = 1.0 - peak("verify-totp", true) / peak("verify-totp", false);
    let p99 = runs
        .iter()
        .find(|r| r.rate.is_some())
        .map_or(f64::NAN, |r| r.p99_ms);
    md.push_str("\n## Targets\n\n| target | measured | met |\n|---|---:|---|\n");
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
        "VerifyCode e2e ≥ 50% of SoftHSM-direct HMAC ×3",
        format!("{:.1}%", 100.0 * verify),
        verify >= 0.5,
        format!("{:.1} points", 100.0 * (0.5 - verify)),
    ));
    md.push_str(&row(
        "SignAssertion ES256 e2e ≥ 70% of SoftHSM-direct ECDSA",
        format!("{:.1}%", 100.0 * sign),
        sign >= 0.7,
        format!("{:.1} points", 100.0 * (0.7 - sign)),
    ));
    md.push_str(&row(
        "durable group commit costs ≤ 20% of VerifyCode throughput",
        format!("{:.1}%", 100.0 * cost),
        cost <= 0.2,
        format!("{:.1} points", 100.0 * (cost - 0.2)),
    ));
    md.push_str(&row(
        "open loop at half peak: VerifyCode p99 ≤ 5 ms",
        format!("{p99:.2} ms"),
        p99 <= 5.0,
        format!("{:.2} ms", p99 - 5.0),
    ));
    md
}

/// Two panels: VerifyCode and SignAssertion e2e throughput by concurrency
/// (log2 x), with the SoftHSM-direct and software limits (2 threads) as lines.
fn plot(path: &std::path::Path, rows: &[Row], runs: &[E2e]) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(400);
    let limit = |family: &str, op: &str| {
        rows.iter()
            .find(|r| r.family.starts_with(family) && r.op == op && r.threads == 2)
            .map_or(0.0, |r| r.ops_per_s)
    };
    for (area, scenario, op) in [
        (&top, "verify-totp", "HMAC-SHA1 ×3"),
        (&bottom, "sign-assertion", "ECDSA P-256 sign"),
    ] {
        let series = |durable: bool| -> Vec<(f64, f64)> {
            runs.iter()
                .filter(|r| r.scenario == scenario && r.durable == durable)
                .filter_map(|r| r.concurrency.map(|c| ((c as f64).log2(), r.ops_per_s)))
                .collect()
        };
        let (direct, software) = (limit("SoftHSM", op), limit("software", op));
        let x_max = series(true).iter().map(|p| p.0).fold(1.0f64, f64::max);
        let y_max = series(true)
            .iter()
            .chain(series(false).iter())
            .map(|p| p.1)
            .fold(direct.max(software), f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{scenario}: e2e ops/s by concurrency (log2) vs limits of {op}"),
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
        chart
            .draw_series(LineSeries::new(series(true), &BLUE))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(series(false), &MAGENTA))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new([(0.0, direct), (x_max, direct)], &RED))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, software), (x_max, software)],
                &GREEN,
            ))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
