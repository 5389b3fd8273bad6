//! `import-bench [ENTRIES]`: the PSKC import of issue 14 at scale. Generates a file of
//! ENTRIES (default 1,000,000) AES-128-CBC encrypted, HMAC-SHA1 MACed entries with
//! `pskc::testdata`, starts the dev service (embedded store, fsync on) as a child
//! process, imports the file through `hsm_client::import` (what `hsmctl credential
//! import` runs) and prints: entries/s overall, the rate of every 100,000-entry slice (so
//! a rate that falls as the store grows shows), the peak RSS of the service and of the
//! importing side (VmHWM), and the store's size. `import-bench --service-child DIR` is
//! the child.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use hsm_client::import::{import_file, ImportOptions, TransportArg};

const SERVICE_CHILD: &str = "--service-child";
const SLICE: u64 = 100_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SERVICE_CHILD) {
        service_child(&args[2]);
        return;
    }
    let entries: u64 = args
        .get(1)
        .map(|a| a.replace('_', "").parse().expect("ENTRIES is a number"))
        .unwrap_or(1_000_000);
    run(entries);
}

/// The dev service of data directory `dir` on 127.0.0.1:0; prints `listening ADDR`,
/// serves until stdin closes.
fn service_child(dir: &str) {
    let path = Path::new(dir).join("config.toml");
    let mut config = hsm_service::config::Config::load(&path).expect("dev config.toml");
    config.server.listen = "127.0.0.1:0".parse().expect("address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt
        .block_on(hsm_service::server::start(config))
        .expect("the service starts");
    println!("listening {}", server.local_addr());
    std::io::stdout().flush().ok();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    rt.block_on(server.shutdown()).expect("shutdown");
}

/// VmHWM of `/proc/PID/status` in MiB.
fn peak_rss_mib(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                total += dir_size(&path);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

fn run(entries: u64) {
    let env = hsm_service::testing::DevEnv::new();
    let files = tempfile::tempdir().expect("tmp");
    let file = files.path().join("bench.pskc");
    let spec = pskc::testdata::Spec::new(entries).id_prefix("bench-");
    let t = Instant::now();
    pskc::testdata::write_encrypted(
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&file).expect("create")),
        &spec,
    )
    .expect("generate");
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "generated {entries} entries ({:.0} MiB) in {:.1} s",
        file_bytes as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );

    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg(SERVICE_CHILD)
        .arg(env.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the service");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("the service's address");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("listening ADDR")
        .to_owned();
    let pid = child.id().to_string();

    // The importing side's peak from here on (not the generator's).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let slices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, f64)>::new()));
    let started = Instant::now();
    let summary = rt.block_on(async {
        let client = hsm_client::ClientConfig {
            endpoint: format!("https://{addr}"),
            ca: env.pki("ca.crt"),
            cert: env.pki("login-service.crt"),
            key: env.pki("login-service.key"),
        }
        .connect()
        .await
        .expect("connect");
        let marks = slices.clone();
        let mut next = SLICE;
        let progress = Box::new(move |done: u64, _total: u64| {
            while done >= next {
                marks
                    .lock()
                    .expect("marks")
                    .push((next, started.elapsed().as_secs_f64()));
                next += SLICE;
            }
        });
        let options = ImportOptions {
            transport: TransportArg::Psk(zeroize::Zeroizing::new(spec.transport_key())),
            mapping: None,
            dry_run: false,
            allow_unmaced: false,
            allow_rsa_1_5: false,
        };
        import_file(&client, &file, options, None, progress)
            .await
            .expect("import")
    });
    let secs = started.elapsed().as_secs_f64();
    let service_rss = peak_rss_mib(&pid);
    let client_rss = peak_rss_mib("self");
    drop(child.stdin.take());
    let _ = child.wait();
    let store = dir_size(env.dir.path());
    assert_eq!(summary.imported, entries, "{summary:?}");

    println!(
        "# PSKC import: {entries} AES-128-CBC + HMAC-SHA1 entries, embedded store (fsync), SoftHSM"
    );
    println!(
        "total: {entries} imported in {secs:.1} s = {:.0} entries/s ({} batches; decrypted in HSM {}, in a zeroized buffer {})",
        entries as f64 / secs,
        summary.batches,
        summary.decrypted_in_hsm,
        summary.decrypted_in_host
    );
    println!(
        "peak RSS: service {service_rss:.0} MiB, importer (hsmctl's library) {client_rss:.0} MiB"
    );
    println!(
        "file {:.0} MiB; data directory after import {:.0} MiB",
        file_bytes as f64 / (1 << 20) as f64,
        store as f64 / (1 << 20) as f64
    );
    println!("rate per {SLICE}-entry slice (entries sent; the store holds the earlier slices):");
    let marks = slices.lock().expect("marks").clone();
    let mut prev = 0.0;
    for (n, t) in marks {
        println!(
            "  {:>9} .. {:>9}: {:>6.0} entries/s",
            n - SLICE,
            n,
            SLICE as f64 / (t - prev)
        );
        prev = t;
    }
}
