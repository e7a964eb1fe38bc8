//! ioasis: a userspace device-server framework for vDPA and SVA (work in progress).

pub mod device;
pub mod dma;
pub mod server;
pub mod service;
pub mod uring;
pub mod vhost_user;
