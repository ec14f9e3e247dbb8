#!/usr/bin/env bash
# Crypto micro-benchmarks next to OpenSSL's AES-256-GCM on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --bench crypto
if command -v openssl >/dev/null; then
  echo "--- openssl speed -evp aes-256-gcm (bytes/s per block size; compare the 4096 column with 'block seal') ---"
  openssl speed -seconds 2 -bytes 4096 -evp aes-256-gcm 2>/dev/null | tail -2
fi
