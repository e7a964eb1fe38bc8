#!/usr/bin/env python3
"""Counts a vdpa-net debug log's IOTLB traffic: misses sent, updates and
invalidations received, and misses asked again for a page while an earlier
ask of it was unanswered (no update or invalidation covered the page since).

    scripts/iotlb-asks.py VDPA_NET_LOG

The log comes from a daemon run with RUST_LOG=debug, e.g. the migration
test's, kept with IOASIS_KEEP_LOGS=1:

    IOASIS_KEEP_LOGS=1 RUST_LOG=debug cargo test -j2 -p ioasis-integration \\
        --test vdpa_net_migration test_guest_migrates_under_traffic_strict_iommu
    scripts/iotlb-asks.py /tmp/ioasis-test-.../vdpa-net.err
"""
import re
import sys

PAGE = 4096


def main(path):
    outstanding = set()
    misses = updates = invalidations = again = 0
    with open(path, errors="replace") as f:
        for line in f:
            m = re.search(r"IOTLB Update \{ iova: (\d+), size: (\d+)", line)
            if m:
                updates += 1
                a = int(m.group(1))
                b = a + int(m.group(2)) - 1
                outstanding = {p for p in outstanding if not a <= p <= b}
                continue
            m = re.search(r"IOTLB Invalidate \{ iova: (\d+), last: (\d+)", line)
            if m:
                invalidations += 1
                a, b = int(m.group(1)), int(m.group(2))
                outstanding = {p for p in outstanding if not (p <= b and p + PAGE - 1 >= a)}
                continue
            m = re.search(r"IOTLB miss sent for (0x[0-9a-f]+)", line)
            if m:
                misses += 1
                page = int(m.group(1), 16) & ~(PAGE - 1)
                if page in outstanding:
                    again += 1
                outstanding.add(page)
    print(
        f"misses {misses}, updates {updates}, invalidations {invalidations}, "
        f"asked again while unanswered {again}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
