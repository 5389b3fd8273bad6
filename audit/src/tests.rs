use std::collections::HashMap;
use std::io::{BufReader, Cursor, Seek, SeekFrom};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::*;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const T0: u64 = 1_700_000_000_000;
const KEY_ID: &str = "audit-1";

/// Stand-in for the HSM audit key.
struct TestSigner {
    id: String,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl TestSigner {
    fn new(id: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        TestSigner {
            id: id.to_owned(),
            pair,
            rng,
        }
    }

    fn public(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    fn trusted(&self) -> HashMap<String, Vec<u8>> {
        HashMap::from([(self.id.clone(), self.public())])
    }
}

impl CheckpointSigner for TestSigner {
    fn key_id(&self) -> String {
        self.id.clone()
    }
    fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, String> {
        self.pair
            .sign(&self.rng, statement)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| e.to_string())
    }
}

struct FailingSigner;

impl CheckpointSigner for FailingSigner {
    fn key_id(&self) -> String {
        "broken".into()
    }
    fn sign(&self, _: &[u8]) -> Result<Vec<u8>, String> {
        Err("token removed".into())
    }
}

fn clerk() -> Actor {
    Actor::from_certificate("clerk-01", b"clerk certificate DER")
}

/// A varied, deterministic event stream.
fn event(i: u64) -> Event {
    let t = T0 + i * 1000;
    match i % 4 {
        0 => Event::new(t, clerk(), "credential.verify", &format!("cred-{i}"))
            .with_details(Details::new().u64("attempt", i).bool("match", true)),
        1 => Event::new(t, clerk(), "ceremony.approve", "ceremony-7")
            .with_details(Details::new().str("role", "officer").u64("quorum", 3)),
        2 => Event::new(t, clerk(), "credential.verify", &format!("cred-{i}")).denied(),
        _ => Event::new(t, Actor::service(), "key.state", "key-1").failed("hsm busy"),
    }
}

/// `events` events with a checkpoint after every `interval`, plus a shutdown checkpoint
/// if the last record is not one.
fn build_log(events: u64, interval: u64, signer: &TestSigner) -> Vec<AuditRecord> {
    let mut chain = Chain::new().with_checkpoint_interval(interval);
    let mut out = Vec::new();
    for i in 1..=events {
        out.push(chain.append(event(i)));
        if chain.checkpoint_due() {
            out.push(chain.checkpoint(signer, T0 + i * 1000 + 1).unwrap());
        }
    }
    if !out.last().is_some_and(AuditRecord::is_checkpoint) {
        out.push(chain.checkpoint(signer, T0 + events * 1000 + 2).unwrap());
    }
    out
}

fn lines_of(records: &[AuditRecord]) -> Vec<String> {
    records.iter().map(AuditRecord::to_json_line).collect()
}

fn text(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

fn check(lines: &[String], keys: &HashMap<String, Vec<u8>>) -> VerifyReport {
    verify(Cursor::new(text(lines)), keys)
}

fn parse(line: &str) -> AuditRecord {
    AuditRecord::from_json_line(line).unwrap()
}

/// Changes the record on 1-based `line` without recomputing its hash.
fn edit(lines: &mut [String], line: usize, f: impl FnOnce(&mut AuditRecord)) {
    let mut r = parse(&lines[line - 1]);
    f(&mut r);
    lines[line - 1] = r.to_json_line();
}

/// Changes the record on `line` and recomputes its hash (a smarter forger).
fn edit_rehash(lines: &mut [String], line: usize, f: impl FnOnce(&mut AuditRecord)) {
    edit(lines, line, |r| {
        f(r);
        r.hash = r.compute_hash();
    });
}

/// Recomputes `prev` and `hash` of every record from `line` on (a full rewrite).
fn relink_from(lines: &mut [String], line: usize) {
    for i in line..=lines.len() {
        let prev = if i == 1 {
            GENESIS_PREV.to_owned()
        } else {
            parse(&lines[i - 2]).hash
        };
        edit_rehash(lines, i, |r| r.prev = prev);
    }
}

fn set_detail(r: &mut AuditRecord, key: &'static str, value: DetailValue) {
    let mut d = Details::new();
    for (k, v) in r.details.take().unwrap().iter() {
        if k != key {
            d = match v {
                DetailValue::Str(s) => d.str(leak(k), s),
                DetailValue::U64(n) => d.u64(leak(k), *n),
                DetailValue::Bool(b) => d.bool(leak(k), *b),
            };
        }
    }
    d = match value {
        DetailValue::Str(s) => d.str(key, &s),
        DetailValue::U64(n) => d.u64(key, n),
        DetailValue::Bool(b) => d.bool(key, b),
    };
    r.details = Some(d);
}

fn remove_detail(r: &mut AuditRecord, key: &str) {
    // Rebuild through JSON: the typed builder has no removal on purpose.
    let mut v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
    v["details"].as_object_mut().unwrap().remove(key);
    *r = serde_json::from_value(v).unwrap();
}

fn leak(s: &str) -> &'static str {
    match s {
        "head_seq" => "head_seq",
        "head_hash" => "head_hash",
        "key_id" => "key_id",
        "signature" => "signature",
        other => panic!("unexpected detail key {other}"),
    }
}

type Expected = (u64, Option<u64>, ProblemKind, &'static str);
type RecordEdit = fn(&mut AuditRecord);
type LinesEdit<'a> = Box<dyn Fn(&mut Vec<String>) + 'a>;

/// Compares problems exactly; an expected message ending in `*` is a prefix.
fn assert_problems(name: &str, report: &VerifyReport, expected: &[Expected]) {
    let got: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.line, p.seq, p.kind, p.message.as_str()))
        .collect();
    let matches = got.len() == expected.len()
        && got.iter().zip(expected).all(|(g, e)| {
            g.0 == e.0
                && g.1 == e.1
                && g.2 == e.2
                && match e.3.strip_suffix('*') {
                    Some(prefix) => g.3.starts_with(prefix),
                    None => g.3 == e.3,
                }
        });
    assert!(
        matches,
        "{name}:\n got      {got:#?}\n expected {expected:#?}\n report:\n{report}"
    );
}

// ---------------------------------------------------------------------------------------
// Canonical form
// ---------------------------------------------------------------------------------------

fn golden_record() -> AuditRecord {
    let mut r = AuditRecord {
        seq: 42,
        time: 1_700_000_000_123,
        actor: Actor::from_certificate("CN=Officer \"A\"", b"certificate"),
        action: "credential.lock".into(),
        object: "cred-7".into(),
        outcome: "failed: too many attempts".into(),
        // Out of order on purpose: the canonical form sorts keys. Parsed, not built: the
        // builder would replace the control characters whose escaping is pinned here
        // (records written before it did may hold them).
        details: Some(
            serde_json::from_str(r#"{"reason":"tab\there/ü\u0001","attempts":3,"locked":true}"#)
                .unwrap(),
        ),
        prev: sha256_hex(b"previous"),
        hash: String::new(),
    };
    r.hash = r.compute_hash();
    r
}

#[test]
fn canonical_bytes_are_pinned() {
    let r = golden_record();
    let expected = concat!(
        r#"{"seq":42,"time":1700000000123,"#,
        r#""actor":{"subject":"CN=Officer \"A\"","#,
        r#""fingerprint":"03d66dd08835c1ca3f128cceacd1f31ac94163096b20f445ae84285bc0832d72"},"#,
        r#""action":"credential.lock","object":"cred-7","outcome":"failed: too many attempts","#,
        r#""details":{"attempts":3,"locked":true,"reason":"tab\there/ü\u0001"},"#,
        r#""prev":"6da0633528deaa0144e7b058315f0b753ec0b945163a72bf96a0d18180f9de0d"}"#
    );
    assert_eq!(String::from_utf8(r.canonical_bytes()).unwrap(), expected);
    assert_eq!(
        r.hash, GOLDEN_HASH,
        "canonical form changed: old logs would no longer verify"
    );
    assert_eq!(
        r.to_json_line(),
        format!(
            "{},\"hash\":\"{GOLDEN_HASH}\"}}",
            &expected[..expected.len() - 1]
        )
    );
}

/// SHA-256 of the golden record's canonical bytes, computed once and pinned (and
/// cross-checked with Python's hashlib over the literal above).
const GOLDEN_HASH: &str = "2f524b6885d10699e79b509a5a414f43be9df2ffed4be04a64193cd64055161d";

#[test]
fn canonical_form_matches_serde_json_for_tricky_strings() {
    let nasty = "q\" b\\ nl\n cr\r tab\t bs\u{8} ff\u{c} nul\u{0} us\u{1f} del\u{7f} ls\u{2028} é 𝄞 </script>";
    let mut r = golden_record();
    r.object = nasty.into();
    r.actor.subject = nasty.into();
    r.details = Some(Details::new().str("k", nasty).u64("max", u64::MAX));
    r.hash = r.compute_hash();
    assert_eq!(serde_json::to_string(&r).unwrap(), r.to_json_line());
    // The canonical bytes are the line without the trailing hash member.
    let line = r.to_json_line();
    let cut = line.rfind(",\"hash\":").unwrap();
    assert_eq!(
        format!("{}}}", &line[..cut]).into_bytes(),
        r.canonical_bytes()
    );
    assert_eq!(parse(&line), r);
}

#[test]
fn append_with_line_gives_the_records_own_line() {
    let nasty = "q\" b\\ nl\n tab\t nul\u{0} é 𝄞";
    let mut chain = Chain::new();
    for (i, details) in [None, Some(Details::new().str("k", nasty).u64("n", 7))]
        .into_iter()
        .enumerate()
    {
        let mut e = Event::new(
            T0 + i as u64,
            Actor::new(nasty, ""),
            "credential.verify",
            nasty,
        );
        if let Some(d) = details {
            e = e.with_details(d).denied();
        }
        let (r, line) = chain.append_with_line(e);
        assert!(r.hash_matches());
        assert_eq!(line, r.to_json_line());
        assert_eq!(parse(&line), r);
    }
}

#[test]
fn canonical_form_omits_absent_details_and_keeps_empty_ones() {
    let mut r = golden_record();
    r.details = None;
    let none = String::from_utf8(r.canonical_bytes()).unwrap();
    assert!(!none.contains("details"), "{none}");
    r.details = Some(Details::new());
    let empty = String::from_utf8(r.canonical_bytes()).unwrap();
    assert!(empty.contains(r#","details":{},"prev":"#), "{empty}");
    assert_ne!(none, empty);
    // Both round-trip exactly.
    r.hash = r.compute_hash();
    assert_eq!(parse(&r.to_json_line()), r);
}

#[test]
fn detail_key_order_does_not_change_the_hash() {
    let a = Details::new().str("a", "1").u64("b", 2).bool("c", true);
    let b = Details::new().bool("c", true).u64("b", 2).str("a", "1");
    let mut ra = golden_record();
    ra.details = Some(a);
    let mut rb = golden_record();
    rb.details = Some(b);
    assert_eq!(ra.compute_hash(), rb.compute_hash());
    assert_ne!(ra.compute_hash(), golden_record().compute_hash());
}

#[test]
fn every_field_is_covered_by_the_hash() {
    let base = golden_record();
    let edits: Vec<(&str, RecordEdit)> = vec![
        ("seq", |r| r.seq += 1),
        ("time", |r| r.time += 1),
        ("subject", |r| r.actor.subject.push('x')),
        ("fingerprint", |r| r.actor.fingerprint.clear()),
        ("action", |r| r.action.push('x')),
        ("object", |r| r.object.push('x')),
        ("outcome", |r| r.outcome = "ok".into()),
        ("details value", |r| {
            r.details = Some(r.details.take().unwrap().u64("attempts", 4))
        }),
        ("details type", |r| {
            r.details = Some(r.details.take().unwrap().str("attempts", "3"))
        }),
        ("details removed", |r| r.details = None),
        ("prev", |r| r.prev = GENESIS_PREV.into()),
    ];
    for (name, f) in edits {
        let mut r = base.clone();
        f(&mut r);
        assert_ne!(r.compute_hash(), base.hash, "{name} is not covered");
        assert!(!r.hash_matches(), "{name}");
    }
    // ...and `hash` itself is not part of its own input.
    let mut r = base.clone();
    r.hash = GENESIS_PREV.into();
    assert_eq!(r.compute_hash(), base.hash);
}

#[test]
fn record_parsing_is_strict() {
    let good = golden_record().to_json_line();
    assert!(AuditRecord::from_json_line(&good).is_ok());
    let bad = [
        (
            "unknown field",
            good.replacen("{\"seq\"", "{\"note\":\"x\",\"seq\"", 1),
        ),
        (
            "duplicate field",
            good.replacen("{\"seq\":42", "{\"seq\":42,\"seq\":42", 1),
        ),
        (
            "unknown actor field",
            good.replacen("\"actor\":{", "\"actor\":{\"x\":1,", 1),
        ),
        (
            "missing hash",
            good[..good.rfind(",\"hash\"").unwrap()].to_owned() + "}",
        ),
        (
            "nested detail",
            good.replacen("\"attempts\":3", "\"attempts\":{\"n\":3}", 1),
        ),
        (
            "array detail",
            good.replacen("\"attempts\":3", "\"attempts\":[3]", 1),
        ),
        (
            "float detail",
            good.replacen("\"attempts\":3", "\"attempts\":3.5", 1),
        ),
        (
            "negative detail",
            good.replacen("\"attempts\":3", "\"attempts\":-3", 1),
        ),
        (
            "null detail",
            good.replacen("\"attempts\":3", "\"attempts\":null", 1),
        ),
        (
            "duplicate detail",
            good.replacen("\"attempts\":3", "\"attempts\":3,\"attempts\":4", 1),
        ),
        (
            "details not an object",
            good.replacen("\"details\":{", "\"details\":[{", 1),
        ),
        ("not json", "{\"seq\":".to_owned()),
    ];
    for (name, line) in bad {
        assert_ne!(line, good, "{name}: replacement did not apply");
        assert!(
            AuditRecord::from_json_line(&line).is_err(),
            "{name} accepted: {line}"
        );
    }
}

#[test]
fn key_order_and_whitespace_in_the_file_do_not_matter() {
    // The hash is over the canonical form of the parsed content, not the raw line.
    let signer = TestSigner::new(KEY_ID);
    let mut lines = lines_of(&build_log(20, 10, &signer));
    let v: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
    lines[4] = serde_json::to_string_pretty(&v).unwrap().replace('\n', " ");
    assert_ne!(lines[4], parse(&lines[4]).to_json_line());
    let report = check(&lines, &signer.trusted());
    assert!(report.is_fully_covered(), "{report}");
}

#[test]
fn actor_and_event_builders() {
    assert_eq!(Actor::service().subject, "service");
    assert_eq!(Actor::service().fingerprint, "");
    let a = Actor::from_certificate("clerk", b"der");
    assert_eq!(a.fingerprint, sha256_hex(b"der"));
    assert_eq!(a.fingerprint.len(), 64);

    let mut chain = Chain::new();
    let ok = chain.append(Event::new(1, a.clone(), "credential.create", "c1"));
    let denied = chain.append(Event::new(2, a.clone(), "credential.delete", "c1").denied());
    let failed = chain.append(Event::new(3, a, "credential.lock", "c1").failed("not found"));
    let empty =
        chain.append(Event::new(4, Actor::service(), "x.y", "o").with_details(Details::new()));
    assert_eq!(
        [&ok.outcome, &denied.outcome, &failed.outcome],
        ["ok", "denied", "failed: not found"]
    );
    assert_eq!(empty.details, None);
    assert_eq!((ok.seq, ok.prev.as_str()), (1, GENESIS_PREV));
    assert_eq!(denied.prev, ok.hash);
    assert!([&ok, &denied, &failed, &empty]
        .iter()
        .all(|r| r.hash_matches()));
}

// ---------------------------------------------------------------------------------------
// Clean chains
// ---------------------------------------------------------------------------------------

#[test]
fn clean_chain_of_100_records_with_checkpoints_every_10_verifies() {
    let signer = TestSigner::new(KEY_ID);
    let records = build_log(100, 10, &signer);
    assert_eq!(records.len(), 110);
    let cps: Vec<u64> = records
        .iter()
        .filter(|r| r.is_checkpoint())
        .map(|r| r.seq)
        .collect();
    assert_eq!(cps, (1..=10).map(|i| i * 11).collect::<Vec<_>>());

    // Through a real file, as an export would be read.
    let mut file = tempfile::tempfile().unwrap();
    write_jsonl(&mut file, &records).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    let report = verify(BufReader::new(file), &signer.trusted());

    assert!(report.is_ok(), "{report}");
    assert!(report.is_fully_covered(), "{report}");
    assert_eq!(report.records, 110);
    assert_eq!(report.checkpoints, 10);
    assert_eq!(report.uncovered_tail, 0);
    assert_eq!(report.covered_through, 110);
    assert_eq!(report.head, Some(Head::of(&records[109])));
    assert_eq!(
        report.to_string(),
        "audit log OK: 110 records, 10 valid checkpoints, head seq 110\n"
    );
}

#[test]
fn empty_log_verifies_as_empty() {
    let report = verify(Cursor::new(""), &HashMap::new());
    assert!(report.is_fully_covered());
    assert_eq!((report.records, report.head.clone()), (0, None));
    assert_eq!(
        report.to_string(),
        "audit log OK: 0 records, 0 valid checkpoints, empty\n"
    );
}

// ---------------------------------------------------------------------------------------
// Tampering: edit, delete, reorder — table-driven on a clean 110-record log where line k
// holds seq k and checkpoints are at seq 11, 22, …, 110.
// ---------------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    tamper: fn(&mut Vec<String>),
    expected: Vec<Expected>,
}

fn tamper_cases() -> Vec<Case> {
    use ProblemKind::*;
    vec![
        Case {
            name: "edit time",
            tamper: |l| edit(l, 17, |r| r.time += 1),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: hash mismatch")],
        },
        Case {
            name: "edit actor",
            tamper: |l| edit(l, 17, |r| r.actor.subject = "someone-else".into()),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: hash mismatch")],
        },
        Case {
            name: "edit outcome",
            tamper: |l| edit(l, 18, |r| r.outcome = "denied".into()),
            expected: vec![(18, Some(18), Altered, "line 18 (seq 18): record altered: hash mismatch")],
        },
        Case {
            name: "edit details",
            tamper: |l| edit(l, 17, |r| r.details = Some(Details::new().bool("match", false))),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: hash mismatch")],
        },
        Case {
            name: "edit prev",
            tamper: |l| edit(l, 17, |r| r.prev = GENESIS_PREV.into()),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: hash mismatch")],
        },
        Case {
            name: "edit stored hash",
            tamper: |l| edit(l, 17, |r| r.hash = GENESIS_PREV.into()),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: hash mismatch")],
        },
        Case {
            name: "edit seq",
            tamper: |l| edit(l, 17, |r| r.seq = 99),
            expected: vec![(17, Some(99), Altered, "line 17 (seq 99): record altered: hash mismatch")],
        },
        Case {
            name: "edit first record",
            tamper: |l| edit(l, 1, |r| r.object = "x".into()),
            expected: vec![(1, Some(1), Altered, "line 1 (seq 1): record altered: hash mismatch")],
        },
        Case {
            name: "edit last record (a checkpoint)",
            tamper: |l| edit(l, 110, |r| r.time += 1),
            expected: vec![(110, Some(110), Altered, "line 110 (seq 110): record altered: hash mismatch")],
        },
        Case {
            name: "edit a checkpoint's head",
            tamper: |l| edit(l, 22, |r| set_detail(r, "head_seq", DetailValue::U64(20))),
            expected: vec![(22, Some(22), Altered, "line 22 (seq 22): record altered: hash mismatch")],
        },
        Case {
            name: "edit and recompute hash",
            tamper: |l| edit_rehash(l, 17, |r| r.object = "cred-forged".into()),
            expected: vec![(17, Some(17), Altered, "line 17 (seq 17): record altered: seq 18 (line 18) does not link to its hash (rewritten with a recomputed hash)")],
        },
        Case {
            name: "edit first record and recompute hash",
            tamper: |l| edit_rehash(l, 1, |r| r.time = 0),
            expected: vec![(1, Some(1), Altered, "line 1 (seq 1): record altered: seq 2 (line 2) does not link to its hash (rewritten with a recomputed hash)")],
        },
        Case {
            name: "first record not linked to genesis",
            tamper: |l| edit_rehash(l, 1, |r| r.prev = sha256_hex(b"elsewhere")),
            expected: vec![(1, Some(1), Altered, "line 1 (seq 1): record altered: prev does not link to the start of the log (64 zeros)")],
        },
        Case {
            name: "delete one record",
            tamper: |l| {
                l.remove(16);
            },
            expected: vec![(17, Some(18), Removed, "line 17: seq 18 follows seq 16: record 17 removed")],
        },
        Case {
            name: "delete three records",
            tamper: |l| {
                l.drain(16..19);
            },
            expected: vec![(17, Some(20), Removed, "line 17: seq 20 follows seq 16: records 17 to 19 removed")],
        },
        Case {
            name: "delete first record",
            tamper: |l| {
                l.remove(0);
            },
            expected: vec![(1, Some(2), Removed, "line 1: first record is seq 2, expected seq 1: record 1 removed")],
        },
        Case {
            name: "delete a checkpoint",
            tamper: |l| {
                l.remove(21);
            },
            expected: vec![(22, Some(23), Removed, "line 22: seq 23 follows seq 21: record 22 removed")],
        },
        Case {
            name: "delete two separate records",
            tamper: |l| {
                l.remove(59);
                l.remove(16);
            },
            expected: vec![
                (17, Some(18), Removed, "line 17: seq 18 follows seq 16: record 17 removed"),
                (59, Some(61), Removed, "line 59: seq 61 follows seq 59: record 60 removed"),
            ],
        },
        Case {
            name: "swap adjacent records",
            tamper: |l| l.swap(16, 17),
            expected: vec![(17, Some(18), Reordered, "line 17: seq 18 before seq 17: records reordered")],
        },
        Case {
            name: "swap distant records",
            tamper: |l| l.swap(16, 19),
            expected: vec![(17, Some(20), Reordered, "line 17: seq 20 and line 20: seq 17 swapped: records reordered")],
        },
        Case {
            name: "swap a checkpoint with its head",
            tamper: |l| l.swap(20, 21),
            expected: vec![(21, Some(22), Reordered, "line 21: seq 22 before seq 21: records reordered")],
        },
        Case {
            name: "reverse three records",
            tamper: |l| l.swap(16, 18),
            expected: vec![(
                17,
                Some(19),
                Reordered,
                "line 17: seq 19 and line 19: seq 17 swapped: records reordered",
            )],
        },
        Case {
            name: "delete one record and swap two later ones",
            tamper: |l| {
                l.swap(29, 30);
                l.remove(16);
            },
            expected: vec![
                (17, Some(18), Removed, "line 17: seq 18 follows seq 16: record 17 removed"),
                (29, Some(31), Reordered, "line 29: seq 31 before seq 30: records reordered"),
            ],
        },
        Case {
            name: "rotate three records",
            tamper: |l| l[16..19].rotate_left(1),
            expected: vec![(19, Some(17), Reordered, "line 19: seq 17 after seq 19: record out of order")],
        },
        Case {
            name: "move a record later",
            tamper: |l| {
                let r = l.remove(16);
                l.insert(24, r);
            },
            expected: vec![(25, Some(17), Reordered, "line 25: seq 17 after seq 25: record out of order")],
        },
        Case {
            name: "move a record earlier",
            tamper: |l| {
                let r = l.remove(24);
                l.insert(16, r);
            },
            expected: vec![(17, Some(25), Reordered, "line 17: seq 25 after seq 16: record out of order")],
        },
        Case {
            name: "duplicate a record",
            tamper: |l| {
                let r = l[16].clone();
                l.insert(17, r);
            },
            expected: vec![(18, Some(17), Duplicate, "line 18 (seq 17): duplicate of line 17")],
        },
        Case {
            name: "insert a forged record with a taken seq",
            tamper: |l| {
                let mut r = parse(&l[16]);
                r.object = "forged".into();
                r.hash = r.compute_hash();
                l.insert(17, r.to_json_line());
            },
            expected: vec![(18, Some(17), Duplicate, "line 18 (seq 17): seq 17 already used by line 17")],
        },
        Case {
            name: "garbage line inserted",
            tamper: |l| l.insert(17, "this is not json".into()),
            expected: vec![(18, None, Unparseable, "line 18: unparseable record: *")],
        },
        Case {
            name: "record mangled beyond parsing",
            tamper: |l| l[16] = l[16][..40].to_owned(),
            expected: vec![(17, None, Unparseable, "line 17: unparseable record: *")],
        },
        Case {
            name: "unhashed field smuggled in",
            tamper: |l| l[16] = l[16].replacen("{", "{\"note\":\"approved by CEO\",", 1),
            expected: vec![(17, None, Unparseable, "line 17: unparseable record: unknown field `note`*")],
        },
        Case {
            name: "blank line",
            tamper: |l| l.insert(17, String::new()),
            expected: vec![(18, None, Unparseable, "line 18: unparseable record: empty line")],
        },
    ]
}

#[test]
fn tampering_is_pinpointed() {
    let signer = TestSigner::new(KEY_ID);
    let keys = signer.trusted();
    let clean = lines_of(&build_log(100, 10, &signer));
    assert!(check(&clean, &keys).is_fully_covered());
    for case in tamper_cases() {
        let mut lines = clean.clone();
        (case.tamper)(&mut lines);
        assert!(lines != clean, "{}: tamper did nothing", case.name);
        let report = check(&lines, &keys);
        assert_problems(case.name, &report, &case.expected);
        assert!(!report.is_ok(), "{}", case.name);
    }
}

#[test]
fn full_rewrite_is_caught_by_the_next_checkpoint() {
    let signer = TestSigner::new(KEY_ID);
    let clean = lines_of(&build_log(100, 10, &signer));
    let mut lines = clean.clone();
    // Forger edits seq 15 and recomputes every later prev and hash; the checkpoint
    // signatures cannot be recomputed.
    edit(&mut lines, 15, |r| r.outcome = "ok".into());
    relink_from(&mut lines, 15);
    let report = check(&lines, &signer.trusted());
    let msg = format!(
        "line 22 (seq 22): checkpoint claims head seq 21 with hash {}, but record 21 (line 21) has hash {}: log rewritten after signing",
        parse(&clean[20]).hash,
        parse(&lines[20]).hash
    );
    assert_problems(
        "full rewrite",
        &report,
        &[(
            22,
            Some(22),
            ProblemKind::CheckpointWrongHead,
            leak_string(msg),
        )],
    );
    // Only the checkpoint before the rewrite vouches for anything.
    assert_eq!(report.checkpoints, 1);
    assert_eq!(report.covered_through, 11);
    assert_eq!(report.uncovered_tail, 99);
}

fn leak_string(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

// ---------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------

#[test]
fn forged_checkpoints_are_pinpointed() {
    use ProblemKind::*;
    let signer = TestSigner::new(KEY_ID);
    let keys = signer.trusted();
    let clean = lines_of(&build_log(100, 10, &signer));
    let rogue = TestSigner::new(KEY_ID);
    let statement_of =
        |r: &AuditRecord| checkpoint_statement(&CheckpointClaim::parse(r).unwrap().head);

    let cases: Vec<(&str, LinesEdit, Expected)> = vec![
        (
            "signature bit flipped",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    let mut sig = CheckpointClaim::parse(r).unwrap().signature;
                    sig[10] ^= 1;
                    set_detail(
                        r,
                        "signature",
                        DetailValue::Str(URL_SAFE_NO_PAD.encode(sig)),
                    );
                })
            }),
            (
                110,
                Some(110),
                CheckpointSignatureInvalid,
                "line 110 (seq 110): checkpoint signature invalid (key id \"audit-1\")",
            ),
        ),
        (
            "signed by another key under the trusted id",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    let sig = rogue.sign(&statement_of(r)).unwrap();
                    set_detail(
                        r,
                        "signature",
                        DetailValue::Str(URL_SAFE_NO_PAD.encode(sig)),
                    );
                })
            }),
            (
                110,
                Some(110),
                CheckpointSignatureInvalid,
                "line 110 (seq 110): checkpoint signature invalid (key id \"audit-1\")",
            ),
        ),
        (
            "valid signature moved to another head",
            Box::new(|l| {
                let other = CheckpointClaim::parse(&parse(&l[98])).unwrap().signature;
                edit_rehash(l, 110, |r| {
                    set_detail(
                        r,
                        "signature",
                        DetailValue::Str(URL_SAFE_NO_PAD.encode(other)),
                    )
                })
            }),
            (
                110,
                Some(110),
                CheckpointSignatureInvalid,
                "line 110 (seq 110): checkpoint signature invalid (key id \"audit-1\")",
            ),
        ),
        (
            "unknown key id",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    set_detail(r, "key_id", DetailValue::Str("audit-9".into()))
                })
            }),
            (
                110,
                Some(110),
                CheckpointUnknownKey,
                "line 110 (seq 110): checkpoint signed with unknown key id \"audit-9\"",
            ),
        ),
        (
            "signature missing",
            Box::new(|l| edit_rehash(l, 110, |r| remove_detail(r, "signature"))),
            (
                110,
                Some(110),
                CheckpointMalformed,
                "line 110 (seq 110): checkpoint malformed: missing or non-string signature",
            ),
        ),
        (
            "signature not base64url",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    set_detail(r, "signature", DetailValue::Str("a+b/c==".into()))
                })
            }),
            (
                110,
                Some(110),
                CheckpointMalformed,
                "line 110 (seq 110): checkpoint malformed: signature is not unpadded base64url",
            ),
        ),
        (
            "claims its own seq as head, validly signed",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    set_detail(r, "head_seq", DetailValue::U64(110));
                    let sig = signer.sign(&statement_of(r)).unwrap();
                    set_detail(
                        r,
                        "signature",
                        DetailValue::Str(URL_SAFE_NO_PAD.encode(sig)),
                    );
                })
            }),
            (
                110,
                Some(110),
                CheckpointWrongHead,
                "line 110 (seq 110): checkpoint claims head seq 110, which is not before it",
            ),
        ),
        (
            "claims a head outside the log, validly signed",
            Box::new(|l| {
                edit_rehash(l, 110, |r| {
                    set_detail(r, "head_seq", DetailValue::U64(0));
                    set_detail(r, "head_hash", DetailValue::Str(sha256_hex(b"x")));
                    let sig = signer.sign(&statement_of(r)).unwrap();
                    set_detail(
                        r,
                        "signature",
                        DetailValue::Str(URL_SAFE_NO_PAD.encode(sig)),
                    );
                })
            }),
            (
                110,
                Some(110),
                CheckpointWrongHead,
                "line 110 (seq 110): checkpoint claims head seq 0 with hash *",
            ),
        ),
    ];
    for (name, tamper, expected) in cases {
        let mut lines = clean.clone();
        tamper(&mut lines);
        let report = check(&lines, &keys);
        assert_problems(name, &report, &[expected]);
        // The forged final checkpoint vouches for nothing: coverage falls back to seq 99.
        assert_eq!(
            (report.checkpoints, report.covered_through),
            (9, 99),
            "{name}"
        );
        assert_eq!(report.uncovered_tail, 11, "{name}");
    }
}

#[test]
fn checkpoint_claiming_a_wrong_head_is_pinpointed() {
    let signer = TestSigner::new(KEY_ID);
    let mut chain = Chain::new().with_checkpoint_interval(0);
    let mut records: Vec<_> = (1..=5).map(|i| chain.append(event(i))).collect();
    // A validly signed claim that seq 4 has record 3's hash.
    let lie = Head {
        seq: 4,
        hash: records[2].hash.clone(),
    };
    let sig = signer.sign(&checkpoint_statement(&lie)).unwrap();
    records.push(chain.checkpoint_record(&lie, KEY_ID, &sig, T0).unwrap());
    records.push(chain.append(event(6)));
    records.push(chain.checkpoint(&signer, T0).unwrap());

    let report = check(&lines_of(&records), &signer.trusted());
    let msg = format!(
        "line 6 (seq 6): checkpoint claims head seq 4 with hash {}, but record 4 (line 4) has hash {}: log rewritten after signing",
        records[2].hash, records[3].hash
    );
    assert_problems(
        "wrong head",
        &report,
        &[(
            6,
            Some(6),
            ProblemKind::CheckpointWrongHead,
            leak_string(msg),
        )],
    );
    // The honest checkpoint after it still verifies.
    assert_eq!((report.checkpoints, report.uncovered_tail), (1, 0));
}

#[test]
fn untrusted_keys_leave_every_checkpoint_unverified() {
    let signer = TestSigner::new(KEY_ID);
    let lines = lines_of(&build_log(30, 10, &signer));
    let report = check(&lines, &HashMap::new());
    assert_eq!(report.problems.len(), 3, "{report}");
    assert!(report
        .problems
        .iter()
        .all(|p| p.kind == ProblemKind::CheckpointUnknownKey));
    assert_eq!((report.checkpoints, report.uncovered_tail), (0, 33));
    // A different key under the right id: signatures invalid.
    let report = check(&lines, &TestSigner::new(KEY_ID).trusted());
    assert_eq!(
        report
            .problems_of(ProblemKind::CheckpointSignatureInvalid)
            .count(),
        3,
        "{report}"
    );
}

#[test]
fn checkpoint_statement_format_is_pinned() {
    let head = Head {
        seq: 17,
        hash: sha256_hex(b"x"),
    };
    assert_eq!(
        checkpoint_statement(&head),
        format!(
            "eid-hsm-audit-checkpoint-v1\nhead_seq=17\nhead_hash={}\n",
            head.hash
        )
        .into_bytes()
    );
    let signer = TestSigner::new(KEY_ID);
    let sig = signer.sign(&checkpoint_statement(&head)).unwrap();
    assert_eq!(sig.len(), 64);
    assert!(verify_checkpoint_signature(&signer.public(), &head, &sig));
    let other = Head {
        seq: 18,
        ..head.clone()
    };
    assert!(!verify_checkpoint_signature(&signer.public(), &other, &sig));
    assert!(!verify_checkpoint_signature(
        &TestSigner::new("x").public(),
        &head,
        &sig
    ));
}

#[test]
fn two_phase_checkpoint_with_appends_in_flight() {
    let signer = TestSigner::new(KEY_ID);
    let mut chain = Chain::new().with_checkpoint_interval(3);
    let mut records: Vec<_> = (1..=5).map(|i| chain.append(event(i))).collect();
    assert!(chain.checkpoint_due());

    // Phase 1: statement of the current head, sent to the HSM.
    let head = chain.head().unwrap();
    assert_eq!(head, Head::of(&records[4]));
    let statement = checkpoint_statement(&head);
    // Meanwhile three more events are appended.
    records.extend((6..=8).map(|i| chain.append(event(i))));
    // Phase 2: the signature comes back.
    let sig = signer.sign(&statement).unwrap();
    let cp = chain.checkpoint_record(&head, KEY_ID, &sig, T0).unwrap();
    assert_eq!((cp.seq, cp.prev.as_str()), (9, records[7].hash.as_str()));
    assert_eq!(cp.actor, Actor::service());
    assert_eq!(
        (cp.action.as_str(), cp.object.as_str()),
        (CHECKPOINT_ACTION, CHECKPOINT_OBJECT)
    );
    records.push(cp);
    // The three in-flight records count toward the next interval.
    assert!(chain.checkpoint_due());

    let report = check(&lines_of(&records), &signer.trusted());
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        (
            report.checkpoints,
            report.covered_through,
            report.uncovered_tail
        ),
        (1, 5, 4)
    );
    assert!(
        report
            .to_string()
            .ends_with("  4 records after seq 5 not yet covered by a signed checkpoint\n"),
        "{report}"
    );

    records.push(chain.checkpoint(&signer, T0).unwrap());
    let report = check(&lines_of(&records), &signer.trusted());
    assert!(report.is_fully_covered(), "{report}");
    assert_eq!(report.covered_through, 10);
}

#[test]
fn chain_refuses_bad_checkpoints() {
    let signer = TestSigner::new(KEY_ID);
    let sig = vec![7u8; 64];
    let mut chain = Chain::new();
    let any = Head {
        seq: 1,
        hash: GENESIS_PREV.into(),
    };
    assert!(matches!(
        chain.checkpoint_record(&any, KEY_ID, &sig, 0),
        Err(AuditError::EmptyChain)
    ));
    assert!(matches!(
        chain.checkpoint(&signer, 0),
        Err(AuditError::EmptyChain)
    ));

    let r1 = chain.append(event(1));
    let r2 = chain.append(event(2));
    let bad_head = |c: &mut Chain, h: Head| {
        matches!(
            c.checkpoint_record(&h, KEY_ID, &sig, 0),
            Err(AuditError::BadCheckpointHead { .. })
        )
    };
    assert!(
        bad_head(
            &mut chain,
            Head {
                seq: 3,
                hash: r2.hash.clone()
            }
        ),
        "ahead"
    );
    assert!(
        bad_head(
            &mut chain,
            Head {
                seq: 0,
                hash: GENESIS_PREV.into()
            }
        ),
        "zero"
    );
    assert!(
        bad_head(
            &mut chain,
            Head {
                seq: 2,
                hash: r1.hash.clone()
            }
        ),
        "wrong hash"
    );
    assert!(
        bad_head(
            &mut chain,
            Head {
                seq: 1,
                hash: "AB".repeat(32)
            }
        ),
        "not hex"
    );
    assert!(matches!(
        chain.checkpoint_record(&Head::of(&r2), KEY_ID, &sig[..63], 0),
        Err(AuditError::BadSignatureLength(63))
    ));
    assert!(matches!(
        chain.checkpoint_record(&Head::of(&r2), "", &sig, 0),
        Err(AuditError::EmptyKeyId)
    ));
    assert!(matches!(
        chain.checkpoint(&FailingSigner, 0),
        Err(AuditError::Signer(m)) if m == "token removed"
    ));
    // Nothing was appended by the refusals.
    assert_eq!(chain.next_seq(), 3);

    chain.checkpoint(&signer, 0).unwrap();
    assert!(
        bad_head(&mut chain, Head::of(&r2)),
        "stale: already checkpointed"
    );
    assert!(bad_head(&mut chain, Head::of(&r1)), "stale: older");
}

// ---------------------------------------------------------------------------------------
// Truncation and the uncovered tail
// ---------------------------------------------------------------------------------------

#[test]
fn tail_after_the_last_checkpoint_is_reported_uncovered() {
    let signer = TestSigner::new(KEY_ID);
    let mut chain = Chain::new().with_checkpoint_interval(10);
    let mut records = Vec::new();
    for i in 1..=105 {
        records.push(chain.append(event(i)));
        if chain.checkpoint_due() {
            records.push(chain.checkpoint(&signer, T0).unwrap());
        }
    }
    let report = check(&lines_of(&records), &signer.trusted());
    assert!(report.is_ok(), "{report}");
    assert!(!report.is_fully_covered());
    assert_eq!((report.covered_through, report.uncovered_tail), (110, 5));
    assert_eq!(
        report.to_string(),
        "audit log OK: 115 records, 10 valid checkpoints, head seq 115\n  5 records after seq 110 not yet covered by a signed checkpoint\n"
    );
}

#[test]
fn truncation_is_reported_as_uncovered_or_missing() {
    let signer = TestSigner::new(KEY_ID);
    let keys = signer.trusted();
    let records = build_log(100, 10, &signer);
    let lines = lines_of(&records);
    let live_head = Some(Head::of(&records[109]));

    // Cut inside the covered part: the records after the last surviving checkpoint are
    // uncovered; the file alone cannot say how many are missing.
    let cut = &lines[..103];
    let report = check(cut, &keys);
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.covered_through, report.uncovered_tail), (99, 4));
    // Knowing the live head, the loss is exact.
    let opts = VerifyOptions {
        expected_head: live_head.clone(),
        ..Default::default()
    };
    let report = verify_with(Cursor::new(text(cut)), &keys, &opts);
    assert_problems(
        "cut at 103",
        &report,
        &[(104, None, ProblemKind::Truncated, "line 104: end of log after seq 103: records 104 to 110 missing (expected head seq 110)")],
    );

    // Cut right after a checkpoint: consistent on its own...
    let cut = &lines[..99];
    let report = check(cut, &keys);
    assert!(report.is_fully_covered(), "{report}");
    // ...but not against the live head.
    let report = verify_with(Cursor::new(text(cut)), &keys, &opts);
    assert_problems(
        "cut at 99",
        &report,
        &[(
            100,
            None,
            ProblemKind::Truncated,
            "line 100: end of log after seq 99: records 100 to 110 missing (expected head seq 110)",
        )],
    );

    // Last record lost.
    let report = verify_with(Cursor::new(text(&lines[..109])), &keys, &opts);
    assert_problems(
        "cut at 109",
        &report,
        &[(
            110,
            None,
            ProblemKind::Truncated,
            "line 110: end of log after seq 109: record 110 missing (expected head seq 110)",
        )],
    );

    // Cut in the middle of the last line (crash while writing).
    let mut partial = text(&lines[..110]);
    partial.truncate(partial.len() - 30);
    let report = verify(Cursor::new(partial), &keys);
    assert_problems(
        "cut mid-line",
        &report,
        &[(
            110,
            None,
            ProblemKind::Unparseable,
            "line 110: unparseable record (incomplete last line: log cut mid-record): *",
        )],
    );
    assert_eq!(report.uncovered_tail, 10);

    // The full log matches the live head; a different head at that seq does not.
    assert!(verify_with(Cursor::new(text(&lines)), &keys, &opts).is_ok());
    let other = VerifyOptions {
        expected_head: Some(Head {
            seq: 110,
            hash: sha256_hex(b"other"),
        }),
        ..Default::default()
    };
    let report = verify_with(Cursor::new(text(&lines)), &keys, &other);
    assert_eq!(
        report
            .problems
            .iter()
            .map(|p| (p.line, p.kind))
            .collect::<Vec<_>>(),
        [(110, ProblemKind::Altered)],
        "{report}"
    );
}

#[test]
fn a_segment_verifies_against_its_anchor() {
    let signer = TestSigner::new(KEY_ID);
    let records = build_log(50, 10, &signer);
    let lines = lines_of(&records);
    let anchor = Some(Head::of(&records[21])); // the checkpoint at seq 22
    let opts = VerifyOptions {
        anchor: anchor.clone(),
        ..Default::default()
    };
    let report = verify_with(Cursor::new(text(&lines[22..])), &signer.trusted(), &opts);
    assert!(report.is_fully_covered(), "{report}");
    assert_eq!(report.records, 33);
    // Without the anchor the segment looks like it lost its first 22 records.
    let report = check(&lines[22..], &signer.trusted());
    assert_problems(
        "no anchor",
        &report,
        &[(
            1,
            Some(23),
            ProblemKind::Removed,
            "line 1: first record is seq 23, expected seq 1: records 1 to 22 removed",
        )],
    );
    // A wrong anchor hash is caught on the first record.
    let opts = VerifyOptions {
        anchor: Some(Head {
            seq: 22,
            hash: sha256_hex(b"wrong"),
        }),
        ..Default::default()
    };
    let report = verify_with(Cursor::new(text(&lines[22..])), &signer.trusted(), &opts);
    assert_problems(
        "wrong anchor",
        &report,
        &[(
            1,
            Some(23),
            ProblemKind::Altered,
            "line 1 (seq 23): record altered: prev does not link to the anchor hash of seq 22",
        )],
    );
}

// ---------------------------------------------------------------------------------------
// Resume
// ---------------------------------------------------------------------------------------

#[test]
fn resume_from_the_last_record_continues_the_chain() {
    let signer = TestSigner::new(KEY_ID);
    let mut chain = Chain::new().with_checkpoint_interval(10);
    let mut stored: Vec<String> = Vec::new();
    for i in 1..=25 {
        stored.push(chain.append(event(i)).to_json_line());
        if chain.checkpoint_due() {
            stored.push(chain.checkpoint(&signer, T0).unwrap().to_json_line());
        }
    }
    let before_restart = chain.next_seq();
    drop(chain);

    // Restart: only the stored bytes survive.
    let last = parse(stored.last().unwrap());
    let mut chain = Chain::resume(Some(&last))
        .unwrap()
        .with_checkpoint_interval(10);
    assert_eq!(chain.next_seq(), before_restart);
    assert_eq!(chain.last_hash(), last.hash);
    // The stretch since the last checkpoint is not known after a restart: due at once.
    assert!(chain.checkpoint_due());
    stored.push(chain.checkpoint(&signer, T0).unwrap().to_json_line());
    for i in 26..=40 {
        stored.push(chain.append(event(i)).to_json_line());
        if chain.checkpoint_due() {
            stored.push(chain.checkpoint(&signer, T0).unwrap().to_json_line());
        }
    }
    stored.push(chain.checkpoint(&signer, T0).unwrap().to_json_line());

    let report = check(&stored, &signer.trusted());
    assert!(report.is_fully_covered(), "{report}");
    assert_eq!(report.records, stored.len() as u64);
    let seqs: Vec<u64> = stored.iter().map(|l| parse(l).seq).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
}

#[test]
fn resume_edge_cases() {
    let signer = TestSigner::new(KEY_ID);
    // Nothing stored: a fresh chain.
    let mut chain = Chain::resume(None).unwrap();
    assert_eq!((chain.next_seq(), chain.last_hash()), (1, GENESIS_PREV));
    assert_eq!(chain.head(), None);
    let r1 = chain.append(event(1));
    assert_eq!((r1.seq, r1.prev.as_str()), (1, GENESIS_PREV));

    // From a checkpoint: the schedule restarts from it.
    let cp = chain.checkpoint(&signer, T0).unwrap();
    let resumed = Chain::resume(Some(&cp))
        .unwrap()
        .with_checkpoint_interval(1);
    assert!(!resumed.checkpoint_due());
    assert_eq!(resumed.head(), Some(Head::of(&cp)));

    // From an ordinary record with periodic checkpoints off: never due.
    let resumed = Chain::resume(Some(&r1))
        .unwrap()
        .with_checkpoint_interval(0);
    assert!(!resumed.checkpoint_due());

    // From a damaged record: refused.
    let mut bad = r1.clone();
    bad.outcome = "denied".into();
    let err = Chain::resume(Some(&bad)).unwrap_err();
    assert!(
        matches!(err, AuditError::BadResumePoint { seq: 1, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "cannot resume from record seq 1: stored hash does not match the record's content"
    );
    let mut bad = r1;
    bad.seq = u64::MAX;
    bad.hash = bad.compute_hash();
    assert!(Chain::resume(Some(&bad)).is_err());
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

#[test]
fn report_display_lists_problems_in_line_order() {
    let signer = TestSigner::new(KEY_ID);
    let mut lines = lines_of(&build_log(100, 10, &signer));
    lines.swap(49, 50); // seqs 50, 51
    edit(&mut lines, 80, |r| r.time = 0);
    lines.remove(29); // seq 30
    lines.truncate(105); // ends at seq 106
    let report = check(&lines, &signer.trusted());
    assert_eq!(
        report.to_string(),
        "audit log FAILED, 3 problems: 105 records, 9 valid checkpoints, head seq 106\n\
         \x20 line 30: seq 31 follows seq 29: record 30 removed\n\
         \x20 line 49: seq 51 before seq 50: records reordered\n\
         \x20 line 79 (seq 80): record altered: hash mismatch\n\
         \x20 7 records after seq 99 not yet covered by a signed checkpoint\n"
    );
    assert_eq!(report.problems_of(ProblemKind::Removed).count(), 1);
}

#[test]
fn a_record_moved_very_far_is_removed_here_and_out_of_order_there() {
    let signer = TestSigner::new(KEY_ID);
    let mut lines = lines_of(&build_log(1100, 100, &signer));
    let n = lines.len(); // 1100 events + 11 checkpoints
    let r = lines.remove(16);
    lines.push(r);
    let report = check(&lines, &signer.trusted());
    let last = leak_string(format!(
        "line {n}: seq 17 after seq {n}: record out of order"
    ));
    assert_problems(
        "far move",
        &report,
        &[
            (
                17,
                Some(18),
                ProblemKind::Removed,
                "line 17: seq 18 follows seq 16: record 17 removed",
            ),
            (n as u64, Some(17), ProblemKind::Reordered, last),
        ],
    );
}

#[test]
fn odd_bytes_and_line_endings() {
    let signer = TestSigner::new(KEY_ID);
    let lines = lines_of(&build_log(20, 10, &signer));
    // CRLF line endings are accepted.
    let crlf = lines.join("\r\n") + "\r\n";
    assert!(verify(Cursor::new(crlf), &signer.trusted()).is_fully_covered());
    // A line that is not UTF-8 is one problem; the next record does not report a gap.
    let mut bytes = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if i == 4 {
            bytes.extend_from_slice(b"\xff\xfe garbage");
        } else {
            bytes.extend_from_slice(l.as_bytes());
        }
        bytes.push(b'\n');
    }
    let report = verify(Cursor::new(bytes), &signer.trusted());
    assert_problems(
        "not utf-8",
        &report,
        &[(
            5,
            None,
            ProblemKind::Unparseable,
            "line 5: unparseable record: not UTF-8",
        )],
    );
}

#[test]
fn json_string_escape_table() {
    let cases: &[(&str, &str)] = &[
        ("", r#""""#),
        ("plain", r#""plain""#),
        ("a\"b\\c", r#""a\"b\\c""#),
        ("\u{08}\u{0c}\n\r\t", r#""\b\f\n\r\t""#),
        ("\u{00}x\u{1f}", r#""\u0000x\u001f""#),
        ("\u{7f}ü€𝄞/", "\"\u{7f}ü€𝄞/\""),
        ("ü\"", "\"ü\\\"\""),
        ("tail\u{01}", r#""tail\u0001""#),
    ];
    for (input, want) in cases {
        let mut out = String::from("x");
        crate::record::push_json_str(&mut out, input);
        assert_eq!(&out[1..], *want, "{input:?}");
    }
    // Every ASCII character and some multi-byte ones round-trip through a JSON parser.
    let all: String = (0u8..0x80).map(char::from).chain("ü€𝄞".chars()).collect();
    for s in [all.clone(), all.chars().rev().collect::<String>()] {
        let mut out = String::new();
        crate::record::push_json_str(&mut out, &s);
        assert_eq!(serde_json::from_str::<String>(&out).expect("valid JSON"), s);
    }
}

#[test]
fn every_builder_bounds_and_cleans_what_it_records() {
    let huge = format!("x\n\u{202e}{}", "y".repeat(1 << 20));
    let mut chain = Chain::new();
    let r = chain.append(
        Event::new(1, Actor::new(&huge, &huge), "auth.denied", &huge)
            .failed(&huge)
            .with_details(Details::new().str("method", &huge)),
    );
    assert!(r.object.len() <= text::MAX_OBJECT_LEN && r.object.ends_with('…'));
    assert!(r.actor.subject.len() <= text::MAX_SUBJECT_LEN);
    assert!(r.actor.fingerprint.len() <= text::MAX_FINGERPRINT_LEN);
    assert!(r.outcome.len() <= "failed: ".len() + text::MAX_REASON_LEN);
    let method = r.details.as_ref().unwrap().get("method").unwrap();
    assert!(method.as_str().unwrap().len() <= text::MAX_DETAIL_LEN);
    let line = r.to_json_line();
    assert!(line.len() < 6 * 1024, "{} bytes", line.len());
    assert!(!line.contains('\u{202e}') && !line.contains("\\n"));
    assert!(r.hash_matches());
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_pinned_key_refuses_checkpoints_by_any_other_key() {
    let real = TestSigner::new(KEY_ID);
    let log = text(&lines_of(&build_log(30, 10, &real)));
    let pin = |id: &str, key: &[u8]| VerifyOptions {
        pinned_key: Some(format!("{id}:{}", hex_of(key)).parse().unwrap()),
        ..Default::default()
    };
    // Pinned to the key that signed it: intact, even with no keys file at all.
    let report = verify_with(
        Cursor::new(&log),
        &HashMap::new(),
        &pin(KEY_ID, &real.public()),
    );
    assert!(report.is_fully_covered(), "{report}");
    assert_eq!(report.checkpoints, 3);

    // Pinned to another key: every checkpoint of this log is refused, even though the
    // keys file trusts the key that made them.
    let other = TestSigner::new("audit-other");
    let report = verify_with(
        Cursor::new(&log),
        &real.trusted(),
        &pin("audit-other", &other.public()),
    );
    assert_eq!(report.checkpoints, 0);
    assert_eq!(report.problems.len(), 3, "{report}");
    assert!(report
        .problems
        .iter()
        .all(|p| p.kind == ProblemKind::CheckpointNotPinnedKey
            && p.message.contains("not the pinned key \"audit-other\"")));

    // The right id with another public key: the signatures do not verify.
    let report = verify_with(
        Cursor::new(&log),
        &real.trusted(),
        &pin(KEY_ID, &other.public()),
    );
    assert_eq!(report.problems.len(), 3, "{report}");
    assert!(report
        .problems
        .iter()
        .all(|p| p.kind == ProblemKind::CheckpointSignatureInvalid));
}

#[test]
fn key_pins_and_anchors_parse_strictly() {
    let key = TestSigner::new(KEY_ID).public();
    let pin: KeyPin = format!("audit-0011:{}", hex_of(&key).to_uppercase())
        .parse()
        .unwrap();
    assert_eq!(
        (pin.key_id.as_str(), pin.public_key),
        ("audit-0011", key.clone())
    );
    for bad in [
        "no-colon".to_owned(),
        format!(":{}", hex_of(&key)),
        "audit-1:zz".to_owned(),
        format!("audit-1:{}", &hex_of(&key)[2..]),
        format!("audit-1:{}", hex_of(&key[..33])),
    ] {
        assert!(bad.parse::<KeyPin>().is_err(), "{bad}");
    }
    let hash = sha256_hex(b"x");
    let head: Head = format!("41:{}", hash.to_uppercase()).parse().unwrap();
    assert_eq!(
        head,
        Head {
            seq: 41,
            hash: hash.clone()
        }
    );
    for bad in [
        "41".to_owned(),
        format!("-1:{hash}"),
        format!("x:{hash}"),
        format!("41:{}", &hash[1..]),
        "41:".to_owned(),
    ] {
        assert!(bad.parse::<Head>().is_err(), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------
// Several chains (one per instance)
// ---------------------------------------------------------------------------------------

/// Two chains of one export: `default` first (no header: the single-chain format), then
/// `node-2` after its header.
fn two_chains(signer: &TestSigner) -> Vec<String> {
    let mut lines = lines_of(&build_log(12, 5, signer));
    lines.push(chain_header("node-2"));
    lines.extend(lines_of(&build_log(7, 5, signer)));
    lines
}

fn check_chains(
    lines: &[String],
    keys: &HashMap<String, Vec<u8>>,
    o: ChainsOptions,
) -> ChainsReport {
    verify_chains(Cursor::new(text(lines)), keys, &o)
}

#[test]
fn every_chain_of_an_export_verifies_on_its_own() {
    let signer = TestSigner::new(KEY_ID);
    let lines = two_chains(&signer);
    let report = check_chains(&lines, &signer.trusted(), ChainsOptions::default());
    assert!(report.is_ok(), "{report}");
    let names: Vec<_> = report.chains.iter().map(|c| c.chain.as_str()).collect();
    assert_eq!(names, ["default", "node-2"]);
    let d = report.chain("default").unwrap();
    let n = report.chain("node-2").unwrap();
    assert_eq!((d.records, n.records), (12 + 3, 7 + 2));
    assert_eq!(d.head.as_ref().unwrap().seq, 15);
    assert_eq!(n.last_checkpoint, Some(9));
    assert_eq!((d.uncovered_tail, n.uncovered_tail), (0, 0));
    let shown = report.to_string();
    assert!(shown.contains("audit chain node-2 OK: 9 records, 2 valid checkpoints, head seq 9, last checkpoint seq 9"), "{shown}");
    assert!(
        shown.ends_with("audit trail OK: 2 chains, 24 records\n"),
        "{shown}"
    );

    // A file of one chain with no header is the default chain (the format before chains).
    let single = lines_of(&build_log(12, 5, &signer));
    let report = check_chains(&single, &signer.trusted(), ChainsOptions::default());
    assert!(report.is_ok());
    assert_eq!(report.chains.len(), 1);
    assert_eq!(report.chains[0].chain, DEFAULT_CHAIN);
}

#[test]
fn a_removed_record_is_a_gap_of_its_chain() {
    let signer = TestSigner::new(KEY_ID);
    let mut lines = two_chains(&signer);
    // Line 19 is node-2's seq 3 (15 records of default, the header, then seq 1..).
    assert_eq!(parse(&lines[18]).seq, 3);
    lines.remove(18);
    let report = check_chains(&lines, &signer.trusted(), ChainsOptions::default());
    assert!(!report.is_ok());
    assert!(report.chain("default").unwrap().is_ok());
    let node = &report.chains[1];
    assert_eq!(node.chain, "node-2");
    let gaps: Vec<_> = node.gaps().map(|p| (p.line, p.message.as_str())).collect();
    assert_eq!(
        gaps,
        [(19, "line 19: seq 4 follows seq 2: record 3 removed")]
    );
    let shown = report.to_string();
    assert!(shown.contains("audit chain node-2 FAILED"), "{shown}");
    assert!(
        shown.contains("1 gap(s) in the sequence of chain node-2"),
        "{shown}"
    );
    assert!(
        shown.ends_with("audit trail FAILED: 2 chains, 23 records\n"),
        "{shown}"
    );
}

#[test]
fn a_chain_that_does_not_start_at_one_is_reported() {
    let signer = TestSigner::new(KEY_ID);
    let mut lines = two_chains(&signer);
    // node-2 loses its first record: its sequence no longer starts at 1.
    lines.remove(16);
    let report = check_chains(&lines, &signer.trusted(), ChainsOptions::default());
    let node = report.chain("node-2").unwrap();
    assert_eq!(
        node.problems_of(ProblemKind::Removed).count(),
        1,
        "{report}"
    );
    assert!(
        node.problems[0].message.contains("expected seq 1"),
        "{report}"
    );
}

#[test]
fn only_restricts_to_one_chain_and_an_absent_chain_is_a_problem() {
    let signer = TestSigner::new(KEY_ID);
    let mut lines = two_chains(&signer);
    lines.remove(18); // a gap in node-2 only
    let keys = signer.trusted();
    let only = |c: &str| ChainsOptions {
        only: Some(c.to_owned()),
        ..Default::default()
    };
    let report = check_chains(&lines, &keys, only("default"));
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.chains.len(), 1);
    let report = check_chains(&lines, &keys, only("node-2"));
    assert!(!report.is_ok());
    let report = check_chains(&lines, &keys, only("node-3"));
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].kind, ProblemKind::UnexpectedChain);
    assert!(!report.is_ok());
}

#[test]
fn an_anchor_applies_to_one_chain() {
    let signer = TestSigner::new(KEY_ID);
    let lines = two_chains(&signer);
    let keys = signer.trusted();
    // node-2 from seq 4 on, anchored at its seq 3.
    let third = parse(&lines[18]);
    let mut segment = vec![chain_header("node-2")];
    segment.extend_from_slice(&lines[19..]);
    let anchored = ChainsOptions {
        anchor: Some(Head::of(&third)),
        ..Default::default()
    };
    assert!(check_chains(&segment, &keys, anchored.clone()).is_ok());
    // Without naming the chain, a second chain is refused.
    let report = check_chains(&lines, &keys, anchored.clone());
    assert!(report
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::UnexpectedChain));
    // Named, the other chain is skipped.
    let mut mixed = lines_of(&build_log(4, 5, &signer));
    mixed.extend(segment);
    let named = ChainsOptions {
        only: Some("node-2".into()),
        ..anchored
    };
    assert!(check_chains(&mixed, &keys, named).is_ok());
}

#[test]
fn header_lines_are_recognised_only_in_their_exact_form() {
    assert_eq!(
        parse_chain_header(chain_header("node-2").as_bytes()).as_deref(),
        Some("node-2")
    );
    assert_eq!(parse_chain_header(br#"{"audit_chain":"x","seq":1}"#), None);
    assert_eq!(parse_chain_header(br#"{"seq":1}"#), None);
    assert!(check_chain_name("node-1.eu_west").is_ok());
    assert!(check_chain_name("").is_err());
    assert!(check_chain_name("a b").is_err());
    assert!(check_chain_name(&"a".repeat(65)).is_err());
}
