//! The quickstart built with the `fault-injection` feature, as an example
//! of its own so that it never replaces the plain one:
//!
//! ```text
//! cargo build -p ioasis-examples --features fault-injection --example quickstart-fault-injection
//! IOASIS_FAULT_LATE_WRITE=sva0:20 target/debug/examples/quickstart-fault-injection
//! ```
//!
//! With `IOASIS_FAULT_LATE_WRITE=<device>[:<ms>]` (`net0` or `sva0`,
//! 20 ms by default) the backend's device makes one write into the frame
//! area that many milliseconds after an access section ended, through the
//! host pointer the section gave, and step 6 must fail; without it the run
//! is the plain quickstart's. `integration/tests/quickstart.rs` runs both.

#[path = "main.rs"]
mod quickstart;

fn main() {
    quickstart::main();
}
