//! The server event loop (being written).

/// Tags a device-owned event token for a worker's epoll set.
pub(crate) fn worker_device_token(token: u64) -> u64 {
    token | (1 << 63)
}
