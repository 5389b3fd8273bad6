//! `hsmctl bench`: the CLI adapter of the load generator in [`hsm_client::load`]
//! (flags, output and exit code are defined there).

pub use hsm_client::load::{connect_targets, run, BenchArgs};
