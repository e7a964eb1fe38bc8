//! End-to-end test harness for ioasis backends driven by real vhost-user
//! frontends.
//!
//! The harness starts real programs and cleans up after them:
//!
//! - [`testpmd`]: DPDK's `dpdk-testpmd`, as a virtio_user frontend or as
//!   DPDK's own vhost backend (net_vhost, the reference), with its statistics
//!   parsed;
//! - [`qemu`]: QEMU guests (TCG) with vhost-user virtio-net and virtio-blk devices,
//!   optionally behind an emulated intel-iommu;
//! - [`guest`]: the guest kit they boot (Debian's kernel and a busybox
//!   initramfs built once and cached under `target/`);
//! - [`blk_frontend`]: a vhost-user-blk driver of the project's own (the
//!   block benchmark's load generator);
//! - [`blk_server`]: vhost-user-blk servers (the workspace's `vdpa-blk`,
//!   qemu-storage-daemon's export as the reference);
//! - [`guest_disk`]: guest scripts writing a pattern onto such disks and
//!   the host's checks of the image;
//! - [`guest_pktgen`]: a guest sending frames with the kernel's pktgen
//!   into a backend that counts them;
//! - [`netns`]: network namespaces and taps;
//! - [`vdpa_net`]: the workspace's `vdpa-net` daemon and its JSON statistics;
//! - [`tcp_bulk`]: a bulk TCP transfer from a guest on vdpa-net to a tap in
//!   a namespace;
//! - [`vduse_kit`]: the guest kit of the VDUSE tests (Debian's 6.12
//!   kernel, which has VDUSE, with the vDPA modules and the `vdpa` tool),
//!   and the daemon with its shared libraries for such a guest;
//! - [`vduse_testpmd`]: DPDK testpmd inside such a guest, driving vdpa-net
//!   over vhost-user and over VDUSE bound to `vhost_vdpa`;
//! - [`accounting`]: counts two sides of a run must agree on (every frame
//!   sent is counted), failing with the number lost.
//!
//! Every process runs in its own process group and is killed with SIGKILL
//! and reaped when its handle drops; namespaces are deleted and scratch
//! directories removed (kept, with their logs, when the test panics). Every
//! wait is bounded in time and in iterations.
//!
//! Tests that need something this machine lacks skip loudly, or fail in CI
//! ([`env::ready`]). Tests that busy-poll cores or boot guests serialize on
//! [`env::heavy_lock`], so a 2-core machine runs one at a time.

#![deny(missing_docs)]

pub mod accounting;
pub mod bench_record;
pub mod bins;
pub mod blk_frontend;
pub mod blk_server;
pub mod cpio;
pub mod env;
pub mod error;
pub mod guest;
pub mod guest_disk;
pub mod guest_pktgen;
pub mod guest_stream;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tcp_bulk;
pub mod testpmd;
pub mod vdpa_net;
pub mod vduse_kit;
pub mod vduse_testpmd;

pub use env::{heavy_lock, ready, WorkDir};
pub use error::{Error, OrPanic, Result};
