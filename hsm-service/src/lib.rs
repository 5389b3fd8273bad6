//! hsm-service: the only component allowed to talk to the HSM behind a national eID's
//! logins. It keeps authenticator seeds and signing keys in a PKCS#11 token, verifies
//! one-time codes, signs assertions, and runs key ceremonies under an officer quorum.
//!
//! Data flows one way: `api -> {credentials, signing, ceremony, events} -> {otp, store,
//! audit, hsm}`, plus the leaf `common` every module may use. Domain modules never see proto
//! types; `hsm` never sees proto or store types; `store` never imports a domain module or
//! `audit`. `tests/layering.rs` holds the full table and checks every import against it.
//! See the README's design section for why things are the way they are.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod ceremony;
pub mod common;
pub mod config;
pub mod credentials;
pub mod dev;
pub mod devices;
pub mod error;
pub mod events;
pub mod hsm;
pub mod logging;
pub mod metrics;
pub mod otp;
pub mod pki;
pub mod server;
pub mod signing;
pub mod store;
#[doc(hidden)]
pub mod testing;

pub use error::{Error, Result};
