#!/usr/bin/env bash
# 64-byte packet rates of vdpa-net against DPDK's own vhost backend
# (net_vhost), both driven by the same testpmd virtio_user frontend,
# alternating the backends round by round and comparing medians (this kind of
# machine is shared and noisy: compare only within one run).
#
#   scripts/bench-net.sh [--rounds N] [--secs S] [--tap] [--tcp] [--only-reference] [--no-pin] [--poll-us N] [--test NAME]... [--vdpa-arg ARG]...
#
# vdpa-net is pinned to CPU 1, where net_vhost forwards (testpmd's frontend
# forwards on CPU 0); --no-pin lets it run anywhere. In the packet tests
# vdpa-net polls (--poll-us 1000), as net_vhost does; --poll-us 0 turns it off.
#
# --test NAME (to-backend, loop, from-backend, tap; repeatable) runs only
# those. --tap adds the tap benchmark (frames from testpmd through the backend into a
# tap inside a network namespace, counted on the tap). --tcp adds, in the same
# run, a bulk TCP transfer from a TCG QEMU guest on vdpa-net (tap port inside
# a network namespace) to the namespace's side: median bytes per second of a
# few 20 MiB downloads, with the frames and bytes seen on the tap (needs
# qemu-system-x86 and busybox; vdpa-net only). Without a vdpa-net
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
echo "== $(nproc) CPUs, kernel $(uname -r), DPDK $(dpkg-query -W -f='${Version}' dpdk-dev 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/ioasis-bench-net "$@"
