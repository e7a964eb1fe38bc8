//! vdpa-net (work in progress).
