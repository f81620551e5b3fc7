#!/usr/bin/env bash
# Install the Debian tools GastroLens's tests talk to, when any is missing:
# DCMTK (storescu, echoscu, storescp, dsrdump), dicom3tools (dciodvfy), Orthanc (a real PACS)
# with its DICOMweb plugin (STOW-RS destinations),
# and Chromium with its driver (dashboard tests).
set -euo pipefail
need=()
[ -x /usr/bin/storescu ] || need+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
[ -x /usr/bin/openssl ] || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Orthanc's package starts a system service on 4242/8042; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop orthanc 2>/dev/null || true; fi
$SUDO service orthanc stop >/dev/null 2>&1 || true
