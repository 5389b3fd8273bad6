//! Small shared vocabulary every module may use: the clock and hex.
//!
//! This is a leaf: it imports nothing from the crate, so no module has to import
//! upwards (e.g. `audit` from `auth`, `ceremony` from `signing`) just for a helper.

mod clock;
mod hex;

pub use clock::{Clock, ManualTime};
pub use hex::hex;
