//! sva-accel (work in progress).
