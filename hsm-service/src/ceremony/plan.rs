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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::backup_file::{self, BackupFile};
use super::shares::{check_kek_label, KekRecord};
use crate::error::{Error, Result};
use crate::pki::Name;
use crate::signing::{valid_key_name, Algorithm, KeyOrigin, KeyState, KEY_NAME_RULE};

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
const MAX_DESCRIPTION_LEN: usize = 1024;
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

/// What a key is for: `ca`, `signing` or `raw` (the key's stored, immutable usage).
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
        /// `ca`, `signing` or `raw`.
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
    /// the token with their names and versions, in state `pending`, unwrapped under the
    /// KEK recombined from the shares the approving officers handed in.
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
}

/// The version a reference without a version means: the active one, else the newest
/// one not destroyed, else the newest.
fn current(versions: &[ExistingKey]) -> Option<&ExistingKey> {
    versions
        .iter()
        .find(|k| k.state == KeyState::Active)
        .or_else(|| versions.iter().rfind(|k| k.state != KeyState::Destroyed))
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

/// What validation knows about a key that a step refers to.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// None for a restored key (its usage is not recorded).
    usage: Option<Usage>,
    state: KeyState,
    certified: bool,
    backup: bool,
}

fn bad(step: usize, kind: &str, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("step {} ({kind}): {msg}", step + 1))
}

/// Check a plan against the service's keys and limits, without touching the HSM.
/// Every refusal is INVALID_ARGUMENT naming the step (1-based) and the reason.
pub fn validate(plan: &Plan, ctx: &Context) -> Result<()> {
    if plan.version != 1 {
        return Err(Error::InvalidArgument(format!(
            "plan version {} is not supported (expected 1)",
            plan.version
        )));
    }
    if plan.description.len() > MAX_DESCRIPTION_LEN {
        return Err(Error::InvalidArgument(format!(
            "description is longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    if plan.steps.is_empty() {
        return Err(Error::InvalidArgument("plan has no [[step]]".into()));
    }
    if plan.steps.len() > MAX_STEPS {
        return Err(Error::InvalidArgument(format!(
            "plan has {} steps, the limit is {MAX_STEPS}",
            plan.steps.len()
        )));
    }
    // Keys the plan creates, by name: what validation knows about the new version.
    let mut created: HashMap<String, Tracked> = HashMap::new();
    let mut rotation: Option<usize> = None;
    // Backup files the plan writes.
    let mut files: BTreeSet<String> = BTreeSet::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let kind = step.kind();
        // A reference to a key: created earlier in the plan, or found on the service.
        let lookup = |created: &HashMap<String, Tracked>,
                      role: &str,
                      name: &str,
                      version: &Option<u32>|
         -> Result<Option<Tracked>> {
            if let Some(t) = created.get(name) {
                if version.is_some() {
                    return Err(bad(
                        i,
                        kind,
                        format!("{role} {name:?} is created by this plan; give no version"),
                    ));
                }
                return Ok(Some(*t));
            }
            let Some(versions) = ctx.existing.get(name) else {
                return Err(bad(
                    i,
                    kind,
                    format!(
                        "{role} {name:?} is neither created by an earlier step nor a key of the service"
                    ),
                ));
            };
            let found = match version {
                Some(v) => versions.iter().find(|k| k.version == *v),
                None => current(versions),
            };
            match found {
                None => Err(bad(
                    i,
                    kind,
                    match version {
                        Some(v) => format!("{role} {name:?} has no version {v}"),
                        None => format!("{role} {name:?} has no version that is not destroyed"),
                    },
                )),
                Some(k) if k.state == KeyState::Destroyed => Err(bad(
                    i,
                    kind,
                    format!("{role} {name:?} v{} is destroyed", k.version),
                )),
                Some(_) => Ok(None),
            }
        };
        let validity = |days: u32| -> Result<()> {
            if days == 0 || days > ctx.max_validity_days {
                return Err(bad(
                    i,
                    kind,
                    format!(
                        "validity_days {days} must be between 1 and {} (ceremony.max_validity_days)",
                        ctx.max_validity_days
                    ),
                ));
            }
            Ok(())
        };
        let subject_ok = |subject: &str| -> Result<()> {
            Name::from_str(subject)
                .map(|_| ())
                .map_err(|e| bad(i, kind, format!("subject {subject:?}: {e}")))
        };
        match step {
            Step::GenerateKey {
                name,
                algorithm,
                usage,
                new_version,
                extractable,
                backup,
            } => {
                if !valid_key_name(name) {
                    return Err(bad(i, kind, format!("name {name:?}: {KEY_NAME_RULE}")));
                }
                Algorithm::from_str(algorithm).map_err(|e| bad(i, kind, e))?;
                if *extractable {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "{name:?}: long-term keys are generated non-extractable; extractable = true is refused"
                        ),
                    ));
                }
                if created.contains_key(name) {
                    return Err(bad(
                        i,
                        kind,
                        format!("duplicate key name {name:?}: an earlier step generates it"),
                    ));
                }
                if ctx.existing.contains_key(name) && !new_version {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "key {name:?} exists already; a ceremony never overwrites a key \
                             (set new_version = true to add a version, i.e. rotate)"
                        ),
                    ));
                }
                created.insert(
                    name.clone(),
                    Tracked {
                        usage: Some(*usage),
                        state: KeyState::Pending,
                        certified: false,
                        backup: *backup,
                    },
                );
            }
            Step::SelfSign {
                key,
                version,
                subject,
                validity_days,
            } => {
                let t = lookup(&created, "key", key, version)?;
                validity(*validity_days)?;
                subject_ok(subject)?;
                if let Some(mut t) = t {
                    if let Some(u) = t.usage.filter(|u| *u != Usage::Ca) {
                        return Err(bad(
                            i,
                            kind,
                            format!("{key:?} is a {u} key; only a ca key is self-signed"),
                        ));
                    }
                    t.certified = true;
                    created.insert(key.clone(), t);
                }
            }
            Step::IssueCertificate {
                issuer,
                issuer_version,
                key,
                version,
                subject,
                validity_days,
                usage,
                dns_names,
            } => {
                let ti = lookup(&created, "issuer", issuer, issuer_version)?;
                let tk = lookup(&created, "key", key, version)?;
                if issuer == key {
                    return Err(bad(
                        i,
                        kind,
                        "issuer and key are the same key (use self-sign)",
                    ));
                }
                validity(*validity_days)?;
                subject_ok(subject)?;
                if dns_names.iter().any(|d| d.is_empty() || d.len() > 253) {
                    return Err(bad(
                        i,
                        kind,
                        "dns_names entries must be 1 to 253 characters",
                    ));
                }
                if let Some(ti) = ti {
                    if ti.usage.is_some_and(|u| u != Usage::Ca) {
                        return Err(bad(i, kind, format!("issuer {issuer:?} is not a ca key")));
                    }
                    if !ti.certified {
                        return Err(bad(
                            i,
                            kind,
                            format!("issuer {issuer:?} has no certificate yet; self-sign or certify it in an earlier step"),
                        ));
                    }
                }
                if let Some(mut tk) = tk {
                    // A restored key's usage is not recorded: the plan's word counts.
                    if tk.usage.is_some_and(|u| u != *usage) {
                        return Err(bad(
                            i,
                            kind,
                            format!(
                                "usage {} does not match the usage {} that {key:?} was generated with",
                                usage.as_str(),
                                tk.usage.map_or("?", Usage::as_str)
                            ),
                        ));
                    }
                    tk.certified = true;
                    created.insert(key.clone(), tk);
                }
            }
            Step::Publish { key, version }
            | Step::Activate { key, version }
            | Step::Retire { key, version } => {
                if let Some(mut t) = lookup(&created, "key", key, version)? {
                    if t.usage == Some(Usage::Ca) {
                        return Err(bad(
                            i,
                            kind,
                            format!(
                                "{key:?} is a ca key; ca keys are never published or activated"
                            ),
                        ));
                    }
                    let (from, to) = match step {
                        Step::Publish { .. } => (KeyState::Pending, KeyState::Published),
                        Step::Activate { .. } => (KeyState::Published, KeyState::Active),
                        _ => (KeyState::Active, KeyState::VerifyOnly),
                    };
                    if t.state != from {
                        return Err(bad(
                            i,
                            kind,
                            format!("{key:?} will be {} at this step, not {from}", t.state),
                        ));
                    }
                    t.state = to;
                    created.insert(key.clone(), t);
                }
            }
            Step::Destroy { key, version, .. } => {
                if created.contains_key(key) {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "{key:?} is created by this plan; a plan does not destroy its own keys"
                        ),
                    ));
                }
                lookup(&created, "key", key, &Some(*version))?;
            }
            Step::RotateSeedMasterKey { batch_size } => {
                if !(1..=MAX_REWRAP_BATCH).contains(batch_size) {
                    return Err(bad(
                        i,
                        kind,
                        format!("batch_size {batch_size} must be between 1 and {MAX_REWRAP_BATCH}"),
                    ));
                }
                if let Some(first) = rotation {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "step {} rotates the seed master key already; a plan rotates it once",
                            first + 1
                        ),
                    ));
                }
                if !ctx.seed_rotation {
                    return Err(bad(
                        i,
                        kind,
                        "this service has no credential seed master key to rotate",
                    ));
                }
                rotation = Some(i);
            }
            Step::Backup { keys, kek, file } => {
                if keys.is_empty() || keys.len() > MAX_BACKUP_KEYS {
                    return Err(bad(
                        i,
                        kind,
                        format!("keys must name 1 to {MAX_BACKUP_KEYS} keys"),
                    ));
                }
                let mut seen = BTreeSet::new();
                for name in keys {
                    if !seen.insert(name) {
                        return Err(bad(i, kind, format!("key {name:?} named twice")));
                    }
                    let for_backup = match lookup(&created, "key", name, &None)? {
                        Some(t) => t.backup,
                        None => ctx
                            .existing
                            .get(name)
                            .and_then(|v| current(v))
                            .is_some_and(|k| k.origin == KeyOrigin::GeneratedForBackup),
                    };
                    if !for_backup {
                        return Err(bad(
                            i,
                            kind,
                            format!(
                                "{name:?} was not generated for backup (generate-key with backup = true); \
                                 it never leaves the HSM"
                            ),
                        ));
                    }
                }
                check_kek_label(kek).map_err(|e| bad(i, kind, e))?;
                if !ctx.keks.contains_key(kek) {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "KEK {kek:?} is not provisioned on this token \
                             (hsm-service backup-kek, with the service stopped)"
                        ),
                    ));
                }
                check_backup_file_name(file).map_err(|e| bad(i, kind, e))?;
                if !files.insert(file.clone()) {
                    return Err(bad(
                        i,
                        kind,
                        format!("an earlier step uses backup file {file:?}"),
                    ));
                }
                if ctx.backup_dir.join(file).exists() {
                    return Err(bad(
                        i,
                        kind,
                        format!(
                            "backup file {file:?} exists already; backup files are never overwritten"
                        ),
                    ));
                }
            }
            Step::Restore { file, sha256, keys } => {
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(i, kind, "sha256 must be 64 hex digits"));
                }
                if keys.len() > MAX_BACKUP_KEYS {
                    return Err(bad(
                        i,
                        kind,
                        format!("keys names more than {MAX_BACKUP_KEYS} keys"),
                    ));
                }
                if files.contains(file) {
                    return Err(bad(
                        i,
                        kind,
                        format!("backup file {file:?} is written by this plan"),
                    ));
                }
                let backup =
                    read_backup_file(&ctx.backup_dir, file, sha256).map_err(|e| bad(i, kind, e))?;
                let entries = if keys.is_empty() {
                    backup.keys.iter().collect::<Vec<_>>()
                } else {
                    let mut seen = BTreeSet::new();
                    keys.iter()
                        .map(|name| {
                            if !seen.insert(name) {
                                return Err(bad(i, kind, format!("key {name:?} named twice")));
                            }
                            backup.key(name, None).map_err(|e| bad(i, kind, e))
                        })
                        .collect::<Result<Vec<_>>>()?
                };
                for e in entries {
                    if created.contains_key(&e.name) {
                        return Err(bad(
                            i,
                            kind,
                            format!("{:?} is created by an earlier step", e.name),
                        ));
                    }
                    if ctx
                        .existing
                        .get(&e.name)
                        .is_some_and(|v| v.iter().any(|k| k.version == e.version))
                    {
                        return Err(bad(
                            i,
                            kind,
                            format!(
                                "{} v{} exists on this service; a restore never replaces a key",
                                e.name, e.version
                            ),
                        ));
                    }
                    Algorithm::from_str(&e.algorithm).map_err(|err| bad(i, kind, err))?;
                    created.insert(
                        e.name.clone(),
                        Tracked {
                            usage: None,
                            state: KeyState::Pending,
                            certified: !e.certificate_chain.is_empty(),
                            backup: false,
                        },
                    );
                }
            }
        }
    }
    Ok(())
}
