//! Who may attach a device, and who holds a device's RID now.
//!
//! iommufd's model is that a device is attached only by whoever holds its
//! bound fd. A device server has no device fds to hand out, so ioasis
//! states the same rule in three parts, all enforced by the `/dev/iommu`
//! service ([the crate](crate)):
//!
//! 1. **Grants** ([`Grants`]): a device's RID and PASIDs are attached (and
//!    its PASIDs reserved, its HWPTs allocated) only by a session whose
//!    peer ([`Peer`], from `SO_PEERCRED`) the device was granted to. The
//!    daemon's configuration grants devices (`--grant DEVICE=WHO`,
//!    [`crate::Service::grant`]); a device nobody was granted is
//!    granted to the daemon's own user, the owner of its sockets.
//! 2. **The holder's consent** ([`RidOwnership`]): a device whose RID a
//!    vhost-user frontend holds (its connection attached the RID to an
//!    address space of its own) is taken over by a session only if that
//!    frontend agreed: the session is the frontend's own process, or it
//!    redeemed a one-time [`HandoverToken`] that the frontend's process
//!    obtained and handed over.
//! 3. **One owner**: once a session took the RID over, no other session may
//!    attach it (`EBUSY`) until the owner detaches or closes.
//!
//! A redeemed token also counts as a grant, for as long as the connection
//! that issued it lives: a frontend can delegate its device to another
//! process without the daemon's configuration naming that process.
//!
//! Files: `peer` (who is on the other end of a socket), `grant` (the
//! daemon's grants), `token` (the one-time credential), `rid` (the RID's
//! arbitration between its holder and the sessions).

mod grant;
mod peer;
mod rid;
mod token;

pub use grant::{GrantError, Grantee, Grants, ANY_DEVICE};
pub use peer::Peer;
pub use rid::{Refusal, RidHolder, RidOwnership, RidState};
pub use token::{HandoverToken, TOKEN_LEN};
