//! Offline verification of an exported JSON Lines audit log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::BufRead;

use super::chain::{verify_checkpoint_signature, CheckpointClaim};
use super::record::{AuditRecord, Head, GENESIS_PREV};
use super::MAX_CHECKPOINT_LAG;

/// How many records after a gap are held to tell a removal from a reorder.
const BLOCK_CAP: usize = 1024;

/// Optional context for [`verify_with`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The record just before the first line, when verifying a later segment of the log
    /// (e.g. after archiving older records): the file must then start at `anchor.seq + 1`
    /// linking to `anchor.hash`, and records up to the anchor count as covered. Default:
    /// the log starts at seq 1 with `prev` = 64 zeros.
    pub anchor: Option<Head>,
    /// The head the log is known to have reached (from the live service or an earlier
    /// verification). Records missing at the end are reported as
    /// [`ProblemKind::Truncated`]; a different hash at that seq as
    /// [`ProblemKind::Altered`].
    pub expected_head: Option<Head>,
    /// The one key checkpoints must be signed with, known out of band (e.g. read from
    /// the HSM at the key ceremony). When set, it is the only trusted key: a checkpoint
    /// by any other key id is [`ProblemKind::CheckpointNotPinnedKey`], and one under
    /// the pinned id that does not verify with the pinned public key is
    /// [`ProblemKind::CheckpointSignatureInvalid`].
    pub pinned_key: Option<KeyPin>,
}

/// A checkpoint key pinned out of band: its id and its uncompressed P-256 public key
/// (`0x04||x||y`). Written `KEYID:HEX` on the command line ([`std::str::FromStr`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPin {
    /// The key id checkpoints name.
    pub key_id: String,
    /// The public key, 65 bytes.
    pub public_key: Vec<u8>,
}

impl std::str::FromStr for KeyPin {
    type Err = String;

    /// `KEYID:HEX`: the id as `hsmctl audit keys` prints it, then the 130 hex digits of
    /// the uncompressed public key.
    fn from_str(s: &str) -> Result<Self, String> {
        let (key_id, hex) = s
            .rsplit_once(':')
            .ok_or("expected KEYID:HEX (the key id, a colon, the public key in hex)")?;
        if key_id.is_empty() || key_id.len() > 256 || key_id.chars().any(char::is_control) {
            return Err("the key id must be 1 to 256 printable characters".into());
        }
        let public_key = decode_hex(hex).ok_or("the public key is not hex")?;
        if public_key.len() != 65 || public_key[0] != 0x04 {
            return Err(format!(
                "the public key must be an uncompressed P-256 point (65 bytes starting 04), got {} bytes",
                public_key.len()
            ));
        }
        Ok(KeyPin {
            key_id: key_id.to_owned(),
            public_key,
        })
    }
}

impl std::str::FromStr for Head {
    type Err = String;

    /// `SEQ:HASH`: a record's decimal seq and its 64-hex-digit hash (as a verification
    /// report prints the head), e.g. kept out of band as the anchor of the next segment.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or("expected SEQ:HASH (a record's seq, a colon, its hash)")?;
        let seq: u64 = seq
            .parse()
            .map_err(|_| format!("the seq {seq:?} is not a decimal number"))?;
        let hash = hash.to_ascii_lowercase();
        if !crate::record::is_hash_hex(&hash) {
            return Err("the hash must be 64 hex digits".into());
        }
        Ok(Head { seq, hash })
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The kind of a verification problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// The input could not be read (I/O error); verification stopped there.
    Unreadable,
    /// A line is not a well-formed record (bad JSON, unknown or missing field,
    /// unsupported details value, not UTF-8, empty, or cut off).
    Unparseable,
    /// A record's content was changed: its hash does not match, or it was rewritten with
    /// a recomputed hash (the next record does not link to it), or it differs from the
    /// expected head.
    Altered,
    /// One or more seqs are missing.
    Removed,
    /// Records are present but out of order.
    Reordered,
    /// A seq appears a second time.
    Duplicate,
    /// A checkpoint record's details are not a well-formed checkpoint claim.
    CheckpointMalformed,
    /// A checkpoint is signed with a key id that is not trusted.
    CheckpointUnknownKey,
    /// A checkpoint is signed with a key other than the pinned one
    /// ([`VerifyOptions::pinned_key`]).
    CheckpointNotPinnedKey,
    /// A checkpoint signature does not verify under the trusted key.
    CheckpointSignatureInvalid,
    /// A validly signed checkpoint names a head that is not what the log contains.
    CheckpointWrongHead,
    /// The log ends before the expected head.
    Truncated,
    /// A chain the verification did not expect: the chain asked for is absent, or a
    /// second chain follows where an anchor names one (see [`crate::ChainsOptions`]).
    UnexpectedChain,
}

/// One finding, pinned to a line of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the input the problem is about (for [`ProblemKind::Truncated`],
    /// the line after the last one).
    pub line: u64,
    /// The seq of the record on that line, `None` if there is no parseable record there.
    pub seq: Option<u64>,
    /// What kind of problem it is.
    pub kind: ProblemKind,
    /// The full human-readable finding, starting with `line N`.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of verifying a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of lines that parsed as records.
    pub records: u64,
    /// Number of checkpoints that verified (trusted key, valid signature, real head).
    pub checkpoints: u64,
    /// All problems, ordered by line.
    pub problems: Vec<Problem>,
    /// Number of records after the last valid checkpoint: not yet covered by a signed
    /// checkpoint. Not a problem by itself (a running service always has some), but
    /// nothing vouches for them.
    pub uncovered_tail: u64,
    /// The highest seq vouched for by a valid checkpoint (its head, or the checkpoint
    /// record itself when it immediately follows its head); the anchor's seq or 0 if none.
    pub covered_through: u64,
    /// Seq and stored hash of the highest-seq record read, `None` for an empty log.
    pub head: Option<Head>,
    /// The seq of the last checkpoint record that verified, `None` if none did.
    pub last_checkpoint: Option<u64>,
}

impl VerifyReport {
    /// True if no problem was found (uncovered records at the end are not a problem).
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// True if no problem was found and every record is covered by a valid checkpoint.
    pub fn is_fully_covered(&self) -> bool {
        self.is_ok() && self.uncovered_tail == 0
    }

    /// The problems of one kind.
    pub fn problems_of(&self, kind: ProblemKind) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.kind == kind)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.problems.len() {
            0 => "OK".to_owned(),
            1 => "FAILED, 1 problem".to_owned(),
            n => format!("FAILED, {n} problems"),
        };
        let head = match &self.head {
            Some(h) => format!("head seq {}", h.seq),
            None => "empty".to_owned(),
        };
        writeln!(
            f,
            "audit log {verdict}: {} records, {} valid checkpoints, {head}",
            self.records, self.checkpoints
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        match self.uncovered_tail {
            0 => {}
            1 => writeln!(
                f,
                "  1 record after seq {} not yet covered by a signed checkpoint",
                self.covered_through
            )?,
            n => writeln!(
                f,
                "  {n} records after seq {} not yet covered by a signed checkpoint",
                self.covered_through
            )?,
        }
        Ok(())
    }
}

/// Verifies a JSON Lines audit log against the trusted checkpoint keys
/// (key id → uncompressed P-256 public key `0x04||x||y`). Same as [`verify_with`] with
/// default options.
///
/// # What is checked, and how problems are attributed
///
/// Lines are read one by one (1-based line numbers). Each line must parse as a record;
/// its `hash` must match its content; each record's `prev` must equal the stored `hash`
/// of the record with the previous seq; seqs must run 1, 2, 3, … in file order; each
/// checkpoint must be signed by a trusted key and name a head that is really in the log.
///
/// The verifier reports each tampering *once, at its root cause*:
///
/// * **Altered** — a record whose `hash` does not match its content is reported as
///   `record altered: hash mismatch`. Its fields are then untrusted: it is excluded from
///   link checks on both sides and its checkpoint claims (if any) are not evaluated. If
///   its stored seq does not fit where it stands, it is assumed to occupy the next seq
///   (so an edited seq field does not also produce a gap or reorder report).
///   Links are checked against the *stored* hash of the predecessor, so editing a record
///   without recomputing its hash does not break the next link at all.
/// * **Altered (rewritten)** — when two records that each match their own hash do not
///   link (`seq n+1`'s `prev` ≠ `seq n`'s `hash`), record `n` was rewritten with a
///   recomputed hash (or, indistinguishably, `n+1`'s `prev` was); it is reported once,
///   on record `n`, and the link is not reported again. (For seq 1, or the first record
///   after a [`VerifyOptions::anchor`], the record itself is reported.)
/// * **Removed** — a seq that never appears: `seq 18 follows seq 16: record 17
///   removed`. No link problem is reported across the gap.
/// * **Reordered** — seqs that all appear, but not in order. Two records exchanged are
///   reported as one swap (`seq 18 before seq 17: records reordered` when adjacent);
///   other permutations name the fewest records that are out of place (the complement
///   of a longest increasing run). Links are checked by seq, so a pure reorder produces
///   no link problem.
/// * **Duplicate** — a seq that already appeared.
/// * **Checkpoints** — checked in this order, reporting only the first failure:
///   malformed details, unknown key id, invalid signature, head not in the log or hash
///   differing from the log's record at that seq. A checkpoint whose head record was
///   already reported altered is not reported again (but does not count as valid). Once
///   a head mismatch is reported, later head mismatches are the same rewrite and are not
///   reported until a checkpoint verifies again.
/// * **Unparseable** lines are reported once each; the next record may skip one seq per
///   such line without a removal being reported.
///
/// Detection is local: reorders and gaps are resolved within a window of
/// [`super::MAX_CHECKPOINT_LAG`] records (checkpoint heads, links) and of 1024 records
/// after a gap (a record moved further than that is reported as removed at its original
/// place and out of order where it turns up).
///
/// # What cannot be detected offline
///
/// A file cut right after a checkpoint looks complete, and a rewrite of every record
/// after the last checkpoint (recomputing all hashes) is consistent. The report therefore
/// gives `uncovered_tail`, the number of records after the last valid checkpoint, and
/// [`VerifyOptions::expected_head`] lets a caller who knows the live head (or the head
/// of a previous verification) detect truncation.
pub fn verify(reader: impl BufRead, trusted_keys: &HashMap<String, Vec<u8>>) -> VerifyReport {
    verify_with(reader, trusted_keys, &VerifyOptions::default())
}

/// Verifies a JSON Lines audit log with [`VerifyOptions`].
pub fn verify_with(
    mut reader: impl BufRead,
    trusted_keys: &HashMap<String, Vec<u8>>,
    options: &VerifyOptions,
) -> VerifyReport {
    let mut v = Verifier::new(trusted_keys, options);
    let last_line = read_lines(&mut reader, |line, bytes, complete| {
        v.line(line, bytes, complete)
    });
    match last_line {
        Ok(n) => v.finish(n),
        Err((n, e)) => {
            v.unreadable(n + 1, &e);
            v.finish(n)
        }
    }
}

/// Feeds each line of `reader` (1-based number, bytes without the line ending, whether
/// it ended in a newline) to `f`; the number of lines read, or the lines read before an
/// I/O error and the error.
pub(crate) fn read_lines(
    reader: &mut impl BufRead,
    mut f: impl FnMut(u64, &[u8], bool),
) -> Result<u64, (u64, std::io::Error)> {
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                line_no += 1;
                let complete = buf.last() == Some(&b'\n');
                if complete {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                f(line_no, &buf, complete);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((line_no, e)),
        }
    }
    Ok(line_no)
}

struct Entry {
    /// 0 for the anchor (the virtual record before the first line).
    line: u64,
    hash: String,
    prev: String,
    flagged: bool,
}

/// Recent records by seq, for link and checkpoint-head checks.
struct Window {
    map: HashMap<u64, Entry>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Window {
    fn insert(&mut self, seq: u64, entry: Entry) {
        if self.map.contains_key(&seq) {
            return;
        }
        self.map.insert(seq, entry);
        self.order.push_back(seq);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// Records seen after a gap, held until the gap is filled (a reorder) or given up on.
struct Block {
    anchor_seq: u64,
    anchor_line: u64,
    /// (line, seq) in file order.
    entries: Vec<(u64, u64)>,
    present: HashSet<u64>,
    max_seq: u64,
}

impl Block {
    fn is_missing(&self, seq: u64) -> bool {
        seq > self.anchor_seq && seq < self.max_seq && !self.present.contains(&seq)
    }

    fn add(&mut self, line: u64, seq: u64) {
        self.entries.push((line, seq));
        self.present.insert(seq);
        self.max_seq = self.max_seq.max(seq);
    }

    fn resolved(&self) -> bool {
        self.max_seq - self.anchor_seq == self.present.len() as u64
    }
}

pub(crate) struct Verifier<'a> {
    keys: &'a HashMap<String, Vec<u8>>,
    pinned: Option<KeyPin>,
    anchor_seq: u64,
    expected_head: Option<Head>,
    window: Window,
    tip: u64,
    tip_line: u64,
    tip_hash: Option<String>,
    block: Option<Block>,
    unparsed_credit: u64,
    covered_through: u64,
    in_rewrite: bool,
    records: u64,
    checkpoints: u64,
    last_checkpoint: Option<u64>,
    problems: Vec<Problem>,
}

impl<'a> Verifier<'a> {
    pub(crate) fn new(keys: &'a HashMap<String, Vec<u8>>, options: &VerifyOptions) -> Self {
        let anchor = options.anchor.clone().unwrap_or(Head {
            seq: 0,
            hash: GENESIS_PREV.to_owned(),
        });
        let mut window = Window {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: usize::try_from(MAX_CHECKPOINT_LAG)
                .unwrap_or(usize::MAX)
                .saturating_add(2),
        };
        window.insert(
            anchor.seq,
            Entry {
                line: 0,
                hash: anchor.hash,
                prev: String::new(),
                flagged: false,
            },
        );
        Verifier {
            keys,
            pinned: options.pinned_key.clone(),
            anchor_seq: anchor.seq,
            expected_head: options.expected_head.clone(),
            window,
            tip: anchor.seq,
            tip_line: 0,
            tip_hash: None,
            block: None,
            unparsed_credit: 0,
            covered_through: anchor.seq,
            in_rewrite: false,
            records: 0,
            checkpoints: 0,
            last_checkpoint: None,
            problems: Vec::new(),
        }
    }

    /// Reports an I/O error before line `line`: verification stops there.
    pub(crate) fn unreadable(&mut self, line: u64, e: &std::io::Error) {
        self.push(
            line,
            None,
            ProblemKind::Unreadable,
            format!("line {line}: read error: {e}"),
        );
    }

    fn push(&mut self, line: u64, seq: Option<u64>, kind: ProblemKind, message: String) {
        self.problems.push(Problem {
            line,
            seq,
            kind,
            message,
        });
    }

    /// True if `seq` is a not-yet-seen seq inside the open gap.
    fn missing(&self, seq: u64) -> bool {
        self.block.as_ref().is_some_and(|b| b.is_missing(seq))
    }

    pub(crate) fn line(&mut self, line: u64, bytes: &[u8], complete: bool) {
        let parsed = match std::str::from_utf8(bytes) {
            Err(_) => Err("not UTF-8".to_owned()),
            Ok(s) if s.trim().is_empty() => Err("empty line".to_owned()),
            Ok(s) => serde_json::from_str::<AuditRecord>(s)
                .map_err(|e| e.to_string().replace(" at line 1 column ", " at column ")),
        };
        match parsed {
            Ok(record) => self.record(line, record),
            Err(reason) => {
                let cut = if complete {
                    ""
                } else {
                    " (incomplete last line: log cut mid-record)"
                };
                self.push(
                    line,
                    None,
                    ProblemKind::Unparseable,
                    format!("line {line}: unparseable record{cut}: {reason}"),
                );
                self.unparsed_credit += 1;
            }
        }
    }

    fn record(&mut self, line: u64, r: AuditRecord) {
        self.records += 1;
        let stored = r.seq;
        let self_ok = r.hash_matches();
        if !self_ok {
            self.push(
                line,
                Some(stored),
                ProblemKind::Altered,
                format!("line {line} (seq {stored}): record altered: hash mismatch"),
            );
        }
        // An altered record's seq is untrusted: if it does not fit, assume it is the next.
        let seq = if self_ok || stored == self.tip.saturating_add(1) || self.missing(stored) {
            stored
        } else {
            self.tip.saturating_add(1)
        };

        if seq <= self.anchor_seq {
            self.push(
                line,
                Some(stored),
                ProblemKind::Reordered,
                format!(
                    "line {line} (seq {stored}): seq {stored} is not after the start of the log (seq {})",
                    self.anchor_seq
                ),
            );
            return;
        }
        if let Some(e) = self.window.map.get(&seq) {
            let msg = if self_ok && !e.flagged && e.hash == r.hash {
                format!("line {line} (seq {seq}): duplicate of line {}", e.line)
            } else {
                format!(
                    "line {line} (seq {seq}): seq {seq} already used by line {}",
                    e.line
                )
            };
            self.push(line, Some(stored), ProblemKind::Duplicate, msg);
            return;
        }

        let credit = std::mem::take(&mut self.unparsed_credit);
        let next = self.tip.saturating_add(1);
        if self.block.is_none() && seq >= next && seq - next <= credit {
            // In order, possibly skipping seqs taken by unparseable lines.
        } else if seq > self.tip {
            let (tip, tip_line) = (self.tip, self.tip_line);
            self.block
                .get_or_insert_with(|| Block {
                    anchor_seq: tip,
                    anchor_line: tip_line,
                    entries: Vec::new(),
                    present: HashSet::new(),
                    max_seq: tip,
                })
                .add(line, seq);
        } else if self.missing(seq) {
            if let Some(b) = self.block.as_mut() {
                b.add(line, seq);
            }
        } else {
            self.push(
                line,
                Some(stored),
                ProblemKind::Reordered,
                format!(
                    "line {line}: seq {seq} after seq {}: record out of order",
                    self.tip
                ),
            );
        }
        if seq > self.tip {
            self.tip = seq;
            self.tip_line = line;
            self.tip_hash = Some(r.hash.clone());
        }
        self.window.insert(
            seq,
            Entry {
                line,
                hash: r.hash.clone(),
                prev: r.prev.clone(),
                flagged: !self_ok,
            },
        );
        self.link(seq - 1, seq);
        if let Some(after) = seq.checked_add(1) {
            self.link(seq, after);
        }
        if self_ok && r.is_checkpoint() {
            self.checkpoint(line, seq, &r);
        }
        if self
            .block
            .as_ref()
            .is_some_and(|b| b.resolved() || b.entries.len() >= BLOCK_CAP)
        {
            self.close_block();
        }
    }

    /// Checks that record `seq` links to record `seq - 1`, if both are known and sound.
    fn link(&mut self, pred: u64, succ: u64) {
        let (Some(p), Some(s)) = (self.window.map.get(&pred), self.window.map.get(&succ)) else {
            return;
        };
        if p.flagged || s.flagged || s.prev == p.hash {
            return;
        }
        let (p_line, s_line) = (p.line, s.line);
        if p_line == 0 {
            let start = if pred == 0 {
                "the start of the log (64 zeros)".to_owned()
            } else {
                format!("the anchor hash of seq {pred}")
            };
            if let Some(s) = self.window.map.get_mut(&succ) {
                s.flagged = true;
            }
            self.push(
                s_line,
                Some(succ),
                ProblemKind::Altered,
                format!(
                    "line {s_line} (seq {succ}): record altered: prev does not link to {start}"
                ),
            );
        } else {
            if let Some(p) = self.window.map.get_mut(&pred) {
                p.flagged = true;
            }
            self.push(
                p_line,
                Some(pred),
                ProblemKind::Altered,
                format!(
                    "line {p_line} (seq {pred}): record altered: seq {succ} (line {s_line}) does not link to its hash (rewritten with a recomputed hash)"
                ),
            );
        }
    }

    fn checkpoint(&mut self, line: u64, seq: u64, r: &AuditRecord) {
        let at = format!("line {line} (seq {})", r.seq);
        let claim = match CheckpointClaim::parse(r) {
            Ok(c) => c,
            Err(reason) => {
                self.push(
                    line,
                    Some(r.seq),
                    ProblemKind::CheckpointMalformed,
                    format!("{at}: checkpoint malformed: {reason}"),
                );
                return;
            }
        };
        let key = match &self.pinned {
            Some(pin) if pin.key_id == claim.key_id => Ok(pin.public_key.as_slice()),
            Some(pin) => Err((
                ProblemKind::CheckpointNotPinnedKey,
                format!(
                    "{at}: checkpoint signed with key id \"{}\", not the pinned key \"{}\"",
                    claim.key_id, pin.key_id
                ),
            )),
            None => self.keys.get(&claim.key_id).map(Vec::as_slice).ok_or((
                ProblemKind::CheckpointUnknownKey,
                format!(
                    "{at}: checkpoint signed with unknown key id \"{}\"",
                    claim.key_id
                ),
            )),
        };
        let key = match key {
            Ok(k) => k,
            Err((kind, message)) => {
                self.push(line, Some(r.seq), kind, message);
                return;
            }
        };
        if !verify_checkpoint_signature(key, &claim.head, &claim.signature) {
            self.push(
                line,
                Some(r.seq),
                ProblemKind::CheckpointSignatureInvalid,
                format!(
                    "{at}: checkpoint signature invalid (key id \"{}\")",
                    claim.key_id
                ),
            );
            return;
        }
        let h = claim.head.seq;
        if h >= seq {
            self.push(
                line,
                Some(r.seq),
                ProblemKind::CheckpointWrongHead,
                format!("{at}: checkpoint claims head seq {h}, which is not before it"),
            );
            return;
        }
        match self.window.map.get(&h) {
            Some(e) if e.flagged => {}
            Some(e) if e.hash == claim.head.hash => {
                self.checkpoints += 1;
                self.last_checkpoint = Some(self.last_checkpoint.map_or(seq, |l| l.max(seq)));
                self.in_rewrite = false;
                let covers = if h + 1 == seq { seq } else { h };
                self.covered_through = self.covered_through.max(covers);
            }
            Some(e) => {
                if !self.in_rewrite {
                    self.in_rewrite = true;
                    let msg = format!(
                        "{at}: checkpoint claims head seq {h} with hash {}, but record {h} (line {}) has hash {}: log rewritten after signing",
                        claim.head.hash, e.line, e.hash
                    );
                    self.push(line, Some(r.seq), ProblemKind::CheckpointWrongHead, msg);
                }
            }
            None => {
                if !self.missing(h) {
                    self.push(
                        line,
                        Some(r.seq),
                        ProblemKind::CheckpointWrongHead,
                        format!(
                            "{at}: checkpoint claims head seq {h}, which is not in the log within {MAX_CHECKPOINT_LAG} records before it"
                        ),
                    );
                }
            }
        }
    }

    fn close_block(&mut self) {
        let Some(b) = self.block.take() else {
            return;
        };
        let e = &b.entries;
        let mut sorted: Vec<u64> = e.iter().map(|&(_, s)| s).collect();
        sorted.sort_unstable();
        let mut found = Vec::new();

        if e.windows(2).any(|w| w[0].1 > w[1].1) {
            let diffs: Vec<usize> = (0..e.len()).filter(|&i| e[i].1 != sorted[i]).collect();
            let swap = diffs.len() == 2 && {
                let (i, j) = (diffs[0], diffs[1]);
                e[i].1 == sorted[j] && e[j].1 == sorted[i]
            };
            if swap {
                let ((li, si), (lj, sj)) = (e[diffs[0]], e[diffs[1]]);
                let msg = if diffs[1] == diffs[0] + 1 && lj == li + 1 {
                    format!("line {li}: seq {si} before seq {sj}: records reordered")
                } else {
                    format!(
                        "line {li}: seq {si} and line {lj}: seq {sj} swapped: records reordered"
                    )
                };
                found.push((li, si, ProblemKind::Reordered, msg));
            } else {
                let keep = longest_increasing(e);
                for (idx, &(l, s)) in e.iter().enumerate() {
                    if !keep[idx] {
                        let p = if idx == 0 { b.anchor_seq } else { e[idx - 1].1 };
                        found.push((
                            l,
                            s,
                            ProblemKind::Reordered,
                            format!("line {l}: seq {s} after seq {p}: record out of order"),
                        ));
                    }
                }
            }
        }

        // Entry indices in seq order, to find each gap and the record right after it.
        let mut by_seq: Vec<usize> = (0..e.len()).collect();
        by_seq.sort_unstable_by_key(|&i| e[i].1);
        let mut before = b.anchor_seq;
        for idx in by_seq {
            let (l, s) = e[idx];
            if s > before + 1 {
                let (x, y) = (before + 1, s - 1);
                let what = if x == y {
                    format!("record {x} removed")
                } else {
                    format!("records {x} to {y} removed")
                };
                let file_prev = if idx == 0 { b.anchor_seq } else { e[idx - 1].1 };
                let msg = if file_prev != before {
                    format!("line {l} (seq {s}): {what} before it")
                } else if idx == 0 && b.anchor_line == 0 {
                    format!("line {l}: first record is seq {s}, expected seq {x}: {what}")
                } else {
                    format!("line {l}: seq {s} follows seq {before}: {what}")
                };
                found.push((l, s, ProblemKind::Removed, msg));
            }
            before = s;
        }
        for (line, seq, kind, message) in found {
            self.push(line, Some(seq), kind, message);
        }
    }

    pub(crate) fn finish(mut self, last_line: u64) -> VerifyReport {
        self.close_block();
        if let Some(exp) = self.expected_head.clone() {
            if exp.seq > self.tip {
                let after = self.tip.saturating_add(1);
                let what = if after == exp.seq {
                    format!("record {after} missing")
                } else {
                    format!("records {after} to {} missing", exp.seq)
                };
                self.push(
                    last_line + 1,
                    None,
                    ProblemKind::Truncated,
                    format!(
                        "line {}: end of log after seq {}: {what} (expected head seq {})",
                        last_line + 1,
                        self.tip,
                        exp.seq
                    ),
                );
            } else if let Some(e) = self.window.map.get(&exp.seq) {
                if e.line > 0 && !e.flagged && e.hash != exp.hash {
                    let msg = format!(
                        "line {} (seq {}): record altered: hash {} differs from the expected head hash {}",
                        e.line, exp.seq, e.hash, exp.hash
                    );
                    self.push(e.line, Some(exp.seq), ProblemKind::Altered, msg);
                }
            }
        }
        self.problems.sort_by_key(|p| p.line);
        VerifyReport {
            records: self.records,
            checkpoints: self.checkpoints,
            problems: self.problems,
            uncovered_tail: self.tip.saturating_sub(self.covered_through),
            covered_through: self.covered_through,
            head: self.tip_hash.map(|hash| Head {
                seq: self.tip,
                hash,
            }),
            last_checkpoint: self.last_checkpoint,
        }
    }
}

/// Marks the members of one longest strictly increasing subsequence of the seqs.
fn longest_increasing(entries: &[(u64, u64)]) -> Vec<bool> {
    let n = entries.len();
    let mut tails: Vec<usize> = Vec::new();
    let mut parent = vec![None; n];
    for i in 0..n {
        let s = entries[i].1;
        let pos = tails.partition_point(|&t| entries[t].1 < s);
        if pos > 0 {
            parent[i] = Some(tails[pos - 1]);
        }
        if pos == tails.len() {
            tails.push(i);
        } else {
            tails[pos] = i;
        }
    }
    let mut keep = vec![false; n];
    let mut at = tails.last().copied();
    while let Some(i) = at {
        keep[i] = true;
        at = parent[i];
    }
    keep
}
