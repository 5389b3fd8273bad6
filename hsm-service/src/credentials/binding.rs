//! Each wrapped seed is bound to its record: an HMAC computed in the HSM (see
//! [`crate::hsm::binding`]) over the record's tenant, id, kind, algorithm, digits and
//! period and over the blob. Someone who can write the store but not use the HSM cannot
//! move a blob into another record (to verify B's codes with A's seed, or A's codes
//! against B's record): the binding is checked before the HSM unwraps the blob, and a
//! mismatch is refused as tampering (`DATA_LOSS`, never a verdict).
//!
//! Records from before bindings get one from a one-time migration at start-up
//! ([`migrate`]); after it, a record without a binding is refused like a mismatch.

use std::sync::Arc;

use super::store_error;
use crate::error::{Error, Result};
use crate::hsm::binding::{SeedBinding, BINDING_LEN};
use crate::hsm::Hsm;
use crate::store::{CredentialKey, CredentialRecord, CredentialStore, Store, StoreError, Update};

/// Store meta key set once every record has a binding.
pub const BINDINGS_MIGRATED_META: &str = "credentials.seed_bindings_migrated";

/// Domain tag of the binding context, versioned with its encoding.
const CONTEXT_TAG: &[u8] = b"hsm-service seed binding v1";

/// The canonical binding context of `rec` in `tenant`: the tag, then tenant, id, kind,
/// algorithm, digits and period, each with a 4-byte big-endian length, so no two
/// different records share an encoding. (The HSM appends the blob the same way.)
pub fn context(tenant: &str, rec: &CredentialRecord) -> Vec<u8> {
    let digits = [rec.digits];
    let period = rec.period_seconds.to_be_bytes();
    let fields: [&[u8]; 7] = [
        CONTEXT_TAG,
        tenant.as_bytes(),
        rec.id.as_bytes(),
        rec.kind.uri_name().as_bytes(),
        rec.algorithm.uri_name().as_bytes(),
        &digits,
        &period,
    ];
    let mut out = Vec::with_capacity(fields.iter().map(|f| 4 + f.len()).sum());
    for f in fields {
        // Every field is bounded (ids 128 bytes, tenants 128, names a few): far below 4 GiB.
        out.extend_from_slice(&u32::try_from(f.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// The binding the HSM must find before it unwraps `rec`'s seed. A record without one
/// (never migrated) is refused as tampering.
pub(super) fn expected(rec: &CredentialRecord) -> Result<SeedBinding> {
    let mac = rec.seed_binding.ok_or_else(|| {
        tampered(rec, "has no seed binding");
        Error::Integrity(format!(
            "credential {:?} failed its integrity check",
            rec.id
        ))
    })?;
    Ok(SeedBinding {
        context: context(&rec.tenant, rec),
        mac,
    })
}

/// The binding `rec`'s unwrapped seed is cached under, if it has one (no check, no log:
/// for dropping the cached copy).
pub(super) fn cached_under(rec: &CredentialRecord) -> Option<SeedBinding> {
    rec.seed_binding.map(|mac| SeedBinding {
        context: context(&rec.tenant, rec),
        mac,
    })
}

/// Compute `rec`'s binding (its blob as it is now) in the HSM.
pub(super) async fn compute(hsm: &Hsm, rec: &CredentialRecord) -> Result<[u8; BINDING_LEN]> {
    let mut macs = macs(hsm, std::slice::from_ref(rec)).await?;
    macs.pop()
        .ok_or_else(|| Error::Internal("no binding computed".into()))
}

/// Bind each of `recs` (its blob as it is now), in one HSM job: for records made
/// outside [`super::Credentials::create`], such as bulk imports into the store.
pub async fn bind_all(hsm: &Hsm, recs: &mut [CredentialRecord]) -> Result<()> {
    let macs = macs(hsm, recs).await?;
    for (rec, mac) in recs.iter_mut().zip(macs) {
        rec.seed_binding = Some(mac);
    }
    Ok(())
}

async fn macs(hsm: &Hsm, recs: &[CredentialRecord]) -> Result<Vec<[u8; BINDING_LEN]>> {
    let items = recs
        .iter()
        .map(|r| (context(&r.tenant, r), r.wrapped_seed.clone()))
        .collect();
    Ok(hsm.seed_bindings(items).await?)
}

/// The HSM refused `rec`'s blob: map it to the tampering answer, logging it (ids and
/// tenants only, never a blob or a MAC).
pub(super) fn refused(rec: &CredentialRecord, e: crate::hsm::Error) -> Error {
    match e {
        crate::hsm::Error::BindingMismatch => {
            tampered(rec, "has a wrapped seed not bound to it");
            Error::Integrity(format!(
                "credential {:?} failed its integrity check",
                rec.id
            ))
        }
        other => Error::Hsm(other),
    }
}

fn tampered(rec: &CredentialRecord, what: &str) {
    tracing::error!(
        target: "hsm_service::tamper",
        credential = %rec.id,
        tenant = %rec.tenant,
        master_key_version = rec.master_key_version,
        "possible store tampering: the credential record {what}; refused without unwrapping"
    );
}

/// Contexts of `recs` with their blobs, as the HSM re-wrap takes them.
pub(super) fn rewrap_items(recs: &[CredentialRecord]) -> Result<Vec<(Arc<[u8]>, SeedBinding)>> {
    recs.iter()
        .map(|r| Ok((Arc::from(r.wrapped_seed.as_slice()), expected(r)?)))
        .collect()
}

/// One-time start-up migration: give every record without a binding one (over its blob
/// as stored now), `batch` per HSM job, then set [`BINDINGS_MIGRATED_META`] so later
/// starts skip the scan. Creates the binding key on the token first; refuses when the
/// store says records were bound but the token lacks the key (a wrong token: a new key
/// would make every record fail its check). Returns the records bound.
pub async fn migrate(hsm: &Hsm, store: &Store, batch: usize) -> Result<u64> {
    let migrated = store
        .get_meta(BINDINGS_MIGRATED_META)
        .await
        .map_err(store_error)?
        .is_some();
    if migrated {
        if !hsm.has_seed_binding_key().await? {
            let count = store.count().await.map_err(store_error)?;
            if count > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "the token has no {} but the store holds {count} credentials bound with it: wrong token?",
                    crate::hsm::binding::SEED_BINDING_KEY_LABEL
                )));
            }
            hsm.ensure_seed_binding_key().await?;
        }
        return Ok(0);
    }
    hsm.ensure_seed_binding_key().await?;
    let mut bound = 0u64;
    let mut after: Option<CredentialKey> = None;
    loop {
        // Every tenant's records, in (tenant, id) order.
        let page = store
            .list(None, after.as_ref(), batch.max(1))
            .await
            .map_err(store_error)?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(CredentialKey {
            tenant: last.tenant.clone(),
            id: last.id.clone(),
        });
        let todo: Vec<CredentialRecord> = page
            .into_iter()
            .filter(|r| r.seed_binding.is_none())
            .collect();
        if todo.is_empty() {
            continue;
        }
        let macs = macs(hsm, &todo).await?;
        for (rec, mac) in todo.into_iter().zip(macs) {
            let blob = rec.wrapped_seed;
            let stored = store
                .update(&rec.tenant, &rec.id, move |r| {
                    // Only the blob that was bound, and only if still unbound (another
                    // instance may be migrating too).
                    if r.seed_binding.is_some() || r.wrapped_seed != blob {
                        return Update::Keep(false);
                    }
                    r.seed_binding = Some(mac);
                    Update::Write(true)
                })
                .await;
            match stored {
                Ok(true) => bound += 1,
                Ok(false) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
    }
    // A record enrolled meanwhile was bound at enrolment (enrolment always binds).
    store
        .put_meta(BINDINGS_MIGRATED_META, vec![1])
        .await
        .map_err(store_error)?;
    if bound > 0 {
        tracing::info!(bound, "seed bindings added to existing credentials");
    }
    Ok(bound)
}
