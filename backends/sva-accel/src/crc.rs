//! CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as the CRCGEN and
//! COPY_CRC operations compute it.
//!
//! Convention: `crc32c(seed, data) = !raw(!seed, data)`, so seed 0 gives the
//! standard CRC-32C and the value of one call is the seed that continues it:
//! `crc32c(crc32c(0, a), b) == crc32c(0, a ++ b)`. The hardware path uses the
//! SSE4.2 `crc32` instruction when the CPU has it (detected at run time);
//! otherwise slicing-by-8 tables.

use std::sync::OnceLock;

const POLY: u32 = 0x82f6_3b78;

fn tables() -> &'static [[u32; 256]; 8] {
    static T: OnceLock<Box<[[u32; 256]; 8]>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = Box::new([[0u32; 256]; 8]);
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            }
        }
        t
    })
}

/// Updates the raw (non-inverted) CRC state with `n` bytes at `p`, portable path.
///
/// # Safety
/// `p` must be valid for reads of `n` bytes.
unsafe fn raw_soft(mut crc: u32, p: *const u8, n: usize) -> u32 {
    let t = tables();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n and the caller guarantees n readable bytes.
        let w = unsafe { p.add(i).cast::<u64>().read_unaligned() }.to_le() ^ u64::from(crc);
        crc = t[7][(w & 0xff) as usize]
            ^ t[6][((w >> 8) & 0xff) as usize]
            ^ t[5][((w >> 16) & 0xff) as usize]
            ^ t[4][((w >> 24) & 0xff) as usize]
            ^ t[3][((w >> 32) & 0xff) as usize]
            ^ t[2][((w >> 40) & 0xff) as usize]
            ^ t[1][((w >> 48) & 0xff) as usize]
            ^ t[0][(w >> 56) as usize];
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        let b = unsafe { p.add(i).read() };
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(b)) & 0xff) as usize];
        i += 1;
    }
    crc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
/// Updates the raw CRC state with the SSE4.2 instruction.
///
/// # Safety
/// The CPU must support SSE4.2 and `p` must be valid for reads of `n` bytes.
unsafe fn raw_sse42(crc: u32, p: *const u8, n: usize) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = u64::from(crc);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n and the caller guarantees n readable bytes.
        let w = unsafe { p.add(i).cast::<u64>().read_unaligned() };
        c = _mm_crc32_u64(c, w);
        i += 8;
    }
    let mut c = c as u32;
    while i < n {
        // SAFETY: i < n.
        let b = unsafe { p.add(i).read() };
        c = _mm_crc32_u8(c, b);
        i += 1;
    }
    c
}

fn have_sse42() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAVE: OnceLock<bool> = OnceLock::new();
        *HAVE.get_or_init(|| std::arch::is_x86_feature_detected!("sse4.2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Updates a raw CRC-32C state over `n` bytes at `p`.
///
/// # Safety
/// `p` must be valid for reads of `n` bytes.
pub(crate) unsafe fn update_raw(crc: u32, p: *const u8, n: usize) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if have_sse42() {
        // SAFETY: SSE4.2 was detected; the caller guarantees the range.
        return unsafe { raw_sse42(crc, p, n) };
    }
    // SAFETY: the caller guarantees the range.
    unsafe { raw_soft(crc, p, n) }
}

/// CRC-32C of `data` continuing from `seed` (0 for a fresh CRC).
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    // SAFETY: a slice is valid for reads of its length.
    !unsafe { update_raw(!seed, data.as_ptr(), data.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_crc32c_check_value() {
        assert_eq!(crc32c(0, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(0, b""), 0);
    }

    #[test]
    fn test_crc32c_chains_through_seed() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = crc32c(0, &data);
        for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let a = crc32c(0, &data[..split]);
            assert_eq!(crc32c(a, &data[split..]), whole, "split {split}");
        }
    }

    #[test]
    fn test_soft_and_hardware_paths_agree() {
        let data: Vec<u8> = (0..4099u32).map(|i| (i ^ (i >> 3)) as u8).collect();
        // SAFETY: the vector is readable for its length.
        let soft = unsafe { raw_soft(!0, data.as_ptr(), data.len()) };
        // SAFETY: as above.
        let best = unsafe { update_raw(!0, data.as_ptr(), data.len()) };
        assert_eq!(soft, best);
    }
}
