//! Small shared vocabulary every module may use: the clock, hex, authentication methods.
//!
//! This is a leaf: it imports nothing from the crate, so no module has to import
//! upwards (e.g. `audit` from `auth`, `ceremony` from `signing`) just for a helper.

mod auth_method;
mod clock;
mod hex;

pub use auth_method::AuthMethod;
pub use clock::{Clock, ManualTime};
pub use hex::hex;
