#!/usr/bin/env bash
# Prepares this machine for the test suite and the benchmarks. Idempotent and
# safe to run repeatedly; needs root (or passwordless sudo) for everything
# below except the checks.
#
# - installs the system packages the tests use (QEMU, qemu-storage-daemon
#   as the reference vhost-user-blk server, DPDK's testpmd, a Debian kernel
#   for guests, a static busybox for their initramfs, cpio, iproute2, and
#   libc6-dev, whose static C library links the migration tests' guest
#   program `guest-stream` static);
# - reserves 2 MiB hugepages (IOASIS_HUGEPAGES, default 600) and mounts
#   hugetlbfs at /dev/hugepages, then deletes hugepage files that no running
#   process maps (left behind by a killed DPDK process, they starve the next);
# - makes sure /dev/net/tun exists (taps), and that network namespaces work;
# - deletes network namespaces of earlier test runs whose process is gone.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-system-common dpdk dpdk-dev linux-image-amd64 busybox-static cpio iproute2 libc6-dev)
HUGEPAGES="${IOASIS_HUGEPAGES:-600}"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
warn() { echo "!! setup: $*" >&2; }

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Hugepages for DPDK (testpmd falls back to --no-huge without them).
cur=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$cur" -lt "$HUGEPAGES" ]; then
    echo "$HUGEPAGES" | $SUDO tee /proc/sys/vm/nr_hugepages >/dev/null || warn "cannot reserve hugepages"
fi
if ! mountpoint -q /dev/hugepages; then
    $SUDO mkdir -p /dev/hugepages
    $SUDO mount -t hugetlbfs nodev /dev/hugepages || warn "cannot mount hugetlbfs at /dev/hugepages"
fi
if mountpoint -q /dev/hugepages; then
    # Files mapped by a live process are in its /proc/PID/maps; delete the rest.
    inuse=$(cat /proc/[0-9]*/maps 2>/dev/null | awk '$6 ~ "^/dev/hugepages/" {print $6}' | sort -u || true)
    for f in /dev/hugepages/*; do
        [ -e "$f" ] || continue
        if ! grep -qxF "$f" <<<"$inuse"; then
            $SUDO rm -rf -- "$f"
        fi
    done
fi
free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
echo "== hugepages: $(cat /proc/sys/vm/nr_hugepages) reserved, ${free:-0} free (2 MiB)"

# Taps.
if [ ! -c /dev/net/tun ]; then
    $SUDO modprobe tun 2>/dev/null || true
    if [ ! -c /dev/net/tun ]; then
        $SUDO mkdir -p /dev/net
        $SUDO mknod /dev/net/tun c 10 200 2>/dev/null || true
        $SUDO chmod 0666 /dev/net/tun 2>/dev/null || true
    fi
fi
[ -c /dev/net/tun ] || warn "/dev/net/tun is missing: tap tests cannot run"

# Network namespaces: named ioasis-<pid>-<n> by the harness; drop those whose
# creating process is gone.
if command -v ip >/dev/null; then
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^ioasis-[0-9]*-[0-9]*$' || true); do
        pid=${ns#ioasis-}
        pid=${pid%%-*}
        [ -d "/proc/$pid" ] || $SUDO ip netns del "$ns" 2>/dev/null || true
    done
    probe="ioasis-setup-probe-$$"
    if $SUDO ip netns add "$probe" 2>/dev/null; then
        $SUDO ip netns del "$probe"
    else
        warn "cannot create network namespaces: tap tests cannot run"
    fi
fi

# A vDPA-capable guest kernel for the VDUSE tests. The host's kernel (and
# Debian's 6.1, which the other guests boot) lacks VDUSE; Debian's 6.12
# (bookworm security suite) ships vduse.ko, vdpa.ko and virtio_vdpa.ko. It
# is unpacked, not installed: installing would change the kernel the other
# guest tests pick from /boot. The tests read it from
# IOASIS_VDUSE_KERNEL_DIR (default below): vmlinuz-<version> and
# lib/modules/<version>/ under it.
VDUSE_DIR="${IOASIS_VDUSE_KERNEL_DIR:-/var/cache/ioasis/vduse-kernel}"
vduse_kernel() {
    local pkg deb
    pkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12\./ {print $2; exit}')
    if [ -z "$pkg" ]; then
        $SUDO apt-get update -qq || true
        pkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12\./ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { warn "no linux-image-6.12-amd64 in the package lists (bookworm-security): VDUSE tests skip"; return 0; }
    local version=${pkg#linux-image-}
    if [ -f "$VDUSE_DIR/vmlinuz-$version" ] && [ -d "$VDUSE_DIR/lib/modules/$version/kernel/drivers/vdpa" ]; then
        echo "== VDUSE guest kernel: $VDUSE_DIR/vmlinuz-$version"
        return 0
    fi
    $SUDO mkdir -p "$VDUSE_DIR/deb"
    ( cd "$VDUSE_DIR/deb" && $SUDO apt-get download -qq "$pkg" ) || { warn "cannot download $pkg: VDUSE tests skip"; return 0; }
    deb=$(ls -t "$VDUSE_DIR"/deb/"${pkg}"_*.deb | head -n 1)
    $SUDO rm -rf "$VDUSE_DIR/x"
    $SUDO dpkg -x "$deb" "$VDUSE_DIR/x"
    $SUDO mkdir -p "$VDUSE_DIR/lib/modules"
    $SUDO rm -rf "$VDUSE_DIR/lib/modules/$version"
    $SUDO mv "$VDUSE_DIR/x/lib/modules/$version" "$VDUSE_DIR/lib/modules/$version"
    $SUDO mv "$VDUSE_DIR/x/boot/vmlinuz-$version" "$VDUSE_DIR/vmlinuz-$version"
    $SUDO rm -rf "$VDUSE_DIR/x" "$VDUSE_DIR/deb"
    echo "== VDUSE guest kernel: $VDUSE_DIR/vmlinuz-$version (unpacked from $pkg)"
}
vduse_kernel
