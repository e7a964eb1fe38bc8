//! The OS-facing pieces the service and the device framework share: one
//! piece of code per mechanism.
//!
//! - [`scm`]: receiving a message with the fds a peer attached
//!   (`SCM_RIGHTS`), never leaking one.
//! - [`epoll`]: event loops (nix's `Epoll`).
//! - [`eventfd`]: eventfds (vmm-sys-util's `EventFd`).
//! - [`le`]: the little-endian reader and writer of the wire formats.
//! - [`peer_fd`]: fds a peer handed over (made `O_NONBLOCK`, counters read).
//! - [`peer_write`]: writes to a peer's eventfd that cannot wedge a thread
//!   (server side).
//! - [`accept`]: accept loops that back off instead of spinning (server
//!   side).
//! - [`socket_policy`]: who may connect to a listening socket (server side).
//! - [`ratelimit`]: rate-limited log lines ([`log_limited!`](crate::log_limited)).
//! - [`error_chain`]: an error and its sources, for logs.

#[cfg(feature = "server")]
pub mod accept;
pub mod epoll;
pub mod eventfd;
pub mod le;
pub mod peer_fd;
#[cfg(feature = "server")]
pub mod peer_write;
pub mod ratelimit;
pub mod scm;
#[cfg(feature = "server")]
pub mod socket_policy;

/// Formats an error with its chain of sources, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    // Source chains are short; bound the walk anyway.
    for _ in 0..16 {
        let Some(c) = cur else { break };
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
