#!/usr/bin/env bash
# CPU an idle vdpa-net uses: a testpmd virtio_user frontend is connected and
# forwarding (rxonly: it polls the device-to-driver direction, and the
# device's port is a sink, so nothing flows either way), for SECS seconds
# (default 10). Prints the daemon's CPU from /proc/PID/stat (utime + stime)
# and from its threads' schedstat run times, and each thread's wake-ups
# (context switches) over the same time, so what wakes an idle daemon shows.
#
#   scripts/idle-cpu.sh [--secs S] [VDPA-NET ARG]...     e.g. --poll-us 1000
#
# Exits 1 when the daemon used 1 % of a CPU or more (the target of the
# default, adaptive, mode; a fixed --poll-us window should stay under it too,
# since an idle device polls only after work), 2 when the setup failed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=10
if [ "${1:-}" = "--secs" ]; then SECS="$2"; shift 2; fi

scripts/setup.sh >/dev/null || true
cargo build -q -j2 --release -p vdpa-net --bin vdpa-net
BIN="$PWD/target/release/vdpa-net"
DIR="$(mktemp -d)"
VPID=""
TPID=""
cleanup() {
    [ -n "$TPID" ] && kill -INT "$TPID" 2>/dev/null || true
    [ -n "$VPID" ] && kill -TERM "$VPID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"$BIN" --socket-path "$DIR/vh.sock" --port sink "$@" >"$DIR/vdpa.out" 2>"$DIR/vdpa.err" &
VPID=$!
for _ in $(seq 100); do [ -S "$DIR/vh.sock" ] && break; sleep 0.05; done
[ -S "$DIR/vh.sock" ] || { echo "!! vdpa-net did not start:"; cat "$DIR/vdpa.err"; exit 2; }

free_mb=$(( $(awk '/HugePages_Free/ {print $2}' /proc/meminfo) * 2 ))
if [ "$(id -u)" -eq 0 ] && [ "$free_mb" -ge 320 ]; then MEM=(--in-memory --single-file-segments); else MEM=(--no-huge); fi
timeout -s INT -k 5 $((SECS + 30)) dpdk-testpmd -l 0,1 --main-lcore 1 --no-pci \
    --file-prefix "ioasis-idle-$$" -m 256 "${MEM[@]}" \
    --vdev "virtio_user0,path=$DIR/vh.sock,queues=1" -- \
    --forward-mode=rxonly --nb-cores=1 --no-mlockall --stats-period=1 -a \
    >"$DIR/testpmd.out" 2>&1 &
TPID=$!
for _ in $(seq 200); do grep -q "Rx-pps" "$DIR/testpmd.out" 2>/dev/null && break; sleep 0.1; done
grep -q "Rx-pps" "$DIR/testpmd.out" || { echo "!! testpmd did not start forwarding:"; tail -20 "$DIR/testpmd.out"; exit 2; }
# Let the connection settle (the first passes, the adaptive window closing).
sleep 1

ticks() { awk '{print $14 + $15}' "/proc/$VPID/stat"; }
threads() {
    for t in /proc/"$VPID"/task/*; do
        printf '%s %s %s %s\n' "${t##*/}" "$(tr ' ' '_' <"$t/comm")" \
            "$(awk '{print $1}' "$t/schedstat" 2>/dev/null || echo 0)" \
            "$(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")"
    done
}
t0=$(ticks); threads | sort >"$DIR/a"
sleep "$SECS"
t1=$(ticks); threads | sort >"$DIR/b"
kill -0 "$TPID" 2>/dev/null || { echo "!! testpmd ended during the measurement"; exit 2; }

hz=$(getconf CLK_TCK)
echo "== vdpa-net $* idle for ${SECS} s with testpmd virtio_user connected (load $(cut -d' ' -f1-3 /proc/loadavg))"
echo "thread           cpu-us  wake-ups"
join "$DIR/a" "$DIR/b" | awk '{ printf "%-15s %7d %9d\n", $2, ($6 - $3) / 1000, $7 - $4 }'
run_ns=$(join "$DIR/a" "$DIR/b" | awk '{ s += $6 - $3 } END { print s }')
awk -v t="$((t1 - t0))" -v hz="$hz" -v s="$SECS" -v ns="$run_ns" 'BEGIN {
    printf "utime+stime: %d ticks = %.3f %% of a CPU; schedstat: %.3f %%\n", t, 100 * t / hz / s, ns / 1e7 / s
    exit (100 * t / hz / s >= 1 || ns / 1e7 / s >= 1) ? 1 : 0
}' || { echo "FAIL: 1 % or more"; exit 1; }
echo "ok: under 1 %"
