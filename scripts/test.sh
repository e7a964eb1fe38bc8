#!/usr/bin/env bash
# The whole test suite: installs and prepares what the tests need
# (scripts/setup.sh, idempotent), checks formatting and clippy, builds
# everything once, then runs the unit and in-process tests of every crate,
# the doc tests, the loom models of iommu-core's unmap protocol
# (scripts/model-check.sh, with its proof that they fail on broken builds),
# the quickstart as the README runs it (release build),
# and the end-to-end tests against real frontends (QEMU, DPDK
# testpmd; crate ioasis-integration, which also runs the disk tests against
# qemu-storage-daemon while the workspace has no vdpa-blk). `.ci/run` calls this and nothing else.
#
# A test that cannot run here (a missing tool, guest kernel or root, a
# premise the machine did not give) records a skip through the crate
# ioasis-test-skip into $IOASIS_SKIP_LOG. The script ends, whatever the
# outcome, with "== skipped: N" and one "test: reason" line per skip. With
# CI set (anything but empty, 0 or false) or IOASIS_REQUIRE_FRONTENDS=1 such
# a test fails, and the script fails when N is not zero. A workspace daemon
# or example that does not build stops the script at the build step (and
# fails an integration test run on its own; see integration/src/bins.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
step() { echo "== $* (t=$((SECONDS - t0))s)"; }

# The rule of ioasis_test_skip::strict().
on() { [ -n "$1" ] && [ "$1" != 0 ] && [ "${1,,}" != false ]; }
strict() { on "${CI:-}" || on "${IOASIS_REQUIRE_FRONTENDS:-}"; }

target="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$target"
export IOASIS_SKIP_LOG="$target/ioasis-skips.tsv"
: >"$IOASIS_SKIP_LOG"

# Runs on every exit, so a failed step still shows what was skipped.
summary() {
    local rc=$? n
    n=$(sort -u "$IOASIS_SKIP_LOG" | grep -c . || true)
    echo "== skipped: $n (log: $IOASIS_SKIP_LOG)"
    sort -u "$IOASIS_SKIP_LOG" | while IFS=$'\t' read -r test why; do
        echo "   $test: $why"
    done
    if [ "$n" -ne 0 ] && strict; then
        echo "!! $n skipped tests: a skip is a failure under CI=true or IOASIS_REQUIRE_FRONTENDS=1" >&2
        [ "$rc" -ne 0 ] || rc=1
    fi
    exit "$rc"
}
trap summary EXIT

step "setup"
if ! scripts/setup.sh; then
    if strict; then exit 1; fi
    echo "!! scripts/setup.sh failed: real-frontend tests will skip" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -D warnings"
cargo clippy -j2 --workspace --all-targets -- -D warnings
step "cargo doc -D warnings (every public item documented, no broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc -j2 --workspace --no-deps -q

# One build of everything the tests run: the daemons the end-to-end tests
# drive, and every test executable.
step "build"
cargo build -j2 --workspace --bins
cargo test -j2 --workspace --all-targets --no-run

step "unit and in-process tests"
cargo test -j2 --workspace --all-targets --exclude ioasis-integration --no-fail-fast
cargo test -j2 --workspace --doc
step "model check of the unmap protocol (loom)"
scripts/model-check.sh --prove-fail
# The README's first command as users run it: an optimised build changes
# the timing between the daemon's threads and the quickstart's frontend,
# and once it alone failed (a transmit miss suppressed by the receive
# queue's ask for the same page, framework/src/worker.rs `already_asked`)
# while the debug-build test below passed.
step "the quickstart, release build (the README's first command)"
quickstart=$(cargo run -j2 --release -q -p ioasis-examples --example quickstart 2>&1) \
    || { echo "$quickstart"; exit 1; }
echo "$quickstart" | tail -n 1
step "end-to-end tests (real frontends)"
t1=$SECONDS
cargo test -j2 -p ioasis-integration --all-targets --no-fail-fast
echo "== end-to-end tests took $((SECONDS - t1))s"
step "done"
