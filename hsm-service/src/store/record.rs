//! The credential record and its on-disk encoding.
//!
//! Encoding: one format-version byte, then postcard of a private struct with
//! the enums as `u8` codes. The table key is `tenant NUL id` ([`key`]): ids are
//! unique per tenant, one tenant's records are one contiguous key range, and
//! neither is repeated in the value. A new format gets a new version byte and a
//! new private struct; old versions stay decodable (format 1, written before
//! issue 10, decodes with no subject, no seed binding and its failure count
//! without times; format 2 adds the three).

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::StoreError;
use crate::otp::{HashAlgorithm, OtpKind};

/// Longest accepted credential id, in bytes. Keeps keys (and so B-tree pages)
/// small; generated ids are far shorter.
pub const MAX_ID_LEN: usize = 256;

/// Longest tenant name, in bytes.
pub const MAX_TENANT_LEN: usize = 128;

/// Most failure times a record keeps (the credential policy counts no more: the NIST SP
/// 800-63B bound of 100 consecutive failures plus every doubling of the back-off). Here
/// because decoding a format 1 record caps its count with it.
pub const MAX_FAILURE_TIMES: usize = 132;

/// The tenant of records written before tenants existed (store schema 1).
pub const DEFAULT_TENANT: &str = "default";

/// Separates tenant and id in a table key; tenants never contain it.
const KEY_SEPARATOR: char = '\0';

/// First byte of every encoded record in format 1 (no subject).
const FORMAT_V1: u8 = 1;
/// Format 2: format 1 plus the subject, the seed binding and the failure times.
const FORMAT_V2: u8 = 2;

/// One credential's durable state.
///
/// `Debug` never prints `wrapped_seed`, only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    /// The tenant (login service) that created it; with `id`, the store key.
    /// Immutable once inserted.
    pub tenant: String,
    /// Unique within its tenant. Immutable once inserted.
    pub id: String,
    /// The citizen's pseudonymous id at the login service; evidence of an accepted
    /// code names it. `None`: the credential produces no evidence.
    pub subject: Option<String>,
    /// HOTP or TOTP.
    pub kind: OtpKind,
    /// HMAC hash.
    pub algorithm: HashAlgorithm,
    /// Number of OTP digits.
    pub digits: u8,
    /// TOTP time step in seconds.
    pub period_seconds: u32,
    /// TOTP epoch (unix seconds).
    pub t0: u64,
    /// Seed wrapped under the HSM master key (AES key wrap with padding);
    /// useless without the HSM.
    pub wrapped_seed: Vec<u8>,
    /// Which master key version wrapped `wrapped_seed`.
    pub master_key_version: u32,
    /// HMAC-SHA256 computed in the HSM with the seed binding key over this record's
    /// tenant, id, kind, algorithm, digits, period and `wrapped_seed`
    /// (`credentials::binding`): a blob moved into another record does not match it.
    /// `None` only in records from before bindings, until the start-up migration.
    pub seed_binding: Option<[u8; 32]>,
    /// Issuer shown in authenticator apps.
    pub issuer: String,
    /// Account name shown in authenticator apps.
    pub account_name: String,
    /// TOTP: last accepted step; HOTP: last accepted counter. A code is a
    /// replay unless strictly beyond it.
    pub last_accepted: Option<u64>,
    /// HOTP: where the look-ahead window starts.
    pub next_counter: u64,
    /// TOTP drift (in steps) recorded by resync.
    pub drift_steps: i64,
    /// Failed verifications that counted when the record was last written (those inside
    /// the failure window, since the last success): `failure_times.len()`.
    pub failures: u32,
    /// Unix seconds of those failures, oldest first (the lockout policy drops the ones
    /// that left the window and keeps a bounded number).
    pub failure_times: Vec<u64>,
    /// Unix seconds until which the credential is temporarily locked.
    pub locked_until: u64,
    /// Locked until an officer unlocks it.
    pub hard_locked: bool,
    /// Administratively disabled.
    pub disabled: bool,
    /// Unix seconds of creation.
    pub created_at: u64,
    /// Unix seconds of the last change (maintained by the caller: the store
    /// has no clock of its own so that tests and replays stay deterministic).
    pub updated_at: u64,
}

impl std::fmt::Debug for CredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRecord")
            .field("tenant", &self.tenant)
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("kind", &self.kind)
            .field("algorithm", &self.algorithm)
            .field("digits", &self.digits)
            .field("period_seconds", &self.period_seconds)
            .field("t0", &self.t0)
            .field(
                "wrapped_seed",
                &format_args!("<{} bytes>", self.wrapped_seed.len()),
            )
            .field("master_key_version", &self.master_key_version)
            .field("seed_binding", &self.seed_binding.is_some())
            .field("issuer", &self.issuer)
            .field("account_name", &self.account_name)
            .field("last_accepted", &self.last_accepted)
            .field("next_counter", &self.next_counter)
            .field("drift_steps", &self.drift_steps)
            .field("failures", &self.failures)
            .field("failure_times", &self.failure_times)
            .field("locked_until", &self.locked_until)
            .field("hard_locked", &self.hard_locked)
            .field("disabled", &self.disabled)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// Format 1 as stored. Field order is the wire format: never reorder, only
/// add a new format version.
#[derive(Serialize, Deserialize)]
struct RecordV1<'a> {
    kind: u8,
    algorithm: u8,
    digits: u8,
    period_seconds: u32,
    t0: u64,
    #[serde(borrow)]
    wrapped_seed: &'a [u8],
    master_key_version: u32,
    #[serde(borrow)]
    issuer: &'a str,
    #[serde(borrow)]
    account_name: &'a str,
    last_accepted: Option<u64>,
    next_counter: u64,
    drift_steps: i64,
    failures: u32,
    locked_until: u64,
    hard_locked: bool,
    disabled: bool,
    created_at: u64,
    updated_at: u64,
}

/// Format 2 as stored: format 1's fields, then what issue 10 added. Field order is the
/// wire format: never reorder, only add a new format version.
#[derive(Serialize, Deserialize)]
struct RecordV2<'a> {
    #[serde(borrow)]
    v1: RecordV1<'a>,
    #[serde(borrow)]
    subject: Option<&'a str>,
    seed_binding: Option<[u8; 32]>,
    failure_times: Vec<u64>,
}

// Codes start at 1 so that zeroed bytes never decode as a valid record.
fn kind_code(k: OtpKind) -> u8 {
    match k {
        OtpKind::Hotp => 1,
        OtpKind::Totp => 2,
    }
}

fn kind_from(c: u8) -> Option<OtpKind> {
    match c {
        1 => Some(OtpKind::Hotp),
        2 => Some(OtpKind::Totp),
        _ => None,
    }
}

fn alg_code(a: HashAlgorithm) -> u8 {
    match a {
        HashAlgorithm::Sha1 => 1,
        HashAlgorithm::Sha256 => 2,
        HashAlgorithm::Sha512 => 3,
    }
}

fn alg_from(c: u8) -> Option<HashAlgorithm> {
    match c {
        1 => Some(HashAlgorithm::Sha1),
        2 => Some(HashAlgorithm::Sha256),
        3 => Some(HashAlgorithm::Sha512),
        _ => None,
    }
}

/// The table key of `(tenant, id)`.
pub(super) fn key(tenant: &str, id: &str) -> String {
    let mut k = String::with_capacity(tenant.len() + 1 + id.len());
    k.push_str(tenant);
    k.push(KEY_SEPARATOR);
    k.push_str(id);
    k
}

/// `(tenant, id)` of a table key.
pub(super) fn split_key(k: &str) -> Result<(&str, &str), StoreError> {
    k.split_once(KEY_SEPARATOR)
        .ok_or_else(|| StoreError::Corrupt(format!("credential key {k:?} has no tenant")))
}

/// The key range holding exactly `tenant`'s records: `tenant NUL` up to (excluding)
/// `tenant \x01`.
pub(super) fn tenant_range(tenant: &str) -> (String, String) {
    (format!("{tenant}\0"), format!("{tenant}\u{1}"))
}

/// Checks a tenant before it becomes part of a key.
pub fn validate_tenant(tenant: &str) -> Result<(), StoreError> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN {
        return Err(StoreError::Invalid(format!(
            "tenant must be 1 to {MAX_TENANT_LEN} bytes"
        )));
    }
    if tenant.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "tenant may not contain control characters".into(),
        ));
    }
    Ok(())
}

/// Checks a tenant and an id before they become a key.
pub(super) fn validate_key(tenant: &str, id: &str) -> Result<(), StoreError> {
    validate_tenant(tenant)?;
    validate_id(id)
}

/// Checks an id before it becomes a key.
pub(super) fn validate_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::Invalid("empty credential id".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(StoreError::Invalid(format!(
            "credential id longer than {MAX_ID_LEN} bytes"
        )));
    }
    if id.contains(KEY_SEPARATOR) {
        return Err(StoreError::Invalid("credential id contains NUL".into()));
    }
    Ok(())
}

/// Encodes a record's value (everything but tenant and id), in the newest format.
/// The buffer is zeroized on drop because it holds a copy of the wrapped seed.
pub(super) fn encode(rec: &CredentialRecord) -> Zeroizing<Vec<u8>> {
    let v1 = RecordV1 {
        kind: kind_code(rec.kind),
        algorithm: alg_code(rec.algorithm),
        digits: rec.digits,
        period_seconds: rec.period_seconds,
        t0: rec.t0,
        wrapped_seed: &rec.wrapped_seed,
        master_key_version: rec.master_key_version,
        issuer: &rec.issuer,
        account_name: &rec.account_name,
        last_accepted: rec.last_accepted,
        next_counter: rec.next_counter,
        drift_steps: rec.drift_steps,
        failures: rec.failures,
        locked_until: rec.locked_until,
        hard_locked: rec.hard_locked,
        disabled: rec.disabled,
        created_at: rec.created_at,
        updated_at: rec.updated_at,
    };
    let v = RecordV2 {
        v1,
        subject: rec.subject.as_deref(),
        seed_binding: rec.seed_binding,
        failure_times: rec.failure_times.clone(),
    };
    let subject_len = rec.subject.as_ref().map_or(0, String::len);
    // Upper bound (varints <= 10 bytes, 5 length prefixes, option tags, the binding)
    // so the Vec never reallocates, which would leave an unzeroized copy of the seed
    // behind.
    let cap = 1
        + 19 * 10
        + 33
        + 10 * rec.failure_times.len()
        + rec.wrapped_seed.len()
        + rec.issuer.len()
        + rec.account_name.len()
        + subject_len;
    let mut buf = Vec::with_capacity(cap);
    buf.push(FORMAT_V2);
    // Serializing plain integers, bools and slices into a Vec cannot fail.
    let buf = postcard::to_extend(&v, buf).expect("postcard encoding into a Vec is infallible");
    Zeroizing::new(buf)
}

/// Decodes the value stored under table key `k`. Errors name the key and the
/// defect, never the bytes.
pub(super) fn decode_keyed(k: &str, bytes: &[u8]) -> Result<CredentialRecord, StoreError> {
    let (tenant, id) = split_key(k)?;
    decode(tenant, id, bytes)
}

/// Decodes the value stored for `(tenant, id)`, in any known format. Errors name the
/// id and the defect, never the bytes.
pub(super) fn decode(tenant: &str, id: &str, bytes: &[u8]) -> Result<CredentialRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("credential {id:?}: {what}"));
    let (&version, body) = bytes.split_first().ok_or_else(|| corrupt("empty value"))?;
    let taken = match version {
        FORMAT_V1 => postcard::take_from_bytes::<RecordV1<'_>>(body).map(|(v1, rest)| {
            // Format 1 kept a count only: its failures are taken as made at the last
            // change, so they leave the failure window a window after it.
            let n = usize::try_from(v1.failures)
                .unwrap_or(usize::MAX)
                .min(MAX_FAILURE_TIMES);
            let failure_times = vec![v1.updated_at; n];
            let v2 = RecordV2 {
                v1,
                subject: None,
                seed_binding: None,
                failure_times,
            };
            (v2, rest)
        }),
        FORMAT_V2 => postcard::take_from_bytes::<RecordV2<'_>>(body),
        _ => return Err(corrupt(&format!("unknown record format version {version}"))),
    };
    let (v2, rest) = taken.map_err(|e| corrupt(&format!("undecodable: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes after record"));
    }
    let RecordV2 {
        v1: v,
        subject,
        seed_binding,
        failure_times,
    } = v2;
    Ok(CredentialRecord {
        tenant: tenant.to_owned(),
        id: id.to_owned(),
        subject: subject.map(str::to_owned),
        kind: kind_from(v.kind).ok_or_else(|| corrupt(&format!("unknown kind code {}", v.kind)))?,
        algorithm: alg_from(v.algorithm)
            .ok_or_else(|| corrupt(&format!("unknown algorithm code {}", v.algorithm)))?,
        digits: v.digits,
        period_seconds: v.period_seconds,
        t0: v.t0,
        wrapped_seed: v.wrapped_seed.to_vec(),
        master_key_version: v.master_key_version,
        seed_binding,
        issuer: v.issuer.to_owned(),
        account_name: v.account_name.to_owned(),
        last_accepted: v.last_accepted,
        next_counter: v.next_counter,
        drift_steps: v.drift_steps,
        failures: v.failures,
        failure_times,
        locked_until: v.locked_until,
        hard_locked: v.hard_locked,
        disabled: v.disabled,
        created_at: v.created_at,
        updated_at: v.updated_at,
    })
}

/// Encodes in format 1 (no subject, binding or failure times), as a store of schema 1 holds it: for the
/// migration and decoding tests.
#[cfg(test)]
pub(super) fn encode_v1(rec: &CredentialRecord) -> Vec<u8> {
    let full = encode(rec);
    let (v2, _): (RecordV2<'_>, _) = postcard::take_from_bytes(&full[1..]).expect("own encoding");
    postcard::to_extend(&v2.v1, vec![FORMAT_V1])
        .expect("postcard encoding into a Vec is infallible")
}
