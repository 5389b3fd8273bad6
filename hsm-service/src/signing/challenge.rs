//! Signatures over app challenge payloads: [`Signer::sign_challenge`].
//!
//! Only keys of usage `challenge` sign them, and they sign nothing else (no RPC lets a
//! caller choose the bytes: the payload is built by `devices` from the challenge's own
//! fields), so a challenge signature never passes for an assertion or a raw signature.

use super::signer::Signer;
use super::versions::Usage;
use super::{ecdsa_raw_to_der, Algorithm};
use crate::error::{Error, Result};

/// A challenge payload's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeSignature {
    /// ECDSA P-256/SHA-256, DER `Ecdsa-Sig-Value`.
    pub der: Vec<u8>,
    /// `kid` of the key version that signed (in the `challenge` JWKS).
    pub kid: String,
}

impl Signer {
    /// Sign `payload` in the HSM with the active version of `[signing]
    /// default_challenge_key`, which must be an ES256 key of usage `challenge`.
    pub async fn sign_challenge(&self, payload: &[u8]) -> Result<ChallengeSignature> {
        let name = self.config().default_challenge_key.clone();
        let k = self
            .looked_up(|s| s.signing_version(&name, Usage::Challenge))
            .await?;
        if k.algorithm != Algorithm::Es256 {
            return Err(Error::FailedPrecondition(format!(
                "challenge key {name:?} signs {}; app challenges need ES256 (ECDSA P-256)",
                k.algorithm
            )));
        }
        let raw = self.hsm_sign(&k, payload).await?;
        Ok(ChallengeSignature {
            der: ecdsa_raw_to_der(&raw)?,
            kid: k.kid,
        })
    }
}
