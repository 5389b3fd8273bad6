#!/usr/bin/env bash
# Installs what hsm-service needs on a Debian or Ubuntu machine, idempotently:
# SoftHSM2 (the PKCS#11 token used in development and tests) and OpenSSL (the
# independent verifier the tests use for CSRs and certificates).
#
# It never touches the system token directory: hsm-service writes its own
# softhsm2.conf (from softhsm2.conf.template next to this script) into its data
# directory, and the tests into temporary directories.
set -euo pipefail

need=()
have_softhsm() {
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib64/pkcs11/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -f "$p" ] && return 0
  done
  [ -n "${HSM_PKCS11_MODULE:-}" ] && [ -f "$HSM_PKCS11_MODULE" ]
}
have_softhsm || need+=(softhsm2)
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: please install: ${need[*]} (no apt-get on this machine)" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

have_softhsm || { echo "setup: SoftHSM2 still not found after install" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
