# Shared by the callgrind count scripts (scripts/count-net.sh,
# scripts/count-queue.sh); sourced, not run. Both take an optional bench
# binary (to count another build) and a few flags they pass on to it.

# count_args FLAG... -- ARG...: sets `args` to the ARGs that are one of the
# FLAGs and `bin` to the last other ARG (empty if none).
count_args() {
    local flags=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        flags+=("$1")
        shift
    done
    shift
    bin=
    args=()
    local a f known
    for a in "$@"; do
        known=
        for f in "${flags[@]}"; do
            [ "$a" = "$f" ] && known=1
        done
        if [ -n "$known" ]; then args+=("$a"); else bin=$a; fi
    done
}

# count_bench_binary PACKAGE BENCH: the path of BENCH's benchmark binary in
# PACKAGE, built if needed, unless `bin` is already set; exits 2 without one.
count_bench_binary() {
    if [ -z "$bin" ]; then
        bin=$(cargo bench -j2 -p "$1" --bench "$2" --no-run 2>&1 \
            | grep -o "target/release/deps/$2-[0-9a-f]*" | tail -1)
    fi
    [ -x "$bin" ] || { echo "no benchmark binary: $bin" >&2; exit 2; }
}
