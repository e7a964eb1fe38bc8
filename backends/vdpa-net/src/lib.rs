//! vdpa-net: a virtio-net device served over vhost-user.
//!
//! The device is split the way its concerns are:
//! - [`net`]: the virtio-net model with no sockets: features, header, config
//!   space, control commands, receive filter.
//! - [`port`]: where frames go: a tap, an in-process L2 switch, a sink or a
//!   reflector, each batched and allocation-free on the packet path.
//! - [`stats`]: per-device and per-queue counters and their JSON lines.
//! - [`engine`]: the packet engine: the per-frame receive, transmit and
//!   control work of one queue pair on its rings (bursts, mergeable receive
//!   buffers, notification suppression).
//! - [`vhu_net`]: the glue onto the framework's device trait: queue pairs,
//!   the workers' events, polling.
//!
//! A frontend (QEMU, DPDK virtio-user) drives the device's virtqueues; the
//! device moves frames between them and the port in bursts.

// Tests may unwrap: a failure is the test's report.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![deny(missing_docs)]

pub mod cli;
pub mod engine;
pub mod net;
pub mod port;
pub mod stats;
pub mod vhu_net;

pub use ioasis::poll::PollMode;
pub use vhu_net::{NetConfig, VhostUserNetBackend};
