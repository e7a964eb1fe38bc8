//! The blocking client library of the service.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use thiserror::Error;

use crate::ownership::HandoverToken;
use crate::proto::*;
use crate::transport::{recv_packet, send_packet};
use crate::uring::{ChannelError, FaultChannel};

/// Errors of the client library.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting to the service socket failed.
    #[error("cannot connect to the service")]
    Connect(#[source] io::Error),
    /// Sending or receiving failed.
    #[error("service socket I/O failed during {op:?}")]
    Io {
        /// The operation.
        op: Opcode,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The service closed the connection.
    #[error("the service closed the connection during {0:?}")]
    Closed(Opcode),
    /// The reply did not decode.
    #[error("malformed reply to {op:?}")]
    Proto {
        /// The operation.
        op: Opcode,
        /// What was wrong.
        #[source]
        source: ProtoError,
    },
    /// The reply answers another request.
    #[error("reply to request {got} while waiting for {expected}")]
    OutOfOrder {
        /// Request id expected.
        expected: u64,
        /// Request id received.
        got: u64,
    },
    /// The service refused the request; `errno` is the iommu-core errno.
    #[error("{op:?} failed with errno {errno}: {message}")]
    Remote {
        /// The operation.
        op: Opcode,
        /// The errno (positive).
        errno: i32,
        /// The server's message.
        message: String,
    },
    /// Wrapping the fault channel failed.
    #[error("cannot set up the fault channel")]
    Channel(#[source] ChannelError),
}

impl ClientError {
    /// The errno of a remote failure (or of the local I/O error).
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Remote { errno, .. } => Some(*errno),
            ClientError::Io { source, .. } | ClientError::Connect(source) => source.raw_os_error(),
            ClientError::Proto { source, .. } => Some(source.errno()),
            ClientError::Closed(_) => Some(libc::ECONNRESET),
            ClientError::OutOfOrder { .. } => Some(libc::EPROTO),
            ClientError::Channel(_) => None,
        }
    }
}

/// Result alias of the client library.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Device information, as `DEVICE_INFO` reports it.
pub type DeviceInfo = WireDeviceInfo;

/// Permissions of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapPerm {
    /// Device may read.
    Read,
    /// Device may write.
    Write,
    /// Device may read and write.
    ReadWrite,
}

impl MapPerm {
    fn flags(self) -> u32 {
        match self {
            MapPerm::Read => MAP_READABLE,
            MapPerm::Write => MAP_WRITEABLE,
            MapPerm::ReadWrite => MAP_READABLE | MAP_WRITEABLE,
        }
    }
}

/// Arguments of [`Client::hwpt_alloc`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HwptRequest {
    /// The device it is allocated for.
    pub label: String,
    /// IOAS (paging) or nest-parent HWPT (nested).
    pub pt_id: u32,
    /// `IOMMU_HWPT_ALLOC_*` flags (`FAULT_ID_VALID` is implied by `fault_id`).
    pub flags: u32,
    /// Fault queue for I/O page faults.
    pub fault_id: Option<u32>,
    /// Stage-1 root IOVA for a nested HWPT.
    pub stage1_root: Option<u64>,
}

/// Creates a memfd of `len` bytes sealed against shrinking, as the service
/// requires for `IOAS_MAP`.
pub fn sealed_memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    nix::unistd::ftruncate(&fd, len)?;
    fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))?;
    Ok(fd)
}

/// A blocking connection to the service: one session, requests answered
/// in order. Objects it creates live until it destroys them or the
/// connection closes (then the service detaches and destroys them all).
#[derive(Debug)]
pub struct Client {
    fd: OwnedFd,
    next_id: u64,
    last_aux: u32,
    session_id: u64,
    server_pid: u32,
}

impl Client {
    /// Connects to the service socket at `path` and opens a session.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| ClientError::Connect(e.into()))?;
        let addr = UnixAddr::new(path.as_ref()).map_err(|e| ClientError::Connect(e.into()))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| ClientError::Connect(e.into()))?;
        Client::from_fd(fd)
    }

    /// Opens a session over an already connected socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Client> {
        let mut c = Client {
            fd,
            next_id: 1,
            last_aux: 0,
            session_id: 0,
            server_pid: 0,
        };
        if let (
            ReplyBody::Hello {
                session_id,
                server_pid,
            },
            _,
        ) = c.call(&Request::Hello, &[])?
        {
            c.session_id = session_id;
            c.server_pid = server_pid;
        }
        Ok(c)
    }

    /// This session's id on the server (what a device server such as an
    /// SVA accelerator matches against the PASID's owner).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// The server's process id.
    pub fn server_pid(&self) -> u32 {
        self.server_pid
    }

    /// The session socket.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends a raw packet and returns the raw reply packet and its fds (for
    /// protocol tests).
    pub fn raw_call(
        &mut self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        send_packet(self.fd.as_fd(), bytes, fds)?;
        Ok(recv_packet(self.fd.as_fd())?.map(|p| (p.data, p.fds)))
    }

    fn call_fd(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(ReplyBody, u32, Option<OwnedFd>)> {
        let op = req.opcode();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let bytes = req.encode(id);
        send_packet(self.fd.as_fd(), &bytes, fds)
            .map_err(|source| ClientError::Io { op, source })?;
        let pkt = recv_packet(self.fd.as_fd())
            .map_err(|source| ClientError::Io { op, source })?
            .ok_or(ClientError::Closed(op))?;
        if pkt.truncated {
            return Err(ClientError::Proto {
                op,
                source: ProtoError::TooLong {
                    len: pkt.data.len(),
                },
            });
        }
        let (h, reply) = Reply::decode(&pkt.data, pkt.fds.len(), op)
            .map_err(|source| ClientError::Proto { op, source })?;
        if h.request_id != id {
            return Err(ClientError::OutOfOrder {
                expected: id,
                got: h.request_id,
            });
        }
        match reply {
            Reply::Ok { body, aux } => {
                self.last_aux = aux;
                Ok((body, aux, pkt.fds.into_iter().next()))
            }
            Reply::Err {
                errno,
                aux,
                message,
            } => {
                self.last_aux = aux;
                Err(ClientError::Remote { op, errno, message })
            }
        }
    }

    fn call(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(ReplyBody, u32)> {
        self.call_fd(req, fds).map(|(b, a, _)| (b, a))
    }

    fn bad_body(op: Opcode) -> ClientError {
        ClientError::Proto {
            op,
            source: ProtoError::BadValue {
                field: "reply body",
                value: 0,
            },
        }
    }

    fn id(&mut self, req: &Request) -> Result<u32> {
        match self.call(req, &[])?.0 {
            ReplyBody::Id(id) => Ok(id),
            _ => Err(Self::bad_body(req.opcode())),
        }
    }

    fn u64(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<u64> {
        match self.call(req, fds)?.0 {
            ReplyBody::U64(v) => Ok(v),
            _ => Err(Self::bad_body(req.opcode())),
        }
    }

    /// `IOMMU_IOAS_ALLOC`: a new IOAS owned by this session.
    pub fn ioas_alloc(&mut self) -> Result<u32> {
        self.id(&Request::IoasAlloc)
    }

    /// `IOMMU_DESTROY` of an object this session owns.
    pub fn destroy(&mut self, id: u32) -> Result<()> {
        self.call(&Request::Destroy { id }, &[]).map(|_| ())
    }

    /// `IOMMU_IOAS_MAP_FILE`: maps `length` bytes of `memfd` (sealed with
    /// `F_SEAL_SHRINK`, see [`sealed_memfd`]) from `offset`, at `iova` or an
    /// allocated IOVA; returns the IOVA.
    pub fn ioas_map(
        &mut self,
        ioas_id: u32,
        memfd: BorrowedFd<'_>,
        offset: u64,
        length: u64,
        iova: Option<u64>,
        perm: MapPerm,
    ) -> Result<u64> {
        let mut flags = perm.flags();
        if iova.is_some() {
            flags |= MAP_FIXED_IOVA;
        }
        self.u64(
            &Request::IoasMap {
                flags,
                ioas_id,
                offset,
                length,
                iova: iova.unwrap_or(0),
            },
            &[memfd],
        )
    }

    /// `IOMMU_IOAS_UNMAP`; returns the bytes unmapped. Returns once no
    /// device of the server can use the old translations.
    pub fn ioas_unmap(&mut self, ioas_id: u32, iova: u64, length: u64) -> Result<u64> {
        self.u64(
            &Request::IoasUnmap {
                ioas_id,
                iova,
                length,
            },
            &[],
        )
    }

    /// Unmaps everything in the IOAS.
    pub fn ioas_unmap_all(&mut self, ioas_id: u32) -> Result<u64> {
        self.ioas_unmap(ioas_id, 0, u64::MAX)
    }

    /// `IOMMU_IOAS_COPY`; returns the destination IOVA.
    pub fn ioas_copy(
        &mut self,
        dst_ioas_id: u32,
        src_ioas_id: u32,
        src_iova: u64,
        length: u64,
        dst_iova: Option<u64>,
        perm: MapPerm,
    ) -> Result<u64> {
        let mut flags = perm.flags();
        if dst_iova.is_some() {
            flags |= MAP_FIXED_IOVA;
        }
        self.u64(
            &Request::IoasCopy {
                flags,
                dst_ioas_id,
                src_ioas_id,
                length,
                dst_iova: dst_iova.unwrap_or(0),
                src_iova,
            },
            &[],
        )
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: `(alignment, inclusive ranges)`.
    pub fn ioas_iova_ranges(&mut self, ioas_id: u32) -> Result<(u64, Vec<(u64, u64)>)> {
        match self.call(&Request::IoasIovaRanges { ioas_id }, &[])?.0 {
            ReplyBody::Ranges { alignment, ranges } => Ok((alignment, ranges)),
            _ => Err(Self::bad_body(Opcode::IoasIovaRanges)),
        }
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS` (inclusive ranges; empty clears).
    pub fn ioas_allow_iovas(&mut self, ioas_id: u32, ranges: &[(u64, u64)]) -> Result<()> {
        self.call(
            &Request::IoasAllowIovas {
                ioas_id,
                ranges: ranges.to_vec(),
            },
            &[],
        )
        .map(|_| ())
    }

    /// Labels of the server's devices.
    pub fn devices(&mut self) -> Result<Vec<String>> {
        match self.call(&Request::DeviceList, &[])?.0 {
            ReplyBody::Devices(v) => Ok(v),
            _ => Err(Self::bad_body(Opcode::DeviceList)),
        }
    }

    /// `IOMMU_GET_HW_INFO` of a device.
    pub fn device_info(&mut self, label: &str) -> Result<DeviceInfo> {
        match self
            .call(
                &Request::DeviceInfo {
                    label: label.to_owned(),
                },
                &[],
            )?
            .0
        {
            ReplyBody::DeviceInfo(i) => Ok(i),
            _ => Err(Self::bad_body(Opcode::DeviceInfo)),
        }
    }

    /// Attaches a device's RID (`pasid: None`) or a PASID reserved with
    /// [`Client::pasid_alloc`] to an IOAS or HWPT of this session; a second
    /// attach of the same (device, PASID) replaces. Returns the HWPT id.
    pub fn attach(&mut self, label: &str, pasid: Option<u32>, pt_id: u32) -> Result<u32> {
        self.id(&Request::Attach {
            label: label.to_owned(),
            pasid,
            pt_id,
        })
    }

    /// Detaches what this session attached.
    pub fn detach(&mut self, label: &str, pasid: Option<u32>) -> Result<()> {
        self.call(
            &Request::Detach {
                label: label.to_owned(),
                pasid,
            },
            &[],
        )
        .map(|_| ())
    }

    /// Reserves a free PASID of a device for this session.
    pub fn pasid_alloc(&mut self, label: &str) -> Result<u32> {
        self.id(&Request::PasidAlloc {
            label: label.to_owned(),
        })
    }

    /// Releases a reserved PASID (detaching it first if attached).
    pub fn pasid_free(&mut self, label: &str, pasid: u32) -> Result<()> {
        self.call(
            &Request::PasidFree {
                label: label.to_owned(),
                pasid,
            },
            &[],
        )
        .map(|_| ())
    }

    /// `IOMMU_HWPT_ALLOC`; returns the HWPT id.
    pub fn hwpt_alloc(&mut self, req: &HwptRequest) -> Result<u32> {
        let (data_type, data) = match req.stage1_root {
            Some(root) => (HWPT_DATA_STAGE1, root.to_le_bytes().to_vec()),
            None => (HWPT_DATA_NONE, Vec::new()),
        };
        self.id(&Request::HwptAlloc {
            label: req.label.clone(),
            pt_id: req.pt_id,
            flags: req.flags,
            fault_id: req.fault_id,
            data_type,
            data,
        })
    }

    /// `IOMMU_HWPT_INVALIDATE`: returns the number of entries done and the
    /// first failure (iommufd's `entry_num` rule). All entries must be of
    /// one kind.
    pub fn hwpt_invalidate(
        &mut self,
        hwpt_id: u32,
        entries: &[InvalidateEntry],
    ) -> (u32, Result<()>) {
        let (data_type, entry_len) = match entries.first() {
            Some(InvalidateEntry::Viommu { .. }) => (INVALIDATE_DATA_VIOMMU, INVALIDATE_VIOMMU_LEN),
            _ => (INVALIDATE_DATA_STAGE1, INVALIDATE_STAGE1_LEN),
        };
        let req = Request::HwptInvalidate {
            hwpt_id,
            data_type,
            entry_len,
            entries: entries.to_vec(),
        };
        self.last_aux = 0;
        match self.call(&req, &[]) {
            Ok((_, aux)) => (aux, Ok(())),
            // The entries done come back with the error too.
            Err(e) => (self.last_aux, Err(e)),
        }
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: returns the fault queue id and the
    /// consumer end of its fault channel.
    pub fn fault_queue_alloc_fd(&mut self) -> Result<(u32, OwnedFd)> {
        let op = Opcode::FaultQueueAlloc;
        match self.call_fd(&Request::FaultQueueAlloc, &[])? {
            (ReplyBody::Id(id), _, Some(fd)) => Ok((id, fd)),
            _ => Err(Self::bad_body(op)),
        }
    }

    /// A one-time handover token for device `label`'s RID. Only the
    /// process of the device's connected vhost-user frontend gets one
    /// (`EPERM` otherwise, `ENOENT` with no frontend connected): passing it
    /// to another process, whose session redeems it with
    /// [`Client::rid_claim`], is the frontend's consent to that session
    /// taking the RID over.
    pub fn rid_token(&mut self, label: &str) -> Result<HandoverToken> {
        let req = Request::RidToken {
            label: label.to_owned(),
        };
        match self.call(&req, &[])?.0 {
            ReplyBody::Token(t) => Ok(HandoverToken::from_bytes(t)),
            _ => Err(Self::bad_body(Opcode::RidToken)),
        }
    }

    /// Redeems a handover token of device `label`'s frontend: while that
    /// frontend stays connected, this session is granted the device and
    /// may take its RID over with [`Client::attach`].
    pub fn rid_claim(&mut self, label: &str, token: &HandoverToken) -> Result<()> {
        let req = Request::RidClaim {
            label: label.to_owned(),
            token: token.bytes(),
        };
        self.call(&req, &[]).map(|_| ())
    }

    /// [`Client::fault_queue_alloc_fd`] wrapped in a [`FaultChannel`].
    pub fn fault_queue_alloc(&mut self) -> Result<(u32, FaultChannel)> {
        let (id, fd) = self.fault_queue_alloc_fd()?;
        Ok((id, FaultChannel::new(fd).map_err(ClientError::Channel)?))
    }
}
