#!/usr/bin/env bash
# Build the GastroLens image from deploy/container/Containerfile on this machine:
# base image from scripts/build-base-image.sh, pip's local wheel indexes and the host's CA bundle
# mounted into the build (not kept in the image), host networking for apt and pip.
# Usage: scripts/build-image.sh [TAG]   (default localhost/gastrolens:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/gastrolens:dev}
BASE=${BASE:-localhost/debian:bookworm-slim}
PODMAN=(podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs)
bash scripts/build-base-image.sh "$BASE"
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro)
extra=""
for index in /opt/pypi /opt/pypi-more; do   # this machine's local wheel indexes (torch 2.14.1 lies in pypi-more)
  if [ -d "$index/simple" ]; then
    mounts+=(-v "$index:/wheels$index:ro")
    extra="$extra file:///wheels$index/simple"
  fi
done
"${PODMAN[@]}" build --network host -f deploy/container/Containerfile -t "$TAG" \
  --build-arg BASE="$BASE" --build-arg PIP_CERT=/host-ca.crt \
  --build-arg PIP_EXTRA_INDEX_URL="${extra# }" \
  "${mounts[@]}" .
