#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then formatting,
# lints, and every test against real SoftHSM tokens in temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
softhsm-config/setup.sh
# A private PostgreSQL cluster for the PostgreSQL backend's tests (installs Debian's
# postgresql package if needed), stopped and removed at exit. Tests that need it fail
# under CI=true without it. The cluster also serves TLS with a throw-away CA, whose
# certificate HSM_TEST_POSTGRES_CA names (the tests of store.ca_file). An already
# exported HSM_TEST_POSTGRES_URL (and HSM_TEST_POSTGRES_CA) is used as is.
if [ -z "${HSM_TEST_POSTGRES_URL:-}" ]; then
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/hsm-test-pg.XXXXXX")
    trap 'scripts/postgres.sh stop "$pg_dir" || true; rm -rf "$pg_dir"' EXIT
    HSM_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pg_dir" "${HSM_TEST_POSTGRES_PORT:-54329}" --tls)
    HSM_TEST_POSTGRES_CA=$(scripts/postgres.sh ca "$pg_dir")
    export HSM_TEST_POSTGRES_URL HSM_TEST_POSTGRES_CA
fi
# Tests make their own tokens; never inherit a developer's SoftHSM configuration.
unset SOFTHSM2_CONF
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets
cargo test --locked --workspace --doc
# The HSM-facing subset again on a second, independent PKCS#11 token (kryoptic, built
# once into /var/cache/hsm-token2; opencryptoki 3.8 for the refusal test): issue 15 §6.
scripts/token2.sh test
