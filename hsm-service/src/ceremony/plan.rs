//! Ceremony plans: the TOML file officers write, its strict parsing, its canonical form
//! and id, and the validation that runs before anything touches the HSM.
//!
//! # Canonical form and id
//!
//! The plan is parsed strictly (unknown keys are refused) into [`Plan`]; every optional
//! key gets its default. The canonical form is that parsed plan serialized as compact
//! JSON (`serde_json`, no whitespace): object keys in the fixed order of the Rust
//! structs (`version`, `description`, `steps`; each step starts with `kind`), every key
//! present (absent optional values are `null`, absent flags `false`), strings
//! JSON-escaped. So comments, key order, whitespace, quoting style and spelling a default
//! out or leaving it away do not change it; any change of meaning does. One exception:
//! `generate-key`'s `backup` is left out when false, so that plans written before it
//! existed keep their ids.
//!
//! The ceremony id is the lower-case hex SHA-256 of
//! `"hsm-service ceremony plan v1\n" || canonical form`.

mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::backup_file::{self, BackupFile};
use super::shares::KekRecord;
use crate::error::{Error, Result};
use crate::signing::{KeyOrigin, KeyState};
pub use validate::validate;

/// Domain separation prefix of the ceremony id hash.
pub const ID_DOMAIN: &[u8] = b"hsm-service ceremony plan v1\n";
/// Largest plan file accepted.
pub const MAX_PLAN_LEN: usize = 64 * 1024;
/// Most steps in one plan.
pub const MAX_STEPS: usize = 64;
/// Default number of credentials re-wrapped per HSM job by `rotate-seed-master-key`.
pub const DEFAULT_REWRAP_BATCH: u32 = 500;
/// Largest `batch_size` of `rotate-seed-master-key`.
pub const MAX_REWRAP_BATCH: u32 = 5000;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most keys one `backup` or `restore` step names.
pub const MAX_BACKUP_KEYS: usize = 64;

/// A ceremony plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Plan format version; must be 1.
    pub version: u32,
    /// What the ceremony is for, in words (part of the id).
    #[serde(default)]
    pub description: String,
    /// The steps, run in order.
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

/// What a key is for: `ca`, `signing`, `raw` or `challenge` (the key's stored, immutable
/// usage).
pub use crate::signing::Usage;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Generate a key pair in the HSM (a new key name, or with `new_version` a new
    /// version of an existing one), then check it.
    GenerateKey {
        /// Key name.
        name: String,
        /// `ES256`, `ES384`, `EdDSA` or `PS256`.
        algorithm: String,
        /// `ca`, `signing`, `raw` or `challenge` (ES256 only).
        usage: Usage,
        /// Allowed to add a version to a key name that exists already (rotation).
        #[serde(default)]
        new_version: bool,
        /// Long-term keys are never extractable: `true` is refused.
        #[serde(default)]
        extractable: bool,
        /// Make the key so that a later `backup` step can wrap it under a trusted backup
        /// KEK (and nothing else can take it off the token).
        #[serde(default, skip_serializing_if = "is_false")]
        backup: bool,
    },
    /// A self-signed CA certificate for a key, stored as its chain.
    SelfSign {
        /// Key name.
        key: String,
        /// Version of a key the plan does not create (absent: the current one).
        #[serde(default)]
        version: Option<u32>,
        /// Subject DN, RFC 4514.
        subject: String,
        /// Validity in days.
        validity_days: u32,
    },
    /// A certificate for `key` issued by `issuer`; the chain is stored for `key`.
    IssueCertificate {
        /// The issuing CA key.
        issuer: String,
        /// Its version when the plan does not create it (absent: the current one).
        #[serde(default)]
        issuer_version: Option<u32>,
        /// The subject key.
        key: String,
        /// Its version when the plan does not create it (absent: the current one).
        #[serde(default)]
        version: Option<u32>,
        /// Subject DN, RFC 4514.
        subject: String,
        /// Validity in days.
        validity_days: u32,
        /// `ca` (an intermediate CA certificate) or `signing`.
        usage: Usage,
        /// DNS subject alternative names.
        #[serde(default)]
        dns_names: Vec<String>,
    },
    /// `pending -> published`.
    Publish {
        /// Key name.
        key: String,
        /// Version when the plan does not create it (absent: the current one).
        #[serde(default)]
        version: Option<u32>,
    },
    /// `published -> active` (the active version becomes verify-only).
    Activate {
        /// Key name.
        key: String,
        /// Version when the plan does not create it (absent: the current one).
        #[serde(default)]
        version: Option<u32>,
    },
    /// `active -> verify-only`.
    Retire {
        /// Key name.
        key: String,
        /// Version when the plan does not create it (absent: the current one).
        #[serde(default)]
        version: Option<u32>,
    },
    /// Destroy a version's HSM objects (refused for the active version).
    Destroy {
        /// Key name.
        key: String,
        /// The version; required (destruction names exactly what it destroys).
        version: u32,
        /// Destroy even though assertions it signed may still be valid (compromise).
        #[serde(default)]
        force: bool,
    },
    /// Create seed master key version N+1 and re-wrap every credential seed under it
    /// inside the HSM; new enrolments use it at once. The old master key is kept
    /// (destroying it is a later, separate decision).
    RotateSeedMasterKey {
        /// Credentials re-wrapped per HSM job (1 to [`MAX_REWRAP_BATCH`]).
        #[serde(default = "default_rewrap_batch")]
        batch_size: u32,
    },
    /// Wrap the current version of each named key (generated with `backup = true`)
    /// under the trusted backup KEK `kek` and write them to the new backup file `file`
    /// in the service's backup directory.
    Backup {
        /// Key names.
        keys: Vec<String>,
        /// Label of the trusted backup KEK (made by `hsm-service backup-kek`).
        kek: String,
        /// File name in the backup directory; an existing file is never overwritten.
        file: String,
    },
    /// Put keys from the backup file `file` (in the service's backup directory) onto
    /// the token with their names, versions and the usages the file records, in state
    /// `pending`, unwrapped under the KEK recombined from the shares the approving
    /// officers handed in.
    Restore {
        /// File name in the backup directory.
        file: String,
        /// SHA-256 of the file (lower-case hex), as the backup's transcript shows it:
        /// the approvals bind to exactly that file.
        sha256: String,
        /// Key names to restore (empty: every key in the file).
        #[serde(default)]
        keys: Vec<String>,
    },
}

fn default_rewrap_batch() -> u32 {
    DEFAULT_REWRAP_BATCH
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Check a file name of the backup directory: 1 to 128 of `A-Z a-z 0-9 - _ .`, not
/// starting with a dot (so never a path).
pub fn check_backup_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "backup file name {name:?}: 1 to 128 of A-Z a-z 0-9 - _ . and not starting with a dot"
        )))
    }
}

/// Read backup file `name` from `dir`, check its SHA-256 against `sha256` and parse it.
pub fn read_backup_file(dir: &std::path::Path, name: &str, sha256: &str) -> Result<BackupFile> {
    check_backup_file_name(name)?;
    let path = dir.join(name);
    let meta = std::fs::metadata(&path)
        .map_err(|e| Error::FailedPrecondition(format!("backup file {}: {e}", path.display())))?;
    if meta.len() > backup_file::MAX_BACKUP_LEN as u64 {
        return Err(Error::InvalidArgument(format!(
            "backup file {} is larger than {} bytes",
            path.display(),
            backup_file::MAX_BACKUP_LEN
        )));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::FailedPrecondition(format!("backup file {}: {e}", path.display())))?;
    let actual = backup_file::sha256_hex(&text);
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(Error::FailedPrecondition(format!(
            "backup file {} has SHA-256 {actual}, the plan names {sha256}",
            path.display()
        )));
    }
    BackupFile::parse(&text)
}

impl Step {
    /// The step's kind as written in plans.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::GenerateKey { .. } => "generate-key",
            Step::SelfSign { .. } => "self-sign",
            Step::IssueCertificate { .. } => "issue-certificate",
            Step::Publish { .. } => "publish",
            Step::Activate { .. } => "activate",
            Step::Retire { .. } => "retire",
            Step::Destroy { .. } => "destroy",
            Step::RotateSeedMasterKey { .. } => "rotate-seed-master-key",
            Step::Backup { .. } => "backup",
            Step::Restore { .. } => "restore",
        }
    }

    /// One line for people: the kind and its main arguments.
    pub fn summary(&self) -> String {
        let v = |version: &Option<u32>| version.map(|v| format!(" v{v}")).unwrap_or_default();
        match self {
            Step::GenerateKey {
                name,
                algorithm,
                usage,
                new_version,
                backup,
                ..
            } => format!(
                "generate-key {name} {algorithm} usage {}{}{}",
                usage.as_str(),
                if *new_version { " (new version)" } else { "" },
                if *backup { " (for backup)" } else { "" }
            ),
            Step::SelfSign {
                key,
                version,
                subject,
                validity_days,
            } => format!(
                "self-sign {key}{} subject {subject:?} for {validity_days} days",
                v(version)
            ),
            Step::IssueCertificate {
                issuer,
                issuer_version,
                key,
                version,
                subject,
                validity_days,
                usage,
                ..
            } => format!(
                "issue-certificate for {key}{} by {issuer}{} subject {subject:?} for {validity_days} days, usage {}",
                v(version),
                v(issuer_version),
                usage.as_str()
            ),
            Step::Publish { key, version } => format!("publish {key}{}", v(version)),
            Step::Activate { key, version } => format!("activate {key}{}", v(version)),
            Step::Retire { key, version } => format!("retire {key}{}", v(version)),
            Step::Destroy {
                key,
                version,
                force,
            } => format!(
                "destroy {key} v{version}{}",
                if *force { " (forced)" } else { "" }
            ),
            Step::RotateSeedMasterKey { batch_size } => {
                format!("rotate-seed-master-key (re-wrap all credential seeds, {batch_size} per batch)")
            }
            Step::Backup { keys, kek, file } => {
                format!("backup {} under KEK {kek} to {file}", keys.join(", "))
            }
            Step::Restore { file, sha256, keys } => format!(
                "restore {} from {file} (SHA-256 {sha256})",
                if keys.is_empty() {
                    "every key".to_owned()
                } else {
                    keys.join(", ")
                }
            ),
        }
    }
}

/// Parse a plan file strictly. Syntax errors and unknown keys are INVALID_ARGUMENT.
pub fn parse(text: &str) -> Result<Plan> {
    if text.len() > MAX_PLAN_LEN {
        return Err(Error::InvalidArgument(format!(
            "plan is {} bytes, the limit is {MAX_PLAN_LEN}",
            text.len()
        )));
    }
    toml::from_str::<Plan>(text).map_err(|e| {
        let line = e
            .span()
            .map_or(1, |s| text[..s.start].matches('\n').count() + 1);
        Error::InvalidArgument(format!(
            "plan, line {line}: {}",
            e.message().trim().replace('\n', " ")
        ))
    })
}

/// The canonical form of a parsed plan (see the module documentation).
pub fn canonical(plan: &Plan) -> Result<String> {
    serde_json::to_string(plan).map_err(|e| Error::Internal(format!("canonical plan: {e}")))
}

/// The ceremony id of a canonical form: lower-case hex SHA-256 with [`ID_DOMAIN`].
pub fn id_of(canonical: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ID_DOMAIN);
    ctx.update(canonical.as_bytes());
    crate::common::hex(ctx.finish().as_ref())
}

/// Parse the plan from its canonical form (as stored).
pub fn from_canonical(canonical: &str) -> Result<Plan> {
    serde_json::from_str(canonical)
        .map_err(|e| Error::Internal(format!("stored canonical plan does not parse: {e}")))
}

/// A key version the service has, as validation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingKey {
    /// Version.
    pub version: u32,
    /// State.
    pub state: KeyState,
    /// How it came to be on the token.
    pub origin: KeyOrigin,
    /// What it signs (every version of a name has the same usage).
    pub usage: Usage,
}

/// What validation checks a plan against.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Longest certificate validity, in days (`[ceremony] max_validity_days`).
    pub max_validity_days: u32,
    /// The service's key versions by name.
    pub existing: BTreeMap<String, Vec<ExistingKey>>,
    /// The ceremony service can rotate the seed master key (it holds the credentials'
    /// master key version).
    pub seed_rotation: bool,
    /// The trusted backup KEKs provisioned on this token, by label.
    pub keks: BTreeMap<String, KekRecord>,
    /// Where `backup` writes and `restore` reads backup files.
    pub backup_dir: PathBuf,
}
