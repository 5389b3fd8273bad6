//! `report --quick` runs end to end and writes the Markdown with every section and row,
//! and the accepted-path rows were all ACCEPTED (else the report exits 1).
//! (Figures are not checked: speed is never asserted in a test.)

#[test]
fn quick_report_writes_every_row() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_report"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run report");
    assert!(status.success());
    let svg = std::fs::metadata(out.path().join("report.svg")).expect("report.svg");
    assert!(svg.len() > 0, "empty report.svg");
    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(md.contains("nproc "), "{md}");
    assert!(md.contains("SoftHSM "), "{md}");
    // Every end-to-end row says what the calls answered.
    assert!(
        md.contains(" | REPLAYED ") || md.contains("REPLAYED "),
        "{md}"
    );
    assert!(md.contains(" | OK "), "{md}");
    // The accepted path: every answer ACCEPTED, none REPLAYED, the share printed.
    let accepted: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| VerifyCode, accepted (HOTP in order) |"))
        .collect();
    assert_eq!(accepted.len(), 2 + 2 + 1, "{md}");
    for row in &accepted {
        assert!(row.contains(" | 100.00% | ACCEPTED "), "{row}");
        assert!(!row.contains("REPLAYED") && !row.contains("FAIL"), "{row}");
        assert!(row.contains(" | HMAC-SHA1 ×12 | "), "{row}");
    }
    // Every row is a median of interleaved runs, and lists them (2 with --quick).
    let row = md
        .lines()
        .find(|l| {
            l.starts_with(
                "| VerifyCode, mostly REPLAYED (TOTP current step) | redb, no fsync (bench only) | 1 | closed, 4 in flight |",
            )
        })
        .expect("row");
    let runs = row
        .trim_end_matches('|')
        .rsplit('|')
        .next()
        .expect("runs column");
    assert_eq!(runs.split(" / ").count(), 2, "{row}");
    for needle in [
        "## End to end",
        "| VerifyCode, accepted (HOTP in order) | redb | 1 | closed, 1 in flight |",
        "| VerifyCode, accepted (HOTP in order) | redb, no fsync (bench only) | 1 | closed, 4 in flight |",
        "| VerifyCode, accepted (HOTP in order) | redb | 1 | open, ",
        "| VerifyCode, mostly REPLAYED (TOTP current step) | redb | 1 | closed, 1 in flight |",
        "| SignAssertion ES256 | redb | 1 | closed, 4 in flight |",
        "## Targets",
        "| VerifyCode accepted (HOTP) e2e ≥ 50% of SoftHSM-direct HMAC-SHA1 ×12 |",
        "| VerifyCode mostly REPLAYED (TOTP; the pre-issue-11 measure) e2e ≥ 50%",
        "| SignAssertion ES256 e2e ≥ 70%",
        "| durable group commit costs ≤ 20% of VerifyCode accepted throughput |",
        "| open loop at half the accepted peak: VerifyCode accepted p99 ≤ 5 ms |",
    ] {
        assert!(md.contains(needle), "missing {needle:?}: {md}");
    }
    for op in ["HMAC-SHA1 ×12", "HMAC-SHA1 ×3", "ECDSA P-256 sign"] {
        for threads in [1, 2] {
            assert!(
                md.contains(&format!("| {op} | {threads} |")),
                "{op} on {threads}: {md}"
            );
        }
    }
}
