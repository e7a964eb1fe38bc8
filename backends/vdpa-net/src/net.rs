//! The virtio-net device model, with no sockets and no rings: feature
//! negotiation, the virtio-net header, the config space, the control queue
//! commands and the receive filter they program.
//!
//! Everything here is plain data in and plain data out, so it can be tested
//! without a frontend. The glue (`vhu_net`) feeds it bytes it read from the
//! control queue and writes back what it answers.

use thiserror::Error;

/// VIRTIO_NET_F_CSUM: the device accepts packets with a partial checksum.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver accepts packets with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// VIRTIO_NET_F_MTU: the config space reports a maximum MTU.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// VIRTIO_NET_F_MAC: the config space holds the device MAC address.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// VIRTIO_NET_F_GUEST_TSO4: the driver accepts TCPv4 segmentation offload.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// VIRTIO_NET_F_GUEST_TSO6: the driver accepts TCPv6 segmentation offload.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// VIRTIO_NET_F_GUEST_ECN: the driver accepts TSO with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
/// VIRTIO_NET_F_HOST_TSO4: the device accepts TCPv4 segmentation offload.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// VIRTIO_NET_F_HOST_TSO6: the device accepts TCPv6 segmentation offload.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// VIRTIO_NET_F_HOST_ECN: the device accepts TSO with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// VIRTIO_NET_F_MRG_RXBUF: the driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// VIRTIO_NET_F_STATUS: the config space holds a link status.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// VIRTIO_NET_F_CTRL_VQ: a control queue exists.
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
/// VIRTIO_NET_F_CTRL_RX: receive-mode commands on the control queue.
pub const VIRTIO_NET_F_CTRL_RX: u32 = 18;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: the driver announces the device itself
/// (gratuitous ARP) when asked to, after a live migration. With vhost-user,
/// QEMU asks (config status and control queue are QEMU's there); the device
/// only offers it and accepts the driver's acknowledgement.
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u32 = 21;
/// VIRTIO_NET_F_MQ: multiqueue with automatic steering.
pub const VIRTIO_NET_F_MQ: u32 = 22;
/// VIRTIO_NET_F_CTRL_MAC_ADDR: the MAC address can be set on the control queue.
pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u32 = 23;
/// VIRTIO_NET_F_GUEST_USO4: the driver accepts UDPv4 segmentation offload.
pub const VIRTIO_NET_F_GUEST_USO4: u32 = 54;
/// VIRTIO_NET_F_GUEST_USO6: the driver accepts UDPv6 segmentation offload.
pub const VIRTIO_NET_F_GUEST_USO6: u32 = 55;
/// VIRTIO_NET_F_HOST_USO: the device accepts UDP segmentation offload.
pub const VIRTIO_NET_F_HOST_USO: u32 = 56;
/// VIRTIO_RING_F_INDIRECT_DESC: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// VIRTIO_RING_F_EVENT_IDX: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_VERSION_1: the modern (1.0) interface.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_F_ACCESS_PLATFORM: every address goes through the platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// VIRTIO_F_IN_ORDER: buffers are used in the order they were made
/// available. The device always does (transmit chains complete in pop
/// order, receive chains fill in pop order, unused ones go back untouched),
/// so it is offered; the used ring of a transmit burst is then written once.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

/// Bit mask of one feature bit number.
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}

/// The largest number of queue pairs a device offers (VIRTIO_NET_F_MQ).
pub const MAX_QUEUE_PAIRS: u16 = 8;
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN from the VIRTIO spec.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN: u16 = 1;
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX from the VIRTIO spec.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX: u16 = 0x8000;

/// VIRTIO_NET_S_LINK_UP: link status bit in the config space.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Size of the virtio-net header when VERSION_1 or MRG_RXBUF is negotiated.
pub const VNET_HDR_LEN: usize = 12;
/// Size of the legacy virtio-net header without `num_buffers`.
pub const VNET_HDR_LEN_LEGACY: usize = 10;

/// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start+csum_offset is partial.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// VIRTIO_NET_HDR_F_DATA_VALID: the checksum was validated (receive only).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// VIRTIO_NET_HDR_GSO_NONE: no segmentation.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// VIRTIO_NET_HDR_GSO_TCPV4: TCPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// VIRTIO_NET_HDR_GSO_UDP: UDP fragmentation offload (deprecated, never offered).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// VIRTIO_NET_HDR_GSO_TCPV6: TCPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// VIRTIO_NET_HDR_GSO_UDP_L4: UDP segmentation (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// VIRTIO_NET_HDR_GSO_ECN: the ECN bit may be set on segments.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// VIRTIO_NET_OK: control command acknowledgement.
pub const VIRTIO_NET_OK: u8 = 0;
/// VIRTIO_NET_ERR: control command failure.
pub const VIRTIO_NET_ERR: u8 = 1;

/// VIRTIO_NET_CTRL_RX: receive-mode class.
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// VIRTIO_NET_CTRL_RX_PROMISC.
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// VIRTIO_NET_CTRL_RX_ALLMULTI.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// VIRTIO_NET_CTRL_RX_ALLUNI.
pub const VIRTIO_NET_CTRL_RX_ALLUNI: u8 = 2;
/// VIRTIO_NET_CTRL_RX_NOMULTI.
pub const VIRTIO_NET_CTRL_RX_NOMULTI: u8 = 3;
/// VIRTIO_NET_CTRL_RX_NOUNI.
pub const VIRTIO_NET_CTRL_RX_NOUNI: u8 = 4;
/// VIRTIO_NET_CTRL_RX_NOBCAST.
pub const VIRTIO_NET_CTRL_RX_NOBCAST: u8 = 5;
/// VIRTIO_NET_CTRL_MAC: MAC filter class.
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// VIRTIO_NET_CTRL_MAC_TABLE_SET.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// VIRTIO_NET_CTRL_MAC_ADDR_SET.
pub const VIRTIO_NET_CTRL_MAC_ADDR_SET: u8 = 1;
/// VIRTIO_NET_CTRL_ANNOUNCE: announcement class.
pub const VIRTIO_NET_CTRL_ANNOUNCE: u8 = 3;
/// VIRTIO_NET_CTRL_ANNOUNCE_ACK.
pub const VIRTIO_NET_CTRL_ANNOUNCE_ACK: u8 = 0;
/// VIRTIO_NET_CTRL_MQ: multiqueue class.
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

/// Most MAC addresses the receive filter table holds; a longer table
/// received from the driver switches the filter to "accept all" for that
/// address kind (as QEMU does) rather than failing.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// The largest control command payload accepted (a MAC table of 2^16 entries
/// would not fit; the driver never needs more than this).
pub const MAX_CTRL_PAYLOAD: usize = 2 * (4 + 6 * 1024);

/// An Ethernet MAC address.
pub type MacAddr = [u8; 6];

/// Errors of the net model.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The control command is shorter than its two-byte header.
    #[error("control command of {0} bytes is shorter than its header")]
    CtrlTooShort(usize),
    /// The control command payload has the wrong size for its command.
    #[error("control command class {class} cmd {cmd} has a payload of {len} bytes")]
    CtrlBadPayload {
        /// Command class.
        class: u8,
        /// Command within the class.
        cmd: u8,
        /// Payload length received.
        len: usize,
    },
    /// The command is not supported (or its feature was not negotiated).
    #[error("control command class {class} cmd {cmd} is not supported")]
    CtrlUnsupported {
        /// Command class.
        class: u8,
        /// Command within the class.
        cmd: u8,
    },
    /// VQ_PAIRS_SET asked for a number of pairs outside 1..=max.
    #[error("queue pair count {requested} outside 1..={max}")]
    CtrlBadPairs {
        /// Pairs requested.
        requested: u16,
        /// Pairs the device offers.
        max: u16,
    },
    /// The packet is shorter than the virtio-net header.
    #[error("packet of {0} bytes is shorter than the virtio-net header")]
    HdrTooShort(usize),
    /// The header asks for an offload that was not negotiated.
    #[error("header asks for offload flags {flags:#x} gso {gso:#x} not negotiated")]
    HdrOffloadNotNegotiated {
        /// `flags` field of the header.
        flags: u8,
        /// `gso_type` field of the header.
        gso: u8,
    },
    /// The MAC address string does not parse.
    #[error("bad MAC address {0:?} (expected six hex bytes separated by ':')")]
    BadMac(String),
}

/// Result alias of the net model.
pub type Result<T> = std::result::Result<T, Error>;

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(|| Error::BadMac(s.to_string()))?;
        if p.is_empty() || p.len() > 2 {
            return Err(Error::BadMac(s.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| Error::BadMac(s.to_string()))?;
    }
    if parts.next().is_some() {
        return Err(Error::BadMac(s.to_string()));
    }
    Ok(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &MacAddr) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// A locally administered unicast MAC derived from `seed` (stable per device).
pub fn default_mac(seed: u32) -> MacAddr {
    let s = seed.to_be_bytes();
    [0x52, 0x54, 0x00, s[1] ^ 0x5a, s[2], s[3]]
}

/// What a port can honour of the virtio-net offloads, in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortOffloads {
    /// The port accepts frames with a partial checksum (device side CSUM).
    pub csum: bool,
    /// The port accepts TSO frames (needs `csum`).
    pub tso: bool,
    /// The port accepts USO frames (needs `csum`).
    pub uso: bool,
    /// The port can deliver frames with partial checksums and GRO'd frames
    /// when the driver accepts them (guest side offloads).
    pub guest: bool,
}

/// The features the device offers, given what it is configured with.
pub fn device_features(pairs: u16, offloads: PortOffloads, mtu: Option<u16>) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_ACCESS_PLATFORM)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | bit(VIRTIO_F_IN_ORDER);
    if pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    if mtu.is_some() {
        f |= bit(VIRTIO_NET_F_MTU);
    }
    if offloads.csum {
        f |= bit(VIRTIO_NET_F_CSUM);
        if offloads.tso {
            f |= bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN);
        }
        if offloads.uso {
            f |= bit(VIRTIO_NET_F_HOST_USO);
        }
    }
    if offloads.guest {
        f |= bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN);
        if offloads.uso {
            f |= bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6);
        }
    }
    f
}

/// The negotiated features, with the questions the data path asks of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// Whether feature bit `b` was negotiated.
    pub fn has(self, b: u32) -> bool {
        self.0 & bit(b) != 0
    }

    /// Size of the virtio-net header on the rings.
    pub fn hdr_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            VNET_HDR_LEN
        } else {
            VNET_HDR_LEN_LEGACY
        }
    }

    /// Whether receive buffers may be merged.
    pub fn mrg_rxbuf(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Whether the used/avail event indexes suppress notifications.
    pub fn event_idx(self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// The offloads the driver accepts on receive, as TUN_F_* bits for a tap.
    pub fn tun_offloads(self) -> u32 {
        let mut o = 0;
        if self.has(VIRTIO_NET_F_GUEST_CSUM) {
            o |= TUN_F_CSUM;
            if self.has(VIRTIO_NET_F_GUEST_TSO4) {
                o |= TUN_F_TSO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_TSO6) {
                o |= TUN_F_TSO6;
            }
            if self.has(VIRTIO_NET_F_GUEST_ECN) && o & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                o |= TUN_F_TSO_ECN;
            }
            if self.has(VIRTIO_NET_F_GUEST_USO4) {
                o |= TUN_F_USO4;
            }
            if self.has(VIRTIO_NET_F_GUEST_USO6) {
                o |= TUN_F_USO6;
            }
        }
        o
    }

    /// Checks the header of a frame the driver sent against the negotiated
    /// features, so a port never sees an offload nobody agreed to.
    pub fn check_tx_hdr(self, hdr: &VnetHdr) -> Result<()> {
        let needs_csum = hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if needs_csum && !self.has(VIRTIO_NET_F_CSUM) {
            return Err(Error::HdrOffloadNotNegotiated {
                flags: hdr.flags,
                gso: hdr.gso_type,
            });
        }
        let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let ok = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => !ecn,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.has(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.has(VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP_L4 => self.has(VIRTIO_NET_F_HOST_USO) && !ecn,
            _ => false,
        };
        if !ok || (ecn && !self.has(VIRTIO_NET_F_HOST_ECN)) || (hdr.gso_type != 0 && !needs_csum) {
            return Err(Error::HdrOffloadNotNegotiated {
                flags: hdr.flags,
                gso: hdr.gso_type,
            });
        }
        Ok(())
    }
}

/// TUN_F_CSUM (linux/if_tun.h).
pub const TUN_F_CSUM: u32 = 0x01;
/// TUN_F_TSO4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUN_F_TSO6.
pub const TUN_F_TSO6: u32 = 0x04;
/// TUN_F_TSO_ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// TUN_F_USO4.
pub const TUN_F_USO4: u32 = 0x20;
/// TUN_F_USO6.
pub const TUN_F_USO6: u32 = 0x40;

/// The virtio-net header (`struct virtio_net_hdr_v1`), decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `flags`: NEEDS_CSUM, DATA_VALID.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers` (mergeable receive buffers; 0 on transmit).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Decodes the header at the front of `b` (10 or 12 bytes, little endian).
    pub fn read(b: &[u8]) -> Result<VnetHdr> {
        if b.len() < VNET_HDR_LEN_LEGACY {
            return Err(Error::HdrTooShort(b.len()));
        }
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: if b.len() >= VNET_HDR_LEN { le(10) } else { 0 },
        })
    }

    /// Encodes the 12-byte header into `b[..12]`.
    pub fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
    }
}

/// Sets `num_buffers` in a 12-byte header in place.
pub fn set_num_buffers(hdr: &mut [u8], n: u16) {
    if hdr.len() >= VNET_HDR_LEN {
        hdr[10..12].copy_from_slice(&n.to_le_bytes());
    }
}

/// The virtio-net config space (`struct virtio_net_config`), the part we fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// `mac`.
    pub mac: MacAddr,
    /// `status`: VIRTIO_NET_S_LINK_UP.
    pub status: u16,
    /// `max_virtqueue_pairs`.
    pub max_virtqueue_pairs: u16,
    /// `mtu` (meaningful with VIRTIO_NET_F_MTU).
    pub mtu: u16,
}

/// Size of the config space we expose: mac, status, max_virtqueue_pairs, mtu.
pub const NET_CONFIG_LEN: usize = 12;

impl VirtioNetConfig {
    /// Encodes the config space (little endian, VERSION_1 layout).
    pub fn bytes(&self) -> [u8; NET_CONFIG_LEN] {
        let mut b = [0u8; NET_CONFIG_LEN];
        b[..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// Reads `len` bytes at `offset` of the config space; bytes past the end
    /// read as zero, and an overflowing request yields zeros, never a panic.
    pub fn read(&self, offset: u32, len: u32) -> Vec<u8> {
        let all = self.bytes();
        let mut out = vec![0u8; (len as usize).min(256)];
        for (i, o) in out.iter_mut().enumerate() {
            if let Some(v) = (offset as usize).checked_add(i).and_then(|p| all.get(p)) {
                *o = *v;
            }
        }
        out
    }
}

/// The receive filter that CTRL_RX and CTRL_MAC program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    /// The device's own MAC address.
    pub mac: MacAddr,
    /// Accept every frame.
    pub promisc: bool,
    /// Accept every multicast frame.
    pub allmulti: bool,
    /// Accept every unicast frame.
    pub alluni: bool,
    /// Drop every multicast frame (unless promiscuous).
    pub nomulti: bool,
    /// Drop every unicast frame (unless promiscuous).
    pub nouni: bool,
    /// Drop broadcast frames (unless promiscuous).
    pub nobcast: bool,
    uni: Vec<MacAddr>,
    multi: Vec<MacAddr>,
    uni_overflow: bool,
    multi_overflow: bool,
}

impl RxFilter {
    /// The filter after reset: promiscuous (as the VIRTIO spec lets a device
    /// start and as QEMU does), so a driver without CTRL_RX receives everything.
    pub fn new(mac: MacAddr) -> RxFilter {
        RxFilter {
            mac,
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            uni: Vec::with_capacity(MAC_TABLE_ENTRIES),
            multi: Vec::with_capacity(MAC_TABLE_ENTRIES),
            uni_overflow: false,
            multi_overflow: false,
        }
    }

    /// Whether a frame with destination `dst` passes the filter.
    pub fn accepts(&self, dst: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        let Some(d) = dst.get(..6) else { return false };
        if d[0] & 1 != 0 {
            if d == [0xff; 6] {
                return !self.nobcast;
            }
            if self.nomulti {
                return false;
            }
            return self.allmulti || self.multi_overflow || self.multi.iter().any(|m| m == d);
        }
        if self.nouni {
            return false;
        }
        self.alluni || self.uni_overflow || d == self.mac || self.uni.iter().any(|m| m == d)
    }

    /// The unicast table.
    pub fn unicast(&self) -> &[MacAddr] {
        &self.uni
    }

    /// The multicast table.
    pub fn multicast(&self) -> &[MacAddr] {
        &self.multi
    }
}

/// A decoded control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlCommand {
    /// VIRTIO_NET_CTRL_RX_* with its on/off value.
    Rx {
        /// Which receive mode.
        cmd: u8,
        /// On or off.
        on: bool,
    },
    /// VIRTIO_NET_CTRL_MAC_TABLE_SET: unicast and multicast tables; `None`
    /// for a table longer than [`MAC_TABLE_ENTRIES`].
    MacTableSet {
        /// Unicast entries (None: overflow).
        uni: Option<Vec<MacAddr>>,
        /// Multicast entries (None: overflow).
        multi: Option<Vec<MacAddr>>,
    },
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET.
    MacAddrSet(MacAddr),
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    VqPairsSet(u16),
    /// VIRTIO_NET_CTRL_ANNOUNCE_ACK: the driver announced the device.
    AnnounceAck,
}

fn parse_mac_table(b: &[u8]) -> Option<(Option<Vec<MacAddr>>, &[u8])> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let bytes = n.checked_mul(6)?;
    let end = bytes.checked_add(4)?;
    let entries = b.get(4..end)?;
    let rest = &b[end..];
    if n > MAC_TABLE_ENTRIES {
        return Some((None, rest));
    }
    let mut v = Vec::with_capacity(n);
    for c in entries.chunks_exact(6) {
        let mut m = [0u8; 6];
        m.copy_from_slice(c);
        v.push(m);
    }
    Some((Some(v), rest))
}

/// Decodes a control command: `b` is the device-readable part of the chain
/// (class, command, payload); `features` gates what the driver may ask for.
pub fn parse_ctrl(b: &[u8], features: Features) -> Result<CtrlCommand> {
    if b.len() < 2 {
        return Err(Error::CtrlTooShort(b.len()));
    }
    let (class, cmd, data) = (b[0], b[1], &b[2..]);
    let bad = || Error::CtrlBadPayload {
        class,
        cmd,
        len: data.len(),
    };
    let unsupported = Error::CtrlUnsupported { class, cmd };
    match class {
        VIRTIO_NET_CTRL_RX if features.has(VIRTIO_NET_F_CTRL_RX) => {
            if cmd > VIRTIO_NET_CTRL_RX_NOBCAST {
                return Err(unsupported);
            }
            if data.len() != 1 {
                return Err(bad());
            }
            Ok(CtrlCommand::Rx {
                cmd,
                on: data[0] != 0,
            })
        }
        VIRTIO_NET_CTRL_MAC => match cmd {
            VIRTIO_NET_CTRL_MAC_TABLE_SET if features.has(VIRTIO_NET_F_CTRL_RX) => {
                let (uni, rest) = parse_mac_table(data).ok_or_else(bad)?;
                let (multi, rest) = parse_mac_table(rest).ok_or_else(bad)?;
                if !rest.is_empty() {
                    return Err(bad());
                }
                Ok(CtrlCommand::MacTableSet { uni, multi })
            }
            VIRTIO_NET_CTRL_MAC_ADDR_SET if features.has(VIRTIO_NET_F_CTRL_MAC_ADDR) => {
                let m: MacAddr = data.try_into().map_err(|_| bad())?;
                Ok(CtrlCommand::MacAddrSet(m))
            }
            _ => Err(unsupported),
        },
        VIRTIO_NET_CTRL_ANNOUNCE if features.has(VIRTIO_NET_F_GUEST_ANNOUNCE) => {
            if cmd != VIRTIO_NET_CTRL_ANNOUNCE_ACK {
                return Err(unsupported);
            }
            if !data.is_empty() {
                return Err(bad());
            }
            Ok(CtrlCommand::AnnounceAck)
        }
        VIRTIO_NET_CTRL_MQ if features.has(VIRTIO_NET_F_MQ) => {
            if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
                return Err(unsupported);
            }
            let n: [u8; 2] = data.try_into().map_err(|_| bad())?;
            Ok(CtrlCommand::VqPairsSet(u16::from_le_bytes(n)))
        }
        _ => Err(unsupported),
    }
}

/// The control-plane state of one virtio-net device.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// Queue pairs offered.
    pub max_pairs: u16,
    /// Queue pairs the driver enabled (VQ_PAIRS_SET; 1 until then).
    pub active_pairs: u16,
    /// Features the device offers.
    pub offered: u64,
    /// Features the driver acknowledged.
    pub acked: Features,
    /// The receive filter, including the current MAC.
    pub filter: RxFilter,
    /// MTU reported in the config space (with VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
    /// Link status.
    pub link_up: bool,
    initial_mac: MacAddr,
}

impl NetDevice {
    /// A device with `pairs` queue pairs (clamped to 1..=MAX_QUEUE_PAIRS).
    pub fn new(mac: MacAddr, pairs: u16, offloads: PortOffloads, mtu: Option<u16>) -> NetDevice {
        let pairs = pairs.clamp(1, MAX_QUEUE_PAIRS);
        NetDevice {
            max_pairs: pairs,
            active_pairs: 1,
            offered: device_features(pairs, offloads, mtu),
            acked: Features(0),
            filter: RxFilter::new(mac),
            mtu,
            link_up: true,
            initial_mac: mac,
        }
    }

    /// Number of virtqueues: two per pair plus the control queue (when
    /// offered).
    pub fn num_queues(&self) -> usize {
        2 * self.max_pairs as usize + usize::from(self.has_ctrl_queue())
    }

    /// Whether the device has a control queue (`VIRTIO_NET_F_CTRL_VQ`
    /// offered).
    pub fn has_ctrl_queue(&self) -> bool {
        self.offered & bit(VIRTIO_NET_F_CTRL_VQ) != 0
    }

    /// Leaves out the control queue and what needs it (its commands,
    /// multiqueue, whose pairs the driver enables there, and the guest's
    /// announcement, which the driver acknowledges there: Linux's
    /// virtio_net refuses to probe a device offering GUEST_ANNOUNCE without
    /// CTRL_VQ): for a transport that refuses a control queue (VDUSE). The
    /// driver then uses one queue pair.
    pub fn without_ctrl_queue(&mut self) {
        self.offered &= !(bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
            | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
            | bit(VIRTIO_NET_F_MQ));
    }

    /// Index of the control queue.
    pub fn ctrl_queue_index(&self) -> usize {
        2 * self.max_pairs as usize
    }

    /// Records the driver's features (only the offered ones stick).
    pub fn set_features(&mut self, f: u64) {
        self.acked = Features(f & self.offered);
    }

    /// Back to the state after reset (the MAC set on the command line stays).
    pub fn reset(&mut self) {
        self.active_pairs = 1;
        self.acked = Features(0);
        self.filter = RxFilter::new(self.initial_mac);
    }

    /// The config space as it reads now.
    pub fn config(&self) -> VirtioNetConfig {
        VirtioNetConfig {
            mac: self.filter.mac,
            status: if self.link_up {
                VIRTIO_NET_S_LINK_UP
            } else {
                0
            },
            max_virtqueue_pairs: self.max_pairs,
            mtu: self.mtu.unwrap_or(0),
        }
    }

    /// A driver write to the config space: the MAC bytes are writable for
    /// legacy drivers (without CTRL_MAC_ADDR); the rest is read-only.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) {
        if self.acked.has(VIRTIO_F_VERSION_1) {
            return;
        }
        for (i, v) in data.iter().enumerate() {
            if let Some(p) = (offset as usize).checked_add(i) {
                if p < 6 {
                    self.filter.mac[p] = *v;
                }
            }
        }
    }

    /// Runs one control command; the caller writes the returned status byte
    /// into the chain's device-writable part.
    pub fn handle_ctrl(&mut self, b: &[u8]) -> Result<CtrlCommand> {
        let cmd = parse_ctrl(b, self.acked)?;
        match &cmd {
            CtrlCommand::Rx { cmd, on } => {
                let f = &mut self.filter;
                match *cmd {
                    VIRTIO_NET_CTRL_RX_PROMISC => f.promisc = *on,
                    VIRTIO_NET_CTRL_RX_ALLMULTI => f.allmulti = *on,
                    VIRTIO_NET_CTRL_RX_ALLUNI => f.alluni = *on,
                    VIRTIO_NET_CTRL_RX_NOMULTI => f.nomulti = *on,
                    VIRTIO_NET_CTRL_RX_NOUNI => f.nouni = *on,
                    _ => f.nobcast = *on,
                }
            }
            CtrlCommand::MacTableSet { uni, multi } => {
                let f = &mut self.filter;
                f.uni.clear();
                f.multi.clear();
                f.uni_overflow = uni.is_none();
                f.multi_overflow = multi.is_none();
                if let Some(u) = uni {
                    f.uni.extend_from_slice(u);
                }
                if let Some(m) = multi {
                    f.multi.extend_from_slice(m);
                }
            }
            CtrlCommand::MacAddrSet(m) => self.filter.mac = *m,
            CtrlCommand::VqPairsSet(n) => {
                if *n < VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN || *n > self.max_pairs {
                    return Err(Error::CtrlBadPairs {
                        requested: *n,
                        max: self.max_pairs,
                    });
                }
                self.active_pairs = *n;
            }
            // The device never sets VIRTIO_NET_S_ANNOUNCE itself: nothing
            // to clear.
            CtrlCommand::AnnounceAck => {}
        }
        Ok(cmd)
    }
}

/// Swaps the source and destination MAC of an Ethernet frame in place
/// (frames shorter than 12 bytes are left alone).
pub fn swap_macs(frame: &mut [u8]) {
    if frame.len() >= 12 {
        let (dst, rest) = frame.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Features {
        Features(device_features(
            8,
            PortOffloads {
                csum: true,
                tso: true,
                uso: true,
                guest: true,
            },
            Some(1500),
        ))
    }

    #[test]
    fn test_parse_mac_round_trip() {
        let m = parse_mac("52:54:00:12:34:ab").unwrap();
        assert_eq!(m, [0x52, 0x54, 0, 0x12, 0x34, 0xab]);
        assert_eq!(format_mac(&m), "52:54:00:12:34:ab");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:ab:cd",
            "zz:54:00:12:34:ab",
            "123:1:1:1:1:1",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_features_offered_follow_port() {
        let plain = device_features(1, PortOffloads::default(), None);
        assert_eq!(plain & bit(VIRTIO_NET_F_CSUM), 0);
        assert_eq!(plain & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(plain & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(plain & bit(VIRTIO_NET_F_MTU), 0);
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MAC,
        ] {
            assert_ne!(plain & bit(b), 0, "bit {b}");
        }
        let f = all();
        assert!(
            f.has(VIRTIO_NET_F_MQ)
                && f.has(VIRTIO_NET_F_HOST_TSO4)
                && f.has(VIRTIO_NET_F_GUEST_USO6)
        );
        assert!(f.has(VIRTIO_NET_F_MTU));
    }

    #[test]
    fn test_hdr_len_by_features() {
        assert_eq!(Features(bit(VIRTIO_F_VERSION_1)).hdr_len(), 12);
        assert_eq!(Features(bit(VIRTIO_NET_F_MRG_RXBUF)).hdr_len(), 12);
        assert_eq!(Features(0).hdr_len(), 10);
    }

    #[test]
    fn test_hdr_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut b = [0u8; 12];
        h.write(&mut b);
        assert_eq!(VnetHdr::read(&b).unwrap(), h);
        let legacy = VnetHdr::read(&b[..10]).unwrap();
        assert_eq!(legacy.num_buffers, 0);
        assert_eq!(VnetHdr::read(&b[..9]), Err(Error::HdrTooShort(9)));
        set_num_buffers(&mut b, 7);
        assert_eq!(VnetHdr::read(&b).unwrap().num_buffers, 7);
    }

    #[test]
    fn test_tx_hdr_checked_against_features() {
        let none = Features(bit(VIRTIO_F_VERSION_1));
        let mut h = VnetHdr::default();
        assert!(none.check_tx_hdr(&h).is_ok());
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        assert!(none.check_tx_hdr(&h).is_err());
        assert!(all().check_tx_hdr(&h).is_ok());
        h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
        assert!(all().check_tx_hdr(&h).is_ok());
        h.gso_type = VIRTIO_NET_HDR_GSO_UDP;
        assert!(all().check_tx_hdr(&h).is_err());
        h.gso_type = VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN;
        assert!(all().check_tx_hdr(&h).is_ok());
        h.flags = 0;
        assert!(all().check_tx_hdr(&h).is_err(), "gso without NEEDS_CSUM");
    }

    #[test]
    fn test_tun_offloads_from_guest_features() {
        assert_eq!(Features(0).tun_offloads(), 0);
        let f = all().tun_offloads();
        assert_eq!(
            f,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6
        );
        // TSO without GUEST_CSUM means nothing.
        let f = Features(bit(VIRTIO_NET_F_GUEST_TSO4)).tun_offloads();
        assert_eq!(f, 0);
    }

    #[test]
    fn test_config_space_layout() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 4, PortOffloads::default(), Some(1500));
        let c = d.config().bytes();
        assert_eq!(&c[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!(d.config().read(8, 2), vec![4, 0]);
        assert_eq!(d.config().read(10, 8), vec![0xdc, 0x05, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.config().read(u32::MAX, 4), vec![0; 4]);
        assert_eq!(d.num_queues(), 9);
        assert_eq!(d.ctrl_queue_index(), 8);
        d.link_up = false;
        assert_eq!(d.config().status, 0);
    }

    #[test]
    fn test_ctrl_mq_pairs_set() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 4, PortOffloads::default(), None);
        d.set_features(d.offered);
        assert_eq!(
            d.handle_ctrl(&[4, 0, 3, 0]).unwrap(),
            CtrlCommand::VqPairsSet(3)
        );
        assert_eq!(d.active_pairs, 3);
        assert_eq!(
            d.handle_ctrl(&[4, 0, 5, 0]),
            Err(Error::CtrlBadPairs {
                requested: 5,
                max: 4
            })
        );
        assert_eq!(
            d.handle_ctrl(&[4, 0, 0, 0]),
            Err(Error::CtrlBadPairs {
                requested: 0,
                max: 4
            })
        );
        assert_eq!(d.active_pairs, 3);
        assert!(matches!(
            d.handle_ctrl(&[4, 0, 1]),
            Err(Error::CtrlBadPayload { .. })
        ));
        assert!(matches!(
            d.handle_ctrl(&[4, 1, 1, 0]),
            Err(Error::CtrlUnsupported { .. })
        ));
        d.reset();
        assert_eq!(d.active_pairs, 1);
    }

    /// Without a control queue (VDUSE): one queue fewer, and neither the
    /// control queue nor what needs it is offered.
    #[test]
    fn test_without_ctrl_queue() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 4, PortOffloads::default(), None);
        assert!(d.has_ctrl_queue());
        assert_eq!(d.num_queues(), 9);
        d.without_ctrl_queue();
        assert!(!d.has_ctrl_queue());
        assert_eq!(d.num_queues(), 8);
        for b in [
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_NET_F_MQ,
        ] {
            assert_eq!(d.offered & bit(b), 0, "bit {b}");
        }
        assert_ne!(d.offered & bit(VIRTIO_F_VERSION_1), 0);
    }

    #[test]
    fn test_ctrl_mq_rejected_without_feature() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 1, PortOffloads::default(), None);
        d.set_features(d.offered);
        assert!(matches!(
            d.handle_ctrl(&[4, 0, 1, 0]),
            Err(Error::CtrlUnsupported { .. })
        ));
    }

    #[test]
    fn test_ctrl_announce_ack_only_when_negotiated() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 1, PortOffloads::default(), None);
        assert_ne!(d.offered & bit(VIRTIO_NET_F_GUEST_ANNOUNCE), 0);
        assert_eq!(
            d.handle_ctrl(&[3, 0]),
            Err(Error::CtrlUnsupported { class: 3, cmd: 0 })
        );
        d.set_features(d.offered);
        assert_eq!(d.handle_ctrl(&[3, 0]), Ok(CtrlCommand::AnnounceAck));
        assert_eq!(
            d.handle_ctrl(&[3, 1]),
            Err(Error::CtrlUnsupported { class: 3, cmd: 1 })
        );
        assert!(matches!(
            d.handle_ctrl(&[3, 0, 1]),
            Err(Error::CtrlBadPayload { .. })
        ));
    }

    #[test]
    fn test_ctrl_rx_filter() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut d = NetDevice::new(mac, 1, PortOffloads::default(), None);
        d.set_features(d.offered);
        let other = [2, 0, 0, 0, 0, 9];
        let mcast = [0x33, 0x33, 0, 0, 0, 1];
        assert!(d.filter.accepts(&other), "promiscuous after reset");
        d.handle_ctrl(&[0, VIRTIO_NET_CTRL_RX_PROMISC, 0]).unwrap();
        assert!(d.filter.accepts(&mac));
        assert!(!d.filter.accepts(&other));
        assert!(d.filter.accepts(&[0xff; 6]));
        assert!(!d.filter.accepts(&mcast));
        assert!(!d.filter.accepts(&[1, 2]));
        d.handle_ctrl(&[0, VIRTIO_NET_CTRL_RX_ALLMULTI, 1]).unwrap();
        assert!(d.filter.accepts(&mcast));
        d.handle_ctrl(&[0, VIRTIO_NET_CTRL_RX_ALLMULTI, 0]).unwrap();
        // Table: one unicast, one multicast.
        let mut t = vec![VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET];
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&other);
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&mcast);
        d.handle_ctrl(&t).unwrap();
        assert!(d.filter.accepts(&other) && d.filter.accepts(&mcast));
        assert_eq!(d.filter.unicast(), &[other]);
        assert_eq!(d.filter.multicast(), &[mcast]);
        d.handle_ctrl(&[0, VIRTIO_NET_CTRL_RX_NOBCAST, 1]).unwrap();
        assert!(!d.filter.accepts(&[0xff; 6]));
        // Bad lengths.
        assert!(matches!(
            d.handle_ctrl(&[0, 0]),
            Err(Error::CtrlBadPayload { .. })
        ));
        assert!(matches!(
            d.handle_ctrl(&[0, 9, 1]),
            Err(Error::CtrlUnsupported { .. })
        ));
        assert_eq!(d.handle_ctrl(&[0]), Err(Error::CtrlTooShort(1)));
        let mut t = vec![1, 0];
        t.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            d.handle_ctrl(&t),
            Err(Error::CtrlBadPayload { .. })
        ));
    }

    #[test]
    fn test_ctrl_mac_table_overflow_accepts_all_of_kind() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 1, PortOffloads::default(), None);
        d.set_features(d.offered);
        d.handle_ctrl(&[0, VIRTIO_NET_CTRL_RX_PROMISC, 0]).unwrap();
        let n = MAC_TABLE_ENTRIES as u32 + 1;
        let mut t = vec![1, 0];
        t.extend_from_slice(&n.to_le_bytes());
        t.extend(std::iter::repeat_n(2u8, 6 * n as usize));
        t.extend_from_slice(&0u32.to_le_bytes());
        d.handle_ctrl(&t).unwrap();
        assert!(d.filter.accepts(&[2, 9, 9, 9, 9, 9]));
        assert!(!d.filter.accepts(&[3, 9, 9, 9, 9, 9]));
    }

    #[test]
    fn test_ctrl_mac_addr_set() {
        let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], 1, PortOffloads::default(), None);
        d.set_features(d.offered);
        d.handle_ctrl(&[1, 1, 2, 3, 4, 5, 6, 7]).unwrap();
        assert_eq!(d.config().mac, [2, 3, 4, 5, 6, 7]);
        assert!(d.handle_ctrl(&[1, 1, 2, 3]).is_err());
        d.reset();
        assert_eq!(d.config().mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn test_swap_macs() {
        let mut f = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 8, 0];
        swap_macs(&mut f);
        assert_eq!(f, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 8, 0]);
        let mut short = [1u8; 5];
        swap_macs(&mut short);
        assert_eq!(short, [1; 5]);
    }

    proptest::proptest! {
        #[test]
        fn prop_ctrl_commands_never_panic_and_keep_state_sane(
            cmds in proptest::collection::vec(proptest::collection::vec(0u8..8, 0..40), 1..20),
            pairs in 1u16..=8,
        ) {
            let mut d = NetDevice::new([2, 0, 0, 0, 0, 1], pairs, PortOffloads::default(), None);
            d.set_features(d.offered);
            for c in &cmds {
                let _ = d.handle_ctrl(c);
                proptest::prop_assert!(d.active_pairs >= 1 && d.active_pairs <= d.max_pairs);
                proptest::prop_assert!(d.filter.unicast().len() <= MAC_TABLE_ENTRIES);
                proptest::prop_assert!(d.filter.multicast().len() <= MAC_TABLE_ENTRIES);
            }
        }

        #[test]
        fn prop_header_check_matches_offered_offloads(b in proptest::array::uniform12(proptest::num::u8::ANY)) {
            let h = VnetHdr::read(&b).unwrap();
            // Without offloads negotiated only a plain header passes.
            let plain = Features(bit(VIRTIO_F_VERSION_1)).check_tx_hdr(&h).is_ok();
            proptest::prop_assert_eq!(plain, h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 && h.gso_type == 0);
            let _ = all().check_tx_hdr(&h);
        }
    }

    #[test]
    fn test_parse_ctrl_never_panics_on_garbage() {
        let f = all();
        let mut x: u32 = 12345;
        for len in 0..64usize {
            for _ in 0..64 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(1103515245).wrapping_add(12345);
                        (x >> 16) as u8 % 8
                    })
                    .collect();
                let _ = parse_ctrl(&b, f);
            }
        }
    }
}
