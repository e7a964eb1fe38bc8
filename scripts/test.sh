#!/usr/bin/env bash
# The whole test suite: installs and prepares what the tests need
# (scripts/setup.sh, idempotent), checks formatting and clippy, builds
# everything once, then runs the unit and in-process tests of every crate,
# the doc tests, and the end-to-end tests against real frontends (QEMU, DPDK
# testpmd; crate ioasis-integration). `.ci/run` calls this and nothing else.
#
# With CI=true (or IOASIS_REQUIRE_FRONTENDS=1) a real-frontend test that
# cannot run (missing tool, kernel, daemon binary) fails; elsewhere it is
# skipped with a loud notice on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
step() { echo "== $* (t=$((SECONDS - t0))s)"; }

step "setup"
if ! scripts/setup.sh; then
    if [ "${CI:-}" = "true" ]; then exit 1; fi
    echo "!! scripts/setup.sh failed: real-frontend tests will skip" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -D warnings"
cargo clippy -j2 --workspace --all-targets -- -D warnings

# One build of everything the tests run: the daemons the end-to-end tests
# drive, and every test executable.
step "build"
cargo build -j2 --workspace --bins
cargo test -j2 --workspace --all-targets --no-run

step "unit and in-process tests"
cargo test -j2 --workspace --all-targets --exclude ioasis-integration --no-fail-fast
cargo test -j2 --workspace --doc
step "end-to-end tests (real frontends)"
t1=$SECONDS
cargo test -j2 -p ioasis-integration --all-targets --no-fail-fast
echo "== end-to-end tests took $((SECONDS - t1))s"
step "done"
