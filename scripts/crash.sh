#!/usr/bin/env bash
# Long crash-consistency run: tests/crash.rs kills the mount daemon with SIGKILL at random
# moments of a random workload (writes, appends, truncates, renames, creates, unlinks,
# fsyncs, rewraps), remounts, and checks every file against its model, for SECONDS
# (default 600). The seed is printed; KEKFS_CRASH_SEED=S replays the same workload
# (kill timing still varies). CI runs the same test for about 30 seconds.
#
# Usage: scripts/crash.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export KEKFS_CRASH_SECS=${1:-600}
exec cargo test --test crash -- --nocapture
