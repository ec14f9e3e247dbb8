#!/usr/bin/env bash
# Long fuzzing run on the stable toolchain: every target in tests/fuzz.rs (volume and file
# headers, content blocks, names, keystore file, PKCS#11 URIs, audit lines) runs for about
# SECONDS (default 60) with fresh random inputs, in the dev profile (overflow checks on).
# A failure prints the shrunk input that triggered it. CI runs the same targets briefly
# (`cargo test --test fuzz`).
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET-FILTER]
#   scripts/fuzz.sh 600 keystore    # ten minutes on the keystore file parser only
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
filter=${2:-fuzz_}
export KEKFS_FUZZ_SECS=$secs
exec cargo test --test fuzz -- --test-threads=1 --nocapture "$filter"
