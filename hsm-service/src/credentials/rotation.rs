//! Seed master key rotation: a new master key on the token, every stored seed re-wrapped
//! under it inside the HSM, new enrolments pointed at it. The `rotate-seed-master-key`
//! ceremony step runs it (a quorum decides when); the credential domain owns it because
//! it rewrites credential records.
//!
//! The new key carries the unwrap template (see [`crate::hsm::seeds`]), so a rotation
//! from a key made before it is the migration of an existing deployment; a key that has
//! the template cannot be rotated away from with the user PIN (see [`SeedRotator::rotate`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{decode_version, master_key_version_in, store_error, MASTER_KEY_VERSION_META};
use crate::error::{Error, Result};
use crate::hsm::seeds::master_key_label;
use crate::hsm::Hsm;
use crate::store::ops::{get_meta, put_meta};
use crate::store::{CredentialRecord, CredentialStore, Rollback, Store, StoreError, Table, Update};

/// Store meta key present while a seed master key rotation runs: the version it moves
/// records away from (4 bytes, big-endian); the version it moves them to is
/// [`MASTER_KEY_VERSION_META`]. Written in the switch's unit of work, removed when the
/// last record is re-wrapped.
pub const ROTATION_META: &str = "credentials.seed_master_key_rotation";

/// What a rotation did (it goes into the ceremony transcript as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRotation {
    /// Token label of the master key new enrolments used before.
    pub old_key_label: String,
    /// Token label of the new master key.
    pub new_key_label: String,
    /// Credentials whose seed was re-wrapped under the new key.
    pub rewrapped: u64,
    /// Credentials already under the new key (an earlier, interrupted rotation).
    pub already_rewrapped: u64,
}

/// Rotates the seed master key of one credential service: shares its current version
/// (see [`super::Credentials::master_key_version`]) and its store.
#[derive(Clone)]
pub struct SeedRotator {
    hsm: Hsm,
    store: Arc<Store>,
    version: Arc<AtomicU32>,
}

impl std::fmt::Debug for SeedRotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedRotator")
            .field("version", &self.version.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SeedRotator {
    /// A rotator over `store`, moving `version` on.
    pub fn new(hsm: Hsm, store: Arc<Store>, version: Arc<AtomicU32>) -> SeedRotator {
        SeedRotator {
            hsm,
            store,
            version,
        }
    }

    /// Create seed master key N+1, point new enrolments at it, re-wrap every stored
    /// seed under it inside the HSM, `batch` per job. Each record is updated with a
    /// compare (its blob and version unchanged), so a credential changed meanwhile is
    /// re-read and done again, and a deleted one is skipped.
    ///
    /// N is the store's current version ([`MASTER_KEY_VERSION_META`]), not this
    /// instance's cached one: the switch to N+1 is a compare-and-set in one unit of
    /// work that also records the rotation as running ([`ROTATION_META`]); every
    /// instance's enrolments read the version again in the unit of work that inserts
    /// them (see [`super::Credentials::create_by`]), so from the switch's commit on no
    /// seed is stored under N, and one pass over the records finds every one left.
    ///
    /// Resumable: after an interrupted rotation (the process died, the database went
    /// away) the next one finishes it (moves the records still under N to N+1, makes no
    /// new key) and only then ends it; records already under N+1 are left alone.
    pub async fn rotate(&self, batch: usize) -> Result<SeedRotation> {
        let (current, running) = self
            .store
            .read(|txn| {
                let current = master_key_version_in(txn)?.map_err(Rollback)?;
                let running = get_meta(txn, ROTATION_META)?;
                Ok((current, running))
            })
            .await
            .map_err(store_error)?;
        let running = decode_version(ROTATION_META, running).map_err(store_error)?;
        self.version.fetch_max(current, Ordering::SeqCst);
        let (old, new) = match running {
            Some(from) => {
                tracing::info!(
                    old = %master_key_label(from),
                    new = %master_key_label(current),
                    "resuming an interrupted seed master key rotation"
                );
                (from, current)
            }
            None => {
                let new = current
                    .checked_add(1)
                    .ok_or_else(|| Error::Internal("seed master key version overflow".into()))?;
                (current, new)
            }
        };
        if running.is_none() {
            // Re-wrapping needs an extractable copy of each seed; a master key with the
            // unwrap template never makes one (that is its point: with the user PIN
            // alone, a re-wrap under another key and an extraction are the same
            // operation). So only a master key made before the template can be rotated
            // away from: that is how an existing deployment moves its seeds under a key
            // that has it.
            if self.hsm.seed_master_key_confined(old).await? {
                return Err(Error::FailedPrecondition(format!(
                    "{} already confines what it unwraps (CKA_UNWRAP_TEMPLATE), so its seeds cannot be re-wrapped with the user PIN; nothing was changed",
                    master_key_label(old)
                )));
            }
            self.hsm.ensure_seed_master_key(new).await?;
            self.switch(old, new).await?;
        }
        // From now on new enrolments (of every instance) wrap under the new key; a
        // rotation that fails half-way leaves records under either key, both kept and
        // both usable, until the next rotation finishes it.
        self.version.fetch_max(new, Ordering::SeqCst);
        tracing::info!(
            old = %master_key_label(old),
            new = %master_key_label(new),
            "seed master key rotation started"
        );
        let mut rewrapped = 0u64;
        let mut already = 0u64;
        let mut after: Option<crate::store::CredentialKey> = None;
        loop {
            // Every tenant's records, in (tenant, id) order.
            let page = self
                .store
                .list(None, after.as_ref(), batch.max(1))
                .await
                .map_err(store_error)?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(crate::store::CredentialKey {
                tenant: last.tenant.clone(),
                id: last.id.clone(),
            });
            let (done, todo): (Vec<_>, Vec<_>) =
                page.into_iter().partition(|r| r.master_key_version == new);
            already += done.len() as u64;
            rewrapped += self.rewrap_batch(new, todo).await?;
        }
        self.finish(old, new).await?;
        tracing::info!(
            old = %master_key_label(old),
            new = %master_key_label(new),
            rewrapped,
            "seed master key rotated; the old key is kept"
        );
        Ok(SeedRotation {
            old_key_label: master_key_label(old),
            new_key_label: master_key_label(new),
            rewrapped,
            already_rewrapped: already,
        })
    }

    /// The switch, one unit of work: the store's version from `old` to `new` and the
    /// rotation recorded as running, if the version is still `old` and no rotation runs
    /// (another instance's rotation may have got there first).
    async fn switch(&self, old: u32, new: u32) -> Result<()> {
        let seen = self
            .store
            .write(move |txn| {
                let current = match master_key_version_in(txn)? {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                if current != old || get_meta(txn, ROTATION_META)?.is_some() {
                    return Ok(Ok(Some(current)));
                }
                if let Err(e) = put_meta(txn, MASTER_KEY_VERSION_META, &new.to_be_bytes())? {
                    return Ok(Err(e));
                }
                if let Err(e) = put_meta(txn, ROTATION_META, &old.to_be_bytes())? {
                    return Err(Rollback(e));
                }
                Ok(Ok(None))
            })
            .await
            .and_then(|r| r)
            .map_err(store_error)?;
        match seen {
            None => Ok(()),
            Some(current) => Err(Error::FailedPrecondition(format!(
                "another seed master key rotation started meanwhile (the store is at {}); this one changed nothing (it may have left {} unused on the token)",
                master_key_label(current),
                master_key_label(new)
            ))),
        }
    }

    /// The end: the rotation from `old` to `new` recorded as done (if it is still the
    /// running one).
    async fn finish(&self, old: u32, new: u32) -> Result<()> {
        self.store
            .write(move |txn| {
                let running = decode_version(ROTATION_META, get_meta(txn, ROTATION_META)?);
                let current = master_key_version_in(txn)?;
                if running == Ok(Some(old)) && current == Ok(new) {
                    txn.delete(Table::Meta, ROTATION_META)?;
                }
                Ok(())
            })
            .await
            .map_err(store_error)
    }

    /// Re-wrap `records` (none of them under `new`) and store each with a compare;
    /// a record changed meanwhile is re-read and redone (a few rounds at most).
    async fn rewrap_batch(&self, new: u32, mut records: Vec<CredentialRecord>) -> Result<u64> {
        const ROUNDS: usize = 5;
        let mut count = 0u64;
        for _ in 0..ROUNDS {
            if records.is_empty() {
                return Ok(count);
            }
            let mut redo = Vec::new();
            // Grouped by the version each is wrapped under (normally all the old one).
            let mut by_version: BTreeMap<u32, Vec<CredentialRecord>> = BTreeMap::new();
            for r in records.drain(..) {
                by_version.entry(r.master_key_version).or_default().push(r);
            }
            for (from, recs) in by_version {
                let items = super::binding::rewrap_items(&recs)?;
                let rewrapped = self.hsm.rewrap_seeds(from, new, items).await?;
                for (rec, out) in recs.into_iter().zip(rewrapped) {
                    let Some((blob, mac)) = out else {
                        // Never re-bind a blob that is not bound to its record: that
                        // would launder a moved seed. The record stays as it is.
                        return Err(super::binding::refused(
                            &rec,
                            crate::hsm::Error::BindingMismatch,
                        ));
                    };
                    let expect = rec.wrapped_seed.clone();
                    let stored = self
                        .store
                        .update(&rec.tenant, &rec.id, move |r| {
                            if r.master_key_version != from || r.wrapped_seed != expect {
                                return Update::Keep(false);
                            }
                            r.wrapped_seed = blob;
                            r.seed_binding = Some(mac);
                            r.master_key_version = new;
                            Update::Write(true)
                        })
                        .await;
                    match stored {
                        Ok(true) => count += 1,
                        Ok(false) => {
                            if let Some(now) = self
                                .store
                                .get(&rec.tenant, &rec.id)
                                .await
                                .map_err(store_error)?
                            {
                                if now.master_key_version != new {
                                    redo.push(now);
                                }
                            }
                        }
                        Err(StoreError::NotFound) => {}
                        Err(e) => return Err(store_error(e)),
                    }
                }
            }
            records = redo;
        }
        if records.is_empty() {
            Ok(count)
        } else {
            Err(Error::FailedPrecondition(format!(
                "{} credential(s) kept changing during the re-wrap; run the rotation again",
                records.len()
            )))
        }
    }
}
