#!/usr/bin/env bash
# Build localhost/debian:bookworm-slim with debootstrap (no image registry is reachable here)
# and import it into podman; skipped when the image exists. The mirror is the one apt uses.
set -euo pipefail
IMAGE=${1:-localhost/debian:bookworm-slim}
PODMAN=(podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs)
if "${PODMAN[@]}" image exists "$IMAGE"; then
  echo "base image $IMAGE: cached"
  exit 0
fi
mirror=$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/gl-debootstrap.XXXXXX)
trap 'rm -rf "$root"' EXIT
began=$(date +%s)
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "${PODMAN[@]}" import - "$IMAGE" >/dev/null
echo "base image $IMAGE: built with debootstrap from $mirror in $(( $(date +%s) - began )) s"
