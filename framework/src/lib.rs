//! ioasis: device-server framework (work in progress).
