//! The check of a freshly generated or restored key version: [`Signer::self_test`].

use super::signer::{kind_of, public_key_of, KeyRef, Signer};
use super::versions::KeyOrigin;
use crate::error::Result;

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

impl Signer {
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
}
