#!/usr/bin/env bash
# Instructions vdpa-net's worker spends per looped frame, counted with
# callgrind: repeatable for the same build, whatever else the machine is
# doing (packet rates on this kind of shared machine swing by 2x; this count
# does not move between runs of one build).
#
#   scripts/count-net.sh [BENCH_BINARY] [--packed]
#
# Runs `cargo bench -p vdpa-net --bench device -- --count-loop`: the `reflect`
# port on the framework's queue harness (real split rings in iommu-core
# memory, every access translated, no socket, no frontend process), 400
# rounds of 256 64-byte frames after a warm-up, each frame popped from the
# transmit queue, copied into a port buffer, MACs swapped, and written into
# a 2 KiB receive buffer (MRG_RXBUF, 12-byte header), every head completed.
# The bench checks that the device took and returned every frame. Only the
# worker's `process_queue` is counted (not the harness playing the driver).
# With BENCH_BINARY it counts that build (for comparing two commits); with
# --packed the rings are packed (VIRTIO_F_RING_PACKED; the driver takes
# back the used descriptors before each round).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
. scripts/lib/count.sh
count_args --packed -- "$@"
count_bench_binary vdpa-net device
out=$(mktemp)
trap 'rm -f "$out" "$out".*' EXIT
# The warm-up's counts are dumped (to "$out.1") and zeroed when the counted
# rounds begin; the final dump ("$out") holds the counted rounds alone.
valgrind --tool=callgrind --callgrind-out-file="$out" \
    '--dump-before=*counted_reflect_rounds*' '--toggle-collect=*process_queue*' \
    "$bin" --count-loop "${args[@]}" >"$out.stdout" 2>"$out.log" \
    || { cat "$out.stdout" "$out.log" >&2; exit 1; }
frames=$(grep -o '^count-loop: [0-9]* frames reflected' "$out.stdout" | grep -o '[0-9]*')
[ -n "$frames" ] || { cat "$out.stdout" >&2; exit 1; }
ir=$(grep -o '^totals: [0-9]*' "$out" | grep -o '[0-9]*$')
echo "vdpa-net loop${args[*]:+ (${args[*]})}: $ir instructions for $frames frames: $(awk -v i="$ir" -v f="$frames" 'BEGIN { printf "%.1f", i / f }') per frame ($bin)"
