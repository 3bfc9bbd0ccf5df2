#!/usr/bin/env bash
# `make image`: builds locus:latest FROM scratch around the host-built release binary and
# exactly the shared libraries `ldd` says it needs (no base image is pulled).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LOCUS:-./target/release/locus}
CTX=target/image
[ -x "$BIN" ] || { echo "build the binary first (make build)" >&2; exit 1; }
rm -rf "$CTX"
mkdir -p "$CTX/rootfs/etc" "$CTX/rootfs/tmp" "$CTX/data"
chmod 1777 "$CTX/rootfs/tmp"
# The binary without its line tables (they are for perf on the host).
objcopy --strip-debug "$BIN" "$CTX/rootfs/locus"
# Its libraries, at the paths the loader looks for them.
ldd "$BIN" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
  mkdir -p "$CTX/rootfs$(dirname "$lib")"
  cp -L "$lib" "$CTX/rootfs$lib"
done
# A non-root user, and name resolution from /etc/hosts then DNS (service names).
echo 'locus:x:10001:10001:locus:/data:/nonexistent' > "$CTX/rootfs/etc/passwd"
echo 'locus:x:10001:' > "$CTX/rootfs/etc/group"
echo 'hosts: files dns' > "$CTX/rootfs/etc/nsswitch.conf"
cp docker/Dockerfile "$CTX/Dockerfile"
docker build -q -t locus:latest "$CTX" >/dev/null
size=$(docker image inspect locus:latest --format '{{.Size}}')
echo "locus:latest built: $((size / 1024 / 1024)) MiB ($(find "$CTX/rootfs" -name "*.so*" | wc -l) shared libraries)"
