//! Small shared vocabulary every module may use: the clock, hex, authentication methods,
//! caller roles, key names, signature algorithms and public keys.
//!
//! This is a leaf: it imports nothing from the crate, so no module has to import
//! upwards (e.g. `audit` from `auth`, `pki` or `config` from `signing`) just for a
//! helper. `tests/layering.rs` checks that.

mod algorithm;
mod auth_method;
mod clock;
mod ecdsa;
mod event_kind;
mod hex;
mod key_name;
mod public_key;
mod role;
#[cfg(test)]
pub(crate) mod soft_key;

pub use algorithm::{Algorithm, DigestAlgorithm, SigningError};
pub use auth_method::AuthMethod;
pub use clock::{Clock, ManualTime};
pub use ecdsa::{ecdsa_der_to_raw, ecdsa_raw_to_der};
pub use event_kind::EventKind;
pub use hex::hex;
pub use key_name::{valid_key_name, KEY_NAME_RULE};
pub use public_key::{jwk, jwks, thumbprint, PublicKey};
pub use role::Role;
