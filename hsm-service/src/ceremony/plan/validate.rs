//! Validation of a plan before anything touches the HSM: the plan-wide limits, then
//! each step in order by its own validator, which sees what the earlier steps create.
//! Every refusal is INVALID_ARGUMENT naming the step (1-based) and the reason.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

use super::{
    check_backup_file_name, read_backup_file, Context, ExistingKey, Plan, Step, Usage,
    MAX_BACKUP_KEYS, MAX_DESCRIPTION_LEN, MAX_REWRAP_BATCH, MAX_STEPS,
};
use crate::ceremony::shares::check_kek_label;
use crate::error::{Error, Result};
use crate::pki::Name;
use crate::signing::{valid_key_name, Algorithm, KeyOrigin, KeyState, KEY_NAME_RULE};

/// The version a reference without a version means: the active one, else the newest
/// one not destroyed, else the newest.
fn current(versions: &[ExistingKey]) -> Option<&ExistingKey> {
    versions
        .iter()
        .find(|k| k.state == KeyState::Active)
        .or_else(|| versions.iter().rfind(|k| k.state != KeyState::Destroyed))
}

/// What validation knows about a key that a step refers to.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// None for a key restored from a format-1 backup file (its usage is not recorded
    /// there; the restore infers it).
    usage: Option<Usage>,
    state: KeyState,
    certified: bool,
    backup: bool,
}

/// Check a plan against the service's keys and limits, without touching the HSM.
/// Every refusal is INVALID_ARGUMENT naming the step (1-based) and the reason.
pub fn validate(plan: &Plan, ctx: &Context) -> Result<()> {
    check_limits(plan)?;
    let mut v = Validation {
        ctx,
        created: HashMap::new(),
        rotation: None,
        files: BTreeSet::new(),
    };
    for (i, step) in plan.steps.iter().enumerate() {
        v.step(&At { index: i, step })?;
    }
    Ok(())
}

/// The plan-wide limits: version, description, number of steps.
fn check_limits(plan: &Plan) -> Result<()> {
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
    Ok(())
}

/// The step being validated, for its refusals.
struct At<'a> {
    index: usize,
    step: &'a Step,
}

impl At<'_> {
    /// A refusal of this step.
    fn bad(&self, msg: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(format!(
            "step {} ({}): {msg}",
            self.index + 1,
            self.step.kind()
        ))
    }
}

/// What the steps validated so far leave behind.
struct Validation<'c> {
    ctx: &'c Context,
    /// Keys the plan creates, by name: what validation knows about the new version.
    created: HashMap<String, Tracked>,
    /// The step that rotates the seed master key, if one does.
    rotation: Option<usize>,
    /// Backup files the plan writes.
    files: BTreeSet<String>,
}

impl Validation<'_> {
    /// Validate one step, by its kind.
    fn step(&mut self, at: &At<'_>) -> Result<()> {
        match at.step {
            Step::GenerateKey {
                name,
                algorithm,
                usage,
                new_version,
                extractable,
                backup,
            } => self.generate_key(
                at,
                name,
                algorithm,
                *usage,
                *new_version,
                *extractable,
                *backup,
            ),
            Step::SelfSign {
                key,
                version,
                subject,
                validity_days,
            } => self.self_sign(at, key, version, subject, *validity_days),
            Step::IssueCertificate {
                issuer,
                issuer_version,
                key,
                version,
                subject,
                validity_days,
                usage,
                dns_names,
            } => self.issue_certificate(
                at,
                (issuer, issuer_version),
                (key, version),
                subject,
                *validity_days,
                *usage,
                dns_names,
            ),
            Step::Publish { key, version } => {
                self.state_change(at, key, version, KeyState::Pending, KeyState::Published)
            }
            Step::Activate { key, version } => {
                self.state_change(at, key, version, KeyState::Published, KeyState::Active)
            }
            Step::Retire { key, version } => {
                self.state_change(at, key, version, KeyState::Active, KeyState::VerifyOnly)
            }
            Step::Destroy { key, version, .. } => self.destroy(at, key, *version),
            Step::RotateSeedMasterKey { batch_size } => {
                self.rotate_seed_master_key(at, *batch_size)
            }
            Step::Backup { keys, kek, file } => self.backup(at, keys, kek, file),
            Step::Restore { file, sha256, keys } => self.restore(at, file, sha256, keys),
        }
    }

    /// A reference to a key: created earlier in the plan (its tracked state), or found
    /// on the service (`None`).
    fn lookup(
        &self,
        at: &At<'_>,
        role: &str,
        name: &str,
        version: &Option<u32>,
    ) -> Result<Option<Tracked>> {
        if let Some(t) = self.created.get(name) {
            if version.is_some() {
                return Err(at.bad(format!(
                    "{role} {name:?} is created by this plan; give no version"
                )));
            }
            return Ok(Some(*t));
        }
        let Some(versions) = self.ctx.existing.get(name) else {
            return Err(at.bad(format!(
                "{role} {name:?} is neither created by an earlier step nor a key of the service"
            )));
        };
        let found = match version {
            Some(v) => versions.iter().find(|k| k.version == *v),
            None => current(versions),
        };
        match found {
            None => Err(at.bad(match version {
                Some(v) => format!("{role} {name:?} has no version {v}"),
                None => format!("{role} {name:?} has no version that is not destroyed"),
            })),
            Some(k) if k.state == KeyState::Destroyed => {
                Err(at.bad(format!("{role} {name:?} v{} is destroyed", k.version)))
            }
            Some(_) => Ok(None),
        }
    }

    fn validity(&self, at: &At<'_>, days: u32) -> Result<()> {
        if days == 0 || days > self.ctx.max_validity_days {
            return Err(at.bad(format!(
                "validity_days {days} must be between 1 and {} (ceremony.max_validity_days)",
                self.ctx.max_validity_days
            )));
        }
        Ok(())
    }

    fn subject(at: &At<'_>, subject: &str) -> Result<()> {
        Name::from_str(subject)
            .map(|_| ())
            .map_err(|e| at.bad(format!("subject {subject:?}: {e}")))
    }

    #[allow(clippy::too_many_arguments)]
    fn generate_key(
        &mut self,
        at: &At<'_>,
        name: &str,
        algorithm: &str,
        usage: Usage,
        new_version: bool,
        extractable: bool,
        backup: bool,
    ) -> Result<()> {
        if !valid_key_name(name) {
            return Err(at.bad(format!("name {name:?}: {KEY_NAME_RULE}")));
        }
        let alg = Algorithm::from_str(algorithm).map_err(|e| at.bad(e))?;
        if usage == Usage::Challenge && alg != Algorithm::Es256 {
            return Err(at.bad(format!(
                "{name:?}: a challenge key signs app challenges with ECDSA P-256: algorithm must be ES256"
            )));
        }
        if extractable {
            return Err(at.bad(format!(
                "{name:?}: long-term keys are generated non-extractable; extractable = true is refused"
            )));
        }
        if self.created.contains_key(name) {
            return Err(at.bad(format!(
                "duplicate key name {name:?}: an earlier step generates it"
            )));
        }
        if self.ctx.existing.contains_key(name) && !new_version {
            return Err(at.bad(format!(
                "key {name:?} exists already; a ceremony never overwrites a key \
                 (set new_version = true to add a version, i.e. rotate)"
            )));
        }
        if let Some(u) = self.usage_of(name, None).filter(|u| *u != usage) {
            return Err(at.bad(format!(
                "key {name:?} is a {u} key; a new version keeps its usage (usage = \"{u}\")"
            )));
        }
        self.created.insert(
            name.to_owned(),
            Tracked {
                usage: Some(usage),
                state: KeyState::Pending,
                certified: false,
                backup,
            },
        );
        Ok(())
    }

    /// The usage of `name`: what the plan made it (`tracked`, None for a restored key),
    /// else the usage of its versions on the service.
    fn usage_of(&self, name: &str, tracked: Option<&Tracked>) -> Option<Usage> {
        match tracked {
            Some(t) => t.usage,
            None => self
                .ctx
                .existing
                .get(name)
                .and_then(|v| v.last())
                .map(|k| k.usage),
        }
    }

    fn self_sign(
        &mut self,
        at: &At<'_>,
        key: &str,
        version: &Option<u32>,
        subject: &str,
        validity_days: u32,
    ) -> Result<()> {
        let t = self.lookup(at, "key", key, version)?;
        self.validity(at, validity_days)?;
        Self::subject(at, subject)?;
        if let Some(u) = self.usage_of(key, t.as_ref()).filter(|u| *u != Usage::Ca) {
            return Err(at.bad(format!(
                "{key:?} is a {u} key; only a ca key is self-signed"
            )));
        }
        if let Some(mut t) = t {
            t.certified = true;
            self.created.insert(key.to_owned(), t);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_certificate(
        &mut self,
        at: &At<'_>,
        (issuer, issuer_version): (&str, &Option<u32>),
        (key, version): (&str, &Option<u32>),
        subject: &str,
        validity_days: u32,
        usage: Usage,
        dns_names: &[String],
    ) -> Result<()> {
        let ti = self.lookup(at, "issuer", issuer, issuer_version)?;
        let tk = self.lookup(at, "key", key, version)?;
        if issuer == key {
            return Err(at.bad("issuer and key are the same key (use self-sign)"));
        }
        self.validity(at, validity_days)?;
        Self::subject(at, subject)?;
        if dns_names.iter().any(|d| d.is_empty() || d.len() > 253) {
            return Err(at.bad("dns_names entries must be 1 to 253 characters"));
        }
        if self
            .usage_of(issuer, ti.as_ref())
            .is_some_and(|u| u != Usage::Ca)
        {
            return Err(at.bad(format!("issuer {issuer:?} is not a ca key")));
        }
        // A restored key's usage is not tracked: the plan's word counts.
        if let Some(u) = self.usage_of(key, tk.as_ref()).filter(|u| *u != usage) {
            return Err(at.bad(format!(
                "usage {} does not match the usage {u} of {key:?}",
                usage.as_str()
            )));
        }
        if let Some(ti) = ti {
            if !ti.certified {
                return Err(at.bad(format!(
                    "issuer {issuer:?} has no certificate yet; self-sign or certify it in an earlier step"
                )));
            }
        }
        if let Some(mut tk) = tk {
            tk.certified = true;
            self.created.insert(key.to_owned(), tk);
        }
        Ok(())
    }

    /// `publish`, `activate`, `retire`: a key the plan creates must be in `from` at
    /// this step, and is in `to` after it.
    fn state_change(
        &mut self,
        at: &At<'_>,
        key: &str,
        version: &Option<u32>,
        from: KeyState,
        to: KeyState,
    ) -> Result<()> {
        let t = self.lookup(at, "key", key, version)?;
        if self.usage_of(key, t.as_ref()) == Some(Usage::Ca) {
            return Err(at.bad(format!(
                "{key:?} is a ca key; ca keys are never published or activated"
            )));
        }
        if let Some(mut t) = t {
            if t.state != from {
                return Err(at.bad(format!(
                    "{key:?} will be {} at this step, not {from}",
                    t.state
                )));
            }
            t.state = to;
            self.created.insert(key.to_owned(), t);
        }
        Ok(())
    }

    fn destroy(&mut self, at: &At<'_>, key: &str, version: u32) -> Result<()> {
        if self.created.contains_key(key) {
            return Err(at.bad(format!(
                "{key:?} is created by this plan; a plan does not destroy its own keys"
            )));
        }
        self.lookup(at, "key", key, &Some(version))?;
        Ok(())
    }

    fn rotate_seed_master_key(&mut self, at: &At<'_>, batch_size: u32) -> Result<()> {
        if !(1..=MAX_REWRAP_BATCH).contains(&batch_size) {
            return Err(at.bad(format!(
                "batch_size {batch_size} must be between 1 and {MAX_REWRAP_BATCH}"
            )));
        }
        if let Some(first) = self.rotation {
            return Err(at.bad(format!(
                "step {} rotates the seed master key already; a plan rotates it once",
                first + 1
            )));
        }
        if !self.ctx.seed_rotation {
            return Err(at.bad("this service has no credential seed master key to rotate"));
        }
        self.rotation = Some(at.index);
        Ok(())
    }

    fn backup(&mut self, at: &At<'_>, keys: &[String], kek: &str, file: &str) -> Result<()> {
        if keys.is_empty() || keys.len() > MAX_BACKUP_KEYS {
            return Err(at.bad(format!("keys must name 1 to {MAX_BACKUP_KEYS} keys")));
        }
        let mut seen = BTreeSet::new();
        for name in keys {
            if !seen.insert(name) {
                return Err(at.bad(format!("key {name:?} named twice")));
            }
            let for_backup = match self.lookup(at, "key", name, &None)? {
                Some(t) => t.backup,
                None => self
                    .ctx
                    .existing
                    .get(name)
                    .and_then(|v| current(v))
                    .is_some_and(|k| k.origin == KeyOrigin::GeneratedForBackup),
            };
            if !for_backup {
                return Err(at.bad(format!(
                    "{name:?} was not generated for backup (generate-key with backup = true); \
                     it never leaves the HSM"
                )));
            }
        }
        check_kek_label(kek).map_err(|e| at.bad(e))?;
        if !self.ctx.keks.contains_key(kek) {
            return Err(at.bad(format!(
                "KEK {kek:?} is not provisioned on this token \
                 (hsm-service backup-kek, with the service stopped)"
            )));
        }
        check_backup_file_name(file).map_err(|e| at.bad(e))?;
        if !self.files.insert(file.to_owned()) {
            return Err(at.bad(format!("an earlier step uses backup file {file:?}")));
        }
        if self.ctx.backup_dir.join(file).exists() {
            return Err(at.bad(format!(
                "backup file {file:?} exists already; backup files are never overwritten"
            )));
        }
        Ok(())
    }

    fn restore(&mut self, at: &At<'_>, file: &str, sha256: &str, keys: &[String]) -> Result<()> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(at.bad("sha256 must be 64 hex digits"));
        }
        if keys.len() > MAX_BACKUP_KEYS {
            return Err(at.bad(format!("keys names more than {MAX_BACKUP_KEYS} keys")));
        }
        if self.files.contains(file) {
            return Err(at.bad(format!("backup file {file:?} is written by this plan")));
        }
        let backup = read_backup_file(&self.ctx.backup_dir, file, sha256).map_err(|e| at.bad(e))?;
        let entries = if keys.is_empty() {
            backup.keys.iter().collect::<Vec<_>>()
        } else {
            let mut seen = BTreeSet::new();
            keys.iter()
                .map(|name| {
                    if !seen.insert(name) {
                        return Err(at.bad(format!("key {name:?} named twice")));
                    }
                    backup.key(name, None).map_err(|e| at.bad(e))
                })
                .collect::<Result<Vec<_>>>()?
        };
        for e in entries {
            if self.created.contains_key(&e.name) {
                return Err(at.bad(format!("{:?} is created by an earlier step", e.name)));
            }
            if let (Some(file_usage), Some(here)) = (e.usage, self.usage_of(&e.name, None)) {
                if file_usage != here {
                    return Err(at.bad(format!(
                        "backup file {file} has {:?} v{} as a {file_usage} key; {:?} is a {here} \
                         key on this service (every version of a name has one usage)",
                        e.name, e.version, e.name
                    )));
                }
            }
            if self
                .ctx
                .existing
                .get(&e.name)
                .is_some_and(|v| v.iter().any(|k| k.version == e.version))
            {
                return Err(at.bad(format!(
                    "{} v{} exists on this service; a restore never replaces a key",
                    e.name, e.version
                )));
            }
            Algorithm::from_str(&e.algorithm).map_err(|err| at.bad(err))?;
            self.created.insert(
                e.name.clone(),
                Tracked {
                    usage: e.usage,
                    state: KeyState::Pending,
                    certified: !e.certificate_chain.is_empty(),
                    backup: false,
                },
            );
        }
        Ok(())
    }
}
