#!/usr/bin/env bash
# Run the whole kekfs test suite: formatting and lint gates, unit tests, and the
# integration tests that mount real FUSE filesystems (they need root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh qemu-utils e2fsprogs   # extra: qemu-img/qemu-io/qemu-nbd for tests/qemu.rs; mkfs.ext2 for tests/exhaustion.rs
# kekfs uses FUSE over io_uring where the kernel offers it; tests/uring.rs covers both
# transports.
scripts/enable-uring.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
  # nextest does not run doctests
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi
