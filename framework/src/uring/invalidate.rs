//! Invalidation delivery (in progress).
