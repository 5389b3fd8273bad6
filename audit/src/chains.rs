//! Several audit chains: one per service instance (see the README's design section).
//!
//! Each instance appends to its own chain, with its own sequence from 1 and its own
//! signed checkpoints, so instances never contend for one chain head. Every chain is
//! verified on its own by the single-chain verifier ([`crate::verify_with`]); this module
//! adds the export format that holds several chains, and a report per chain.
//!
//! # The export format
//!
//! JSON Lines, as for one chain, with *chain header* lines between the chains: a line
//! `{"audit_chain":"NAME"}` ([`chain_header`]) starts the records of chain `NAME`.
//! Records before any header belong to [`DEFAULT_CHAIN`], so an export of the default
//! chain alone (every embedded store's) is exactly the single-chain format, and a file
//! written before chains existed verifies as chain `default`. A header names a chain
//! only; it vouches for nothing: each chain's own hash links and checkpoints do.
//!
//! What a verifier of an export cannot see is a chain missing from it entirely: compare
//! the chains it reports with the service's list (`hsmctl audit chains`), or verify one
//! chain against the head kept from its previous verification.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::BufRead;

use serde::Deserialize;

use crate::record::Head;
use crate::verify::{read_lines, Verifier};
use crate::{KeyPin, Problem, ProblemKind, VerifyOptions, VerifyReport};

/// The chain of a single-instance deployment (and of every embedded store): the chain of
/// records before the first chain header of an export.
pub const DEFAULT_CHAIN: &str = "default";

/// Longest chain name.
pub const MAX_CHAIN_NAME_LEN: usize = 64;

/// Checks a chain name: 1 to 64 ASCII letters, digits, `.`, `_` and `-` (the rule of an
/// instance name).
pub fn check_chain_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CHAIN_NAME_LEN {
        return Err(format!(
            "a chain name must be 1 to {MAX_CHAIN_NAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("a chain name may contain only ASCII letters, digits, '.', '_' and '-'".into());
    }
    Ok(())
}

/// The header line (without the newline) that starts the records of `chain` in an
/// export.
pub fn chain_header(chain: &str) -> String {
    serde_json::json!({ "audit_chain": chain }).to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    audit_chain: String,
}

/// The chain a header line names, `None` when the line is not a chain header.
pub fn parse_chain_header(line: &[u8]) -> Option<String> {
    // Records start with `{"seq":`; only a line that starts like a header is parsed as one.
    let trimmed = line.strip_prefix(b"{")?;
    let trimmed = trimmed.trim_ascii_start();
    if !trimmed.starts_with(b"\"audit_chain\"") {
        return None;
    }
    serde_json::from_slice::<Header>(line)
        .ok()
        .map(|h| h.audit_chain)
}

/// What to verify, for [`verify_chains`] and [`ChainsVerifier`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainsOptions {
    /// Verify only this chain (the other chains' lines are skipped); it must be present.
    pub only: Option<String>,
    /// The record before the first record of the verified chain (see
    /// [`VerifyOptions::anchor`]): a segment of one chain. Applies to [`Self::only`], or,
    /// without it, to the one chain of the input (a second chain is then a problem).
    pub anchor: Option<Head>,
    /// The one trusted checkpoint key (see [`VerifyOptions::pinned_key`]); for every chain.
    pub pinned_key: Option<KeyPin>,
}

/// The verification of one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    /// The chain's name.
    pub chain: String,
    /// Its verification: records, head, last checkpoint, problems (with the input's line
    /// numbers), records after the last checkpoint.
    pub report: VerifyReport,
}

impl ChainReport {
    /// The removed records (gaps in the sequence) of this chain.
    pub fn gaps(&self) -> impl Iterator<Item = &Problem> {
        self.report.problems_of(ProblemKind::Removed)
    }
}

/// The verification of every chain of an input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainsReport {
    /// One report per chain, by name.
    pub chains: Vec<ChainReport>,
    /// Problems of the input as a whole (a chain asked for but absent, a second chain
    /// where an anchor allows one).
    pub problems: Vec<Problem>,
}

impl ChainsReport {
    /// True if no chain has a problem and the input has none.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.chains.iter().all(|c| c.report.is_ok())
    }

    /// The report of `chain`.
    pub fn chain(&self, chain: &str) -> Option<&VerifyReport> {
        self.chains
            .iter()
            .find(|c| c.chain == chain)
            .map(|c| &c.report)
    }

    /// Records of every chain.
    pub fn records(&self) -> u64 {
        self.chains.iter().map(|c| c.report.records).sum()
    }

    /// Every problem: the input's, then each chain's, as (chain, problem).
    pub fn all_problems(&self) -> impl Iterator<Item = (Option<&str>, &Problem)> {
        self.problems
            .iter()
            .map(|p| (None, p))
            .chain(self.chains.iter().flat_map(|c| {
                c.report
                    .problems
                    .iter()
                    .map(|p| (Some(c.chain.as_str()), p))
            }))
    }
}

impl fmt::Display for ChainsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.chains {
            let r = &c.report;
            let verdict = match r.problems.len() {
                0 => "OK".to_owned(),
                1 => "FAILED, 1 problem".to_owned(),
                n => format!("FAILED, {n} problems"),
            };
            let head = match &r.head {
                Some(h) => format!("head seq {}", h.seq),
                None => "empty".to_owned(),
            };
            let last = match r.last_checkpoint {
                Some(s) => format!("last checkpoint seq {s}"),
                None => "no valid checkpoint".to_owned(),
            };
            writeln!(
                f,
                "audit chain {} {verdict}: {} records, {} valid checkpoints, {head}, {last}",
                c.chain, r.records, r.checkpoints
            )?;
            for p in &r.problems {
                writeln!(f, "  {p}")?;
            }
            let gaps = c.gaps().count();
            if gaps > 0 {
                writeln!(f, "  {gaps} gap(s) in the sequence of chain {}", c.chain)?;
            }
            match r.uncovered_tail {
                0 => {}
                n => writeln!(
                    f,
                    "  {n} record(s) after seq {} not yet covered by a signed checkpoint",
                    r.covered_through
                )?,
            }
        }
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        let n = self.chains.len();
        let verdict = if self.is_ok() { "OK" } else { "FAILED" };
        writeln!(
            f,
            "audit trail {verdict}: {n} chain{}, {} records",
            if n == 1 { "" } else { "s" },
            self.records()
        )
    }
}

struct Open<'a> {
    verifier: Verifier<'a>,
    last_line: u64,
}

/// Verifies several chains fed line by line (from an export, or from a store's chains),
/// each chain with its own [`Verifier`](crate::verify_with) and the same trusted keys.
pub struct ChainsVerifier<'a> {
    keys: &'a HashMap<String, Vec<u8>>,
    options: ChainsOptions,
    chains: BTreeMap<String, Open<'a>>,
    /// The chain the lines being read belong to.
    current: String,
    /// The chain the anchor went to (the first one verified).
    anchored: Option<String>,
    problems: Vec<Problem>,
}

impl<'a> ChainsVerifier<'a> {
    /// A verifier trusting `keys` (key id -> uncompressed P-256 public key).
    pub fn new(keys: &'a HashMap<String, Vec<u8>>, options: ChainsOptions) -> Self {
        ChainsVerifier {
            keys,
            options,
            chains: BTreeMap::new(),
            current: DEFAULT_CHAIN.to_owned(),
            anchored: None,
            problems: Vec::new(),
        }
    }

    /// One line of an export: a chain header switches chains, anything else is a record
    /// line of the current chain (see [`ChainsVerifier::record`]).
    pub fn line(&mut self, line: u64, bytes: &[u8], complete: bool) {
        match parse_chain_header(bytes) {
            Some(chain) => self.current = chain,
            None => {
                let chain = std::mem::take(&mut self.current);
                self.record(&chain, line, bytes, complete);
                self.current = chain;
            }
        }
    }

    /// One stored record line of `chain`; `line` is its position in the input (for an
    /// export its line number, for a store its position in the chain).
    pub fn record(&mut self, chain: &str, line: u64, bytes: &[u8], complete: bool) {
        if self.options.only.as_deref().is_some_and(|o| o != chain) {
            return;
        }
        if !self.chains.contains_key(chain) {
            let mut options = VerifyOptions {
                pinned_key: self.options.pinned_key.clone(),
                ..Default::default()
            };
            if let Some(anchor) = &self.options.anchor {
                match &self.anchored {
                    None => {
                        options.anchor = Some(anchor.clone());
                        self.anchored = Some(chain.to_owned());
                    }
                    Some(first) => self.problems.push(Problem {
                        line,
                        seq: None,
                        kind: ProblemKind::UnexpectedChain,
                        message: format!(
                            "line {line}: chain {chain} follows chain {first}, but an anchor applies to one chain: name it (--chain)"
                        ),
                    }),
                }
            }
            self.chains.insert(
                chain.to_owned(),
                Open {
                    verifier: Verifier::new(self.keys, &options),
                    last_line: 0,
                },
            );
        }
        if let Some(open) = self.chains.get_mut(chain) {
            open.verifier.line(line, bytes, complete);
            open.last_line = line;
        }
    }

    /// Reports a read error before line `line` (on the current chain).
    pub fn unreadable(&mut self, line: u64, e: &std::io::Error) {
        match self.chains.get_mut(&self.current) {
            Some(open) => open.verifier.unreadable(line, e),
            None => self.problems.push(Problem {
                line,
                seq: None,
                kind: ProblemKind::Unreadable,
                message: format!("line {line}: read error: {e}"),
            }),
        }
    }

    /// The reports, by chain name.
    pub fn finish(mut self) -> ChainsReport {
        if let Some(only) = &self.options.only {
            if !self.chains.contains_key(only) {
                self.problems.push(Problem {
                    line: 0,
                    seq: None,
                    kind: ProblemKind::UnexpectedChain,
                    message: format!("chain {only}: no record of it in the input"),
                });
            }
        }
        ChainsReport {
            chains: self
                .chains
                .into_iter()
                .map(|(chain, open)| ChainReport {
                    chain,
                    report: open.verifier.finish(open.last_line),
                })
                .collect(),
            problems: self.problems,
        }
    }
}

/// Verifies every chain of an export (the format of this module's documentation), each
/// as [`crate::verify_with`] does one, against the same trusted keys.
pub fn verify_chains(
    mut reader: impl BufRead,
    trusted_keys: &HashMap<String, Vec<u8>>,
    options: &ChainsOptions,
) -> ChainsReport {
    let mut v = ChainsVerifier::new(trusted_keys, options.clone());
    if let Err((n, e)) = read_lines(&mut reader, |line, bytes, complete| {
        v.line(line, bytes, complete)
    }) {
        v.unreadable(n + 1, &e);
    }
    v.finish()
}
