#!/usr/bin/env bash
# Install Orthanc with its DICOMweb plug-in (Debian/Ubuntu packages), for lowdose's PACS tests and PACS mode.
# Safe to run again: it does nothing when both are already there. Installing does not start any service;
# the tests start their own Orthanc on 127.0.0.1 with a throw-away configuration.
set -euo pipefail

PLUGIN=${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}

if command -v Orthanc >/dev/null 2>&1 && [ -f "$PLUGIN" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_orthanc.sh: no apt-get here; install Orthanc and its DICOMweb plug-in by hand" \
         "(https://www.orthanc-server.com/download.php) so that 'Orthanc' is on PATH and" \
         "ORTHANC_DICOMWEB_PLUGIN names libOrthancDicomWeb.so" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_orthanc.sh: installing packages needs root: run 'apt-get install -y orthanc orthanc-dicomweb' as root" >&2
        exit 1
    fi
fi

echo "install_orthanc.sh: installing orthanc and orthanc-dicomweb (apt)" >&2
# No service is started in containers without an init system; policy-rc.d keeps it so elsewhere too.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null

if ! command -v Orthanc >/dev/null 2>&1 || [ ! -f "$PLUGIN" ]; then
    echo "install_orthanc.sh: orthanc installed but 'Orthanc' or $PLUGIN is missing" >&2
    exit 1
fi
echo "install_orthanc.sh: ready ($(Orthanc --version 2>/dev/null | head -1))" >&2
