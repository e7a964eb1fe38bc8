//! Shared memory and small fd helpers: memfds, mappings, eventfds, seals.
//!
//! Every `unsafe` call into the kernel interface of this crate that is not
//! engine pointer arithmetic lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use std::sync::atomic::{AtomicU32, AtomicU64};
use vmm_sys_util::eventfd::EventFd;

/// A shared mapping of (part of) a file; unmapped on drop.
#[derive(Debug)]
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through raw
// pointers or atomics, so sharing the handle between threads is sound.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write or read-only.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no
        // Rust object; the fd is valid for the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMap { ptr: p.cast(), len })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The 8-byte atomic at `off` (must be 8-aligned and inside).
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "atomic_u64 offset {off}"
        );
        // SAFETY: in bounds and 8-aligned (mappings are page aligned); the
        // memory lives as long as `self`; both processes only access these
        // words atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.add(off).cast()) }
    }

    /// The 4-byte atomic at `off` (must be 4-aligned and inside).
    pub fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        assert!(
            off % 4 == 0 && off + 4 <= self.len,
            "atomic_u32 offset {off}"
        );
        // SAFETY: as for atomic_u64.
        unsafe { AtomicU32::from_ptr(self.ptr.add(off).cast()) }
    }

    /// Copies `buf.len()` bytes out of the mapping at `off`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(
            off <= self.len && buf.len() <= self.len - off,
            "read out of bounds"
        );
        // SAFETY: the range is inside the mapping (checked above) and the
        // destination is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
    }

    /// Copies `buf` into the mapping at `off`.
    pub fn write(&self, off: usize, buf: &[u8]) {
        assert!(
            off <= self.len && buf.len() <= self.len - off,
            "write out of bounds"
        );
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(off), buf.len()) };
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping this object created and owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Creates a sealable memfd of `len` bytes.
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(len)?;
    Ok(OwnedFd::from(f))
}

/// Adds seals to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument; fd is valid.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a file (fails for files that cannot be sealed).
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS takes no argument; fd is valid.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Size of a file.
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let f = std::fs::File::from(fd.try_clone_to_owned()?);
    Ok(f.metadata()?.len())
}

/// A new eventfd (vmm-sys-util's), non-blocking and close-on-exec: the
/// device's doorbells and a client's completion eventfd.
pub fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// An eventfd received from a peer (owned), as an [`EventFd`].
pub fn adopt_eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `fd` is owned and handed over whole: the EventFd becomes its
    // only owner. (A peer that sent another kind of fd gets failed reads
    // and writes, nothing worse.)
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// An eventfd's descriptor, borrowed for as long as the eventfd is (to pass
/// it in a message, or to poll it).
pub fn borrow_eventfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is owned by `e`, which the returned borrow
    // cannot outlive.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// Adds 1 to an eventfd (a full counter is fine: it is already signalled).
pub fn signal(e: &EventFd) {
    let _ = e.write(1);
}

/// Resets an eventfd (an empty one has nothing to reset).
pub fn drain(e: &EventFd) {
    let _ = e.read();
}

/// Waits until one of `fds` is readable (or hung up) or `timeout_ms` passes;
/// returns the revents of each.
pub fn poll_in(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a live array of p.len() pollfd structures.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// Borrows an fd as `BorrowedFd` (convenience for `AsFd` holders).
pub fn bfd<F: AsFd>(f: &F) -> BorrowedFd<'_> {
    f.as_fd()
}
