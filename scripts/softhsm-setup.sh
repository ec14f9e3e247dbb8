#!/usr/bin/env bash
# Create a private SoftHSM2 token for tests and demos, without touching the system's
# token directory (/var/lib/softhsm/tokens).
#
# Usage: scripts/softhsm-setup.sh DIR [LABEL] [SO-PIN] [PIN]
#   DIR     created if needed; gets DIR/softhsm2.conf, DIR/tokens/ and DIR/pin (0600)
#   LABEL   token label (default: kekfs)
#   SO-PIN  security officer PIN (default: 12345678)
#   PIN     user PIN (default: 1234); also written to DIR/pin for pin-source=file:DIR/pin
#
# Prints the line to run so that SoftHSM2 (and kekfs) use this token:
#   export SOFTHSM2_CONF=DIR/softhsm2.conf
# Running it again with the same DIR adds another token (a second LABEL) to the same dir.
# The PINs are demo values passed on softhsm2-util's command line: do not use this
# script for a token that guards real data.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 4 ]; then
  echo "usage: $0 DIR [LABEL] [SO-PIN] [PIN]" >&2
  exit 2
fi
dir=$1
label=${2:-kekfs}
so_pin=${3:-12345678}
pin=${4:-1234}

if ! command -v softhsm2-util >/dev/null 2>&1; then
  echo "softhsm2-util not found: install SoftHSM2 (apt-get install softhsm2)" >&2
  exit 1
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
umask 077
mkdir -p "$dir/tokens"
conf=$dir/softhsm2.conf
cat >"$conf" <<EOF
# SoftHSM2 configuration written by kekfs scripts/softhsm-setup.sh
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
SOFTHSM2_CONF=$conf softhsm2-util --init-token --free --label "$label" \
  --so-pin "$so_pin" --pin "$pin" >/dev/null
printf '%s\n' "$pin" >"$dir/pin"
chmod 0600 "$dir/pin"
echo "initialised SoftHSM2 token '$label' in $dir/tokens (user PIN in $dir/pin)" >&2
echo "export SOFTHSM2_CONF=$conf"
