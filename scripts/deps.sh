#!/usr/bin/env bash
# Make sure the system packages kekfs needs are present. As root, installs what is
# missing with apt-get; otherwise prints the exact command and fails.
# Usage: scripts/deps.sh [extra-package ...]   (scripts/test.sh adds qemu-utils for the
# VM disk image tests; kekfs itself does not need it)
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have fusermount3 || need+=(fuse3)
have fio || need+=(fio)
have getfattr || need+=(attr)
have softhsm2-util || need+=(softhsm2)   # PKCS#11 token for tests and demos
have p11-kit || need+=(p11-kit)          # `p11-kit server`: a token served by another process
# p11-kit's RPC client module, which reaches that server
compgen -G '/usr/lib/*/pkcs11/p11-kit-client.so' >/dev/null \
  || [ -e /usr/lib64/pkcs11/p11-kit-client.so ] || need+=(p11-kit-modules)
for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "kekfs needs these packages: ${need[*]}" >&2
  echo "install them with: sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing ${need[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
