//! The transcript of an execution: the evidence officers keep. JSON for machines, text
//! for people, with every fingerprint also as words (see [`super::words`]) to read aloud.
//!
//! It holds only public material: the plan, who approved and executed, each step and
//! its outcome, and for each key its CKA_ID, `kid`, public key (PEM) and fingerprints,
//! its checks, and the certificates made (PEM and fingerprints).

use serde::{Deserialize, Serialize};

use super::plan::{Plan, Step};
use super::record::{CeremonyRecord, Officer};
use super::words::to_words;
use crate::common::hex;
use crate::error::{Error, Result};
use crate::pki::{sha256_fingerprint, to_pem};
use crate::signing::{KeyState, KeyVersion, SelfTest};

/// Format tag of the transcript JSON.
pub const FORMAT: &str = "hsm-service ceremony transcript v1";

/// A SHA-256 fingerprint in the forms people compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Upper-case hex pairs with colons, as `openssl x509 -fingerprint -sha256` prints.
    pub sha256: String,
    /// The 32 bytes as words, to read aloud.
    pub words: String,
}

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Fingerprint {
            sha256: sha256_fingerprint(der),
            words: to_words(digest.as_ref()),
        }
    }
}

/// A key version as the transcript shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Key name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// State after the step.
    pub state: String,
    /// JWS algorithm.
    pub algorithm: String,
    /// CKA_ID, hex.
    pub key_id: String,
    /// `kid`.
    pub kid: String,
    /// Public key, PEM SubjectPublicKeyInfo.
    pub public_key_pem: String,
    /// Fingerprint of the public key DER.
    pub public_key_fingerprint: Fingerprint,
}

impl KeyEntry {
    fn of(k: &KeyVersion) -> KeyEntry {
        KeyEntry {
            name: k.name.clone(),
            version: k.version,
            state: k.state.as_str().to_owned(),
            algorithm: k.algorithm.jws_name().to_owned(),
            key_id: hex(&k.key_id),
            kid: k.kid.clone(),
            public_key_pem: to_pem("PUBLIC KEY", &k.public_key_der),
            public_key_fingerprint: Fingerprint::of(&k.public_key_der),
        }
    }
}

/// The checks of a generated key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck {
    /// The token's public key equals the recorded one.
    pub public_key_matches: bool,
    /// The domain-separated test signature verified under the recorded public key.
    pub signature_verifies: bool,
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: bool,
    /// CKA_LOCAL.
    pub local: bool,
    /// CKA_SIGN and not CKA_DECRYPT.
    pub sign_only: bool,
    /// CKA_WRAP_WITH_TRUSTED.
    pub wrap_with_trusted: bool,
    /// `generated`, `generated-for-backup` or `restored`: what the checks expect.
    pub origin: String,
    /// Empty when every check passed.
    pub problem: String,
}

/// A certificate made by a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateEntry {
    /// The key it certifies (`name/vN`).
    pub key: String,
    /// Position in the stored chain (0: the leaf).
    pub position: usize,
    /// PEM.
    pub pem: String,
    /// Fingerprint of the DER.
    pub fingerprint: Fingerprint,
}

/// A state change made by a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// `name/vN`.
    pub key: String,
    /// State before (empty: the key was new).
    pub from: String,
    /// State after.
    pub to: String,
}

pub use crate::credentials::rotation::SeedRotation;

/// What a `backup` step wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupWritten {
    /// File name in the backup directory.
    pub file: String,
    /// SHA-256 of the file, lower-case hex: what a `restore` step names.
    pub sha256: String,
    /// The same as words, to read aloud.
    pub sha256_words: String,
    /// Label of the KEK the keys are wrapped under.
    pub kek_label: String,
    /// Its check value.
    pub kek_check: String,
    /// The keys, `name/vN kid`.
    pub keys: Vec<String>,
}

/// One step and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    /// 1-based.
    pub number: usize,
    /// Step kind.
    pub kind: String,
    /// One line.
    pub summary: String,
    /// `ok`, `failed`, `not run`, or `unknown` (the execution was interrupted).
    pub outcome: String,
    /// Why it failed.
    pub error: String,
    /// Keys generated.
    pub keys: Vec<KeyEntry>,
    /// Checks of the keys generated.
    pub checks: Vec<KeyCheck>,
    /// Certificates made.
    pub certificates: Vec<CertificateEntry>,
    /// State changes.
    pub state_changes: Vec<StateChange>,
    /// The seed master key rotation, for a `rotate-seed-master-key` step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_rotation: Option<SeedRotation>,
    /// The file a `backup` step wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupWritten>,
}

/// An approval as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalEntry {
    /// Certificate subject.
    pub subject: String,
    /// Certificate SHA-256, hex.
    pub fingerprint: String,
    /// Unix seconds.
    pub approved_at: u64,
}

/// The whole transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    /// [`FORMAT`].
    pub format: String,
    /// Ceremony id (hex SHA-256 of the canonical plan).
    pub ceremony_id: String,
    /// The id as words.
    pub ceremony_id_words: String,
    /// Plan description.
    pub description: String,
    /// The canonical plan (what was approved).
    pub canonical_plan: String,
    /// Who proposed it.
    pub proposed_by: Officer,
    /// The approvals on record when execution started.
    pub approvals: Vec<ApprovalEntry>,
    /// Who executed it.
    pub executed_by: Option<Officer>,
    /// Unix seconds of start and end.
    pub started_at: u64,
    /// Unix seconds of the end.
    pub finished_at: u64,
    /// `succeeded` or `failed`.
    pub outcome: String,
    /// Which step failed and why.
    pub failure: String,
    /// Every step, run or not.
    pub steps: Vec<StepEntry>,
    /// Every key version the ceremony created, whatever happened afterwards.
    pub created_keys: Vec<KeyEntry>,
}

/// A hex digest (a ceremony id, a file hash) as words.
fn id_words(id: &str) -> String {
    let bytes: Vec<u8> = (0..id.len() / 2)
        .filter_map(|i| u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    to_words(&bytes)
}

impl Transcript {
    /// A transcript for `rec` about to run `plan`; every step `not run` yet.
    pub fn start(rec: &CeremonyRecord, plan: &Plan, now: u64) -> Transcript {
        Transcript {
            format: FORMAT.to_owned(),
            ceremony_id: rec.id.clone(),
            ceremony_id_words: id_words(&rec.id),
            description: plan.description.clone(),
            canonical_plan: rec.canonical_plan.clone(),
            proposed_by: rec.proposed_by.clone(),
            approvals: rec
                .approvals
                .iter()
                .map(|a| ApprovalEntry {
                    subject: a.officer.subject.clone(),
                    fingerprint: a.officer.fingerprint.clone(),
                    approved_at: a.approved_at,
                })
                .collect(),
            executed_by: rec.executed_by.clone(),
            started_at: now,
            finished_at: 0,
            outcome: String::new(),
            failure: String::new(),
            steps: plan
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepEntry {
                    number: i + 1,
                    kind: s.kind().to_owned(),
                    summary: s.summary(),
                    outcome: "not run".to_owned(),
                    error: String::new(),
                    keys: Vec::new(),
                    checks: Vec::new(),
                    certificates: Vec::new(),
                    state_changes: Vec::new(),
                    seed_rotation: None,
                    backup: None,
                })
                .collect(),
            created_keys: Vec::new(),
        }
    }

    /// Step `i` starts; returns its index.
    pub fn begin_step(&mut self, i: usize, _step: &Step) -> usize {
        i
    }

    /// Step `i` ended, with an error or not.
    pub fn end_step(&mut self, i: usize, error: Option<String>) {
        if let Some(s) = self.steps.get_mut(i) {
            match error {
                None => s.outcome = "ok".to_owned(),
                Some(e) => {
                    s.outcome = "failed".to_owned();
                    s.error = e;
                }
            }
        }
    }

    /// Step `i` created `k`.
    pub fn key_created(&mut self, i: usize, k: &KeyVersion) {
        let entry = KeyEntry::of(k);
        self.created_keys.push(entry.clone());
        if let Some(s) = self.steps.get_mut(i) {
            s.keys.push(entry);
            s.state_changes.push(StateChange {
                key: format!("{}/v{}", k.name, k.version),
                from: String::new(),
                to: k.state.as_str().to_owned(),
            });
        }
    }

    /// Step `i` checked its new key.
    pub fn key_checked(&mut self, i: usize, c: &SelfTest) {
        if let Some(s) = self.steps.get_mut(i) {
            s.checks.push(KeyCheck {
                public_key_matches: c.public_key_matches,
                signature_verifies: c.signature_verifies,
                token: c.token,
                sensitive: c.sensitive,
                extractable: c.extractable,
                never_extractable: c.never_extractable,
                local: c.local,
                sign_only: c.sign && !c.decrypt,
                wrap_with_trusted: c.wrap_with_trusted,
                origin: c.origin.as_str().to_owned(),
                problem: c.problem().unwrap_or_default(),
            });
        }
    }

    /// Step `i` stored `chain` (leaf first) for `k`.
    pub fn certificate(&mut self, i: usize, k: &KeyVersion, chain: &[Vec<u8>]) {
        if let Some(s) = self.steps.get_mut(i) {
            for (position, der) in chain.iter().enumerate() {
                s.certificates.push(CertificateEntry {
                    key: format!("{}/v{}", k.name, k.version),
                    position,
                    pem: to_pem("CERTIFICATE", der),
                    fingerprint: Fingerprint::of(der),
                });
            }
        }
    }

    /// Step `i` moved `k` from `from` to its current state.
    pub fn state_change(&mut self, i: usize, k: &KeyVersion, from: Option<KeyState>) {
        if let Some(s) = self.steps.get_mut(i) {
            s.state_changes.push(StateChange {
                key: format!("{}/v{}", k.name, k.version),
                from: from.map(|f| f.as_str().to_owned()).unwrap_or_default(),
                to: k.state.as_str().to_owned(),
            });
        }
    }

    /// Step `i` rotated the seed master key.
    pub fn seed_rotation(&mut self, i: usize, r: SeedRotation) {
        if let Some(s) = self.steps.get_mut(i) {
            s.seed_rotation = Some(r);
        }
    }

    /// Step `i` wrote backup file `file` (`sha256` of its text).
    pub fn backup_written(
        &mut self,
        i: usize,
        file: &str,
        b: &super::backup_file::BackupFile,
        sha256: &str,
    ) {
        if let Some(s) = self.steps.get_mut(i) {
            s.backup = Some(BackupWritten {
                file: file.to_owned(),
                sha256: sha256.to_owned(),
                sha256_words: id_words(sha256),
                kek_label: b.kek_label.clone(),
                kek_check: b.kek_check.clone(),
                keys: b
                    .keys
                    .iter()
                    .map(|k| format!("{}/v{}", k.name, k.version))
                    .collect(),
            });
        }
    }

    /// The execution was cut short (the service stopped mid-run): which steps ran is
    /// not known, so each is `unknown`; `keys` are the versions it recorded as created.
    pub fn interrupted(&mut self, keys: &[KeyVersion]) {
        for s in &mut self.steps {
            s.outcome = "unknown".to_owned();
        }
        self.created_keys = keys.iter().map(KeyEntry::of).collect();
    }

    /// The execution ended; `rec` holds the final state and failure.
    pub fn finish(&mut self, rec: &CeremonyRecord, now: u64) {
        self.finished_at = now;
        self.outcome = rec.state.as_str().to_owned();
        self.failure = rec.failure.clone();
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Error::Internal(format!("transcript: {e}")))
    }

    /// The text form, for people and for reading aloud.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "KEY CEREMONY TRANSCRIPT ({})", self.format);
        let _ = writeln!(o, "ceremony id: {}", self.ceremony_id);
        let _ = writeln!(o, "  as words:  {}", self.ceremony_id_words);
        let _ = writeln!(o, "description: {}", self.description);
        let _ = writeln!(o, "outcome:     {}", self.outcome);
        if !self.failure.is_empty() {
            let _ = writeln!(o, "failure:     {}", self.failure);
        }
        let _ = writeln!(
            o,
            "proposed by: {} ({})",
            self.proposed_by.subject, self.proposed_by.fingerprint
        );
        for a in &self.approvals {
            let _ = writeln!(
                o,
                "approved by: {} ({}) at {}",
                a.subject, a.fingerprint, a.approved_at
            );
        }
        if let Some(e) = &self.executed_by {
            let _ = writeln!(o, "executed by: {} ({})", e.subject, e.fingerprint);
        }
        let _ = writeln!(
            o,
            "started at {}, finished at {}",
            self.started_at, self.finished_at
        );
        for s in &self.steps {
            let _ = writeln!(o, "\nstep {}: {} -- {}", s.number, s.summary, s.outcome);
            if !s.error.is_empty() {
                let _ = writeln!(o, "  error: {}", s.error);
            }
            for k in &s.keys {
                let _ = writeln!(
                    o,
                    "  key {} v{} {} kid {} CKA_ID {}",
                    k.name, k.version, k.algorithm, k.kid, k.key_id
                );
                let _ = writeln!(
                    o,
                    "  public key SHA-256: {}",
                    k.public_key_fingerprint.sha256
                );
                let _ = writeln!(o, "    as words: {}", k.public_key_fingerprint.words);
                o.push_str(&k.public_key_pem);
            }
            for c in &s.checks {
                let _ = writeln!(
                    o,
                    "  checks ({}): public key matches {}, test signature verifies {}, token {}, \
                     sensitive {}, extractable {}, never extractable {}, wrap with trusted {}, \
                     local {}, sign-only {}",
                    c.origin,
                    c.public_key_matches,
                    c.signature_verifies,
                    c.token,
                    c.sensitive,
                    c.extractable,
                    c.never_extractable,
                    c.wrap_with_trusted,
                    c.local,
                    c.sign_only
                );
            }
            for c in &s.certificates {
                let _ = writeln!(
                    o,
                    "  certificate {} [{}] SHA-256: {}",
                    c.key, c.position, c.fingerprint.sha256
                );
                let _ = writeln!(o, "    as words: {}", c.fingerprint.words);
                o.push_str(&c.pem);
            }
            if let Some(r) = &s.seed_rotation {
                let _ = writeln!(
                    o,
                    "  seed master key {} -> {}: {} credential(s) re-wrapped, {} already under the new key; {} kept",
                    r.old_key_label, r.new_key_label, r.rewrapped, r.already_rewrapped, r.old_key_label
                );
            }
            if let Some(b) = &s.backup {
                let _ = writeln!(
                    o,
                    "  backup file {} under KEK {} (check {}): {}",
                    b.file,
                    b.kek_label,
                    b.kek_check,
                    b.keys.join(", ")
                );
                let _ = writeln!(o, "  backup file SHA-256: {}", b.sha256);
                let _ = writeln!(o, "    as words: {}", b.sha256_words);
            }
            for c in &s.state_changes {
                let from = if c.from.is_empty() { "new" } else { &c.from };
                let _ = writeln!(o, "  {}: {} -> {}", c.key, from, c.to);
            }
        }
        let _ = writeln!(o, "\nkeys created by this ceremony:");
        for k in &self.created_keys {
            let _ = writeln!(
                o,
                "  {} v{} kid {} public key SHA-256 {}",
                k.name, k.version, k.kid, k.public_key_fingerprint.sha256
            );
        }
        o
    }
}
