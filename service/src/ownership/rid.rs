//! The arbitration of one device's RID between its holder (the transport
//! connection that serves the device with an address space of its own,
//! such as a vhost-user connection of the device framework) and
//! `/dev/iommu` sessions. Ownership of a RID is this module's concept: the
//! service arbitrates through [`RidOwnership`], and a transport takes part
//! through [`RidHolder`] without the service knowing which transport it
//! is.
//!
//! The holder attaches the RID to its *private* IOAS. A session may take the
//! RID over: its ATTACH replaces the holder's attachment (iommufd replace)
//! and records the session as the owner, with the holder's consent (see
//! [`RidState::check_takeover`]). When the owner detaches or closes, the
//! RID goes back to the private IOAS, or is detached if there is no holder.
//! What the holder may do while a session owns its RID is the holder's
//! business (vhost-user's rules are in the device framework's
//! `ioasis::vhost_user`); the
//! arbitration only asks it to resume waiting accesses when the address
//! space changes and to flag itself for a reset when the RID could not be
//! given back.

use std::sync::{Arc, Mutex, MutexGuard};

use iommu_core::IoasId;
use thiserror::Error;

use super::{HandoverToken, Peer, TOKEN_LEN};

/// What the arbitration asks of a RID's holder.
pub trait RidHolder: Send + Sync {
    /// The RID could not go back to the holder's address space (it was
    /// detached instead): the holder must be reset by its peer.
    fn needs_reset(&self);
    /// The address space behind the RID may have changed (its owner mapped
    /// something, or the RID changed hands): accesses that wait on a
    /// translation miss should try again.
    fn resume_parked(&self);
}

/// Why a session may not take a RID over.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// Another session owns it.
    #[error("the RID is owned by session {0}")]
    Owned(u64),
    /// A frontend holds it and did not agree.
    #[error(
        "a frontend ({0}) holds the RID and did not agree to hand it over: \
         only its own process, or a session that redeemed a token it handed over, may take it"
    )]
    HolderDisagrees(Peer),
    /// The holder's addresses are not IOVAs (vhost-user: the frontend did
    /// not negotiate `VIRTIO_F_ACCESS_PLATFORM`), so its device cannot
    /// work from another address space.
    #[error("the holder's addresses are not IOVAs of an address space")]
    NotIovas,
    /// No holder, or the token is not the one it issued.
    #[error("no such handover token for this RID")]
    BadToken,
}

impl Refusal {
    /// The errno a service reports it with.
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::Owned(_) | Refusal::HolderDisagrees(_) => libc::EBUSY,
            Refusal::NotIovas => libc::EINVAL,
            Refusal::BadToken => libc::EPERM,
        }
    }
}

/// The holder while it is connected.
pub(crate) struct Holder {
    /// Who the holder's peer is (the frontend's process), if known.
    peer: Option<Peer>,
    /// Whether the holder addresses memory by IOVAs of an IOAS (vhost-user:
    /// negotiated `VIRTIO_F_ACCESS_PLATFORM`); `None` until it says.
    iovas: Option<bool>,
    hooks: Arc<dyn RidHolder>,
    /// The token issued and not yet redeemed.
    token: Option<HandoverToken>,
    /// Sessions that redeemed a token of this holder.
    agreed: Vec<u64>,
}

/// The arbitration state; the lock is held across the iommu operation that
/// changes who the RID is attached to.
#[derive(Default)]
pub struct RidState {
    /// The session that owns the RID.
    pub owner: Option<u64>,
    /// The holder's own IOAS, while it exists.
    pub private: Option<IoasId>,
    holder: Option<Holder>,
}

impl std::fmt::Debug for RidState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RidState")
            .field("owner", &self.owner)
            .field("private", &self.private)
            .field("holder", &self.holder.as_ref().map(|h| h.peer))
            .finish()
    }
}

/// Most sessions that may redeem tokens of one holder.
const MAX_AGREED: usize = 64;

impl RidState {
    /// Whether a holder is connected.
    pub fn has_holder(&self) -> bool {
        self.holder.is_some()
    }

    /// The holder says whether its addresses are IOVAs (`None`: undecided
    /// again, after a reset).
    pub fn set_holder_iovas(&mut self, iovas: Option<bool>) {
        if let Some(h) = &mut self.holder {
            h.iovas = iovas;
        }
    }

    /// Flags the holder as needing a reset.
    pub fn flag_needs_reset(&self) {
        if let Some(h) = &self.holder {
            h.hooks.needs_reset();
        }
    }

    /// Whether session `sid` of `peer` may take the RID over now: nobody
    /// else owns it, and a connected holder agreed (the session is the
    /// holder's own process, or redeemed its token) and addresses memory by
    /// IOVAs. The owner itself may always re-attach (replace).
    pub fn check_takeover(&self, sid: u64, peer: &Peer) -> Result<(), Refusal> {
        match self.owner {
            Some(o) if o == sid => return Ok(()),
            Some(o) => return Err(Refusal::Owned(o)),
            None => {}
        }
        let Some(h) = &self.holder else {
            return Ok(());
        };
        let agreed = h.peer.is_some_and(|p| p.pid == peer.pid) || h.agreed.contains(&sid);
        if !agreed {
            return Err(Refusal::HolderDisagrees(h.peer.unwrap_or(Peer {
                pid: 0,
                uid: u32::MAX,
                gid: u32::MAX,
            })));
        }
        if h.iovas == Some(false) {
            return Err(Refusal::NotIovas);
        }
        Ok(())
    }

    /// Whether session `sid` redeemed a token of the connected holder.
    pub fn redeemed_by(&self, sid: u64) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|h| h.agreed.contains(&sid))
    }
}

/// The RID arbitration of one device, shared by its holder and the
/// `/dev/iommu` service ([`crate::Directory::rid_ownership`]).
#[derive(Debug, Default)]
pub struct RidOwnership {
    state: Mutex<RidState>,
}

impl RidOwnership {
    /// A RID held by nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// The arbitration state, locked (poisoning ignored). Hold it across
    /// an iommu operation that changes who the RID is attached to.
    pub fn lock(&self) -> MutexGuard<'_, RidState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session id of the owner, if a session owns the RID.
    pub fn owner(&self) -> Option<u64> {
        self.lock().owner
    }

    /// True while a session owns the RID.
    pub fn is_owned(&self) -> bool {
        self.owner().is_some()
    }

    /// True while a holder is connected.
    pub fn has_holder(&self) -> bool {
        self.lock().has_holder()
    }

    /// The connected holder's peer, if known.
    pub fn holder_peer(&self) -> Option<Peer> {
        self.lock().holder.as_ref().and_then(|h| h.peer)
    }

    /// A holder connected (its peer is `peer`, if known): it starts
    /// undecided about IOVAs, with no token issued and nobody agreed.
    pub fn connect_holder(&self, peer: Option<Peer>, hooks: Arc<dyn RidHolder>) {
        self.lock().holder = Some(Holder {
            peer,
            iovas: None,
            hooks,
            token: None,
            agreed: Vec::new(),
        });
    }

    /// The holder is gone: its token and agreements are void.
    pub fn disconnect_holder(&self) {
        self.lock().holder = None;
    }

    /// Issues a one-time token for the connected holder (voiding one
    /// issued before); `None` without a holder. Whoever asks must be
    /// entitled to speak for the holder (the service checks that the
    /// session is the holder's own process).
    pub fn issue_token(&self) -> std::io::Result<Option<HandoverToken>> {
        let t = HandoverToken::random()?;
        let mut st = self.lock();
        let Some(h) = &mut st.holder else {
            return Ok(None);
        };
        h.token = Some(t.clone());
        Ok(Some(t))
    }

    /// Session `sid` redeems `token`: from now on, while this holder stays
    /// connected, the holder agrees to `sid` taking the RID over.
    pub fn redeem(&self, sid: u64, token: &[u8; TOKEN_LEN]) -> Result<(), Refusal> {
        let mut st = self.lock();
        let Some(h) = &mut st.holder else {
            return Err(Refusal::BadToken);
        };
        match &h.token {
            Some(t) if t.matches(token) => {}
            _ => return Err(Refusal::BadToken),
        }
        h.token = None;
        if !h.agreed.contains(&sid) {
            if h.agreed.len() >= MAX_AGREED {
                h.agreed.remove(0);
            }
            h.agreed.push(sid);
        }
        Ok(())
    }

    /// Forgets session `sid`'s redemptions (it closed).
    pub fn forget_session(&self, sid: u64) {
        if let Some(h) = &mut self.lock().holder {
            h.agreed.retain(|s| *s != sid);
        }
    }

    /// The address space behind the RID may have changed: the holder
    /// retries accesses waiting on a miss.
    pub fn resume_parked(&self) {
        let hooks = self.lock().holder.as_ref().map(|h| h.hooks.clone());
        if let Some(h) = hooks {
            h.resume_parked();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl RidHolder for Nop {
        fn needs_reset(&self) {}
        fn resume_parked(&self) {}
    }

    fn peer(pid: i32) -> Peer {
        Peer {
            pid,
            uid: 1000,
            gid: 1000,
        }
    }

    #[test]
    fn test_takeover_needs_the_holders_consent() {
        let r = RidOwnership::new();
        assert_eq!(r.lock().check_takeover(1, &peer(10)), Ok(()), "no holder");
        r.connect_holder(Some(peer(20)), Arc::new(Nop));
        assert_eq!(
            r.lock().check_takeover(1, &peer(10)),
            Err(Refusal::HolderDisagrees(peer(20)))
        );
        assert_eq!(r.lock().check_takeover(1, &peer(20)), Ok(()), "its process");
        let t = r.issue_token().expect("random").expect("holder");
        assert_eq!(r.redeem(2, &[0; TOKEN_LEN]), Err(Refusal::BadToken));
        assert_eq!(r.redeem(1, &t.bytes()), Ok(()));
        assert_eq!(r.redeem(3, &t.bytes()), Err(Refusal::BadToken), "one use");
        assert_eq!(r.lock().check_takeover(1, &peer(10)), Ok(()));
        r.lock().set_holder_iovas(Some(false));
        assert_eq!(
            r.lock().check_takeover(1, &peer(10)),
            Err(Refusal::NotIovas)
        );
        r.lock().set_holder_iovas(Some(true));
        r.lock().owner = Some(1);
        assert_eq!(
            r.lock().check_takeover(3, &peer(20)),
            Err(Refusal::Owned(1))
        );
        r.lock().owner = None;
        r.disconnect_holder();
        r.connect_holder(Some(peer(20)), Arc::new(Nop));
        assert!(
            r.lock().check_takeover(1, &peer(10)).is_err(),
            "agreement ends with the connection"
        );
        assert_eq!(r.redeem(1, &t.bytes()), Err(Refusal::BadToken));
    }
}
