//! Guest scripts and host checks for the disk tests: a QEMU guest writes a
//! known pattern onto a vhost-user-blk disk, reads it back, and the host
//! compares the image file with what the guest wrote.
//!
//! The pattern ([`pattern`]) is made on the host and put into the guest's
//! initramfs as [`PATTERN_PATH`]; every 4 KiB block of it is different (a
//! header with the block number, then pseudo-random bytes seeded by it), so
//! a block written to the wrong place, written twice from an older pass, or
//! not written at all shows up in the comparison. The guest uses busybox
//! `dd` (`oflag=direct`/`iflag=direct` for O_DIRECT) and `sha256sum`.

use std::fmt::Write as _;

/// Bytes per block of the pattern (the guest's `dd bs=4k`).
pub const BLOCK: usize = 4096;

/// Where the pattern lives in the guest.
pub const PATTERN_PATH: &str = "/data/pattern";

/// `blocks` blocks of the pattern: block `i` starts with
/// `ioasis-blk <i>\n` and continues with xorshift bytes seeded by `i`.
pub fn pattern(blocks: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * BLOCK);
    for i in 0..blocks {
        let start = out.len();
        out.extend_from_slice(format!("ioasis-blk {i:08}\n").as_bytes());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
        while out.len() < start + BLOCK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let left = start + BLOCK - out.len();
            out.extend_from_slice(&x.to_le_bytes()[..left.min(8)]);
        }
    }
    out
}

/// The first block (of `expected`, `BLOCK`-sized) where `got` differs, and
/// how many blocks differ; `None` if they are equal.
pub fn first_difference(got: &[u8], expected: &[u8]) -> Option<(usize, usize)> {
    if got == expected {
        return None;
    }
    let blocks = expected.len().max(got.len()).div_ceil(BLOCK);
    let block = |b: &[u8], i: usize| -> Vec<u8> {
        b.get(i * BLOCK..((i + 1) * BLOCK).min(b.len()))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    };
    let bad: Vec<usize> = (0..blocks)
        .filter(|&i| block(got, i) != block(expected, i))
        .collect();
    bad.first().map(|&f| (f, bad.len()))
}

/// Describes what a block holds (`pattern block N`, `zeroes`, or `other`),
/// to say which pass a wrong block came from.
pub fn describe_block(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        return "zeroes".into();
    }
    match b.get(..20).and_then(|h| std::str::from_utf8(h).ok()) {
        Some(h) if h.starts_with("ioasis-blk ") => format!("pattern block {}", h[11..19].trim()),
        _ => "other bytes".into(),
    }
}

/// Shell functions the disk scripts share (busybox sh).
const DISK_LIB: &str = r#"P=/data/pattern
fail() { mark "$1"; cat /proc/diskstats; exit 1; }
same() { [ "$1" = "$2" ]; }
sum_of() { sha256sum | cut -d' ' -f1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
"#;

/// A script that writes [`pattern`] of `blocks` blocks over `/dev/<dev>`
/// (the disk must be exactly that big): the first half with O_DIRECT in
/// 64 KiB requests from CPU 0, the third quarter with O_DIRECT in 4 KiB
/// requests from CPU `cpu2`, the last quarter buffered (then `fsync`) from
/// CPU `cpu2`; drops the page cache and reads the disk back with O_DIRECT
/// and buffered, comparing each with the pattern. Markers: `RW_OK` or one
/// of `NOT_WRITABLE`, `WRITE_FAIL`, `DIRECT_READ_BAD`, `BUFFERED_READ_BAD`.
pub fn write_pattern_script(dev: &str, blocks: usize, cpu2: u32) -> String {
    assert!(blocks % 64 == 0, "blocks must be a multiple of 64");
    let half = blocks / 2;
    let quarter = blocks / 4;
    let mut s = String::from(DISK_LIB);
    let _ = write!(
        s,
        "D=/dev/{dev}\n\
         same \"$(cat /sys/block/{dev}/ro)\" 0 || fail NOT_WRITABLE\n\
         same \"$(blockdev --getsize64 $D)\" {bytes} || fail \"WRONG_SIZE $(blockdev --getsize64 $D)\"\n\
         taskset -c 0 dd if=$P of=$D bs=64k count={h64} oflag=direct conv=notrunc 2>/dev/null || fail WRITE_FAIL\n\
         taskset -c {cpu2} dd if=$P of=$D bs=4k skip={half} seek={half} count={quarter} oflag=direct conv=notrunc 2>/dev/null || fail WRITE_FAIL\n\
         taskset -c {cpu2} dd if=$P of=$D bs=4k skip={tq} seek={tq} count={quarter} conv=notrunc,fsync 2>/dev/null || fail WRITE_FAIL\n\
         drop_caches\n\
         want=$(sum_of < $P)\n\
         got=$(taskset -c 0 dd if=$D bs=64k count={all64} iflag=direct 2>/dev/null | sum_of)\n\
         same \"$got\" \"$want\" || fail DIRECT_READ_BAD\n\
         drop_caches\n\
         got=$(taskset -c {cpu2} dd if=$D bs=4k count={blocks} 2>/dev/null | sum_of)\n\
         same \"$got\" \"$want\" || fail BUFFERED_READ_BAD\n\
         mark RW_OK\n",
        bytes = blocks * BLOCK,
        h64 = half / 16,
        tq = half + quarter,
        all64 = blocks / 16,
    );
    s
}

/// A script that checks `/dev/<dev>` is read-only: `/sys/block/<dev>/ro`
/// is 1 (else marker `RO_FLAG_BAD`), and writes to it fail, with O_DIRECT
/// and buffered (else `RO_WRITE_SUCCEEDED`); `RO_OK` when both hold. It
/// also reads the disk and prints its checksum (`RO_SUM <sha256>`).
pub fn read_only_script(dev: &str) -> String {
    format!(
        "{DISK_LIB}D=/dev/{dev}\n\
         same \"$(cat /sys/block/{dev}/ro)\" 1 || fail RO_FLAG_BAD\n\
         if dd if=$P of=$D bs=4k count=16 oflag=direct conv=notrunc 2>/dev/null; then fail RO_WRITE_SUCCEEDED; fi\n\
         if dd if=$P of=$D bs=4k count=16 conv=notrunc,fsync 2>/dev/null; then fail RO_WRITE_SUCCEEDED; fi\n\
         blockdev --setrw $D 2>/dev/null\n\
         if dd if=$P of=$D bs=4k count=16 oflag=direct conv=notrunc 2>/dev/null; then fail RO_WRITE_SUCCEEDED; fi\n\
         mark \"RO_SUM $(dd if=$D bs=64k iflag=direct 2>/dev/null | sum_of)\"\n\
         mark RO_OK\n"
    )
}

/// A script printing, per hardware queue of `/dev/<dev>`, how often the
/// guest's block layer ran it to dispatch requests (debugfs `hctxN/run`;
/// a queue the guest never submitted to stays at 0), as markers
/// `QUEUE_RUNS <dev> <N> <count>`.
pub fn queue_use_script(dev: &str) -> String {
    format!(
        "mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         for h in /sys/kernel/debug/block/{dev}/hctx*; do\n\
         \x20   mark \"QUEUE_RUNS {dev} ${{h##*hctx}} $(cat $h/run 2>/dev/null || echo none)\"\n\
         done\n"
    )
}

/// The `QUEUE_RUNS <dev> <N> <count>` markers of a console, per queue in order.
pub fn queue_runs(console: &str, dev: &str) -> Vec<(u32, Option<u64>)> {
    let tag = format!("@@IOASIS:QUEUE_RUNS {dev} ");
    let mut out: Vec<(u32, Option<u64>)> = console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(&tag)? + tag.len()..];
            let rest = rest.split("@@").next()?;
            let mut it = rest.split_whitespace();
            let q = it.next()?.parse().ok()?;
            Some((q, it.next().and_then(|c| c.parse().ok())))
        })
        .collect();
    out.sort();
    out
}

/// Parameters of the kill-and-restart run ([`rewrite_passes_script`]).
#[derive(Debug, Clone, Copy)]
pub struct Passes {
    /// Parallel writers, each on its own region of the disk.
    pub writers: usize,
    /// Blocks per writer region.
    pub region_blocks: usize,
    /// Passes each writer makes over its region.
    pub passes: usize,
}

impl Passes {
    /// Blocks of the disk.
    pub fn disk_blocks(&self) -> usize {
        self.writers * self.region_blocks
    }

    /// Blocks of the pattern the guest needs.
    pub fn pattern_blocks(&self) -> usize {
        self.disk_blocks() + self.passes - 1
    }

    /// What the disk must hold after every pass: disk block `b` holds
    /// pattern block `b + passes - 1` (pass `p` writes pattern block
    /// `b + p` to disk block `b`).
    pub fn expected<'a>(&self, pattern: &'a [u8]) -> &'a [u8] {
        let start = (self.passes - 1) * BLOCK;
        &pattern[start..start + self.disk_blocks() * BLOCK]
    }
}

/// A script where `p.writers` writers rewrite their own region of
/// `/dev/<dev>` `p.passes` times with O_DIRECT 4 KiB writes, pass `k`
/// writing pattern block `b + k` to disk block `b`; every pass is different
/// from the one before it, so a write applied twice (an older pass landing
/// after a newer one) leaves a wrong block. Meanwhile a flusher issues
/// cache flushes (`fsync` on the device) back to back until the writers
/// are done: a flush takes the host much longer than a 4 KiB write, so the
/// device completes requests out of order all the time, and a request
/// in flight is often older than requests already completed. Markers:
/// `WRITING` once the writers run, `PASS <w> <k>` after each pass,
/// `FLUSHES <n>`, `WRITES_DONE`, then
/// `READBACK_OK` if the disk read back with O_DIRECT matches the last pass
/// (`READBACK_BAD`, `WRITE_FAIL` otherwise).
pub fn rewrite_passes_script(dev: &str, p: &Passes) -> String {
    let mut s = String::from(DISK_LIB);
    let _ = write!(
        s,
        "D=/dev/{dev}\n\
         pids=\"\"\n\
         for w in $(seq 0 {last_w}); do\n\
         \x20   ( k=0; while [ $k -lt {passes} ]; do\n\
         \x20       dd if=$P of=$D bs=4k skip=$((w * {rb} + k)) seek=$((w * {rb})) count={rb} oflag=direct conv=notrunc 2>/dev/null || {{ echo \"writer $w pass $k failed\"; exit 1; }}\n\
         \x20       mark \"PASS $w $k\"; k=$((k + 1))\n\
         \x20   done ) &\n\
         \x20   pids=\"$pids $!\"\n\
         done\n\
         ( n=0; while [ ! -e /tmp/writers-done ]; do\n\
         \x20   dd if=/dev/null of=$D count=0 conv=notrunc,fsync 2>/dev/null || {{ echo \"flush $n failed\"; exit 1; }}\n\
         \x20   n=$((n + 1))\n\
         done; mark \"FLUSHES $n\" ) &\n\
         flusher=$!\n\
         mark WRITING\n\
         rc=0; for pid in $pids; do wait $pid || rc=1; done\n\
         touch /tmp/writers-done\n\
         wait $flusher || rc=1\n\
         same $rc 0 || fail WRITE_FAIL\n\
         mark WRITES_DONE\n\
         drop_caches\n\
         want=$(dd if=$P bs=4k skip={skip} count={blocks} 2>/dev/null | sum_of)\n\
         got=$(dd if=$D bs=64k count={all64} iflag=direct 2>/dev/null | sum_of)\n\
         same \"$got\" \"$want\" || fail READBACK_BAD\n\
         mark READBACK_OK\n",
        last_w = p.writers - 1,
        passes = p.passes,
        rb = p.region_blocks,
        skip = p.passes - 1,
        blocks = p.disk_blocks(),
        all64 = p.disk_blocks() / 16,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pattern_blocks_differ_and_are_named() {
        let p = pattern(3);
        assert_eq!(p.len(), 3 * BLOCK);
        assert_ne!(p[..BLOCK], p[BLOCK..2 * BLOCK]);
        assert_eq!(
            describe_block(&p[BLOCK..2 * BLOCK]),
            "pattern block 00000001"
        );
        assert_eq!(describe_block(&[0; BLOCK]), "zeroes");
        assert_eq!(first_difference(&p, &p), None);
        let mut q = p.clone();
        q[BLOCK + 5] ^= 1;
        assert_eq!(first_difference(&q, &p), Some((1, 1)));
    }

    #[test]
    fn test_expected_after_passes() {
        let p = Passes {
            writers: 2,
            region_blocks: 4,
            passes: 3,
        };
        let pat = pattern(p.pattern_blocks());
        let e = p.expected(&pat);
        assert_eq!(e.len(), 8 * BLOCK);
        assert_eq!(describe_block(&e[..BLOCK]), "pattern block 00000002");
    }

    #[test]
    fn test_queued_markers_parse() {
        let c = "x @@IOASIS:QUEUE_RUNS vda 1 7@@\n@@IOASIS:QUEUE_RUNS vda 0 12@@\n@@IOASIS:QUEUE_RUNS vdb 0 1@@";
        assert_eq!(queue_runs(c, "vda"), vec![(0, Some(12)), (1, Some(7))]);
    }
}
