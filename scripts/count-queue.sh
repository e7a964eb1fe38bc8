#!/usr/bin/env bash
# Instructions the queue layer spends per chain, counted with callgrind:
# repeatable for the same build, whatever else the machine is doing (the
# rates of the other benchmarks swing by 2x on this kind of shared machine;
# this count does not move between runs of one build).
#
#   scripts/count-queue.sh [BENCH_BINARY] [--packed] [--one-buffer]
#
# Runs the queue-layer part of `cargo bench -p ioasis --bench vhost_queue`
# (`--quick --harness-only`: 2 x 3 x 50 batches of 256 chains, each chain
# one 64-byte readable and one 64-byte writable buffer, popped one at a time
# and then in bursts, read, written back and completed through iommu-core
# translation) under `valgrind --tool=callgrind`, counting only the device
# side (the worker's process_queue, not the driver filling the ring), and
# prints instructions per chain. With BENCH_BINARY it counts that build (for
# comparing two commits: build each, keep the binaries). `--packed` runs the
# same on packed rings (128 chains of two descriptors per batch), and
# `--one-buffer` gives each chain one 64-byte writable descriptor that the
# device fills (a receive queue's shape; 256 chains per batch, popped in
# bursts of 32 in both halves), on either layout.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
. scripts/lib/count.sh
count_args --packed --one-buffer -- "$@"
count_bench_binary ioasis vhost_queue
out=$(mktemp)
trap 'rm -f "$out"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$out" \
    '--toggle-collect=*EchoWorker*process_queue*' "$bin" --quick --harness-only "${args[@]}" >"$out.stdout" 2>"$out.log" \
    || { cat "$out.log" >&2; rm -f "$out.log" "$out.stdout"; exit 1; }
ir=$(grep -o 'Collected : [0-9]*' "$out.log" | grep -o '[0-9]*$')
chains=$(sed -n 's/^chains: //p' "$out.stdout")
rm -f "$out.log" "$out.stdout"
echo "queue layer${args[*]:+ (${args[*]})}: $ir instructions for $chains chains: $(awk -v i="$ir" -v c="$chains" 'BEGIN { printf "%.1f", i / c }') per chain ($bin)"
