//! The audit trail: the records, chain and verifier live in the `hsm-audit` crate (shared
//! with `hsmctl audit verify`, which checks an export offline); [`log`] keeps them in the
//! store and signs checkpoints with the HSM.

pub use hsm_audit::*;

pub mod denied;
pub mod log;
