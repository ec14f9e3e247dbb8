#!/usr/bin/env bash
# Revocation latency benchmark (not a test): on a soft: volume mounted with poll=P, time
# from `kekfs key disable` returning to the first failing read, and from `key enable` to
# the first succeeding read, over N trials. Reports median and max against the interval.
# Usage: scripts/bench-revocation.sh [TRIALS=20] [POLL_MS=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-20}
poll_ms=${2:-1000}
[ "$(id -u)" -eq 0 ] || { echo "needs root (FUSE mounts)" >&2; exit 1; }
cargo build --release --locked -q
KEKFS="$PWD/target/release/kekfs"
work=$(mktemp -d /tmp/kekfs-revbench.XXXXXX)
trap 'grep -q " $work/mnt " /proc/mounts && { "$KEKFS" unmount "$work/mnt" || umount -l "$work/mnt"; }; rm -rf "$work"' EXIT
mkdir "$work/mnt"; echo "bench-pass" > "$work/pass"
k() { "$KEKFS" --keystore "$work/ks" --passfile "$work/pass" "$@"; }
k keystore init >/dev/null; k key create bench >/dev/null
k init "$work/b" --kek soft:bench >/dev/null
k mount "$work/b" "$work/mnt" -o "poll=${poll_ms}ms" --log "$work/log"
echo data > "$work/mnt/f"
now_ms() { date +%s%3N; }
revoke=(); restore=()
for i in $(seq "$trials"); do
  k key disable bench >/dev/null; t0=$(now_ms)
  while cat "$work/mnt/f" >/dev/null 2>&1; do :; done
  revoke+=($(( $(now_ms) - t0 )))
  k key enable bench >/dev/null; t0=$(now_ms)
  until cat "$work/mnt/f" >/dev/null 2>&1; do :; done
  restore+=($(( $(now_ms) - t0 )))
done
stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms", a[int((NR+1)/2)], a[NR]}'; }
echo "poll interval: ${poll_ms} ms, trials: $trials"
echo "disable -> first failing read:   $(stats "${revoke[@]}")"
echo "enable  -> first succeeding read: $(stats "${restore[@]}")"
echo "target: median <= interval (${poll_ms} ms), max <= 2x interval ($((2*poll_ms)) ms)"
