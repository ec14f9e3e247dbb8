#!/usr/bin/env bash
# Large stress run: tests/stress.rs with more threads, bigger files and a longer time
# (random operations of several threads checked against a model, then everything again
# after a remount), and fio verify with several jobs on bigger files.
#
# Usage: scripts/stress.sh [SECONDS] [THREADS] [MAX-FILE-BYTES] [FIO-SIZE]
#   defaults: 300 s, 8 threads, 4 MiB files, fio 256m per job
set -euo pipefail
cd "$(dirname "$0")/.."
export KEKFS_STRESS_SECS=${1:-300}
export KEKFS_STRESS_THREADS=${2:-8}
export KEKFS_STRESS_MAX_SIZE=${3:-4194304}
export KEKFS_FIO_SIZE=${4:-256m}
exec cargo test --test stress -- --nocapture
