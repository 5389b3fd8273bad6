#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then formatting,
# lints, and every test against real SoftHSM tokens in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
softhsm-config/setup.sh
# Tests make their own tokens; never inherit a developer's SoftHSM configuration.
unset SOFTHSM2_CONF
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc
