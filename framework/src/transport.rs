//! What the data plane needs of the transport that connects a device to
//! its driver.
//!
//! A worker thread ([`crate::worker`]) walks rings and moves buffers; the
//! few things it must tell the driver go through one small trait,
//! [`Transport`], so that the data plane knows no transport:
//!
//! | event | vhost-user ([`crate::vhost_user`]) | VDUSE ([`crate::vduse`]) |
//! |---|---|---|
//! | kick (driver → device) | the frontend's kick eventfd, per ring | an eventfd per ring handed to the kernel (`VDUSE_VQ_SETUP_KICKFD`) |
//! | call (device → driver) | write the frontend's call eventfd | `VDUSE_VQ_INJECT_IRQ` on the device fd |
//! | translation miss | `VHOST_IOTLB_MISS` on the backend request channel, answered later by an IOTLB update | to the device's control thread, which asks the kernel (`VDUSE_IOTLB_GET_FD`), maps the region and resumes the queue |
//! | access failure | `VHOST_IOTLB_ACCESS_FAIL` on the backend channel | logged |
//! | failed ring | write the frontend's error eventfd | logged (Linux 6.12's VDUSE has no way for a device to set `NEEDS_RESET`) |
//! | config change (device → driver) | `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel (the frontend then re-reads the space with GET_CONFIG); needs `VHOST_USER_PROTOCOL_F_CONFIG` and a backend channel, else logged | `VDUSE_DEV_SET_CONFIG` (the kernel serves the driver's reads from its own copy) then `VDUSE_DEV_INJECT_CONFIG_IRQ` |
//!
//! Kicks need no method: both transports deliver them as an eventfd per
//! ring, which the transport installs in the ring's state
//! and the worker watches (VDUSE: an eventfd of the daemon's, handed to
//! the kernel with `VDUSE_VQ_SETUP_KICKFD`). A transport that signals the
//! driver through eventfds (vhost-user) keeps the defaults of
//! [`call`](Transport::call) and [`queue_failed`](Transport::queue_failed),
//! which write the ring's call and error eventfds; one that injects
//! interrupts (VDUSE) overrides them. The trait is shaped after DPDK's split
//! of `lib/vhost` into vhost-user and VDUSE backends behind a small table
//! of operations (IOTLB miss, interrupt injection).
//!
//! A config change (the device's config space changed under the driver)
//! comes from the device's control side rather than a worker: a
//! [`ConfigNotifier`](crate::config_space::ConfigNotifier) the server hands
//! out ([`Server::config_notifier`](crate::server::Server::config_notifier))
//! reads the device's config space and gives it to
//! [`config_changed`](Transport::config_changed) of the transport the
//! device is served over now (a [`ConfigTarget`]; none while no frontend is
//! connected).
//!
//! Every other method is called from a worker thread, outside any lock but the
//! ring's it is given; none may block for long (writes to a peer's eventfd
//! go through the thread's [`Writer`], which the framework interrupts if
//! the peer wedges it).

use std::io;
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::EventFd;

use crate::config_space::ConfigChange;
use crate::dma::Access;
use crate::peer_write::{Writer, Written};

/// The eventfds a driver reads its signals of one ring from, when the
/// transport signals through eventfds (vhost-user's SET_VRING_CALL and
/// SET_VRING_ERR); empty otherwise.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Used buffers ([`Transport::call`]).
    pub call: Option<EventFd>,
    /// The ring failed ([`Transport::queue_failed`]).
    pub err: Option<EventFd>,
}

/// What became of a translation miss the worker asked the transport to
/// report ([`Transport::report_miss`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MissReport {
    /// Reported, or it cannot be and the transport said why (logged): the
    /// queue waits until the address space changes.
    Done,
    /// The transport cannot take the report now (a full socket): the
    /// worker tries again shortly.
    Retry,
}

/// The transport a device's rings are driven through, as its worker threads
/// see it. One object per connection, shared by its worker threads.
pub(crate) trait Transport: Send + Sync + std::fmt::Debug {
    /// Queue `index` waits for a translation of `iova` for `access`: tell
    /// the driver side, which answers by changing the address space (the
    /// queue is resumed then). Never blocks.
    fn report_miss(&self, index: u16, iova: u64, access: Access) -> MissReport;

    /// The address space denied an access to `iova` (a permission the
    /// mapping lacks): tell the driver side if it can be told. Never blocks.
    fn access_failed(&self, iova: u64, access: Access);

    /// Signals the driver that queue `index` (whose eventfds are `ring`) has
    /// used buffers. The default writes the ring's call eventfd, if any,
    /// through the thread's `writer`; one the peer wedged is forgotten
    /// (logged) until the driver sets a new one.
    fn call(&self, index: u16, ring: &mut Signals, writer: &Writer) -> io::Result<()> {
        signal(&mut ring.call, writer).map(|wedged| {
            if wedged {
                crate::log_limited!(log::Level::Warn,
                    "queue {index}: the frontend's call eventfd is full and blocking; the driver is no longer signalled (until SET_VRING_CALL)"
                );
            }
        })
    }

    /// Queue `index` failed (or the device broke): tell the driver. The
    /// default writes the ring's error eventfd, if any, as
    /// [`call`](Transport::call) writes the call eventfd.
    fn queue_failed(&self, index: u16, ring: &mut Signals, writer: &Writer) {
        match signal(&mut ring.err, writer) {
            Ok(false) => {}
            Ok(true) => crate::log_limited!(log::Level::Warn,
                "queue {index}: the frontend's error eventfd is full and blocking; it is no longer signalled (until SET_VRING_ERR)"
            ),
            Err(e) => crate::log_limited!(
                log::Level::Warn,
                "queue {index}: signalling error fd: {e}"
            ),
        }
    }

    /// The device's config space changed and now reads `config` (all of
    /// it): update the driver side's copy if it keeps one and tell the
    /// driver. Called from the thread that asked
    /// ([`ConfigNotifier::notify`](crate::config_space::ConfigNotifier::notify)),
    /// not a worker; may wait briefly (a full socket). The default says the
    /// driver cannot be told.
    fn config_changed(&self, config: &[u8]) -> io::Result<ConfigChange> {
        let _ = config;
        Ok(ConfigChange::CannotTell(
            "the transport has no config change signal",
        ))
    }
}

/// The transport a device's config changes go to: the one it is served
/// over now (a vhost-user connection's backend channel while a frontend is
/// connected; a VDUSE device's transport while it is served). Held weakly:
/// a connection that ends takes its transport with it.
#[derive(Debug, Default)]
pub(crate) struct ConfigTarget {
    current: Mutex<Option<Weak<dyn Transport>>>,
}

impl ConfigTarget {
    /// The device is served over `transport` from now on (`None`: over
    /// nothing).
    pub fn set(&self, transport: Option<&Arc<dyn Transport>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = transport.map(Arc::downgrade);
    }

    /// The transport the device is served over now, if any.
    pub fn get(&self) -> Option<Arc<dyn Transport>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }
}

/// Writes 1 to the eventfd in `slot`, if any. A full counter needs no write
/// (the reader has a signal it has not read); an eventfd the peer made
/// blocking and full is dropped from `slot` once the write was interrupted:
/// returns true then.
fn signal(slot: &mut Option<EventFd>, writer: &Writer) -> io::Result<bool> {
    let Some(fd) = slot else { return Ok(false) };
    match writer.write_counter(fd, 1)? {
        Written::Done | Written::Full => Ok(false),
        Written::Wedged => {
            *slot = None;
            Ok(true)
        }
    }
}

/// A transport with no driver side to report to: misses and access
/// failures go nowhere (the queue waits for an address-space change), calls
/// and errors are the rings' eventfds. Used where rings are driven
/// in-process (the test harness, the queue layer's tests).
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub(crate) struct Local;

#[cfg(any(test, feature = "test-utils"))]
impl Transport for Local {
    fn report_miss(&self, _index: u16, _iova: u64, _access: Access) -> MissReport {
        MissReport::Done
    }

    fn access_failed(&self, _iova: u64, _access: Access) {}
}
