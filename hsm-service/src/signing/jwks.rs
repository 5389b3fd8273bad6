//! The public keys relying parties verify with: [`Signer::jwks`], one key set per usage.

use super::signer::Signer;
use super::versions::Usage;
use super::{jwk, jwks};
use crate::error::{Error, Result};

impl Signer {
    /// The JWK Set of every published, active and verify-only version of a `usage` key,
    /// with `x5c` and `x5t#S256` where a certificate chain is stored. `signing` is the
    /// assertion JWKS relying parties fetch; `raw` the raw keys' set. `ca` keys are in no
    /// JWKS (INVALID_ARGUMENT): their certificates are the way to them.
    pub fn jwks(&self, usage: Usage) -> Result<String> {
        if usage == Usage::Ca {
            return Err(Error::InvalidArgument(
                "usage \"ca\": ca keys are never in a JWKS (read their certificate chains)".into(),
            ));
        }
        let keys = self.read_keys();
        let mut out = Vec::new();
        for k in keys
            .values()
            .filter(|k| k.usage == usage && k.state.in_jwks())
        {
            let pk = k.public_key()?;
            let chain = (!k.certificate_chain.is_empty()).then_some(&k.certificate_chain[..]);
            out.push(jwk(&pk, &k.kid, k.algorithm, chain));
        }
        Ok(jwks(&out))
    }
}
