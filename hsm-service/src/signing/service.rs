//! [`Signer`]: named signing keys with versions in the HSM, and everything signed with
//! them (assertions, raw signatures, CSRs, certificates).
//!
//! The key records live in memory (loaded once at start) and in the store, written
//! through before memory changes. Signing never searches the token (handles are cached
//! by CKA_ID in `hsm`) and never waits for the store, except when an assertion would
//! expire later than the durable `last_expiry` of its key: then that mark is raised
//! first, in steps of [`EXPIRY_MARK_STEP`], so it costs one store write per key and step.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::rand::SecureRandom;

use super::versions::{self, KeyOrigin, KeyState, KeyVersion};
use super::{
    ecdsa_raw_to_der, jwk, jwks, prepare_assertion, thumbprint, Algorithm, AssertionParams,
    PublicKey, SigningError,
};
use crate::common::Clock;
use crate::config::SigningConfig;
use crate::error::{Error, Result};
use crate::hsm::backup::WrappedKeyPair;
use crate::hsm::{Hsm, KeyPairKind, PublicKeyAttributes, SignMechanism};
use crate::pki::{self, CertificateParams, IssuerCertificate, IssuerRef, KeyUsage, Name};
use crate::store::{EmbeddedStore, StoreError};

/// Granularity of the durable `last_expiry` mark, in seconds.
pub const EXPIRY_MARK_STEP: u64 = 60;
/// Clock skew tolerated for `auth_time` in the future, in seconds.
const AUTH_TIME_SKEW: u64 = 60;
/// Largest message a raw signature may cover.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;
/// Bounds on assertion fields, so that a token stays small.
const MAX_FIELD_LEN: usize = 1024;
const MAX_LIST_LEN: usize = 32;
/// Longest certificate validity the service issues, in days.
const MAX_VALIDITY_DAYS: u32 = 20 * 366;

/// What a caller's configuration lets it sign with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Key names; `None`: the configured default key only.
    pub keys: Option<Vec<String>>,
    /// `acr` values; `None`: every configured value.
    pub acr: Option<Vec<String>>,
}

/// A request for an assertion, as the caller gave it (empty/zero: defaults).
#[derive(Debug, Clone, Default)]
pub struct AssertionRequest {
    /// Key name; empty: the default assertion key.
    pub key: String,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// `nonce`.
    pub nonce: String,
    /// `acr`.
    pub acr: String,
    /// `amr`.
    pub amr: Vec<String>,
    /// Lifetime in seconds; 0: the configured default.
    pub ttl_seconds: u32,
    /// `auth_time` (Unix seconds); 0: now.
    pub auth_time: u64,
    /// Extra claims, a JSON object text (may be empty).
    pub extra_claims_json: String,
}

/// A signed assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAssertion {
    /// Compact JWS.
    pub jws: String,
    /// `kid` of the signing key version.
    pub kid: String,
    /// `exp`.
    pub expires_at: u64,
}

/// What a raw signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInput {
    /// The message; hashed here (ECDSA, RSA-PSS) or signed whole (EdDSA).
    Message(Vec<u8>),
    /// A digest the caller computed with the key's hash (SHA-256 or SHA-384).
    Digest(Vec<u8>),
}

/// How an ECDSA signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    /// Raw `r || s` (JWS); the only form of EdDSA and RSA-PSS signatures.
    #[default]
    Raw,
    /// DER `Ecdsa-Sig-Value` (X.509, CMS); ECDSA only.
    Der,
}

/// A raw signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSignature {
    /// The signature.
    pub signature: Vec<u8>,
    /// `kid` of the key version.
    pub kid: String,
    /// The algorithm it was made with.
    pub algorithm: Algorithm,
    /// Its encoding.
    pub encoding: SignatureEncoding,
}

/// What a certificate made by the service says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    /// Subject DN, RFC 4514 (e.g. `CN=Assertions,O=Example,C=DK`).
    pub subject: String,
    /// Validity from now, in days.
    pub validity_days: u32,
    /// A CA certificate (keyCertSign, cRLSign) rather than a signing one.
    pub is_ca: bool,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
}

/// Prefix of every self-test message: the check after a key is generated signs
/// `SELF_TEST_PREFIX || context`. It is not base64url (so never a JWS signing input),
/// does not start with a DER SEQUENCE tag (so never a certificate or CSR body), and
/// [`Signer::self_test`] signs nothing else.
pub const SELF_TEST_PREFIX: &[u8] = b"\0hsm-service key self-test v1\0";

/// What the check of a freshly generated key found (see [`Signer::self_test`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTest {
    /// The public key read back from the token equals the recorded one.
    pub public_key_matches: bool,
    /// A signature of the self-test message verified under the recorded public key.
    pub signature_verifies: bool,
    /// CKA_TOKEN of the private key.
    pub token: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_LOCAL (generated on the token).
    pub local: bool,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: bool,
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_WRAP_WITH_TRUSTED.
    pub wrap_with_trusted: bool,
    /// How the key came to be on the token: what the checks expect.
    pub origin: KeyOrigin,
}

impl SelfTest {
    /// None when everything is as a long-term signing key of its origin must be;
    /// otherwise why not. Every key is a sensitive, sign-only token object whose public
    /// key and test signature check out. A generated key is CKA_LOCAL and never
    /// extractable; a key generated for backup is CKA_LOCAL and extractable only under a
    /// trusted KEK (CKA_WRAP_WITH_TRUSTED); a restored key is not extractable.
    pub fn problem(&self) -> Option<String> {
        let mut bad = Vec::new();
        if !self.public_key_matches {
            bad.push("the token's public key differs from the recorded one");
        }
        if !self.signature_verifies {
            bad.push("the test signature does not verify");
        }
        if !self.token {
            bad.push("not a token object");
        }
        if !self.sensitive {
            bad.push("not sensitive");
        }
        match self.origin {
            KeyOrigin::Generated => {
                if self.extractable || !self.never_extractable {
                    bad.push("extractable");
                }
            }
            KeyOrigin::GeneratedForBackup => {
                if !self.wrap_with_trusted {
                    bad.push("a backup key that wraps under keys that are not trusted");
                }
            }
            KeyOrigin::Restored => {
                if self.extractable {
                    bad.push("extractable");
                }
            }
        }
        if !self.local && self.origin != KeyOrigin::Restored {
            bad.push("not generated on the token");
        }
        if !self.sign || self.decrypt {
            bad.push("not sign-only");
        }
        (!bad.is_empty()).then(|| bad.join(", "))
    }
}

/// Names a key version: `version` 0 is the current one (the active version, else the
/// newest one not destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// Key name.
    pub name: String,
    /// Version, or 0 for the current one.
    pub version: u32,
}

impl KeyRef {
    /// A reference to `name`, version `version` (0: current).
    pub fn new(name: impl Into<String>, version: u32) -> KeyRef {
        KeyRef {
            name: name.into(),
            version,
        }
    }
}

/// Named, versioned signing keys in the HSM, and the signing done with them.
pub struct Signer {
    hsm: Hsm,
    store: Arc<EmbeddedStore>,
    config: SigningConfig,
    keys: RwLock<BTreeMap<(String, u32), KeyVersion>>,
    /// Serialises record writes, so that memory follows the store in order. Held only
    /// for short steps: the signing path may wait for it to raise an expiry mark.
    writes: tokio::sync::Mutex<()>,
    /// Serialises version creation (held across key generation, seconds for RSA).
    creations: tokio::sync::Mutex<()>,
    rng: ring::rand::SystemRandom,
    clock: Clock,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("versions", &self.read_keys().len())
            .finish_non_exhaustive()
    }
}

fn store_err(e: StoreError) -> Error {
    Error::Internal(format!("signing key store: {e}"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

impl From<SigningError> for Error {
    fn from(e: SigningError) -> Error {
        match e {
            SigningError::InvalidArgument(m) => Error::InvalidArgument(m),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<pki::PkiError> for Error {
    fn from(e: pki::PkiError) -> Error {
        match e {
            pki::PkiError::InvalidArgument(m) => Error::InvalidArgument(m),
            pki::PkiError::Signing(s) => s.into(),
            other => Error::Internal(other.to_string()),
        }
    }
}

fn kind_of(alg: Algorithm) -> KeyPairKind {
    match alg {
        Algorithm::Es256 => KeyPairKind::EcP256,
        Algorithm::Es384 => KeyPairKind::EcP384,
        Algorithm::EdDsa => KeyPairKind::Ed25519,
        Algorithm::Ps256 => KeyPairKind::Rsa3072,
    }
}

fn mechanism_of(alg: Algorithm) -> SignMechanism {
    match alg {
        Algorithm::Es256 | Algorithm::Es384 => SignMechanism::Ecdsa,
        Algorithm::EdDsa => SignMechanism::Eddsa,
        Algorithm::Ps256 => SignMechanism::RsaPssSha256,
    }
}

fn public_key_of(attrs: &PublicKeyAttributes) -> std::result::Result<PublicKey, SigningError> {
    match attrs {
        PublicKeyAttributes::Ec { ec_point } => PublicKey::from_ec_point(ec_point),
        PublicKeyAttributes::Edwards { ec_point } => PublicKey::from_ed25519_point(ec_point),
        PublicKeyAttributes::Rsa {
            modulus,
            public_exponent,
        } => PublicKey::from_rsa_components(modulus, public_exponent),
    }
}

/// The record of a key version that was just put on the token: `pending`, no dates.
fn pending_version(
    key: KeyRef,
    algorithm: Algorithm,
    key_id: Vec<u8>,
    public: &PublicKey,
    certificate_chain: Vec<Vec<u8>>,
    origin: KeyOrigin,
    created_at: u64,
) -> Result<KeyVersion> {
    Ok(KeyVersion {
        name: key.name,
        version: key.version,
        state: KeyState::Pending,
        algorithm,
        key_id,
        kid: thumbprint(public),
        public_key_der: public.to_spki_der()?,
        certificate_chain,
        created_at,
        published_at: 0,
        activated_at: 0,
        retired_at: 0,
        destroyed_at: 0,
        last_expiry: 0,
        origin,
    })
}

fn check_len(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_FIELD_LEN {
        return Err(invalid(format!(
            "{field} is {} bytes, the limit is {MAX_FIELD_LEN}",
            value.len()
        )));
    }
    Ok(())
}

fn check_list(field: &str, values: &[String]) -> Result<()> {
    if values.len() > MAX_LIST_LEN {
        return Err(invalid(format!(
            "{field} has {} entries, the limit is {MAX_LIST_LEN}",
            values.len()
        )));
    }
    for v in values {
        if v.is_empty() {
            return Err(invalid(format!("{field} entries must not be empty")));
        }
        check_len(field, v)?;
    }
    Ok(())
}

impl Signer {
    /// The token the keys live on.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }

    /// Load the key records from the store. With `config.bootstrap_default_key`, create
    /// the default key (ES256), publish and activate it when it has no version yet.
    pub async fn open(
        hsm: Hsm,
        store: Arc<EmbeddedStore>,
        config: SigningConfig,
        clock: Clock,
    ) -> Result<Signer> {
        let loaded = store.read(versions::load_all).map_err(store_err)?;
        let signer = Signer {
            hsm,
            store,
            config,
            keys: RwLock::new(
                loaded
                    .into_iter()
                    .map(|k| ((k.name.clone(), k.version), k))
                    .collect(),
            ),
            writes: tokio::sync::Mutex::new(()),
            creations: tokio::sync::Mutex::new(()),
            rng: ring::rand::SystemRandom::new(),
            clock,
        };
        if signer.config.bootstrap_default_key {
            let name = signer.config.default_key.clone();
            if signer.list(Some(&name)).is_empty() {
                let k = signer.create_version(&name, Algorithm::Es256).await?;
                signer.publish(&name, k.version).await?;
                signer.activate(&name, k.version).await?;
                tracing::info!(key = %name, kid = %k.kid, "created the default assertion key (bootstrap)");
            }
        }
        Ok(signer)
    }

    /// The configuration this signer runs with.
    pub fn config(&self) -> &SigningConfig {
        &self.config
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(String, u32), KeyVersion>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// All versions (of `name`, when given), in name and version order.
    pub fn list(&self, name: Option<&str>) -> Vec<KeyVersion> {
        self.read_keys()
            .values()
            .filter(|k| name.is_none_or(|n| k.name == n))
            .cloned()
            .collect()
    }

    /// One version; `version` 0 is the current one.
    pub fn get(&self, key: &KeyRef) -> Result<KeyVersion> {
        let keys = self.read_keys();
        let found = if key.version == 0 {
            let versions: Vec<&KeyVersion> = keys
                .range((key.name.clone(), 0)..=(key.name.clone(), u32::MAX))
                .map(|(_, k)| k)
                .filter(|k| k.state != KeyState::Destroyed)
                .collect();
            versions
                .iter()
                .find(|k| k.state == KeyState::Active)
                .or(versions.last())
                .map(|k| (*k).clone())
        } else {
            keys.get(&(key.name.clone(), key.version)).cloned()
        };
        found.ok_or_else(|| {
            Error::NotFound(if key.version == 0 {
                format!("no signing key named {:?}", key.name)
            } else {
                format!("no version {} of signing key {:?}", key.version, key.name)
            })
        })
    }

    fn active(&self, name: &str) -> Option<KeyVersion> {
        self.read_keys()
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .map(|(_, k)| k)
            .find(|k| k.state == KeyState::Active)
            .cloned()
    }

    /// Write `versions` through to the store, then to memory. Call with `writes` held.
    async fn put(&self, versions: Vec<KeyVersion>) -> Result<()> {
        let copy = versions.clone();
        self.store
            .write(move |txn| versions::put_all(txn, &copy))
            .await
            .map_err(store_err)?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        for k in versions {
            keys.insert((k.name.clone(), k.version), k);
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------
    // Life cycle (driven by key ceremonies; dev mode bootstraps the default key).
    // ----------------------------------------------------------------------------

    /// Generate a new version of `name` in the HSM, never extractable, in state
    /// `pending`.
    pub async fn create_version(&self, name: &str, algorithm: Algorithm) -> Result<KeyVersion> {
        self.generate_version(name, algorithm, KeyOrigin::Generated)
            .await
    }

    /// Generate a new version of `name` that can be backed up: it leaves the token only
    /// wrapped under a trusted KEK (see [`KeyOrigin::GeneratedForBackup`]).
    pub async fn create_backup_version(
        &self,
        name: &str,
        algorithm: Algorithm,
    ) -> Result<KeyVersion> {
        self.generate_version(name, algorithm, KeyOrigin::GeneratedForBackup)
            .await
    }

    async fn generate_version(
        &self,
        name: &str,
        algorithm: Algorithm,
        origin: KeyOrigin,
    ) -> Result<KeyVersion> {
        if !super::valid_key_name(name) {
            return Err(invalid(format!(
                "key name {name:?}: {}",
                super::KEY_NAME_RULE
            )));
        }
        let _c = self.creations.lock().await;
        let version = self
            .list(Some(name))
            .last()
            .map_or(1, |k| k.version.saturating_add(1));
        let label = format!("sig/{name}/v{version}");
        let pair = match origin {
            KeyOrigin::GeneratedForBackup => {
                self.hsm
                    .generate_backup_key_pair(kind_of(algorithm), &label)
                    .await?
            }
            _ => {
                self.hsm
                    .generate_signing_key_pair(kind_of(algorithm), &label)
                    .await?
            }
        };
        let public = public_key_of(&pair.public)
            .map_err(|e| Error::Internal(format!("public key of {label}: {e}")))?;
        let k = pending_version(
            KeyRef::new(name, version),
            algorithm,
            pair.id,
            &public,
            Vec::new(),
            origin,
            self.clock.now(),
        )?;
        self.record_new(&k, &label).await?;
        tracing::info!(key = %name, version, kid = %k.kid, alg = %algorithm, origin = origin.as_str(), "signing key version created");
        Ok(k)
    }

    /// Write the record of a key pair just put on the token; without its record the
    /// pair would be an orphan, so it is removed again when the write fails.
    async fn record_new(&self, k: &KeyVersion, label: &str) -> Result<()> {
        let written = {
            let _w = self.writes.lock().await;
            self.put(vec![k.clone()]).await
        };
        if let Err(e) = written {
            if let Err(d) = self.hsm.destroy_key_pair(&k.key_id).await {
                tracing::error!(error = %d, key = %label, "could not remove an unrecorded key pair");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Wrap `key`'s private key under the trusted KEK `kek_label` for a backup. Only a
    /// version generated for backup can be wrapped (the token refuses the others too).
    pub async fn wrap_for_backup(
        &self,
        key: &KeyRef,
        kek_label: &str,
    ) -> Result<(KeyVersion, WrappedKeyPair)> {
        let k = self.usable(key)?;
        if k.origin != KeyOrigin::GeneratedForBackup {
            return Err(Error::FailedPrecondition(format!(
                "{} v{} was not generated for backup (generate-key with backup = true); \
                 it never leaves the HSM",
                k.name, k.version
            )));
        }
        let wrapped = self
            .hsm
            .wrap_key_pair_for_backup(kind_of(k.algorithm), &k.key_id, kek_label)
            .await?;
        Ok((k, wrapped))
    }

    /// Put a backed-up key pair onto the token as version `version` of `name`, in state
    /// `pending`, with the certificate chain it had, unwrapped under `kek` (the KEK
    /// recombined from the officers' shares). Refused when this service has that
    /// version already, when the backup's algorithm and key kind disagree, or when a key
    /// with its CKA_ID is on the token.
    pub async fn restore_version(
        &self,
        name: &str,
        version: u32,
        algorithm: Algorithm,
        wrapped: &WrappedKeyPair,
        certificate_chain: Vec<Vec<u8>>,
        kek: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<KeyVersion> {
        if !super::valid_key_name(name) || version == 0 {
            return Err(invalid(format!(
                "key name {name:?} v{version}: {}, version from 1",
                super::KEY_NAME_RULE
            )));
        }
        if kind_of(algorithm) != wrapped.kind {
            return Err(invalid(format!(
                "{name} v{version}: algorithm {algorithm} does not match the backed-up key's kind"
            )));
        }
        let public = public_key_of(&wrapped.public)
            .map_err(|e| invalid(format!("{name} v{version}: public key: {e}")))?;
        let _c = self.creations.lock().await;
        if self.read_keys().contains_key(&(name.to_owned(), version)) {
            return Err(Error::AlreadyExists(format!(
                "{name} v{version} exists on this service; a restore never replaces a key"
            )));
        }
        let label = format!("sig/{name}/v{version}");
        self.hsm.restore_key_pair(wrapped, &label, kek).await?;
        let k = pending_version(
            KeyRef::new(name, version),
            algorithm,
            wrapped.id.clone(),
            &public,
            certificate_chain,
            KeyOrigin::Restored,
            self.clock.now(),
        )?;
        self.record_new(&k, &label).await?;
        tracing::info!(key = %name, version, kid = %k.kid, alg = %algorithm, "signing key version restored from a backup");
        Ok(k)
    }

    async fn transition(
        &self,
        name: &str,
        version: u32,
        change: impl FnOnce(&KeyVersion, Option<&KeyVersion>) -> Result<Vec<KeyVersion>>,
    ) -> Result<KeyVersion> {
        let _w = self.writes.lock().await;
        let k = self.get(&KeyRef::new(name, version.max(1)))?;
        let active = self.active(name);
        let changed = change(&k, active.as_ref())?;
        self.put(changed).await?;
        let k = self.get(&KeyRef::new(name, k.version))?;
        tracing::info!(key = %name, version = k.version, state = %k.state, "signing key version changed state");
        Ok(k)
    }

    /// `pending -> published`: the key appears in the JWKS.
    pub async fn publish(&self, name: &str, version: u32) -> Result<KeyVersion> {
        self.transition(name, version, |k, _| {
            if k.state != KeyState::Pending {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is {}; only a pending version can be published",
                    k.name, k.version, k.state
                )));
            }
            let mut k = k.clone();
            k.state = KeyState::Published;
            k.published_at = self.clock.now();
            Ok(vec![k])
        })
        .await
    }

    /// `published -> active`; the version active until now becomes verify-only (it stays
    /// in the JWKS until it is destroyed).
    pub async fn activate(&self, name: &str, version: u32) -> Result<KeyVersion> {
        self.transition(name, version, |k, active| {
            if k.state != KeyState::Published {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is {}; a version must be published before it is activated",
                    k.name, k.version, k.state
                )));
            }
            let t = self.clock.now();
            let mut out = Vec::new();
            if let Some(old) = active {
                let mut old = old.clone();
                old.state = KeyState::VerifyOnly;
                old.retired_at = t;
                out.push(old);
            }
            let mut k = k.clone();
            k.state = KeyState::Active;
            k.activated_at = t;
            out.push(k);
            Ok(out)
        })
        .await
    }

    /// `active -> verify-only`: stops signing, stays in the JWKS.
    pub async fn retire(&self, name: &str, version: u32) -> Result<KeyVersion> {
        self.transition(name, version, |k, _| {
            if k.state != KeyState::Active {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is {}; only the active version can be retired",
                    k.name, k.version, k.state
                )));
            }
            let mut k = k.clone();
            k.state = KeyState::VerifyOnly;
            k.retired_at = self.clock.now();
            Ok(vec![k])
        })
        .await
    }

    /// Destroy a version's HSM objects and mark it destroyed (out of the JWKS). Refused
    /// for the active version, and, unless `force` (a compromised key), while
    /// assertions signed by it may still be valid.
    pub async fn destroy(&self, name: &str, version: u32, force: bool) -> Result<KeyVersion> {
        let _w = self.writes.lock().await;
        let k = self.get(&KeyRef::new(name, version.max(1)))?;
        match k.state {
            KeyState::Active => {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is active; activate another version or retire it first",
                    k.name, k.version
                )))
            }
            KeyState::Destroyed => {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is already destroyed",
                    k.name, k.version
                )))
            }
            _ => {}
        }
        let t = self.clock.now();
        if !force && k.last_expiry > t {
            return Err(Error::FailedPrecondition(format!(
                "{} v{} signed assertions that may be valid until {}; destroy it after that \
                 (or force it for a compromised key)",
                k.name, k.version, k.last_expiry
            )));
        }
        let destroyed = self.hsm.destroy_key_pair(&k.key_id).await?;
        let mut k = k.clone();
        k.state = KeyState::Destroyed;
        k.destroyed_at = t;
        self.put(vec![k.clone()]).await?;
        tracing::warn!(key = %name, version = k.version, objects = destroyed, forced = force, "signing key version destroyed");
        Ok(k)
    }

    // ----------------------------------------------------------------------------
    // Signing.
    // ----------------------------------------------------------------------------

    /// The key `name` (empty: the default) for a caller with `grant`: refused when the
    /// grant does not name it, unknown when no such key exists.
    fn granted(&self, grant: &Grant, name: &str) -> Result<String> {
        let name = if name.is_empty() {
            self.config.default_key.as_str()
        } else {
            name
        };
        let allowed = match &grant.keys {
            Some(keys) => keys.iter().any(|k| k == name),
            None => name == self.config.default_key,
        };
        if !allowed {
            return Err(Error::PermissionDenied(format!(
                "this client may not sign with key {name:?}"
            )));
        }
        let exists = self
            .read_keys()
            .range((name.to_owned(), 0)..=(name.to_owned(), u32::MAX))
            .next()
            .is_some();
        if !exists {
            return Err(invalid(format!("key: no signing key named {name:?}")));
        }
        Ok(name.to_owned())
    }

    fn signing_version(&self, name: &str) -> Result<KeyVersion> {
        self.active(name).ok_or_else(|| {
            Error::FailedPrecondition(format!("signing key {name:?} has no active version"))
        })
    }

    async fn hsm_sign(&self, k: &KeyVersion, message: &[u8]) -> Result<Vec<u8>> {
        let input = match k.algorithm.digest(message) {
            Some(digest) => digest,
            None => message.to_vec(),
        };
        Ok(self
            .hsm
            .sign(&k.key_id, mechanism_of(k.algorithm), input)
            .await?)
    }

    /// Make sure the durable `last_expiry` of `k` covers `exp` before an assertion
    /// with that expiry leaves the service.
    async fn cover_expiry(&self, k: &KeyVersion, exp: u64) -> Result<()> {
        let current = self
            .read_keys()
            .get(&(k.name.clone(), k.version))
            .map_or(0, |k| k.last_expiry);
        if current >= exp {
            return Ok(());
        }
        let _w = self.writes.lock().await;
        let mark = (exp / EXPIRY_MARK_STEP + 1) * EXPIRY_MARK_STEP;
        let (name, version) = (k.name.clone(), k.version);
        let updated = self
            .store
            .write(move |txn| versions::raise_last_expiry(txn, &name, version, mark))
            .await
            .and_then(|r| r)
            .map_err(store_err)?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.insert((updated.name.clone(), updated.version), updated);
        Ok(())
    }

    /// Sign an assertion for a caller with `grant`.
    pub async fn sign_assertion(
        &self,
        grant: &Grant,
        req: &AssertionRequest,
    ) -> Result<SignedAssertion> {
        if self.config.issuer.is_empty() {
            return Err(Error::FailedPrecondition(
                "assertion signing is not configured (signing.issuer is empty)".into(),
            ));
        }
        let name = self.granted(grant, &req.key)?;
        if req.subject.is_empty() {
            return Err(invalid("subject must not be empty"));
        }
        check_len("subject", &req.subject)?;
        check_len("nonce", &req.nonce)?;
        check_list("audience", &req.audience)?;
        check_list("amr", &req.amr)?;
        if req.acr.is_empty() {
            return Err(invalid("acr must not be empty"));
        }
        if !self.config.acr_values.contains(&req.acr) {
            return Err(invalid(format!(
                "acr {:?} is not an accepted value (accepted: {})",
                req.acr,
                self.config.acr_values.join(", ")
            )));
        }
        if let Some(allowed) = &grant.acr {
            if !allowed.contains(&req.acr) {
                return Err(Error::PermissionDenied(format!(
                    "this client may not assert acr {:?}",
                    req.acr
                )));
            }
        }
        let ttl = match req.ttl_seconds {
            0 => self.config.default_ttl_seconds,
            t if t > self.config.max_ttl_seconds => {
                return Err(invalid(format!(
                    "ttl_seconds {t} exceeds the maximum of {}",
                    self.config.max_ttl_seconds
                )))
            }
            t => t,
        };
        let t = self.clock.now();
        let auth_time = match req.auth_time {
            0 => t,
            a if a > t + AUTH_TIME_SKEW => {
                return Err(invalid(format!("auth_time {a} is in the future")))
            }
            a if a + self.config.max_auth_age_seconds < t => {
                return Err(invalid(format!(
                    "auth_time {a} is more than {} seconds ago",
                    self.config.max_auth_age_seconds
                )))
            }
            a => a,
        };
        let k = self.signing_version(&name)?;
        let mut jti = [0u8; 16];
        self.rng
            .fill(&mut jti)
            .map_err(|_| Error::Internal("system RNG failed".into()))?;
        let jti = URL_SAFE_NO_PAD.encode(jti);
        let params = AssertionParams {
            issuer: &self.config.issuer,
            subject: &req.subject,
            audience: &req.audience,
            nonce: &req.nonce,
            acr: &req.acr,
            amr: &req.amr,
            auth_time,
            now: t,
            ttl_seconds: ttl,
            jti: &jti,
            extra_claims_json: &req.extra_claims_json,
        };
        let input = prepare_assertion(k.algorithm, &k.kid, &params)?;
        let expires_at = input.expires_at();
        let signature = self.hsm_sign(&k, input.bytes()).await?;
        self.cover_expiry(&k, expires_at).await?;
        Ok(SignedAssertion {
            jws: input.finish(&signature),
            kid: k.kid,
            expires_at,
        })
    }

    /// A raw signature by the active version of `name` for a caller with `grant`.
    /// `algorithm`, when given, must be the key's.
    pub async fn sign_raw(
        &self,
        grant: &Grant,
        name: &str,
        algorithm: Option<Algorithm>,
        input: SignInput,
        encoding: SignatureEncoding,
    ) -> Result<RawSignature> {
        let name = self.granted(grant, name)?;
        let k = self.signing_version(&name)?;
        if let Some(alg) = algorithm {
            if alg != k.algorithm {
                return Err(invalid(format!(
                    "algorithm {alg} does not match key {name:?}, which signs {}",
                    k.algorithm
                )));
            }
        }
        let is_ecdsa = matches!(k.algorithm, Algorithm::Es256 | Algorithm::Es384);
        if encoding == SignatureEncoding::Der && !is_ecdsa {
            return Err(invalid(format!(
                "DER encoding applies to ECDSA signatures only, not {}",
                k.algorithm
            )));
        }
        let to_sign = match input {
            SignInput::Message(m) => {
                if m.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(format!(
                        "message is {} bytes, the limit is {MAX_MESSAGE_LEN}",
                        m.len()
                    )));
                }
                k.algorithm.digest(&m).unwrap_or(m)
            }
            SignInput::Digest(d) => match k.algorithm.digest_algorithm() {
                None => {
                    return Err(invalid(format!(
                        "{} signs whole messages; send message, not digest",
                        k.algorithm
                    )))
                }
                Some(h) => {
                    let want = h.digest(b"").len();
                    if d.len() != want {
                        return Err(invalid(format!(
                            "digest must be {want} bytes for {}, got {}",
                            k.algorithm,
                            d.len()
                        )));
                    }
                    d
                }
            },
        };
        let raw = self
            .hsm
            .sign(&k.key_id, mechanism_of(k.algorithm), to_sign)
            .await?;
        let signature = match encoding {
            SignatureEncoding::Der => ecdsa_raw_to_der(&raw)?,
            SignatureEncoding::Raw => raw,
        };
        Ok(RawSignature {
            signature,
            kid: k.kid,
            algorithm: k.algorithm,
            encoding,
        })
    }

    /// The JWK Set of every published, active and verify-only version, with `x5c` and
    /// `x5t#S256` where a certificate chain is stored.
    pub fn jwks(&self) -> Result<String> {
        let keys = self.read_keys();
        let mut out = Vec::new();
        for k in keys.values().filter(|k| k.state.in_jwks()) {
            let pk = k.public_key()?;
            let chain = (!k.certificate_chain.is_empty()).then_some(&k.certificate_chain[..]);
            out.push(jwk(&pk, &k.kid, k.algorithm, chain));
        }
        Ok(jwks(&out))
    }

    // ----------------------------------------------------------------------------
    // Certificates (driven by ceremonies and officers).
    // ----------------------------------------------------------------------------

    fn usable(&self, key: &KeyRef) -> Result<KeyVersion> {
        let k = self.get(key)?;
        if k.state == KeyState::Destroyed {
            return Err(Error::FailedPrecondition(format!(
                "{} v{} is destroyed",
                k.name, k.version
            )));
        }
        Ok(k)
    }

    /// A PKCS#10 request for `key`, signed by it (DER).
    pub async fn create_csr(&self, key: &KeyRef, subject: &str) -> Result<Vec<u8>> {
        let k = self.usable(key)?;
        let tbs = pki::csr_to_sign(subject, &k.public_key()?, k.algorithm)?;
        let signature = self.hsm_sign(&k, tbs.bytes()).await?;
        Ok(tbs.assemble(&signature)?)
    }

    async fn serial(&self) -> Result<Vec<u8>> {
        let mut serial = self.hsm.random(16).await?.to_vec();
        // Positive and never zero, whatever the RNG gave.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        Ok(serial)
    }

    fn params(&self, req: &CertificateRequest, serial: Vec<u8>) -> Result<CertificateParams> {
        if req.validity_days == 0 || req.validity_days > MAX_VALIDITY_DAYS {
            return Err(invalid(format!(
                "validity_days must be between 1 and {MAX_VALIDITY_DAYS}"
            )));
        }
        let t = self.clock.now();
        Ok(CertificateParams {
            subject: req.subject.clone(),
            serial,
            not_before: t.saturating_sub(300),
            not_after: t + u64::from(req.validity_days) * 86_400,
            is_ca: req.is_ca,
            path_len: None,
            key_usage: if req.is_ca {
                KeyUsage::CA
            } else {
                KeyUsage::SIGNING
            },
            dns_names: req.dns_names.clone(),
        })
    }

    async fn store_chain(&self, k: &KeyVersion, chain: Vec<Vec<u8>>) -> Result<()> {
        let _w = self.writes.lock().await;
        let mut k = self.get(&KeyRef::new(k.name.clone(), k.version))?;
        k.certificate_chain = chain;
        self.put(vec![k]).await
    }

    /// A self-signed certificate for `key` (DER), stored as its chain.
    pub async fn self_sign(&self, key: &KeyRef, req: &CertificateRequest) -> Result<Vec<u8>> {
        let k = self.usable(key)?;
        let params = self.params(req, self.serial().await?)?;
        let pk = k.public_key()?;
        let name = Name::from_str(&req.subject)?;
        let tbs = pki::certificate_to_sign(&params, &pk, IssuerRef::new(&name, &pk, k.algorithm))?;
        let signature = self.hsm_sign(&k, tbs.bytes()).await?;
        let cert = tbs.assemble(&signature)?;
        self.store_chain(&k, vec![cert.clone()]).await?;
        Ok(cert)
    }

    /// A certificate for `key` issued by `issuer`, a key whose stored chain starts with
    /// a CA certificate. Stores and returns the chain, leaf first.
    pub async fn issue_certificate(
        &self,
        key: &KeyRef,
        issuer: &KeyRef,
        req: &CertificateRequest,
    ) -> Result<Vec<Vec<u8>>> {
        let k = self.usable(key)?;
        let ca = self.usable(issuer)?;
        let Some(ca_cert) = ca.certificate_chain.first() else {
            return Err(Error::FailedPrecondition(format!(
                "issuer {} v{} has no certificate; self-sign it or import its chain first",
                ca.name, ca.version
            )));
        };
        let ca_info = IssuerCertificate::from_der(ca_cert).map_err(|e| {
            Error::FailedPrecondition(format!(
                "issuer {} v{} cannot issue: {e}",
                ca.name, ca.version
            ))
        })?;
        if ca_info.public_key != ca.public_key()? {
            return Err(Error::FailedPrecondition(format!(
                "the certificate stored for {} v{} is not for its key",
                ca.name, ca.version
            )));
        }
        let params = self.params(req, self.serial().await?)?;
        let tbs = pki::certificate_to_sign(&params, &k.public_key()?, ca_info.issuer_ref())?;
        let signature = self.hsm_sign(&ca, tbs.bytes()).await?;
        let leaf = tbs.assemble(&signature)?;
        let mut chain = vec![leaf];
        chain.extend(ca.certificate_chain.iter().cloned());
        self.store_chain(&k, chain.clone()).await?;
        Ok(chain)
    }

    /// Check a key version after generation: read its public key back from the token and
    /// compare it with the record, read its security attributes, and sign
    /// [`SELF_TEST_PREFIX`]` || context` with it, verified in software under the
    /// recorded public key. Works in every state but destroyed.
    pub async fn self_test(&self, key: &KeyRef, context: &str) -> Result<SelfTest> {
        let k = self.usable(key)?;
        let recorded = k.public_key()?;
        let attrs = self
            .hsm
            .public_key_attributes(&k.key_id, kind_of(k.algorithm))
            .await?;
        let public_key_matches = public_key_of(&attrs).is_ok_and(|pk| pk == recorded);
        let facts = self.hsm.private_key_facts(&k.key_id).await?;
        let message = [SELF_TEST_PREFIX, context.as_bytes()].concat();
        let signature = self.hsm_sign(&k, &message).await?;
        Ok(SelfTest {
            public_key_matches,
            signature_verifies: recorded.verify(&message, &signature),
            token: facts.token,
            sensitive: facts.sensitive,
            extractable: facts.extractable,
            local: facts.local,
            never_extractable: facts.never_extractable,
            sign: facts.sign,
            decrypt: facts.decrypt,
            wrap_with_trusted: facts.wrap_with_trusted,
            origin: k.origin,
        })
    }

    /// The certificate chain stored for `key` (DER, leaf first; empty when none).
    pub fn certificate_chain(&self, key: &KeyRef) -> Result<Vec<Vec<u8>>> {
        Ok(self.get(key)?.certificate_chain)
    }
}
