#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotent), checks
# formatting and clippy, then runs every test. `.ci/run` calls this and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -D warnings"
cargo clippy -j2 --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test -j2 --workspace --all-targets
cargo test -j2 --workspace --doc
