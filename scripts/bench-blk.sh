#!/usr/bin/env bash
# 4 KiB random I/O of vdpa-blk against qemu-storage-daemon's vhost-user-blk
# export, both driven by the project's own load generator
# (ioasis-bench-blk: the vhost crate's Frontend, one split queue in its own
# memfd memory), alternating the servers round by round in one run and
# comparing medians (this kind of machine is shared and noisy: compare only
# within one run).
#
#   scripts/bench-blk.sh [--rounds N] [--secs S] [--warmup-ms MS] [--depth D]... [--op randread|randwrite]... [--backing file|null]... [--size-mib M] [--dir DIR] [--only qsd|vdpa-blk] [--qsd-aio MODE] [--vdpa-arg ARG]...
#       [--variant NAME=ARGS]... [--compare-bin PATH [--compare-name NAME]] [--idle-secs S]
#
# Each round measures, for a raw image file in tmpfs (--dir, default
# /dev/shm) and for each server's null disk (vdpa-blk null:SIZE,
# qemu-storage-daemon null-co with read-zeroes=on: the vhost-user path
# alone), randread and randwrite at queue depth 1, 32 and 128: IOPS, p50
# and p99 latency. Every measurement checks itself: every completion is a
# request in flight, every status OK, completed = issued at the end; one
# that fails makes the run fail (exit status 1). The summary gives medians,
# the range over rounds, the ratio of medians with the range of per-round
# ratios, and the issue's targets marked met or MISSED. The output names the
# commit (IOASIS_BENCH_COMMIT, set here; -dirty when tracked files differ)
# and the load average at the start and the end. Without vdpa-blk in the
# workspace only qemu-storage-daemon is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q -j2 --release -p ioasis-integration --bin ioasis-bench-blk
if [ -f backends/vdpa-blk/Cargo.toml ]; then
    # Built on its own, so that no feature of the harness's build reaches it.
    cargo build -q -j2 --release -p vdpa-blk --bin vdpa-blk
    export IOASIS_VDPA_BLK_BIN="$PWD/target/release/vdpa-blk"
fi
IOASIS_BENCH_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    IOASIS_BENCH_COMMIT="$IOASIS_BENCH_COMMIT-dirty"
fi
export IOASIS_BENCH_COMMIT
echo "== $(nproc) CPUs, kernel $(uname -r), qemu-storage-daemon $(dpkg-query -W -f='${Version}' qemu-system-common 2>/dev/null || echo '?'), load $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/ioasis-bench-blk "$@"
