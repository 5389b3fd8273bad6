//! `hsmctl credential import FILE.pskc (--psk-file | --password-file | --transport-key)`
//! against the real service: RFC 6030 figures 6 and 7, exit codes 0/1/2, the JSONL
//! report, --dry-run, --mapping, and the secret files' formats.

mod common;

use std::path::{Path, PathBuf};

use common::{hsmctl, json, stdout};
use hsm_service::otp::{self, Digits};
use hsm_service::testing::DevEnv;

fn figure(n: u32) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../pskc/tests/data/figure{n}.xml"))
        .display()
        .to_string()
}

fn hotp(seed: &[u8], counter: u64, digits: u32) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed);
    let tag = ring::hmac::sign(&key, &otp::moving_factor(counter));
    format!(
        "{:0width$}",
        otp::truncate(tag.as_ref(), Digits::new(digits).expect("digits")),
        width = digits as usize
    )
}

fn write(dir: &Path, name: &str, content: &[u8]) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_figures_exit_codes_report_and_files() {
    let env = DevEnv::new();
    let server = env.start().await;
    let addr = server.local_addr();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let psk = write(d, "psk.hex", b"12345678901234567890123456789012\n");
    let fig6 = figure(6);
    let import = |args: &[&str]| {
        let mut all = vec!["credential", "import"];
        all.extend_from_slice(args);
        hsmctl(&env, addr, "login-service", &all)
    };

    // Figure 6 with the PSK from a hex file: imported, exit 0, its code verifies.
    let report = d.join("r6.jsonl").display().to_string();
    let out = import(&[&fig6, "--psk-file", &psk, "--report", &report]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("1 imported"), "{text}");
    assert!(text.contains("zeroized service buffer: 1"), "{text}");
    let lines = std::fs::read_to_string(&report).expect("report");
    let line: serde_json::Value = serde_json::from_str(lines.trim()).expect("json line");
    assert_eq!(line["credential_id"], "12345678");
    assert_eq!(line["serial"], "987654321");
    assert_eq!(line["result"], "imported");
    let code = hotp(b"12345678901234567890", 0, 8);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "12345678", &code],
    );
    assert!(out.status.success(), "{out:?}");
    // Again: skipped as identical, still exit 0; --json summary.
    let out = import(&[&fig6, "--psk-file", &psk, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["imported"].as_u64(), v["skipped"].as_u64()),
        (Some(0), Some(1))
    );
    // A wrong key: the whole file refused, exit 2.
    let wrong = write(d, "wrong.hex", "ab".repeat(16).as_bytes());
    let out = import(&[&fig6, "--psk-file", &wrong]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("MAC key"),
        "{out:?}"
    );
    // Malformed secret files: refused before anything is read.
    for bad in ["12 34", "zz", "1234"] {
        let f = write(d, "bad.hex", bad.as_bytes());
        let out = import(&[&fig6, "--psk-file", &f]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
    }
    // Exactly one transport flag.
    let out = import(&[&fig6]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = import(&[&fig6, "--psk-file", &psk, "--transport-key", "x"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Figure 7: the password, one trailing newline ignored.
    let pw = write(d, "pw", b"qwerty\n");
    let out = import(&[&figure(7), "--password-file", &pw]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let code = hotp(b"12345678901234567890", 0, 8);
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "verify", "123456", &code],
    );
    assert!(out.status.success(), "{out:?}");
    let pw2 = write(d, "pw2", b"qwerty\n\n");
    let out = import(&[&figure(7), "--password-file", &pw2]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "only one newline is ignored: {out:?}"
    );

    // Figure 5 (plain values): one key imports or is skipped, the PIN key is refused:
    // exit 1, the report says why.
    let report5 = d.join("r5.jsonl").display().to_string();
    let out = import(&[
        &figure(5),
        "--psk-file",
        &psk,
        "--allow-unmaced",
        "--report",
        &report5,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = std::fs::read_to_string(&report5).expect("report");
    assert_eq!(lines.lines().count(), 2);
    assert!(lines.contains(r#""result":"refused""#), "{lines}");
    assert!(lines.contains("unsupported key algorithm"), "{lines}");
    // Truncated XML: exit 2.
    let text = std::fs::read_to_string(figure(6)).expect("fig 6");
    let cut = write(d, "cut.pskc", &text.as_bytes()[..text.len() / 2]);
    let out = import(&[&cut, "--psk-file", &psk]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // A generated file: --dry-run stores nothing; --mapping gives subjects.
    let spec = pskc::testdata::Spec::new(30).id_prefix("cli-");
    let gen = d.join("gen.pskc");
    pskc::testdata::write_encrypted(
        std::io::BufWriter::new(std::fs::File::create(&gen).expect("create")),
        &spec,
    )
    .expect("generate");
    let gen = gen.display().to_string();
    let key: String = spec
        .transport_key()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let gkey = write(d, "gen.hex", key.as_bytes());
    let out = import(&[&gen, "--psk-file", &gkey, "--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["imported"].as_u64(), Some(30));
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "cli-00000000"],
    );
    assert!(!out.status.success(), "a dry run stores nothing: {out:?}");
    let mapping = write(
        d,
        "map.csv",
        b"serial,subject\nSN00000000,citizen-0\nSN00000001,citizen-1\n",
    );
    let out = import(&[&gen, "--psk-file", &gkey, "--mapping", &mapping]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "cli-00000001", "--json"],
    );
    assert_eq!(json(&out)["subject"], "citizen-1", "{out:?}");
    let out = hsmctl(
        &env,
        addr,
        "login-service",
        &["credential", "get", "cli-00000002", "--json"],
    );
    assert_eq!(json(&out)["subject"], "", "{out:?}");
    let dup = write(d, "dup.csv", b"SN1,a\nSN1,b\n");
    let out = import(&[&gen, "--psk-file", &gkey, "--mapping", &dup]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    server.shutdown().await.expect("shutdown");
}
