//! Assertion signing: named, versioned signing keys in the HSM ([`Signer`]), JWS
//! assertions, JWKS, raw signatures, CSRs and certificates.
//!
//! The building blocks are pure: the private keys never leave the HSM, so signing is
//! two-phase. Build a [`SigningInput`] (or hand out [`Algorithm::digest`]), let
//! the HSM module sign it, then [`SigningInput::finish`] with the signature.
//! [`Signer`] (in `signer`) puts them together with the HSM and the store, one file
//! per operation family: `lifecycle`, `self_test`, `assertion`, `raw`, `jwks`, `certs`.

mod assertion;
mod certs;
mod challenge;
mod evidence;
mod jwks;
mod jws;
mod lifecycle;
mod raw;
mod self_test;
mod signer;
pub mod versions;

#[cfg(test)]
mod instances_tests;
#[cfg(test)]
pub(crate) mod tests;

// Key vocabulary shared with `pki` and `config` lives in the leaf `common`; re-exported so
// `signing::Algorithm` etc. keep their names.
pub use crate::common::{
    ecdsa_der_to_raw, ecdsa_raw_to_der, jwk, jwks, thumbprint, valid_key_name, Algorithm,
    DigestAlgorithm, PublicKey, SigningError, KEY_NAME_RULE,
};
pub use assertion::{AssertionRequest, SignedAssertion, ASSERTION_ACTION, EXPIRY_MARK_STEP};
pub use certs::{CertificateRequest, Issuance, CERTIFICATE_ACTION};
pub use challenge::ChallengeSignature;
pub use evidence::EVIDENCE_ID_LEN;
pub use jws::{prepare_assertion, AssertionParams, SigningInput, TXN_TEXT_SHA256_CLAIM};
pub use lifecycle::BackedUpKey;
pub use raw::{RawSignature, SignInput, SignatureEncoding, MAX_MESSAGE_LEN, RAW_SIGNATURE_ACTION};
pub use self_test::{SelfTest, SELF_TEST_PREFIX};
pub use signer::{Caller, Grant, KeyRef, Signer, REFRESH_PERIOD};
pub use versions::{KeyOrigin, KeyState, KeyVersion, Usage};

/// The NSIS assurance levels the dev config accepts as `acr`.
pub const NSIS_ACR_VALUES: [&str; 2] = [
    "https://data.gov.dk/concept/core/nsis/Substantial",
    "https://data.gov.dk/concept/core/nsis/High",
];

/// The `[signing]` section dev mode writes: a local issuer, the NSIS levels (Substantial
/// reached by OTP or app evidence, High by app evidence), and the default keys created
/// at first start.
pub fn dev_config() -> crate::config::SigningConfig {
    crate::config::SigningConfig {
        issuer: "https://hsm-service.dev.local".to_owned(),
        acr: vec![
            crate::config::AcrRule {
                value: NSIS_ACR_VALUES[0].to_owned(),
                evidence: vec![
                    crate::common::AuthMethod::Otp.as_str().to_owned(),
                    crate::common::AuthMethod::App.as_str().to_owned(),
                ],
            },
            crate::config::AcrRule {
                value: NSIS_ACR_VALUES[1].to_owned(),
                evidence: vec![crate::common::AuthMethod::App.as_str().to_owned()],
            },
        ],
        bootstrap_default_key: true,
        ..Default::default()
    }
}
