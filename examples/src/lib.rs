//! Runnable examples for ioasis; see the `examples` targets.
