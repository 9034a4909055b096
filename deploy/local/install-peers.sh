#!/usr/bin/env bash
# Installs the independent DICOM readers that tests/integration/test_interop.py checks
# Strata's compressed files against: DCMTK (dcmdump, dcmdjpls, dcmdrle) and GDCM's
# command-line tools (gdcmconv, gdcminfo), and Orthanc (the DIMSE door and bench/vs_orthanc.py
# are compared with it), from Debian's packages.
#
# Safe to run again: installs only the packages that are missing, and refreshes the
# package lists only when apt has no candidate for one of them or the install fails on
# stale lists. Non-interactive; uses sudo when not run as root.
set -euo pipefail

packages=(dcmtk libgdcm-tools orthanc orthanc-gdcm)

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$package")
    fi
done
if ((${#missing[@]} == 0)); then
    echo "install-peers: ${packages[*]} already installed"
    exit 0
fi

as_root=()
if ((EUID != 0)); then
    as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
apt_get=("${as_root[@]}" apt-get -y -q -o Dpkg::Use-Pty=0)

lists_known() {
    local package candidate
    for package in "${missing[@]}"; do
        candidate=$(apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ { print $2 }')
        if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
            return 1
        fi
    done
}

install() {
    "${apt_get[@]}" install --no-install-recommends "${missing[@]}"
}

echo "install-peers: installing ${missing[*]}"
if ! lists_known; then
    "${apt_get[@]}" update
    install
elif ! install; then
    # The lists name versions the mirror no longer has: refresh them once and retry.
    "${apt_get[@]}" update
    install
fi
