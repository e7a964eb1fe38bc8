//! `source[=LEN]`: a traffic generator. Offers the same UDP frame (64 bytes
//! by default) whenever the driver has receive buffers; drops what it is sent.
//! It measures the device-to-driver direction without any kernel in the way.

use std::os::fd::BorrowedFd;

use super::{PacketBuf, Port, Result, SendOutcome};
use crate::net::VNET_HDR_LEN;

/// Smallest frame the generator makes (Ethernet + IPv4 + UDP headers).
pub const SOURCE_MIN_LEN: usize = 42;
/// Largest frame the generator makes.
pub const SOURCE_MAX_LEN: usize = 1514;
/// Default frame length: 64 bytes on the wire without the FCS, as testpmd sends.
pub const SOURCE_DEFAULT_LEN: usize = 64;

/// A port that generates frames.
#[derive(Debug)]
pub struct SourcePort {
    buf: Vec<u8>,
}

impl SourcePort {
    /// A generator of `len`-byte frames (clamped to the bounds above):
    /// broadcast, from 02:00:00:00:00:fe, IPv4 UDP 198.18.0.1:9 -> 198.18.0.2:9.
    pub fn new(len: usize) -> SourcePort {
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
        SourcePort { buf: b }
    }
}

impl Port for SourcePort {
    fn describe(&self) -> String {
        format!("source={}", self.buf.len() - VNET_HDR_LEN)
    }

    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome {
        SendOutcome {
            sent: pkts.len(),
            ..Default::default()
        }
    }

    fn recv(&mut self, max: usize, deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize> {
        let mut n = 0;
        while n < max && deliver(&mut self.buf) {
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
    }
}
