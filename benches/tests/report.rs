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
        // The end-to-end table's rows (the bounds table has no load column).
        .filter(|l| l.contains(" | closed, ") || l.contains(" | open, "))
        .collect();
    // PostgreSQL rows run wherever PostgreSQL is installed (CI installs it): then one
    // and two instances beside redb and redb without fsync.
    let postgres = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::fs::read_dir("/usr/lib/postgresql")
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("bin/initdb").exists())));
    let pg_rows = if postgres { 2 + 2 } else { 0 };
    assert_eq!(accepted.len(), 2 + 2 + pg_rows + 1, "{md}");
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
    // The event stream's rows: VerifyCode without watchers, with a follower (its lag
    // measured: numbers, not "-") and with idle watchers, every answer ACCEPTED.
    assert!(md.contains("## Event stream (issue 12)"), "{md}");
    for watchers in ["no watcher", "20 idle watchers"] {
        let row = format!("| redb | 1 | closed, 4 in flight | {watchers} | ");
        assert!(md.contains(&row), "missing {row:?}: {md}");
    }
    let follower = md
        .lines()
        .find(|l| l.starts_with("| redb | 1 | closed, 4 in flight | 1 follower (lag measured) | "))
        .expect("the follower row");
    assert!(follower.contains(" | 100.00% | "), "{follower}");
    let lag = follower.split(" | ").nth(7).expect("lag column");
    assert!(
        lag.split(" / ")
            .next()
            .is_some_and(|p50| p50.parse::<f64>().is_ok()),
        "{follower}"
    );
    if postgres {
        assert!(
            md.contains("| postgres | 1 | closed, 4 in flight | 1 follower (lag measured) | "),
            "{md}"
        );
        for needle in [
            "| VerifyCode, accepted (HOTP in order) | postgres | 1 | closed, 4 in flight |",
            "| VerifyCode, accepted (HOTP in order) | postgres | 2 | closed, 1 in flight |",
            "| SignAssertion ES256 | postgres | 2 | closed, 4 in flight |",
            "## What bounds the PostgreSQL rows (4 in flight)",
            "| VerifyCode, accepted (HOTP in order): PostgreSQL, one instance, ≥ 60% of redb at 4 in flight |",
            "| SignAssertion ES256: PostgreSQL, two instances together not slower than one at 4 in flight |",
        ] {
            assert!(md.contains(needle), "missing {needle:?}: {md}");
        }
        // The database's side is measured (statements counted) for the PostgreSQL rows.
        let bound = md
            .lines()
            .find(|l| {
                l.starts_with("| VerifyCode, accepted (HOTP in order) | postgres | 2 | ")
                    && !l.contains(" in flight |")
            })
            .expect("the PostgreSQL bounds row");
        assert!(!bound.contains(" - |"), "{bound}");
    } else {
        assert!(md.contains("PostgreSQL rows skipped"), "{md}");
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

/// `report --quick --only approve`: the app-login rows (issue 13) beside their limits,
/// every login APPROVED, measured in the same run.
#[test]
fn quick_approve_group_has_its_rows_and_limits() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_report"))
        .args(["--quick", "--only", "approve", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run report");
    assert!(status.success());
    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    assert!(
        md.contains("## App authenticator (issue 13): a login with the app"),
        "{md}"
    );
    // The limits of the same run: SoftHSM-direct signing and software verification.
    for threads in [1, 2] {
        assert!(
            md.contains(&format!("| ECDSA P-256 sign | {threads} |")),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| ECDSA P-256 verify (software (p256)) | {threads} |"
            )),
            "{md}"
        );
    }
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| {
            l.starts_with("| redb | 1 | closed, ") || l.starts_with("| postgres | 1 | closed, ")
        })
        .collect();
    assert!(rows.len() >= 2, "{md}");
    for row in &rows {
        assert!(row.contains(" | 100.00% | APPROVED "), "{row}");
        assert!(!row.contains("FAIL"), "{row}");
        // Ratios against both limits are numbers.
        let cols: Vec<&str> = row.split(" | ").collect();
        for c in [&cols[6], &cols[7]] {
            assert!(
                c.trim_end_matches('%')
                    .parse::<f64>()
                    .is_ok_and(|x| x > 0.0),
                "{row}"
            );
        }
    }
    // The other groups did not run.
    assert!(
        !md.contains("| VerifyCode, accepted (HOTP in order) | redb |"),
        "{md}"
    );
}
