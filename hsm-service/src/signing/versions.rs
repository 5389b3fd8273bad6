//! Signing key versions: their states, their durable record, and the store table.
//!
//! A key name (e.g. `assertion`) has numbered versions. Each version is one key pair in
//! the HSM (found by its CKA_ID) and one record in the store's `signing_keys` table with
//! everything public about it. The private key never leaves the HSM.

use serde::{Deserialize, Serialize};

use super::{Algorithm, PublicKey};
use crate::store::{KeyRange, ReadTxn, Rollback, StoreError, Table, Txn};

/// Where a key version is in its life.
///
/// `pending -> published -> active -> verify-only -> destroyed`; a version may be
/// destroyed from any state but `active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyState {
    /// Generated, not in the JWKS, not signing (e.g. waiting for its certificate).
    Pending,
    /// In the JWKS so that relying parties learn it, not yet signing.
    Published,
    /// In the JWKS and signing; at most one version of a name is active.
    Active,
    /// In the JWKS, no longer signing: its assertions are still being verified.
    VerifyOnly,
    /// Its HSM objects are destroyed; the record stays for the history.
    Destroyed,
}

impl KeyState {
    /// The name used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Published => "published",
            KeyState::Active => "active",
            KeyState::VerifyOnly => "verify-only",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// True for the states whose public key is in the JWKS.
    pub fn in_jwks(self) -> bool {
        matches!(
            self,
            KeyState::Published | KeyState::Active | KeyState::VerifyOnly
        )
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a key version's private key came to be on the token; decides what its check
/// after generation or restore expects (see `SelfTest::problem`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyOrigin {
    /// Generated on the token, never extractable (every key but the two below).
    #[default]
    Generated,
    /// Generated on the token by a plan's `generate-key` with `backup = true`:
    /// sensitive, CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED, so it leaves the token only
    /// wrapped under a trusted backup KEK (which only the security officer can make).
    GeneratedForBackup,
    /// Unwrapped from a backup by a `restore` step: sensitive, never extractable again,
    /// not CKA_LOCAL.
    Restored,
}

impl KeyOrigin {
    /// The name used in transcripts and listings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Generated => "generated",
            KeyOrigin::GeneratedForBackup => "generated-for-backup",
            KeyOrigin::Restored => "restored",
        }
    }
}

/// What a key version signs, fixed when it is made: each usage has its own RPC and its
/// own key set, so that no signature of one usage can pass for another.
///
/// The postcard encoding of a record is the variant index: append new variants at the
/// end, never reorder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    /// Assertions: signs only through SignAssertion; in the assertion JWKS
    /// (`GetJwks` with usage empty or `signing`).
    #[default]
    Signing,
    /// Certificates: signs only inside an executed key ceremony; never in a JWKS.
    Ca,
    /// Caller bytes: signs only through the `Sign` RPC; in the raw keys' JWKS
    /// (`GetJwks` with usage `raw`), never in the assertion JWKS.
    Raw,
    /// App challenges: signs only challenge payloads (`ApprovalService.CreateChallenge`,
    /// ECDSA P-256, DER); in the challenge JWKS (`GetJwks` with usage `challenge`).
    Challenge,
}

impl Usage {
    /// The name used in plans, transcripts, listings and `GetJwksRequest.usage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Signing => "signing",
            Usage::Ca => "ca",
            Usage::Raw => "raw",
            Usage::Challenge => "challenge",
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Usage {
    type Err = super::SigningError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "signing" => Ok(Usage::Signing),
            "ca" => Ok(Usage::Ca),
            "raw" => Ok(Usage::Raw),
            "challenge" => Ok(Usage::Challenge),
            _ => Err(super::SigningError::InvalidArgument(format!(
                "unknown key usage {s:?} (expected signing, ca, raw or challenge)"
            ))),
        }
    }
}

/// One version of a named signing key: public metadata only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    /// Key name.
    pub name: String,
    /// Version number, from 1.
    pub version: u32,
    /// Life-cycle state.
    pub state: KeyState,
    /// The JWS algorithm the key signs with.
    pub algorithm: Algorithm,
    /// CKA_ID of the key pair in the HSM.
    pub key_id: Vec<u8>,
    /// JWS `kid`: the RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// The public key, DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    /// Certificate chain, DER, leaf first; empty when none was made.
    pub certificate_chain: Vec<Vec<u8>>,
    /// Unix seconds of generation.
    pub created_at: u64,
    /// Unix seconds of publication (0: never).
    pub published_at: u64,
    /// Unix seconds of activation (0: never).
    pub activated_at: u64,
    /// Unix seconds of retirement to verify-only (0: never).
    pub retired_at: u64,
    /// Unix seconds of destruction (0: never).
    pub destroyed_at: u64,
    /// No assertion signed by this version expires later than this (Unix seconds). Kept
    /// ahead of the assertions actually signed, so it is safe after a crash.
    pub last_expiry: u64,
    /// How the private key came to be on the token. Not in the record body: stored
    /// after it (format 2), so records written before it existed (format 1) still read,
    /// as `Generated`.
    #[serde(skip)]
    pub origin: KeyOrigin,
    /// What the version signs; never changes. Stored after the origin (format 3);
    /// records of formats 1 and 2 are migrated once at start (see [`migrated_usage`]).
    #[serde(skip)]
    pub usage: Usage,
}

impl KeyVersion {
    /// The public key.
    pub fn public_key(&self) -> Result<PublicKey, super::SigningError> {
        PublicKey::from_spki_der(&self.public_key_der)
    }
}

/// Format of the encoded records; bumped when [`KeyVersion`] changes shape.
/// 1: the postcard body. 2: the body, then the postcard [`KeyOrigin`]. 3: the body, the
/// origin, then the postcard [`Usage`].
const FORMAT: u8 = 3;
/// The format before [`Usage`]; still read (and rewritten at start).
const FORMAT_2: u8 = 2;
/// The format before [`KeyOrigin`]; still read (and rewritten at start).
const FORMAT_1: u8 = 1;

/// The usage of a version recorded before usages were stored: what it was made for.
/// Ceremonies never publish a `ca` key and always give it a CA certificate (self-signed
/// or issued with usage `ca`), and the bootstrap key is an assertion key, so: a version
/// that was never published and whose stored leaf certificate is a CA certificate is
/// `ca`; every other one is `signing` (raw keys did not exist).
pub fn migrated_usage(k: &KeyVersion) -> Usage {
    let never_published =
        k.published_at == 0 && matches!(k.state, KeyState::Pending | KeyState::Destroyed);
    if never_published {
        chain_usage(&k.certificate_chain)
    } else {
        Usage::Signing
    }
}

/// The usage a certificate chain shows: `ca` when its leaf is a CA certificate, else
/// `signing`.
pub fn chain_usage(chain: &[Vec<u8>]) -> Usage {
    let ca_certificate = chain
        .first()
        .is_some_and(|leaf| crate::pki::IssuerCertificate::from_der(leaf).is_ok());
    if ca_certificate {
        Usage::Ca
    } else {
        Usage::Signing
    }
}

/// Store key of a version: sorts by name, then version.
pub(crate) fn store_key(name: &str, version: u32) -> String {
    format!("{name}/{version:010}")
}

pub(crate) fn encode(k: &KeyVersion) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT];
    let invalid =
        |e: postcard::Error| StoreError::Invalid(format!("encoding signing key record: {e}"));
    out.extend_from_slice(&postcard::to_allocvec(k).map_err(invalid)?);
    out.extend_from_slice(&postcard::to_allocvec(&k.origin).map_err(invalid)?);
    out.extend_from_slice(&postcard::to_allocvec(&k.usage).map_err(invalid)?);
    Ok(out)
}

pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<KeyVersion, StoreError> {
    let corrupt = |e: postcard::Error| StoreError::Corrupt(format!("signing key {key:?}: {e}"));
    match bytes.split_first() {
        Some((&FORMAT, body)) => {
            let (mut k, rest): (KeyVersion, _) =
                postcard::take_from_bytes(body).map_err(corrupt)?;
            let (origin, rest) = postcard::take_from_bytes(rest).map_err(corrupt)?;
            k.origin = origin;
            k.usage = postcard::from_bytes(rest).map_err(corrupt)?;
            Ok(k)
        }
        Some((&FORMAT_2, body)) => {
            let (mut k, rest): (KeyVersion, _) =
                postcard::take_from_bytes(body).map_err(corrupt)?;
            k.origin = postcard::from_bytes(rest).map_err(corrupt)?;
            k.usage = migrated_usage(&k);
            Ok(k)
        }
        Some((&FORMAT_1, body)) => {
            let mut k: KeyVersion = postcard::from_bytes(body).map_err(corrupt)?;
            k.usage = migrated_usage(&k);
            Ok(k)
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "signing key {key:?}: unknown format version {v}"
        ))),
        None => Err(StoreError::Corrupt(format!("signing key {key:?}: empty"))),
    }
}

/// Every version in the table, in name and version order.
pub(crate) fn load_all<T: ReadTxn + ?Sized>(txn: &mut T) -> Result<Vec<KeyVersion>, StoreError> {
    txn.scan(Table::SigningKeys, &KeyRange::all(), usize::MAX)?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

/// Rewrite every record of an older format in the current one, so that the usage
/// [`migrated_usage`] gives it is stored once and never derived again. Returns how many
/// records were rewritten.
pub(crate) fn migrate_all(txn: &mut dyn Txn) -> Result<Result<usize, StoreError>, Rollback> {
    let mut old = Vec::new();
    for (k, v) in txn.scan(Table::SigningKeys, &KeyRange::all(), usize::MAX)? {
        if v.first() != Some(&FORMAT) {
            match decode(&k, &v) {
                Ok(version) => old.push(version),
                Err(e) => return Ok(Err(e)),
            }
        }
    }
    put_all(txn, &old)?;
    Ok(Ok(old.len()))
}

/// The `meta` key of the key-version generation: a counter bumped in the same
/// transaction as every write of the `signing_keys` table, so that another instance
/// learns with one small read that its copy of the versions is stale (see
/// [`crate::signing::Signer::refresh`] for why a counter and not LISTEN/NOTIFY).
pub(crate) const GENERATION_KEY: &str = "signing.generation";

/// The key-version generation as `txn` sees it (0: never written).
pub(crate) fn generation<T: ReadTxn + ?Sized>(txn: &mut T) -> Result<u64, StoreError> {
    match txn.get(Table::Meta, GENERATION_KEY)? {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt(format!("meta {GENERATION_KEY:?}: not 8 bytes"))),
    }
}

/// Bump the generation, in the transaction that changes a version. The read is a
/// locking read, so two instances' bumps serialize like their record writes do.
fn bump_generation(txn: &mut dyn Txn) -> Result<(), Rollback> {
    let next = generation(txn)?.wrapping_add(1);
    txn.put(Table::Meta, GENERATION_KEY, &next.to_be_bytes())
}

/// Write `versions` (insert or replace), all in this transaction.
pub(crate) fn put_all(txn: &mut dyn Txn, versions: &[KeyVersion]) -> Result<(), Rollback> {
    for k in versions {
        txn.put(
            Table::SigningKeys,
            &store_key(&k.name, k.version),
            &encode(k)?,
        )?;
    }
    if !versions.is_empty() {
        bump_generation(txn)?;
    }
    Ok(())
}

/// Write each `(before, after)` change only if the stored record is still `before`
/// (`None`: absent, i.e. a new version), all in this transaction, or none of them:
/// `Ok(Err(key))` names the first record another instance changed (or created) since
/// this one read it. The reads are locking reads, so the check and the write are one
/// compare-and-set across instances.
pub(crate) fn put_unchanged(
    txn: &mut dyn Txn,
    changes: &[(Option<KeyVersion>, KeyVersion)],
) -> Result<Result<(), String>, Rollback> {
    for (before, after) in changes {
        let key = store_key(&after.name, after.version);
        let stored = txn
            .get(Table::SigningKeys, &key)?
            .map(|bytes| decode(&key, &bytes))
            .transpose()?;
        if stored != *before {
            return Ok(Err(format!("{} v{}", after.name, after.version)));
        }
    }
    let after: Vec<KeyVersion> = changes.iter().map(|(_, a)| a.clone()).collect();
    put_all(txn, &after)?;
    Ok(Ok(()))
}

/// Raise `last_expiry` of one version to at least `mark`, as the store sees it now.
pub(crate) fn raise_last_expiry(
    txn: &mut dyn Txn,
    name: &str,
    version: u32,
    mark: u64,
) -> Result<Result<KeyVersion, StoreError>, Rollback> {
    let key = store_key(name, version);
    let current = match txn.get(Table::SigningKeys, &key)? {
        Some(bytes) => decode(&key, &bytes),
        None => Err(StoreError::NotFound),
    };
    let mut k = match current {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    if k.last_expiry < mark {
        k.last_expiry = mark;
        txn.put(Table::SigningKeys, &key, &encode(&k)?)?;
        // Other instances must see the higher mark before they destroy the version.
        bump_generation(txn)?;
    }
    Ok(Ok(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(origin: KeyOrigin) -> KeyVersion {
        KeyVersion {
            name: "assertion".into(),
            version: 3,
            state: KeyState::Active,
            algorithm: Algorithm::Es256,
            key_id: vec![1, 2, 3],
            kid: "kid".into(),
            public_key_der: vec![4, 5],
            certificate_chain: vec![vec![6]],
            created_at: 1,
            published_at: 2,
            activated_at: 3,
            retired_at: 0,
            destroyed_at: 0,
            last_expiry: 9,
            origin,
            usage: Usage::Raw,
        }
    }

    /// The bytes a format 2 service wrote: the body, then the origin.
    fn format_2(k: &KeyVersion) -> Vec<u8> {
        let mut out = vec![FORMAT_2];
        out.extend(postcard::to_allocvec(k).unwrap());
        out.extend(postcard::to_allocvec(&k.origin).unwrap());
        out
    }

    #[test]
    fn older_formats_migrate_to_what_the_key_was_made_for() {
        // A published or active key (the bootstrap key, every assertion key) is signing.
        let mut k = sample(KeyOrigin::Restored);
        assert_eq!(decode("k", &format_2(&k)).unwrap().usage, Usage::Signing);
        assert_eq!(
            decode("k", &format_2(&k)).unwrap().origin,
            KeyOrigin::Restored
        );
        // Never published and certified as a CA (what a ceremony makes of a ca key): ca.
        let ca = crate::pki::tests::self_signed_ca_der();
        k.state = KeyState::Pending;
        k.published_at = 0;
        k.certificate_chain = vec![ca.clone()];
        assert_eq!(decode("k", &format_2(&k)).unwrap().usage, Usage::Ca);
        let mut old = vec![FORMAT_1];
        old.extend(postcard::to_allocvec(&k).unwrap());
        assert_eq!(decode("k", &old).unwrap().usage, Usage::Ca);
        // The same certificate on a key that was published: it signed assertions.
        k.published_at = 5;
        k.state = KeyState::VerifyOnly;
        assert_eq!(decode("k", &format_2(&k)).unwrap().usage, Usage::Signing);
        // Pending without a CA certificate: signing.
        k.state = KeyState::Pending;
        k.published_at = 0;
        k.certificate_chain = vec![crate::pki::tests::leaf_der(), ca];
        assert_eq!(decode("k", &format_2(&k)).unwrap().usage, Usage::Signing);
    }

    #[tokio::test]
    async fn migration_rewrites_older_records_once_with_their_usage() {
        use crate::store::{Store, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_redb(
            &dir.path().join(crate::store::EMBEDDED_FILE),
            StoreOptions::default(),
        )
        .unwrap();
        // A format 2 service's records: the bootstrap key (active) and a ca key.
        let mut active = sample(KeyOrigin::Generated);
        active.name = "assertion".into();
        let mut ca = sample(KeyOrigin::Generated);
        ca.name = "root-ca".into();
        ca.version = 1;
        ca.state = KeyState::Pending;
        ca.published_at = 0;
        ca.certificate_chain = vec![crate::pki::tests::self_signed_ca_der()];
        let old = [
            (active.clone(), format_2(&active)),
            (ca.clone(), format_2(&ca)),
        ];
        store
            .write(move |txn| {
                for (k, bytes) in &old {
                    txn.put(Table::SigningKeys, &store_key(&k.name, k.version), bytes)?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let migrated = store.write(migrate_all).await.unwrap().unwrap();
        assert_eq!(migrated, 2);
        let stored = |k: &KeyVersion| {
            let key = store_key(&k.name, k.version);
            store.read(move |txn| Ok(txn.get(Table::SigningKeys, &key)?.unwrap()))
        };
        assert_eq!(stored(&active).await.unwrap()[0], FORMAT);
        assert_eq!(stored(&ca).await.unwrap()[0], FORMAT);
        let loaded = store.read(|txn| load_all(txn)).await.unwrap();
        let usages: Vec<(String, Usage)> =
            loaded.iter().map(|k| (k.name.clone(), k.usage)).collect();
        assert_eq!(
            usages,
            vec![
                ("assertion".into(), Usage::Signing),
                ("root-ca".into(), Usage::Ca)
            ]
        );
        // Once only: the usage is stored, never derived again.
        assert_eq!(store.write(migrate_all).await.unwrap().unwrap(), 0);
    }

    #[test]
    fn usage_names_round_trip_and_unknown_is_invalid() {
        for u in [Usage::Signing, Usage::Ca, Usage::Raw, Usage::Challenge] {
            assert_eq!(u.as_str().parse::<Usage>().unwrap(), u);
        }
        assert!("challenges".parse::<Usage>().is_err());
        assert!("".parse::<Usage>().is_err());
    }

    #[test]
    fn records_round_trip_and_format_1_reads_as_generated() {
        for origin in [
            KeyOrigin::Generated,
            KeyOrigin::GeneratedForBackup,
            KeyOrigin::Restored,
        ] {
            let k = sample(origin);
            let bytes = encode(&k).expect("encode");
            assert_eq!(bytes[0], FORMAT);
            assert_eq!(decode("k", &bytes).expect("decode"), k);
        }
        // A record written before the origin existed: format 1, the body alone.
        let mut old = vec![FORMAT_1];
        old.extend(postcard::to_allocvec(&sample(KeyOrigin::Restored)).unwrap());
        let mut expected = sample(KeyOrigin::Generated);
        expected.usage = Usage::Signing;
        assert_eq!(decode("k", &old).expect("format 1"), expected);
        // Format 3 without its usage, and an unknown format, are corrupt.
        let mut cut = encode(&sample(KeyOrigin::Restored)).unwrap();
        cut.pop();
        assert!(matches!(decode("k", &cut), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode("k", &[7, 0]), Err(StoreError::Corrupt(_))));
    }
}
