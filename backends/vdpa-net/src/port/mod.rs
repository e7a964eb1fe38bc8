//! Ports: where the frames of a virtio-net device go and come from.
//!
//! A port is opened once per queue pair and lives as long as the device, so
//! a frontend that reconnects finds the same tap queue or switch endpoint.
//! Frames cross the port interface in batches, each prefixed by a 12-byte
//! virtio-net header (`struct virtio_net_hdr_v1`), so a tap with
//! IFF_VNET_HDR gets the driver's offload header unchanged. Buffers are
//! allocated up front and reused: nothing on the packet path allocates.

mod reflect;
mod sink;
mod source;
mod switch;
pub mod tap;

use std::fmt;
use std::os::fd::BorrowedFd;

use thiserror::Error;

use crate::net::{MacAddr, PortOffloads, VNET_HDR_LEN};

pub use reflect::ReflectPort;
pub use sink::SinkPort;
pub use source::SourcePort;
pub use switch::{Switch, SwitchPort};
pub use tap::{TapIo, TapPort};

/// The largest frame a port carries, virtio-net header excluded: a 64 KiB
/// GSO frame plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Size of one packet buffer: header plus the largest frame.
pub const PKT_BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The largest batch a port is handed at once.
pub const MAX_BATCH: usize = 256;
/// Frames a port queues towards a device before it drops (reflect, switch).
pub const PORT_QUEUE_LEN: usize = 1024;

/// Errors of the ports.
#[derive(Debug, Error)]
pub enum Error {
    /// The port string does not parse.
    #[error(
        "bad port {0:?} (expected tap=IFNAME, switch=NAME, sink, reflect, source[=LEN] or source-fixed[=LEN])"
    )]
    BadSpec(String),
    /// A tap interface name is empty or too long.
    #[error("bad tap interface name {0:?} (1 to 15 bytes)")]
    BadIfName(String),
    /// Opening /dev/net/tun failed.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("tap {ifname}: {op} failed")]
    TapIoctl {
        /// Interface name.
        ifname: String,
        /// The ioctl that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Setting up io_uring failed.
    #[error("io_uring setup failed")]
    Uring(#[source] std::io::Error),
    /// Reading or writing a tap failed in a way that is not per packet.
    #[error("tap {ifname}: {op} failed")]
    TapIo {
        /// Interface name.
        ifname: String,
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Creating an eventfd failed.
    #[error("eventfd creation failed")]
    EventFd(#[source] std::io::Error),
}

/// Result alias of the ports.
pub type Result<T> = std::result::Result<T, Error>;

/// A reusable packet buffer: a 12-byte virtio-net header, then the frame.
pub struct PacketBuf {
    data: Box<[u8]>,
    len: usize,
}

impl fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketBuf").field("len", &self.len).finish()
    }
}

impl Default for PacketBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBuf {
    /// A buffer of [`PKT_BUF_LEN`] bytes (pages are touched only when used).
    pub fn new() -> PacketBuf {
        PacketBuf {
            data: vec![0u8; PKT_BUF_LEN].into_boxed_slice(),
            len: 0,
        }
    }

    /// Header and frame, as filled.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// Header and frame, as filled, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }

    /// The whole buffer, to fill before [`PacketBuf::set_len`].
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Length of header and frame.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the filled length (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.data.len());
    }

    /// The Ethernet frame after the header.
    pub fn frame(&self) -> &[u8] {
        self.data.get(VNET_HDR_LEN..self.len).unwrap_or(&[])
    }

    /// The Ethernet frame after the header, writable.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.data.get_mut(VNET_HDR_LEN..len).unwrap_or(&mut [])
    }

    /// Replaces the content with `hdr_and_frame` (truncated to the capacity).
    pub fn fill_from(&mut self, hdr_and_frame: &[u8]) {
        let n = hdr_and_frame.len().min(self.data.len());
        self.data[..n].copy_from_slice(&hdr_and_frame[..n]);
        self.len = n;
    }
}

/// What became of a batch handed to [`Port::send`]; the three add up to the
/// batch size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Frames the port took.
    pub sent: usize,
    /// Frames dropped for lack of room (queue full, no receiver).
    pub dropped: usize,
    /// Frames the port refused as malformed or failed to write.
    pub errors: usize,
}

/// A port endpoint serving one queue pair of one device.
pub trait Port: Send + fmt::Debug {
    /// A short description for logs and statistics (`tap=tap0`, `sink`).
    fn describe(&self) -> String;

    /// Sends a batch of frames (each with its virtio-net header). The port
    /// may swap buffers out of `pkts` for spare ones of the same size.
    fn send(&mut self, pkts: &mut [PacketBuf]) -> SendOutcome;

    /// Hands received frames (each with its virtio-net header) to `deliver`,
    /// at most `max`; `deliver` returns false when it cannot take the frame,
    /// which the port then keeps for the next call. Returns how many were
    /// taken, or an error that is not about one packet.
    fn recv(&mut self, max: usize, deliver: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<usize>;

    /// A file descriptor that becomes readable when [`Port::recv`] may have
    /// frames; `None` when frames only appear as a result of
    /// [`Port::send`] on this same endpoint (or never).
    fn rx_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Drops frames queued for the device: called when the device is reset,
    /// so a new frontend does not receive the previous one's traffic.
    fn reset(&mut self) {}

    /// Whether [`Port::recv`] can ever yield a frame (a sink never does, so
    /// the receive queue need not be looked at).
    fn produces_frames(&self) -> bool {
        true
    }

    /// The offloads this port can honour.
    fn offloads(&self) -> PortOffloads {
        PortOffloads::default()
    }

    /// Tells the port which offloads the driver accepts on receive
    /// (TUN_F_* bits); ports that never produce offloaded frames ignore it.
    fn set_guest_offloads(&mut self, _tun_flags: u32) -> Result<()> {
        Ok(())
    }

    /// The MTU to report in the config space, if the port has one.
    fn mtu(&self) -> Option<u16> {
        None
    }
}

/// A port as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// `tap=IFNAME`.
    Tap(String),
    /// `switch=NAME`.
    Switch(String),
    /// `sink`.
    Sink,
    /// `reflect`.
    Reflect,
    /// `source[=LEN]`: generates frames of LEN bytes (default 64), each
    /// written afresh with its sequence number.
    Source(usize),
    /// `source-fixed[=LEN]`: offers one pre-built frame of LEN bytes
    /// (default 64) for every packet.
    SourceFixed(usize),
}

/// The generator's frame length in `source=LEN`, if within bounds.
fn source_len(len: &str) -> Option<usize> {
    len.parse::<usize>()
        .ok()
        .filter(|n| (source::SOURCE_MIN_LEN..=source::SOURCE_MAX_LEN).contains(n))
}

impl std::str::FromStr for PortSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<PortSpec> {
        match s.split_once('=') {
            None if s == "sink" => Ok(PortSpec::Sink),
            None if s == "reflect" => Ok(PortSpec::Reflect),
            None if s == "source" => Ok(PortSpec::Source(source::SOURCE_DEFAULT_LEN)),
            None if s == "source-fixed" => Ok(PortSpec::SourceFixed(source::SOURCE_DEFAULT_LEN)),
            Some(("source", len)) => source_len(len)
                .map(PortSpec::Source)
                .ok_or_else(|| Error::BadSpec(s.to_string())),
            Some(("source-fixed", len)) => source_len(len)
                .map(PortSpec::SourceFixed)
                .ok_or_else(|| Error::BadSpec(s.to_string())),
            Some(("tap", name)) => {
                if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                    return Err(Error::BadIfName(name.to_string()));
                }
                Ok(PortSpec::Tap(name.to_string()))
            }
            Some(("switch", name)) if !name.is_empty() => Ok(PortSpec::Switch(name.to_string())),
            _ => Err(Error::BadSpec(s.to_string())),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Tap(n) => write!(f, "tap={n}"),
            PortSpec::Switch(n) => write!(f, "switch={n}"),
            PortSpec::Sink => write!(f, "sink"),
            PortSpec::Reflect => write!(f, "reflect"),
            PortSpec::Source(n) => write!(f, "source={n}"),
            PortSpec::SourceFixed(n) => write!(f, "source-fixed={n}"),
        }
    }
}

impl PortSpec {
    /// Opens one endpoint per queue pair of a device with MAC `mac`.
    pub fn open(&self, pairs: u16, mac: MacAddr, tap_io: TapIo) -> Result<Vec<Box<dyn Port>>> {
        let pairs = pairs.max(1);
        let mut v: Vec<Box<dyn Port>> = Vec::with_capacity(pairs as usize);
        match self {
            PortSpec::Sink => {
                for _ in 0..pairs {
                    v.push(Box::new(SinkPort::default()));
                }
            }
            PortSpec::Reflect => {
                for _ in 0..pairs {
                    v.push(Box::new(ReflectPort::new()));
                }
            }
            PortSpec::Source(len) => {
                for _ in 0..pairs {
                    v.push(Box::new(SourcePort::new(*len)));
                }
            }
            PortSpec::SourceFixed(len) => {
                for _ in 0..pairs {
                    v.push(Box::new(SourcePort::fixed(*len)));
                }
            }
            PortSpec::Tap(name) => {
                for _ in 0..pairs {
                    v.push(Box::new(TapPort::open(name, pairs > 1, tap_io)?));
                }
            }
            PortSpec::Switch(name) => {
                let sw = Switch::get(name);
                for p in sw.attach(pairs as usize, mac)? {
                    v.push(Box::new(p));
                }
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_port_spec_parse() {
        assert_eq!("sink".parse::<PortSpec>().unwrap(), PortSpec::Sink);
        assert_eq!("reflect".parse::<PortSpec>().unwrap(), PortSpec::Reflect);
        assert_eq!(
            "tap=tap0".parse::<PortSpec>().unwrap(),
            PortSpec::Tap("tap0".into())
        );
        assert_eq!(
            "switch=br".parse::<PortSpec>().unwrap(),
            PortSpec::Switch("br".into())
        );
        for bad in [
            "",
            "tap",
            "tap=",
            "tap=0123456789abcdef",
            "switch=",
            "foo",
            "sink=1",
            "source=10",
            "source=x",
            "source-fixed=1515",
            "source-fixed=",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
        assert_eq!(PortSpec::Tap("t".into()).to_string(), "tap=t");
        assert_eq!("source".parse::<PortSpec>().unwrap(), PortSpec::Source(64));
        assert_eq!(
            "source=128".parse::<PortSpec>().unwrap(),
            PortSpec::Source(128)
        );
        assert_eq!(
            "source-fixed".parse::<PortSpec>().unwrap(),
            PortSpec::SourceFixed(64)
        );
        assert_eq!(
            "source-fixed=100".parse::<PortSpec>().unwrap(),
            PortSpec::SourceFixed(100)
        );
        assert_eq!(PortSpec::SourceFixed(64).to_string(), "source-fixed=64");
    }

    #[test]
    fn test_packet_buf_bounds() {
        let mut b = PacketBuf::new();
        assert!(b.is_empty());
        assert_eq!(b.frame(), &[] as &[u8]);
        b.set_len(usize::MAX);
        assert_eq!(b.len(), PKT_BUF_LEN);
        b.fill_from(&[1; 20]);
        assert_eq!(b.frame().len(), 8);
        b.set_len(5);
        assert_eq!(b.frame_mut().len(), 0);
    }
}
