//! `source[=LEN]` and `source-fixed[=LEN]`: traffic generators. Whenever the
//! driver has receive buffers they offer a UDP frame (64 bytes by default);
//! they drop what they are sent. They measure the device-to-driver direction
//! without any kernel in the way.
//!
//! `source` writes a fresh frame for every packet, as DPDK testpmd's txonly
//! does (it builds each packet's headers in a buffer taken from its pool):
//! the headers are copied from a template into the next of
//! [`SOURCE_POOL`] buffers, with the packet's sequence number in the UDP
//! source port and in the first four bytes of the payload. `source-fixed`
//! offers one pre-built frame again and again (no per-packet writes), the
//! generator's cost floor.

use std::os::fd::BorrowedFd;

use super::{PacketBuf, Port, Result, SendOutcome};
use crate::net::VNET_HDR_LEN;

/// Smallest frame the generator makes (Ethernet + IPv4 + UDP headers).
pub const SOURCE_MIN_LEN: usize = 42;
/// Largest frame the generator makes.
pub const SOURCE_MAX_LEN: usize = 1514;
/// Default frame length: 64 bytes on the wire without the FCS, as testpmd sends.
pub const SOURCE_DEFAULT_LEN: usize = 64;

/// Buffers a fresh-frame generator writes its packets into, in turn.
pub const SOURCE_POOL: usize = 256;
/// Offset of the UDP source port in the frame.
const UDP_SRC_PORT: usize = 34;
/// Offset of the UDP payload (the sequence number) in the frame.
const UDP_PAYLOAD: usize = 42;

/// A port that generates frames.
#[derive(Debug)]
pub struct SourcePort {
    /// The template: virtio-net header and frame.
    buf: Vec<u8>,
    /// Fresh mode: [`SOURCE_POOL`] buffers the packets are written into, in
    /// turn; empty for the fixed frame.
    pool: Vec<Vec<u8>>,
    /// Sequence number of the next packet (fresh mode).
    seq: u32,
}

impl SourcePort {
    /// A generator of `len`-byte frames (clamped to the bounds above) that
    /// writes each packet afresh: broadcast, from 02:00:00:00:00:fe, IPv4
    /// UDP 198.18.0.1 -> 198.18.0.2 port 9, the source port and the first
    /// payload bytes carrying the packet's sequence number.
    pub fn new(len: usize) -> SourcePort {
        let mut s = Self::fixed(len);
        s.pool = (0..SOURCE_POOL).map(|_| s.buf.clone()).collect();
        s
    }

    /// A generator that offers one pre-built `len`-byte frame (as
    /// [`SourcePort::new`] builds its template: UDP 198.18.0.1:9 ->
    /// 198.18.0.2:9) for every packet.
    pub fn fixed(len: usize) -> SourcePort {
        let len = len.clamp(SOURCE_MIN_LEN, SOURCE_MAX_LEN);
        let mut b = vec![0u8; VNET_HDR_LEN + len];
        let f = &mut b[VNET_HDR_LEN..];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_len = (len - 14) as u16;
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
        ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let udp_len = ip_len - 20;
        f[34..36].copy_from_slice(&9u16.to_be_bytes());
        f[36..38].copy_from_slice(&9u16.to_be_bytes());
        f[38..40].copy_from_slice(&udp_len.to_be_bytes());
        SourcePort {
            buf: b,
            pool: Vec::new(),
            seq: 0,
        }
    }

    /// Whether every packet is written afresh ([`SourcePort::new`]).
    pub fn is_fresh(&self) -> bool {
        !self.pool.is_empty()
    }

    /// Writes the packet with sequence number `seq` into its pool buffer
    /// and returns that buffer: the header and the frame's headers from the
    /// template (the receive path rewrites the virtio-net header in place),
    /// then the sequence number.
    fn fresh(&mut self, seq: u32) -> &mut [u8] {
        let n = self.pool.len();
        let b = &mut self.pool[seq as usize % n];
        let hdrs = (VNET_HDR_LEN + UDP_PAYLOAD).min(b.len());
        b[..hdrs].copy_from_slice(&self.buf[..hdrs]);
        let f = &mut b[VNET_HDR_LEN..];
        f[UDP_SRC_PORT..UDP_SRC_PORT + 2].copy_from_slice(&(seq as u16).to_be_bytes());
        if let Some(p) = f.get_mut(UDP_PAYLOAD..UDP_PAYLOAD + 4) {
            p.copy_from_slice(&seq.to_be_bytes());
        }
        b
    }
}

impl Port for SourcePort {
    fn describe(&self) -> String {
        let kind = if self.is_fresh() {
            "source"
        } else {
            "source-fixed"
        };
        format!("{kind}={}", self.buf.len() - VNET_HDR_LEN)
    }

    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        SendOutcome {
            sent: pkts.len(),
            ..Default::default()
        }
    }

    fn recv(&mut self, max: usize, deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize> {
        let mut n = 0;
        if !self.is_fresh() {
            while n < max && deliver(&mut self.buf) {
                n += 1;
            }
            return Ok(n);
        }
        // A refused packet is written again, with the same number, next time.
        while n < max {
            let seq = self.seq;
            if !deliver(self.fresh(seq)) {
                break;
            }
            self.seq = seq.wrapping_add(1);
            n += 1;
        }
        Ok(n)
    }

    fn rx_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_source_offers_valid_frames_until_refused() {
        let mut s = SourcePort::new(64);
        let mut seen = 0;
        let n = s
            .recv(10, &mut |f| {
                assert_eq!(f.len(), VNET_HDR_LEN + 64);
                assert_eq!(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6], &[0xff; 6]);
                seen += 1;
                seen < 4
            })
            .unwrap();
        assert_eq!((n, seen), (3, 4));
        assert_eq!(s.recv(7, &mut |_| true).unwrap(), 7);
        assert_eq!(SourcePort::new(1).describe(), "source=42");
        assert_eq!(SourcePort::new(100_000).describe(), "source=1514");
        assert_eq!(SourcePort::fixed(64).describe(), "source-fixed=64");
    }

    fn seq_of(f: &[u8]) -> (u16, u32) {
        let f = &f[VNET_HDR_LEN..];
        (
            u16::from_be_bytes([f[UDP_SRC_PORT], f[UDP_SRC_PORT + 1]]),
            u32::from_be_bytes([
                f[UDP_PAYLOAD],
                f[UDP_PAYLOAD + 1],
                f[UDP_PAYLOAD + 2],
                f[UDP_PAYLOAD + 3],
            ]),
        )
    }

    #[test]
    fn test_fresh_source_writes_each_packet_and_repeats_a_refused_one() {
        let mut s = SourcePort::new(64);
        let mut seqs = Vec::new();
        let n = s
            .recv(SOURCE_POOL + 3, &mut |f| {
                // The receive path rewrites the header in place; the next
                // packet in this buffer must not see it.
                assert_eq!(&f[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
                f[0] = 0xaa;
                assert_eq!(f.len(), VNET_HDR_LEN + 64);
                assert_eq!(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6], &[0xff; 6]);
                seqs.push(seq_of(f));
                true
            })
            .unwrap();
        assert_eq!(n, SOURCE_POOL + 3);
        let want: Vec<(u16, u32)> = (0..n as u32).map(|i| (i as u16, i)).collect();
        assert_eq!(seqs, want);
        // Refused: offered again with the same number.
        let mut offered = Vec::new();
        assert_eq!(
            s.recv(4, &mut |f| {
                offered.push(seq_of(f).1);
                false
            })
            .unwrap(),
            0
        );
        assert_eq!(s.recv(1, &mut |f| seq_of(f).1 == offered[0]).unwrap(), 1);
        assert_eq!(offered, vec![n as u32]);
    }

    #[test]
    fn test_fixed_source_offers_one_buffer() {
        let mut s = SourcePort::fixed(64);
        let mut ptrs = Vec::new();
        s.recv(3, &mut |f| {
            ptrs.push(f.as_ptr() as usize);
            true
        })
        .unwrap();
        assert!(ptrs.iter().all(|p| *p == ptrs[0]));
        assert!(!s.is_fresh());
    }
}
