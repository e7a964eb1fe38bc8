//! A vhost-user connection as the holder of its device's RID
//! ([`crate::ownership::RidOwnership`]).
//!
//! A connection attaches its device's RID to an IOAS of its own (its
//! *private* address space, built from the memory table or from IOTLB
//! messages) and registers as the RID's holder, with its frontend's
//! `SO_PEERCRED` as the holder's peer. A session of the service may take the
//! RID over with the frontend's consent (the session is the frontend's own
//! process, or redeemed a token the frontend's process handed over; see
//! [`crate::ownership`]): its ATTACH replaces the connection's attachment
//! (iommufd replace: once it returns no worker uses a translation of the
//! private space) and records the session as the RID's owner. What the
//! frontend may do meanwhile is in the module docs of [`super`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use log::debug;

use crate::ownership::RidHolder;
use crate::queue::Vring;
use crate::worker::ConnShared;

/// A connection's queues, as the connection currently has them (replaced on
/// a device reset).
pub(crate) type SharedRings = Mutex<Vec<Arc<Mutex<Vring>>>>;

/// A connection as the holder of its device's RID.
pub(crate) struct ConnHolder {
    /// The connection's shared state (to flag `NEEDS_RESET`).
    pub conn: Weak<ConnShared>,
    /// The connection's queues (to resume those waiting on a miss).
    pub rings: Weak<SharedRings>,
}

impl RidHolder for ConnHolder {
    fn needs_reset(&self) {
        if let Some(c) = self.conn.upgrade() {
            c.needs_reset.store(true, Ordering::SeqCst);
        }
    }

    /// Every queue waiting on a miss is resumed and its worker woken, so
    /// it tries again (and reports the miss again if the address is still
    /// not mapped). The worker is woken through its own control eventfd,
    /// never by writing the frontend's kick (which the frontend may have
    /// made blocking and full), and a ring lock held by a worker wedged in
    /// such a write is got past ([`crate::peer_write`]): the service thread
    /// never waits on a frontend.
    fn resume_parked(&self) {
        let (Some(rings), Some(conn)) = (self.rings.upgrade(), self.conn.upgrade()) else {
            return;
        };
        let rings: Vec<Arc<Mutex<Vring>>> = rings.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // The device's address space changed outside the connection's own
        // (a session's attachment or mappings): a removal without a range,
        // so the workers forget every miss they asked for and ask again.
        conn.removals.fetch_add(1, Ordering::SeqCst);
        let mut any = false;
        for (index, m) in rings.iter().enumerate() {
            if conn.lock_vring(m).parked.take().is_some() {
                debug!("queue {index}: resumed after an address space change");
                any = true;
            }
        }
        if any {
            conn.wake_workers();
        }
    }
}
