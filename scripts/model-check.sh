#!/usr/bin/env bash
# Model-checks iommu-core's unmap-safety protocol and the framework's
# RemovedRanges seqlock with loom: builds iommu-core and its models
# (iommu-core/tests/loom.rs), and the framework's unit tests (the model in
# framework/src/removed.rs), with RUSTFLAGS="--cfg loom" into target/loom
# (its own target dir: the flag changes every crate's build), in release
# mode (the framework's in the dev profile), and runs every model. Each prints "loom model NAME: passed after N
# iterations, preemption bound B, Ts".
#
# Usage: scripts/model-check.sh [--prove-fail]
#
# --prove-fail also builds five test-only broken variants (dev profile)
# and requires the models to fail there with "UNMAP PROMISE BROKEN"
# ("RANGE TORN" for the last):
#   --cfg ioasis_broken="departed" (target/loom-departed): replace, detach
#       and unbind no longer record the leaving device's open sections in
#       the IOAS; the replace, detach and unbind models must fail.
#   --cfg ioasis_broken="acqrel" (target/loom-acqrel): the active/gen
#       store-then-load pairs weakened to Release/Acquire; the unmap models
#       must fail.
#   --cfg ioasis_broken="unpinned" (target/loom-unpinned): a section's end
#       ignores access pins; the three pin models must fail.
#   --cfg ioasis_broken="firstunpin" (target/loom-firstunpin): the first
#       release of two pins ends the translator's section; the two-pin
#       model must fail.
#   --cfg ioasis_broken="seqlockonce" (target/loom-seqlockonce): the
#       framework's RemovedRanges::each_since does not read a slot's seq
#       again after its range; removed_ranges_seqlock must fail.
#
# LOOM_MAX_PREEMPTIONS, when set, replaces every model's own preemption
# bound (see the test file's docs).
set -euo pipefail
cd "$(dirname "$0")/.."

prove_fail=0
case "${1:-}" in
    "") ;;
    --prove-fail) prove_fail=1 ;;
    *) echo "usage: $0 [--prove-fail]" >&2; exit 2 ;;
esac

base="${CARGO_TARGET_DIR:-$PWD/target}"
t0=$SECONDS

# cargo test of the loom models in one variant: $1 target dir, $2 extra
# rustflags, $3 cargo profile, the rest goes to the test harness.
models() {
    local dir=$1 flags=$2 profile=$3
    shift 3
    RUSTFLAGS="--cfg loom $flags" CARGO_TARGET_DIR="$dir" \
        cargo test -j2 --profile "$profile" -p iommu-core --test loom "$@"
}

# The same for the framework's model (a unit test module, run by its path).
removed_model() {
    local dir=$1 flags=$2 profile=$3
    shift 3
    RUSTFLAGS="--cfg loom $flags" CARGO_TARGET_DIR="$dir" \
        cargo test -j2 --profile "$profile" -p ioasis --lib "$@"
}

echo "== loom models (target/loom)"
models "$base/loom" "" release --no-run
models "$base/loom" "" release -- --nocapture
# The framework's model in the dev profile: it runs in 1.5 s there, and
# the framework with its dependencies builds in half the time of a release
# build (53 s against 113 s from nothing; 3 s against 28 s after a change).
removed_model "$base/loom" "" dev --no-run
removed_model "$base/loom" "" dev -- --nocapture removed::loom_model::
echo "== loom models passed ($((SECONDS - t0))s)"

[ "$prove_fail" = 1 ] || exit 0

# $1 variant, $2 preemption bound, the rest: the models that must fail in
# it (iommu-core's; with run=removed_model and marker="RANGE TORN", the
# framework's, named by their path in the crate). Built in the dev profile
# and run with at most $2 preemptions (LOOM_MAX_PREEMPTIONS, when set,
# instead): the models find each bug within that bound (the pin variants
# need 3: at 2, unmap_during_pinned_io passes on the unpinned build and
# unmap_during_two_pins on the firstunpin build; removed_ranges_seqlock
# passes at 1 on the seqlockonce build), in fewer iterations than an
# optimised build would save time for.
must_fail() {
    local v=$1 bound=$2 out rc m
    shift 2
    local dir="$base/loom-$v" flags="--cfg ioasis_broken=\"$v\""
    echo "== ioasis_broken=\"$v\" (target/loom-$v): $* must fail"
    "${run:-models}" "$dir" "$flags" dev --no-run
    for m in "$@"; do
        rc=0
        out=$(LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-$bound}" \
            "${run:-models}" "$dir" "$flags" dev -- --exact "$m" 2>&1) || rc=$?
        if [ "$rc" -eq 0 ] || ! grep -q "${marker:-UNMAP PROMISE BROKEN}" <<<"$out"; then
            echo "$out"
            echo "!! $m did not find the broken protocol (ioasis_broken=\"$v\")" >&2
            exit 1
        fi
        echo "   $(grep -m1 -o "loom model ${m##*::}: .*" <<<"$out")"
        echo "     $(grep -m1 -o "${marker:-UNMAP PROMISE BROKEN}.*" <<<"$out")"
    done
}

must_fail departed 2 replace_during_unmap detach_during_unmap unbind_during_unmap
must_fail acqrel 2 unmap_one_translator unmap_two_translators
must_fail unpinned 3 unmap_during_pinned_io unmap_during_two_pins \
    drain_requested_during_pinned_io
must_fail firstunpin 3 unmap_during_two_pins
run=removed_model marker="RANGE TORN" \
    must_fail seqlockonce 2 removed::loom_model::removed_ranges_seqlock
echo "== the models fail on all five broken variants ($((SECONDS - t0))s)"
