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
//! out or leaving it away do not change it; any change of meaning does.
//!
//! The ceremony id is the lower-case hex SHA-256 of
//! `"hsm-service ceremony plan v1\n" || canonical form`.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pki::Name;
use crate::signing::{valid_key_name, Algorithm, KeyState, KEY_NAME_RULE};

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

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// A certificate authority key: signs certificates only, never in the JWKS.
    Ca,
    /// A signing key: signs assertions and messages; published in the JWKS.
    Signing,
}

impl Usage {
    /// The name used in plans and transcripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Ca => "ca",
            Usage::Signing => "signing",
        }
    }
}

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
        /// `ca` or `signing`.
        usage: Usage,
        /// Allowed to add a version to a key name that exists already (rotation).
        #[serde(default)]
        new_version: bool,
        /// Long-term keys are never extractable: `true` is refused.
        #[serde(default)]
        extractable: bool,
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
}

fn default_rewrap_batch() -> u32 {
    DEFAULT_REWRAP_BATCH
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
                ..
            } => format!(
                "generate-key {name} {algorithm} usage {}{}",
                usage.as_str(),
                if *new_version { " (new version)" } else { "" }
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
    crate::auth::hex(ctx.finish().as_ref())
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
}

/// What validation knows about a key that a step refers to.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    usage: Option<Usage>,
    state: KeyState,
    certified: bool,
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
                None => versions
                    .iter()
                    .find(|k| k.state == KeyState::Active)
                    .or_else(|| versions.iter().rfind(|k| k.state != KeyState::Destroyed)),
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
                    if t.usage != Some(Usage::Ca) {
                        return Err(bad(
                            i,
                            kind,
                            format!("{key:?} is a signing key; only a ca key is self-signed"),
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
                    if ti.usage != Some(Usage::Ca) {
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
                    if tk.usage != Some(*usage) {
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
        }
    }
    Ok(())
}
