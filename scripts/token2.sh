#!/usr/bin/env bash
# The second, independent PKCS#11 token of the test suite (issue 15 §6), non-interactive:
#
#   scripts/token2.sh install   build kryoptic's PKCS#11 module (scripts/token2/kryoptic,
#                               against the system OpenSSL) into $TOKEN2_CACHE once;
#                               installs libclang-dev (bindgen) if missing. Also installs
#                               Debian's opencryptoki (the third token of the table).
#   scripts/token2.sh start     nothing to start for kryoptic (the tests write their own
#                               kryoptic.conf with one sqlite file per slot, see
#                               hsm-service/src/testing.rs); starts pkcsslotd and makes
#                               the opencryptoki software token `ock-t2` (user PIN in
#                               $TOKEN2_CACHE/ock/user.pin) when opencryptoki is installed.
#   scripts/token2.sh env       print `export` lines: HSM_PKCS11_MODULE (kryoptic's
#                               module: dev mode and the tests then use it) and
#                               HSM_TEST_OCK_* (the opencryptoki token, if started).
#   scripts/token2.sh test      the HSM-facing subset of the suite on kryoptic (CI).
#
# TOKEN2_CACHE defaults to /var/cache/hsm-token2 (outside the clone, so that CI reuses
# the build; a fresh machine builds once, about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${TOKEN2_CACHE:-/var/cache/hsm-token2}
module=$cache/libkryoptic_pkcs11.so
crate=scripts/token2/kryoptic
stamp=$cache/libkryoptic_pkcs11.stamp
ock_conf=/etc/opencryptoki/opencryptoki.conf
ock_lib=/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

apt_install() {
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
           $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

install() {
  $sudo mkdir -p "$cache"
  local want
  want=$(sha256sum "$crate/Cargo.toml" "$crate/Cargo.lock" "$crate/src/lib.rs" | sha256sum | cut -c1-16)
  if [ -f "$module" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "token2: kryoptic module up to date: $module" >&2
  else
    [ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 \
      || { echo "token2: installing libclang-dev" >&2; apt_install libclang-dev; }
    dpkg -s libssl-dev libsqlite3-dev pkg-config >/dev/null 2>&1 \
      || { echo "token2: installing libssl-dev libsqlite3-dev pkg-config" >&2; apt_install libssl-dev libsqlite3-dev pkg-config; }
    echo "token2: building kryoptic's PKCS#11 module (once)" >&2
    CARGO_TARGET_DIR=$cache/target nice -n 10 cargo build --locked --release \
      --manifest-path "$crate/Cargo.toml" >&2
    cp "$cache/target/release/libkryoptic_pkcs11.so" "$module.tmp"
    mv "$module.tmp" "$module"
    echo "$want" > "$stamp"
  fi
  if [ ! -x /usr/sbin/pkcsslotd ]; then
    echo "token2: installing opencryptoki" >&2
    apt_install opencryptoki || echo "token2: opencryptoki not installed (its row of the table is then not re-checked)" >&2
  fi
}

# opencryptoki: one software-token slot `ock-t2` of its own directory (tokname), never
# the stock swtok. SO PIN 87654321 is opencryptoki's factory default; the PINs are at most
# 8 characters there (a finding of the table).
start() {
  [ -x /usr/sbin/pkcsslotd ] || { echo "token2: no opencryptoki; nothing to start" >&2; return 0; }
  local dir=$cache/ock
  $sudo mkdir -p "$dir"
  if ! grep -q "tokname = ockt2" "$ock_conf" 2>/dev/null; then
    [ -f "$ock_conf.orig" ] || $sudo cp "$ock_conf" "$ock_conf.orig"
    printf 'version opencryptoki-3.1\nslot 9\n{\nstdll = libpkcs11_sw.so\ntokname = ockt2\n}\n' \
      | $sudo tee "$ock_conf" >/dev/null
    pkill_slotd
  fi
  pgrep -x pkcsslotd >/dev/null || $sudo /usr/sbin/pkcsslotd
  if ! pkcsconf -t -c 9 2>/dev/null | grep -q "Label: ock-t2"; then
    pkcsconf -I -c 9 -S 87654321 <<< "ock-t2" >/dev/null
    printf '%s\n%s\n' 12345678 12345678 | pkcsconf -u -c 9 -S 87654321 >/dev/null
    printf '12345678' > "$dir/user.pin"
    chmod 600 "$dir/user.pin"
  fi
  echo "token2: opencryptoki token ock-t2 in slot 9" >&2
}

# pkcsslotd reads its configuration at start only.
pkill_slotd() {
  local pid
  pid=$(pgrep -x pkcsslotd || true)
  if [ -n "$pid" ]; then
    $sudo kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  $sudo rm -f /var/run/pkcsslotd.pid /run/pkcsslotd.pid
}

env_lines() {
  [ -f "$module" ] || { echo "token2: not installed; run scripts/token2.sh install" >&2; exit 1; }
  echo "export HSM_PKCS11_MODULE=$module"
  if [ -f "$cache/ock/user.pin" ] && [ -f "$ock_lib" ]; then
    echo "export HSM_TEST_OCK_MODULE=$ock_lib HSM_TEST_OCK_LABEL=ock-t2 HSM_TEST_OCK_PIN_FILE=$cache/ock/user.pin"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  env) env_lines ;;
  test)
    install
    # opencryptoki is only the refusal witness: without it its test skips.
    start || echo "token2: opencryptoki not started; its test skips" >&2
    eval "$(env_lines)"
    unset SOFTHSM2_CONF KRYOPTIC_CONF
    # The HSM-facing subset, built already by the main suite (same flags): the PKCS#11
    # boundary, the key ceremonies' wrap/unwrap, the audit signer, then OTP verification
    # and assertion signing end to end through the real binary.
    # (hsm::import is left out: kryoptic answers a corrupted RSA-OAEP transport ciphertext
    # with CKR_DEVICE_ERROR, and unwraps AES-CBC inside the token; see the README table.)
    cargo test --locked --workspace --lib -- hsm:: ceremony::backup_restore audit::log signing:: credentials:: \
      --skip hsm::import
    cargo test --locked --workspace --test credentials --test audit --test token2 --test sigkill
    # signing.rs less the four tests that make EdDSA keys: kryoptic built on OpenSSL 3.0
    # has no EdDSA, and refuses such keys naming CKM_EDDSA (hsm/mechanisms.rs tests it).
    cargo test --locked --workspace --test signing -- \
      --skip assertions_verify_with_an_independent_jwt_library_for_every_algorithm \
      --skip malformed_raw_signing_requests_are_rejected \
      --skip raw_signatures_verify_independently \
      --skip rotation_publishes_first_keeps_the_old_key_and_destroys_it_on_the_token
    ;;
  *) echo "usage: scripts/token2.sh install|start|env|test" >&2; exit 2 ;;
esac
