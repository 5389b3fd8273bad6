//! `report --quick` runs end to end and writes a Markdown table with every row.
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
    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(md.contains("nproc "), "{md}");
    for op in ["HMAC-SHA1 ×3", "ECDSA P-256 sign"] {
        for threads in [1, 2] {
            assert!(
                md.contains(&format!("| {op} | {threads} |")),
                "{op} on {threads}: {md}"
            );
        }
    }
}
