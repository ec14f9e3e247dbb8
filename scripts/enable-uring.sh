#!/usr/bin/env bash
# Turn on FUSE over io_uring (Linux 6.14+), which the kernel keeps off until the fuse
# module's enable_uring parameter is set. kekfs uses it by default where it is on (see
# README, "FUSE over io_uring"); it affects only FUSE daemons that ask for it at INIT.
# Needs root; says what it did. Used by scripts/test.sh and the benchmarks.
set -euo pipefail
param=/sys/module/fuse/parameters/enable_uring
if [ ! -e "$param" ]; then
  echo "enable-uring.sh: this kernel has no FUSE over io_uring ($param missing); kekfs uses /dev/fuse" >&2
  exit 0
fi
if [ "$(cat "$param")" = Y ]; then
  exit 0
fi
if [ -w "$param" ]; then
  echo Y > "$param"
  echo "enable-uring.sh: turned on FUSE over io_uring ($param=Y)" >&2
else
  echo "enable-uring.sh: FUSE over io_uring is off and only root can turn it on: echo Y > $param" >&2
fi
