//! The engine's bulk copy.
//!
//! Copies between two host fragments go through [`move_bytes`]. For
//! cache-sized copies between ranges that do not overlap it uses a plain
//! 32-byte vector load/store loop (AVX, where the CPU has it). The C
//! library's `memmove` copies such sizes with `rep movsb`; on the machine
//! the figures in `BENCHMARKS.md` come from, the loop copies an L2-resident
//! 64 KiB buffer faster (55 against 49 GB/s), and in the worker the first
//! store after a `rep movsb` copy was the hottest instruction outside the
//! copy (it appears to wait for the string instruction's stores to drain).
//! Small copies, overlapping ones and copies larger than the
//! core's cache go to `memmove` (which switches to non-temporal stores for
//! very large ones).

/// Smallest copy worth the vector loop.
pub(crate) const VECTOR_MIN: usize = 4096;
/// Largest copy the vector loop makes (beyond it the data does not stay in
/// the core's cache and `memmove`'s large-copy strategies win).
pub(crate) const VECTOR_MAX: usize = 512 * 1024;

/// Copies `n` bytes from `src` to `dst`; the ranges may overlap (memmove
/// semantics).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `n` bytes.
#[inline]
pub(crate) unsafe fn move_bytes(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if (VECTOR_MIN..=VECTOR_MAX).contains(&n) && disjoint(src, dst, n) && have_avx() {
        // SAFETY: AVX was detected; the ranges are valid (caller) and
        // disjoint (checked).
        unsafe { copy_avx(src, dst, n) };
        return;
    }
    // SAFETY: the caller guarantees both ranges; ptr::copy allows overlap.
    unsafe { std::ptr::copy(src, dst, n) };
}

/// True when `[a, a+n)` and `[b, b+n)` do not overlap.
#[inline]
fn disjoint(a: *const u8, b: *mut u8, n: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    a.abs_diff(b) >= n
}

#[cfg(target_arch = "x86_64")]
fn have_avx() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: unknown, 1: no, 2: yes.
    static HAVE: AtomicU8 = AtomicU8::new(0);
    match HAVE.load(Ordering::Relaxed) {
        0 => {
            let yes = std::arch::is_x86_feature_detected!("avx");
            HAVE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}

/// Copies `n` bytes, 128 at a time with 32-byte vectors (all loads of a
/// block before its stores), then the tail with `copy_nonoverlapping`.
///
/// # Safety
/// The CPU must support AVX; `src` must be valid for reads and `dst` for
/// writes of `n` bytes, and the ranges must not overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_avx(src: *const u8, dst: *mut u8, n: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_storeu_si256};
    const BLOCK: usize = 128;
    let mut i = 0;
    while i + BLOCK <= n {
        // SAFETY: i + 128 <= n: the block is in bounds of the source
        // (caller); unaligned loads need no alignment.
        let s = unsafe { src.add(i) }.cast::<__m256i>();
        // SAFETY: bytes 0..32 of the block.
        let v0 = unsafe { _mm256_loadu_si256(s) };
        // SAFETY: bytes 32..64 of the block.
        let v1 = unsafe { _mm256_loadu_si256(s.add(1)) };
        // SAFETY: bytes 64..96 of the block.
        let v2 = unsafe { _mm256_loadu_si256(s.add(2)) };
        // SAFETY: bytes 96..128 of the block.
        let v3 = unsafe { _mm256_loadu_si256(s.add(3)) };
        // SAFETY: i + 128 <= n: the block is in bounds of the destination
        // (caller), which does not overlap the source.
        let d = unsafe { dst.add(i) }.cast::<__m256i>();
        // SAFETY: bytes 0..32 of the block.
        unsafe { _mm256_storeu_si256(d, v0) };
        // SAFETY: bytes 32..64 of the block.
        unsafe { _mm256_storeu_si256(d.add(1), v1) };
        // SAFETY: bytes 64..96 of the block.
        unsafe { _mm256_storeu_si256(d.add(2), v2) };
        // SAFETY: bytes 96..128 of the block.
        unsafe { _mm256_storeu_si256(d.add(3), v3) };
        i += BLOCK;
    }
    if i < n {
        // SAFETY: the remaining n - i bytes are in bounds of both ranges,
        // which do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), n - i) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn test_move_bytes_every_path_copies_exactly() {
        // Below, at and inside the vector range, with tails that are not a
        // multiple of the block, at odd offsets.
        for n in [
            0,
            1,
            63,
            4095,
            4096,
            4097,
            4096 + 127,
            65536,
            65536 + 13,
            600_000,
        ] {
            for off in [0usize, 1, 33] {
                let src = pattern(n + off);
                let mut dst = vec![0xeeu8; n + off + 64];
                // SAFETY: both vectors hold n + off bytes from their starts
                // (dst 64 more), and they are distinct allocations.
                unsafe { move_bytes(src.as_ptr().add(off), dst.as_mut_ptr().add(off), n) };
                assert_eq!(&dst[off..off + n], &src[off..off + n], "n {n} off {off}");
                assert!(dst[..off].iter().all(|&b| b == 0xee), "before, n {n}");
                assert!(dst[off + n..].iter().all(|&b| b == 0xee), "after, n {n}");
            }
        }
    }

    #[test]
    fn test_move_bytes_overlapping_is_memmove() {
        for (n, shift) in [(8192usize, 64usize), (65536, 4096), (65536, 1)] {
            let orig = pattern(n + shift);
            // Destination above the source.
            let mut up = orig.clone();
            // SAFETY: both ranges lie inside `up` (n + shift bytes).
            unsafe { move_bytes(up.as_ptr(), up.as_mut_ptr().add(shift), n) };
            assert_eq!(&up[shift..], &orig[..n], "up n {n} shift {shift}");
            // Destination below the source.
            let mut down = orig.clone();
            // SAFETY: both ranges lie inside `down`.
            unsafe { move_bytes(down.as_ptr().add(shift), down.as_mut_ptr(), n) };
            assert_eq!(&down[..n], &orig[shift..], "down n {n} shift {shift}");
        }
    }
}
