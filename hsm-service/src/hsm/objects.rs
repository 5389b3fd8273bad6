//! Object search (`C_FindObjects*`) behind a cache of handles.
//!
//! A search on a token with many objects takes tens of milliseconds (25 ms measured on a
//! 1000-object SoftHSM token), so a handle is looked up once and kept; the hot path never
//! searches. A cached handle that the token no longer knows is dropped and searched again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use cryptoki::object::{Attribute, AttributeType};
pub use cryptoki::object::{ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Error, Hsm, Result};

/// Label-and-class (and CKA_ID-and-class) to handle.
#[derive(Default)]
pub(crate) struct HandleCache {
    map: RwLock<HashMap<(u64, String), ObjectHandle>>,
    by_id: RwLock<HashMap<(u64, Vec<u8>), ObjectHandle>>,
    /// Searches that reached the token; the cache's tests and benches read it.
    pub(crate) searches: AtomicU64,
    /// `PoolStats::sessions_replaced + stale_handles` when the cache was last known good.
    losses_seen: AtomicU64,
}

impl HandleCache {
    /// Forget every handle if a session was lost or a handle found stale since the last
    /// look (`losses`: `PoolStats::sessions_replaced + stale_handles`): a token drops its
    /// object handles with the application's last session (SoftHSM does), one that comes
    /// back after a device error or removal may number its objects anew, and an object
    /// may have been removed and made again (faults.rs, design note).
    fn sync(&self, losses: u64) {
        if self.losses_seen.swap(losses, Ordering::Relaxed) != losses {
            self.clear();
        }
    }

    fn clear(&self) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl HandleCache {
    fn get(&self, class: ObjectClass, label: &str) -> Option<ObjectHandle> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(class_key(class), label.to_owned())).copied()
    }

    fn put(&self, class: ObjectClass, label: &str, handle: ObjectHandle) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert((class_key(class), label.to_owned()), handle);
    }

    fn forget(&self, class: ObjectClass, label: &str) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&(class_key(class), label.to_owned()));
    }
}

impl HandleCache {
    fn get_by_id(&self, class: ObjectClass, id: &[u8]) -> Option<ObjectHandle> {
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(class_key(class), id.to_vec())).copied()
    }

    fn put_by_id(&self, class: ObjectClass, id: &[u8], handle: ObjectHandle) {
        let mut map = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        map.insert((class_key(class), id.to_vec()), handle);
    }

    fn forget_by_id(&self, class: ObjectClass, id: &[u8]) {
        let mut map = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&(class_key(class), id.to_vec()));
    }
}

fn class_key(class: ObjectClass) -> u64 {
    // CK_OBJECT_CLASS is a CK_ULONG: at most 64 bits on every supported target.
    *class
}

/// Search the token for the one object of `class` called `label`.
pub(crate) fn search(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>> {
    let found = session.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Invalid(format!(
            "{} objects labelled {label:?}; labels must be unique",
            found.len()
        ))),
    }
}

/// Search the token for the one object of `class` whose CKA_ID is `id`.
pub(crate) fn search_by_id(
    session: &Session,
    class: ObjectClass,
    id: &[u8],
) -> Result<Option<ObjectHandle>> {
    let found = session.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Invalid(format!(
            "{} objects of one class share a CKA_ID; key ids must be unique",
            found.len()
        ))),
    }
}

impl Hsm {
    /// The handle of the object of `class` whose CKA_ID is `id`, from the cache or, the
    /// first time, from a search. `Ok(None)` when the token has no such object.
    pub async fn find_object_by_id(
        &self,
        class: ObjectClass,
        id: &[u8],
    ) -> Result<Option<ObjectHandle>> {
        self.sync_handles();
        if let Some(h) = self.inner.handles.get_by_id(class, id) {
            return Ok(Some(h));
        }
        let owned = id.to_vec();
        let found = self
            .inner
            .pool
            .submit(move |w| w.run(true, |s, _| search_by_id(s, class, &owned)))
            .await?;
        self.inner.handles.searches.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = found {
            self.inner.handles.put_by_id(class, id, h);
        }
        Ok(found)
    }

    fn sync_handles(&self) {
        let stats = self.stats();
        let losses = stats.sessions_replaced.load(Ordering::Relaxed)
            + stats.stale_handles.load(Ordering::Relaxed);
        self.inner.handles.sync(losses);
    }

    /// Forget every cached handle (one was found stale), so that each is searched again.
    pub(crate) fn forget_all_objects(&self) {
        self.inner.handles.clear();
    }

    /// Drop a handle cached by CKA_ID (stale, or the object was destroyed).
    pub fn forget_object_by_id(&self, class: ObjectClass, id: &[u8]) {
        self.inner.handles.forget_by_id(class, id);
    }

    /// The handle of the object of `class` labelled `label`, from the cache or, the first
    /// time, from a search. `Ok(None)` when the token has no such object.
    pub async fn find_object(
        &self,
        class: ObjectClass,
        label: &str,
    ) -> Result<Option<ObjectHandle>> {
        self.sync_handles();
        if let Some(h) = self.inner.handles.get(class, label) {
            return Ok(Some(h));
        }
        let owned = label.to_owned();
        let found = self
            .inner
            .pool
            .submit(move |w| w.run(true, |s, _| search(s, class, &owned)))
            .await?;
        self.inner.handles.searches.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = found {
            self.inner.handles.put(class, label, h);
        }
        Ok(found)
    }

    /// Drop a cached handle (after the token said it is stale, or the object was
    /// destroyed), so that the next lookup searches again.
    pub fn forget_object(&self, class: ObjectClass, label: &str) {
        self.inner.handles.forget(class, label);
    }

    /// The security-relevant attributes of the object of `class` labelled `label`.
    pub async fn key_facts(&self, class: ObjectClass, label: &str) -> Result<KeyFacts> {
        let handle = self
            .find_object(class, label)
            .await?
            .ok_or_else(|| Error::ObjectNotFound(label.to_owned()))?;
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let attrs = s.get_attributes(
                        handle,
                        &[
                            AttributeType::Token,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::NeverExtractable,
                            AttributeType::Local,
                        ],
                    )?;
                    let mut f = KeyFacts::default();
                    for a in attrs {
                        match a {
                            Attribute::Token(v) => f.token = v,
                            Attribute::Sensitive(v) => f.sensitive = v,
                            Attribute::Extractable(v) => f.extractable = v,
                            Attribute::AlwaysSensitive(v) => f.always_sensitive = v,
                            Attribute::NeverExtractable(v) => f.never_extractable = v,
                            Attribute::Local(v) => f.local = v,
                            _ => {}
                        }
                    }
                    Ok(f)
                })
            })
            .await
    }

    /// Number of object searches that reached the token since start.
    pub fn object_searches(&self) -> u64 {
        self.inner.handles.searches.load(Ordering::Relaxed)
    }
}

/// The attributes that say whether a key can leave the HSM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyFacts {
    /// CKA_TOKEN: persistent on the token.
    pub token: bool,
    /// CKA_SENSITIVE: the value cannot be read in plaintext.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE: the value can be wrapped out.
    pub extractable: bool,
    /// CKA_ALWAYS_SENSITIVE: it has been sensitive since creation.
    pub always_sensitive: bool,
    /// CKA_NEVER_EXTRACTABLE: it has never been extractable.
    pub never_extractable: bool,
    /// CKA_LOCAL: generated on the token.
    pub local: bool,
}
