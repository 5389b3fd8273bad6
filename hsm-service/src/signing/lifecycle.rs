//! Key life cycle, driven by key ceremonies (dev mode bootstraps the default key):
//! generate, restore from a backup, wrap for a backup, publish, activate, retire,
//! destroy.

use super::signer::{invalid, kind_of, public_key_of, KeyRef, Signer};
use super::versions::{KeyOrigin, KeyState, KeyVersion, Usage};
use super::{thumbprint, Algorithm, PublicKey};
use crate::error::{Error, Result};
use crate::hsm::backup::WrappedKeyPair;

/// A key version as a backup file gives it, for [`Signer::restore_version`].
#[derive(Debug)]
pub struct BackedUpKey<'a> {
    /// Key name.
    pub name: &'a str,
    /// Version.
    pub version: u32,
    /// Algorithm it signs with.
    pub algorithm: Algorithm,
    /// The usage the file records (`None`: a format-1 file, which records none).
    pub usage: Option<Usage>,
    /// The key pair, its private key wrapped under the KEK.
    pub wrapped: &'a WrappedKeyPair,
    /// Its certificate chain, DER, leaf first.
    pub certificate_chain: Vec<Vec<u8>>,
}

impl Signer {
    /// The record of a key version that was just put on the token: `pending`, no dates,
    /// no certificates.
    fn pending_version(
        &self,
        key: KeyRef,
        algorithm: Algorithm,
        key_id: Vec<u8>,
        public: &PublicKey,
        origin: KeyOrigin,
        usage: Usage,
    ) -> Result<KeyVersion> {
        Ok(KeyVersion {
            name: key.name,
            version: key.version,
            state: KeyState::Pending,
            algorithm,
            key_id,
            kid: thumbprint(public),
            public_key_der: public.to_spki_der()?,
            certificate_chain: Vec::new(),
            created_at: self.clock.now(),
            published_at: 0,
            activated_at: 0,
            retired_at: 0,
            destroyed_at: 0,
            last_expiry: 0,
            origin,
            usage,
        })
    }

    /// Generate a new version of `name` for `usage` in the HSM, never extractable, in
    /// state `pending`. A new version of an existing name keeps the name's usage.
    pub async fn create_version(
        &self,
        name: &str,
        algorithm: Algorithm,
        usage: Usage,
    ) -> Result<KeyVersion> {
        self.generate_version(name, algorithm, KeyOrigin::Generated, usage)
            .await
    }

    /// Generate a new version of `name` that can be backed up: it leaves the token only
    /// wrapped under a trusted KEK (see [`KeyOrigin::GeneratedForBackup`]).
    pub async fn create_backup_version(
        &self,
        name: &str,
        algorithm: Algorithm,
        usage: Usage,
    ) -> Result<KeyVersion> {
        self.generate_version(name, algorithm, KeyOrigin::GeneratedForBackup, usage)
            .await
    }

    /// The usage every version of `name` has (None: no version yet).
    fn usage_of(&self, name: &str) -> Option<Usage> {
        self.list(Some(name)).last().map(|k| k.usage)
    }

    async fn generate_version(
        &self,
        name: &str,
        algorithm: Algorithm,
        origin: KeyOrigin,
        usage: Usage,
    ) -> Result<KeyVersion> {
        if !super::valid_key_name(name) {
            return Err(invalid(format!(
                "key name {name:?}: {}",
                super::KEY_NAME_RULE
            )));
        }
        let _c = self.creations.lock().await;
        // The version number and the usage from the newest state of every instance (the
        // write is a compare-and-set as well: a version another instance made meanwhile
        // is refused, and its key pair removed again).
        self.refresh().await?;
        if let Some(existing) = self.usage_of(name).filter(|u| *u != usage) {
            return Err(Error::FailedPrecondition(format!(
                "key {name:?} is a {existing} key; a new version keeps its usage (not {usage})"
            )));
        }
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
        let k = self.pending_version(
            KeyRef::new(name, version),
            algorithm,
            pair.id,
            &public,
            origin,
            usage,
        )?;
        self.record_new(&k, &label).await?;
        tracing::info!(key = %name, version, kid = %k.kid, alg = %algorithm, origin = origin.as_str(), usage = %usage, "signing key version created");
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
    /// recombined from the officers' shares), with `usage`, the usage the backup file
    /// records. A format-1 backup file records none (`None`): the restored version then
    /// has the usage of the name's other versions on this service, else the one its
    /// chain shows (a CA certificate: `ca`; otherwise `signing`). Refused, before anything
    /// is put on the token, when this service has that version already, when the name
    /// has another usage here, when the backup's algorithm and key kind disagree, or
    /// when a key with its CKA_ID is on the token.
    pub async fn restore_version(
        &self,
        key: BackedUpKey<'_>,
        kek: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<KeyVersion> {
        let BackedUpKey {
            name,
            version,
            algorithm,
            usage,
            wrapped,
            certificate_chain,
        } = key;
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
        self.refresh().await?;
        if self.read_keys().contains_key(&(name.to_owned(), version)) {
            return Err(Error::AlreadyExists(format!(
                "{name} v{version} exists on this service; a restore never replaces a key"
            )));
        }
        let usage = match (usage, self.usage_of(name)) {
            (Some(backed_up), Some(here)) if backed_up != here => {
                return Err(Error::FailedPrecondition(format!(
                    "{name} v{version} was backed up as a {backed_up} key; {name} is a {here} \
                     key on this service (every version of a name has one usage)"
                )))
            }
            (Some(backed_up), _) => backed_up,
            (None, Some(here)) => here,
            (None, None) => super::versions::chain_usage(&certificate_chain),
        };
        let label = format!("sig/{name}/v{version}");
        self.hsm.restore_key_pair(wrapped, &label, kek).await?;
        let mut k = self.pending_version(
            KeyRef::new(name, version),
            algorithm,
            wrapped.id.clone(),
            &public,
            KeyOrigin::Restored,
            usage,
        )?;
        k.certificate_chain = certificate_chain;
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
        self.refresh_locked().await?;
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
            if k.usage == Usage::Ca {
                return Err(Error::FailedPrecondition(format!(
                    "{} v{} is a ca key; ca keys are never published (they are in no JWKS)",
                    k.name, k.version
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
        // The newest record (another instance may have raised its `last_expiry`) before
        // the HSM objects go.
        self.refresh_locked().await?;
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
}
