//! `report --quick` runs end to end and writes the Markdown with every section and row.
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
        md.contains(" | REPLAYED ") || md.contains(" | ACCEPTED "),
        "{md}"
    );
    assert!(md.contains(" | OK "), "{md}");
    // Every row is a median of interleaved runs, and lists them (2 with --quick).
    let row = md
        .lines()
        .find(|l| l.starts_with("| verify-totp | no (bench only) | closed, 4 in flight |"))
        .expect("row");
    let runs = row
        .trim_end_matches('|')
        .rsplit('|')
        .next()
        .expect("runs column");
    assert_eq!(runs.split(" / ").count(), 2, "{row}");
    for needle in [
        "## End to end",
        "| verify-totp | yes | closed, 1 in flight |",
        "| sign-assertion | yes | closed, 4 in flight |",
        "| verify-totp | no (bench only) | closed, 4 in flight |",
        "| verify-totp | yes | open, ",
        "## Targets",
        "| VerifyCode e2e ≥ 50%",
        "| SignAssertion ES256 e2e ≥ 70%",
        "| durable group commit costs ≤ 20%",
        "| open loop at half peak: VerifyCode p99 ≤ 5 ms |",
    ] {
        assert!(md.contains(needle), "missing {needle:?}: {md}");
    }
    for op in ["HMAC-SHA1 ×3", "ECDSA P-256 sign"] {
        for threads in [1, 2] {
            assert!(
                md.contains(&format!("| {op} | {threads} |")),
                "{op} on {threads}: {md}"
            );
        }
    }
}
