#!/usr/bin/env bash
# Side-by-side fio benchmark: plain tmpfs, bindfs (FUSE without crypto), gocryptfs,
# securefs and kekfs, all on a tmpfs backing so the disk is not what is measured.
# Installs what it needs (as root) and runs scripts/bench_fio.py; see its --help.
# Usage: scripts/bench-fio.sh [--reps 3] [--quick] [--only kekfs,gocryptfs] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "needs root (mounts tmpfs and FUSE filesystems, drops caches)" >&2; exit 1; }
scripts/deps.sh bindfs gocryptfs securefs gnuplot-nox
cargo build --release --locked -q
# kekfs carries requests over FUSE over io_uring where the kernel offers it (Linux 6.14+;
# off until the fuse module's enable_uring is set). The peers do not use it. Pass
# --kekfs-options uring=off to measure kekfs on /dev/fuse instead.
scripts/enable-uring.sh
exec python3 scripts/bench_fio.py --kekfs "$PWD/target/release/kekfs" "$@"
