#!/usr/bin/env bash
# The tools `make test-deploy` needs beyond `make test`'s (scripts/bootstrap-debian.sh):
# podman with runc, debootstrap (the base image is built locally: no registry is reachable),
# and podman's containers.conf as these machines need it (no default ulimits inside the sandbox).
set -euo pipefail
need=()
[ -x /usr/bin/podman ] || need+=(podman)
[ -x /usr/sbin/runc ] || need+=(runc)
[ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! grep -qs 'default_ulimits' /etc/containers/containers.conf; then
  $SUDO mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n' | $SUDO tee /etc/containers/containers.conf >/dev/null
fi
