#!/usr/bin/env bash
# Mount time (with its phases, the passphrase KDF reported apart) and the mount daemon's
# memory under a 4-job random load on a 2 GiB file; see scripts/bench_daemon.py --help.
# Usage: scripts/bench-daemon.sh [--mounts 20] [--seconds 30] [--size 2g] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "needs root (mounts tmpfs and FUSE filesystems)" >&2; exit 1; }
scripts/deps.sh
cargo build --release --locked -q
scripts/enable-uring.sh   # the cpu phase compares io_uring (default) with /dev/fuse
exec python3 scripts/bench_daemon.py --kekfs "$PWD/target/release/kekfs" "$@"
