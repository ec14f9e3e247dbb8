#!/usr/bin/env bash
# Run the whole kekfs test suite: formatting and lint gates, unit tests, and the
# integration tests that mount real FUSE filesystems (they need root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh qemu-utils   # extra: qemu-img/qemu-io/qemu-nbd for tests/qemu.rs
# FUSE over io_uring (Linux 6.14+) is off until the fuse module's enable_uring is set;
# kekfs uses it by default where it is on, and tests/uring.rs covers both transports.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then
  echo Y > "$uring"
  echo "test.sh: turned on FUSE over io_uring ($uring=Y)" >&2
fi
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
  # nextest does not run doctests
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi
