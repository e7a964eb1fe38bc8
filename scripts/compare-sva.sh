#!/usr/bin/env bash
# Two sva-bench binaries (e.g. builds of two commits) alternated round by
# round on one machine; prints the median and range of each figure per build
# and the ratio of the medians (second over first).
#
#   scripts/compare-sva.sh BASE_BIN NEW_BIN [ROUNDS] [-- SVA_BENCH_ARGS...]
#
# Figures: 64 B descriptors/s unbatched and batched, and sva memmove GB/s
# at 4 KiB, 64 KiB and 1 MiB. Each run is `chrt -f 10 BIN --ms 300 ARGS`.
set -euo pipefail
base=$1 new=$2 rounds=${3:-6}
shift $(( $# >= 3 ? 3 : $# ))
[ "${1:-}" = "--" ] && shift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$rounds"); do
    for w in base new; do
        bin=$base; [ $w = new ] && bin=$new
        chrt -f 10 "$bin" --ms 300 "$@" > "$out/$w.$i" 2>&1
    done
done
python3 - "$out" "$rounds" <<'PY'
import re, sys, statistics, glob
d, rounds = sys.argv[1], int(sys.argv[2])
def figs(text):
    f = {}
    m = re.search(r"64 B memmove descriptors/s: unbatched ([\d.]+) M/s, batched \(\d+ per batch\) ([\d.]+) M/s", text)
    if not m:
        sys.exit("sva-bench output without the descriptor figures:\n" + text)
    f["64 B unbatched M/s"], f["64 B batched M/s"] = float(m[1]), float(m[2])
    for size in ["4 KiB", "64 KiB", "1 MiB"]:
        m = re.search(r"^\s*" + size + r"\s+[\d.]+\s+([\d.]+)", text, re.M)
        if m:
            f[size + " memmove GB/s"] = float(m[1])
    return f
runs = {w: [figs(open(f"{d}/{w}.{i}").read()) for i in range(1, rounds + 1)] for w in ("base", "new")}
print(f"{rounds} rounds, alternated; median (min-max)")
print(f"{'figure':24} {'base':>22} {'new':>22} {'new/base':>9}")
for k in runs["base"][0]:
    b = [r[k] for r in runs["base"] if k in r]; n = [r[k] for r in runs["new"] if k in r]
    mb, mn = statistics.median(b), statistics.median(n)
    print(f"{k:24} {mb:9.2f} ({min(b):.2f}-{max(b):.2f}) {mn:9.2f} ({min(n):.2f}-{max(n):.2f}) {mn/mb:9.2f}")
PY
