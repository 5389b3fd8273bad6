#!/usr/bin/env bash
# Runs the service in dev mode: installs SoftHSM2 if needed, then builds and starts
# `hsm-service dev`, which creates .hsm-dev/ (token, PINs, dev PKI, config) on first run.
# Extra arguments go to `hsm-service dev` (e.g. --listen 127.0.0.1:50052).
set -euo pipefail
cd "$(dirname "$0")/.."
softhsm-config/setup.sh
exec cargo run --release --locked -p hsm-service -- dev "$@"
