#!/usr/bin/env bash
# Installs the system packages the test suite uses. Idempotent; needs root
# (or sudo) to install, and is a no-op once everything is present.
set -euo pipefail
PKGS=(qemu-system-x86 dpdk dpdk-dev linux-image-amd64 busybox-static cpio iproute2)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
