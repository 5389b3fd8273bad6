//! The public keys relying parties verify with: [`Signer::jwks`].

use super::signer::Signer;
use super::{jwk, jwks};
use crate::error::Result;

impl Signer {
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
}
