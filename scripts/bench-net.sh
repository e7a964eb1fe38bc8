#!/usr/bin/env bash
# 64-byte packet rates of vdpa-net against DPDK's own vhost backend
# (net_vhost), both driven by the same testpmd virtio_user frontend,
# alternating the backends round by round and comparing medians (this kind of
# machine is shared and noisy: compare only within one run).
#
#   scripts/bench-net.sh [--rounds N] [--secs S] [--tap] [--tcp] [--only-reference] [--no-pin] [--poll-us N] [--mode default|poll]... [--test NAME]... [--guest-iommu MODE]... [--guest-packets N] [--vdpa-arg ARG]... [--packed]
#
# vdpa-net is measured in two modes in the same run, each against net_vhost:
# as users start it (no --poll-us, not pinned; "vdpa-net") and polling
# (--poll-us 1000, its worker pinned to CPU 1 with --worker-cpus 1, where
# net_vhost forwards while testpmd's frontend forwards on CPU 0; "vdpa-net
# poll"). --mode picks one, --poll-us N
# sets the polling window (0: no polling mode), --no-pin unpins it.
#
# Every measurement checks itself: the frames the frontend sent equal the
# frames the backend counted (vdpa-net's statistics, net_vhost's testpmd
# forward statistics); in the loop, after the generator stops and the ring
# drains, every frame the backend returned was received and every frame sent
# came back or was counted as dropped by the backend; from the backend, every
# frame it sent was received. A measurement that loses a frame fails the run
# (exit status 1) and says how many. The output names the commit
# (IOASIS_BENCH_COMMIT, set here; -dirty when tracked files differ from it),
# each mode's flags and the load average before and after.
#
# --packed: the frontend drives every backend on packed rings (packed_vq=1),
# and each vdpa-net mode is also measured on split rings in the same rounds
# ("MODE split").
#
# --test NAME (to-backend, loop, from-backend, tap, guest-pktgen; repeatable) runs only
# those. --tap adds the tap benchmark (frames from testpmd through the backend into a
# tap inside a network namespace, counted on the tap). --tcp adds, in the same
# run, a bulk TCP transfer from a TCG QEMU guest on vdpa-net (tap port inside
# a network namespace) to the namespace's side: median bytes per second of a
# few 20 MiB downloads, with the frames and bytes seen on the tap (needs
# qemu-system-x86 and busybox; vdpa-net only). --test guest-pktgen (or
# --guest-iommu none|strict|lazy|all, repeatable; default none and strict)
# adds a TCG guest sending 60-byte frames with the kernel's pktgen into
# net_vhost (rxonly) and vdpa-net's sink in each mode, alternating, without
# and with a guest intel-iommu; every frame pktgen sent must be counted by
# the backend (--guest-packets N sets pktgen's count). Without a vdpa-net
# binary only net_vhost is measured. Extra daemon options go through
# --vdpa-arg (e.g. --vdpa-arg --poll-us --vdpa-arg 50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q -j2 --release -p ioasis-integration --bin ioasis-bench-net
if cargo build -q -j2 --release -p vdpa-net --bin vdpa-net 2>/dev/null && [ -x target/release/vdpa-net ]; then
    export IOASIS_VDPA_NET_BIN="$PWD/target/release/vdpa-net"
else
    echo "!! vdpa-net does not build in release mode: measuring net_vhost only" >&2
    set -- "$@" --only-reference
fi
IOASIS_BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    IOASIS_BENCH_COMMIT="$IOASIS_BENCH_COMMIT-dirty"
fi
export IOASIS_BENCH_COMMIT
echo "== $(nproc) CPUs, kernel $(uname -r), DPDK $(dpkg-query -W -f='${Version}' dpdk-dev 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/ioasis-bench-net "$@"
