//! Property tests of the service message decoder, driven by `arbitrary`:
//! arbitrary bytes and mutated valid messages never panic and always map
//! to an errno; generated requests survive an encode/decode round trip.

use arbitrary::{Result as ArbResult, Unstructured};
use ioasis_service::proto::*;

/// Deterministic bytes for `Unstructured` (xorshift64*), so failures replay.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn label(u: &mut Unstructured<'_>) -> ArbResult<String> {
    let n = u.int_in_range(1..=MAX_LABEL)?;
    Ok((0..n)
        .map(|i| (b'a' + ((i + n) % 26) as u8) as char)
        .collect())
}

fn pasid(u: &mut Unstructured<'_>) -> ArbResult<Option<u32>> {
    Ok(if u.arbitrary()? {
        Some(u.arbitrary()?)
    } else {
        None
    })
}

fn range(u: &mut Unstructured<'_>) -> ArbResult<(u64, u64)> {
    let length: u64 = u.int_in_range(1..=1 << 40)?;
    let start: u64 = u.int_in_range(0..=u64::MAX - length)?;
    Ok((start, length))
}

/// A valid request.
fn request(u: &mut Unstructured<'_>) -> ArbResult<Request> {
    Ok(match u.int_in_range(0..=18u8)? {
        0 => Request::Hello,
        1 => Request::IoasAlloc,
        2 => Request::Destroy { id: u.arbitrary()? },
        3 => {
            let (iova, length) = range(u)?;
            let offset = u.int_in_range(0..=u64::MAX - length)?;
            let fixed: bool = u.arbitrary()?;
            Request::IoasMap {
                flags: u.int_in_range(0..=3u32)? << 1 | u32::from(fixed),
                ioas_id: u.arbitrary()?,
                offset,
                length,
                iova: if fixed { iova } else { 0 },
            }
        }
        4 => {
            let (iova, length) = range(u)?;
            Request::IoasUnmap {
                ioas_id: u.arbitrary()?,
                iova,
                length,
            }
        }
        5 => {
            let (src_iova, length) = range(u)?;
            let dst_iova = u.int_in_range(0..=u64::MAX - length)?;
            Request::IoasCopy {
                flags: MAP_FIXED_IOVA | MAP_READABLE,
                dst_ioas_id: u.arbitrary()?,
                src_ioas_id: u.arbitrary()?,
                length,
                dst_iova,
                src_iova,
            }
        }
        6 => Request::IoasIovaRanges {
            ioas_id: u.arbitrary()?,
        },
        7 => {
            let n = u.int_in_range(0..=8usize)?;
            let mut ranges = Vec::new();
            for _ in 0..n {
                ranges.push((u.arbitrary()?, u.arbitrary()?));
            }
            Request::IoasAllowIovas {
                ioas_id: u.arbitrary()?,
                ranges,
            }
        }
        8 => Request::DeviceList,
        9 => Request::DeviceInfo { label: label(u)? },
        10 => Request::Attach {
            label: label(u)?,
            pasid: pasid(u)?,
            pt_id: u.arbitrary()?,
        },
        11 => Request::Detach {
            label: label(u)?,
            pasid: pasid(u)?,
        },
        12 => Request::PasidAlloc { label: label(u)? },
        13 => Request::PasidFree {
            label: label(u)?,
            pasid: u.arbitrary()?,
        },
        14 => {
            let n = u.int_in_range(0..=MAX_HWPT_DATA)?;
            Request::HwptAlloc {
                label: label(u)?,
                pt_id: u.arbitrary()?,
                flags: u.int_in_range(0..=3u32)? | (u.int_in_range(0..=1u32)? << 3),
                fault_id: if u.arbitrary()? {
                    Some(u.arbitrary()?)
                } else {
                    None
                },
                data_type: u.arbitrary()?,
                data: u.bytes(n)?.to_vec(),
            }
        }
        15 => {
            let n = u.int_in_range(0..=16usize)?;
            let viommu: bool = u.arbitrary()?;
            let mut entries = Vec::new();
            for _ in 0..n {
                entries.push(if viommu {
                    InvalidateEntry::Viommu {
                        vdev_id: u.arbitrary()?,
                        vpasid: pasid(u)?,
                        flags: u.int_in_range(0..=0x7fff_ffffu32)?,
                        addr: u.arbitrary()?,
                        npages: u.arbitrary()?,
                    }
                } else {
                    InvalidateEntry::Stage1 {
                        flags: u.arbitrary()?,
                        addr: u.arbitrary()?,
                        npages: u.arbitrary()?,
                    }
                });
            }
            let (data_type, entry_len) = if viommu {
                (INVALIDATE_DATA_VIOMMU, INVALIDATE_VIOMMU_LEN)
            } else {
                (INVALIDATE_DATA_STAGE1, INVALIDATE_STAGE1_LEN)
            };
            Request::HwptInvalidate {
                hwpt_id: u.arbitrary()?,
                data_type,
                entry_len,
                entries,
            }
        }
        16 => Request::RidToken { label: label(u)? },
        17 => Request::RidClaim {
            label: label(u)?,
            token: u.arbitrary()?,
        },
        _ => Request::FaultQueueAlloc,
    })
}

#[test]
fn test_generated_requests_roundtrip() {
    let mut checked = 0;
    for seed in 0..3000u64 {
        let data = bytes(seed, 4096);
        let mut u = Unstructured::new(&data);
        let Ok(req) = request(&mut u) else { continue };
        let id = seed.wrapping_mul(31);
        let enc = req.encode(id);
        let nfds = req.opcode().request_fds();
        let (h, dec) = Request::decode(&enc, nfds).expect("valid request decodes");
        assert_eq!(h.request_id, id);
        assert_eq!(dec, req, "seed {seed}");
        checked += 1;
    }
    assert!(checked > 2500, "only {checked} requests generated");
}

#[test]
fn test_arbitrary_bytes_never_panic() {
    for seed in 0..5000u64 {
        let data = bytes(seed, 512);
        let mut u = Unstructured::new(&data);
        let n = u.int_in_range(0..=300usize).unwrap_or(0);
        let nfds = u.int_in_range(0..=2usize).unwrap_or(0);
        let mut pkt = u.bytes(n).unwrap_or(&[]).to_vec();
        // Half of the packets get a plausible header so the body decoders
        // are reached.
        if seed % 2 == 0 && pkt.len() >= HEADER_SIZE {
            pkt[0..4].copy_from_slice(&SERVICE_MAGIC.to_le_bytes());
            pkt[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            let op = (seed % 21) as u16;
            pkt[6..8].copy_from_slice(&op.to_le_bytes());
            let len = pkt.len() as u32;
            pkt[8..12].copy_from_slice(&len.to_le_bytes());
            pkt[12..14].copy_from_slice(&(nfds as u16).to_le_bytes());
            pkt[14..16].copy_from_slice(&0u16.to_le_bytes());
        }
        if let Err((_, e)) = Request::decode(&pkt, nfds) {
            assert!(e.errno() > 0);
        }
        for op in [
            Opcode::Hello,
            Opcode::IoasIovaRanges,
            Opcode::DeviceList,
            Opcode::DeviceInfo,
        ] {
            if let Err(e) = Reply::decode(&pkt, nfds, op) {
                assert!(e.errno() > 0);
            }
        }
    }
}

#[test]
fn test_mutated_messages_never_panic() {
    for seed in 0..3000u64 {
        let data = bytes(seed, 2048);
        let mut u = Unstructured::new(&data);
        let Ok(req) = request(&mut u) else { continue };
        let mut enc = req.encode(seed);
        // Flip, truncate or extend.
        match u.int_in_range(0..=2u8).unwrap_or(0) {
            0 => {
                for _ in 0..u.int_in_range(1..=4usize).unwrap_or(1) {
                    let i = u.choose_index(enc.len()).unwrap_or(0);
                    enc[i] ^= u.arbitrary::<u8>().unwrap_or(1) | 1;
                }
            }
            1 => {
                let n = u.choose_index(enc.len()).unwrap_or(0);
                enc.truncate(n);
            }
            _ => {
                let extra = u.int_in_range(1..=64usize).unwrap_or(1);
                enc.extend(std::iter::repeat_n(0xa5, extra));
                if enc.len() >= 12 {
                    let len = enc.len() as u32;
                    enc[8..12].copy_from_slice(&len.to_le_bytes());
                }
            }
        }
        let nfds = req.opcode().request_fds();
        match Request::decode(&enc, nfds) {
            Ok((_, r)) => {
                // A mutation may still be valid: then it must re-encode to
                // a message that decodes to the same request.
                let again = r.encode(1);
                assert_eq!(
                    Request::decode(&again, r.opcode().request_fds()).map(|x| x.1),
                    Ok(r)
                );
            }
            Err((_, e)) => assert!(e.errno() > 0),
        }
    }
}
