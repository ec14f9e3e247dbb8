#!/usr/bin/env bash
# Build kekfs and show its main job on the built-in software keystore: create a keystore
# and a KEK, create a volume, mount it, write and read a file, show that the backing
# directory holds only ciphertext, and unmount. Everything lives in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "the demo mounts a FUSE filesystem; on this machine that needs root (sudo $0)" >&2
  exit 1
fi
cargo build --release --locked
KEKFS="$PWD/target/release/kekfs"
work=$(mktemp -d /tmp/kekfs-demo.XXXXXX)
cleanup() {
  if grep -q " $work/mnt " /proc/mounts; then "$KEKFS" unmount "$work/mnt" || umount -l "$work/mnt"; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt"
head -c 24 /dev/urandom | base64 > "$work/passphrase"
k() { echo "+ kekfs $*" >&2; "$KEKFS" --keystore "$work/keystore" --passfile "$work/passphrase" "$@"; }

k keystore init
k key create demo-kek
k key list
k init "$work/backing" --kek soft:demo-kek
k mount "$work/backing" "$work/mnt"
echo "+ writing files through the mount" >&2
secret="The launch code is 0000 (kekfs demo plaintext)"
echo "$secret" > "$work/mnt/secret-plans.txt"
mkdir "$work/mnt/projects"
head -c 1048576 /dev/urandom > "$work/mnt/projects/random.bin"
sha_in=$(sha256sum < "$work/mnt/projects/random.bin")
echo "+ ls -l mountpoint" >&2
ls -l "$work/mnt" "$work/mnt/projects"
echo "+ cat secret-plans.txt" >&2
cat "$work/mnt/secret-plans.txt"
k status "$work/mnt"
echo "+ the backing directory (what an attacker with the disk sees):" >&2
ls -lR "$work/backing"
if grep -rqs "launch code" "$work/backing" || find "$work/backing" | grep -q -e secret-plans -e projects; then
  echo "FAIL: plaintext found in the backing directory" >&2
  exit 1
fi
echo "OK: no plaintext content or names in the backing directory" >&2
k unmount "$work/mnt"
k mount "$work/backing" "$work/mnt"
if [ "$(cat "$work/mnt/secret-plans.txt")" != "$secret" ] || [ "$(sha256sum < "$work/mnt/projects/random.bin")" != "$sha_in" ]; then
  echo "FAIL: data differs after remount" >&2
  exit 1
fi
echo "OK: data intact after unmount and remount" >&2
k unmount "$work/mnt"
echo "demo finished: kekfs works" >&2
