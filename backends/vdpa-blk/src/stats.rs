//! Per-queue counters and their JSON lines (one object per line on
//! standard output, the shape vdpa-net prints):
//!
//! ```text
//! {"t":1.50,"final":false,"requests":..,"errors":..,"queues":[{"queue":0,"requests":..,"reads":..,...}]}
//! ```
//!
//! `requests` counts completed requests of every type (failed ones
//! included); `errors` the requests completed with `IOERR` or `UNSUPP`,
//! of which `malformed` were refused before any I/O (bad shape, out of
//! range, too large, read-only) and `unsupported` had an unknown type;
//! `io_errors` failed in the backing store; `dropped` could not be
//! completed because their ring had stopped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

/// Counters of one queue. Workers add with relaxed atomics.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Completed requests.
    pub requests: AtomicU64,
    /// Reads.
    pub reads: AtomicU64,
    /// Writes.
    pub writes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// Discards.
    pub discards: AtomicU64,
    /// Write-zeroes.
    pub write_zeroes: AtomicU64,
    /// GET_ID.
    pub get_id: AtomicU64,
    /// Bytes read from the disk.
    pub bytes_read: AtomicU64,
    /// Bytes written to the disk.
    pub bytes_written: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Refused before I/O.
    pub malformed: AtomicU64,
    /// Unknown or not negotiated types.
    pub unsupported: AtomicU64,
    /// Failed in the backing store.
    pub io_errors: AtomicU64,
    /// Requests whose ring stopped before they completed.
    pub dropped: AtomicU64,
}

impl QueueStats {
    fn json(&self, index: usize) -> Value {
        json!({
            "queue": index,
            "requests": self.requests.load(Relaxed),
            "reads": self.reads.load(Relaxed),
            "writes": self.writes.load(Relaxed),
            "flushes": self.flushes.load(Relaxed),
            "discards": self.discards.load(Relaxed),
            "write_zeroes": self.write_zeroes.load(Relaxed),
            "get_id": self.get_id.load(Relaxed),
            "bytes_read": self.bytes_read.load(Relaxed),
            "bytes_written": self.bytes_written.load(Relaxed),
            "errors": self.errors.load(Relaxed),
            "malformed": self.malformed.load(Relaxed),
            "unsupported": self.unsupported.load(Relaxed),
            "io_errors": self.io_errors.load(Relaxed),
            "dropped": self.dropped.load(Relaxed),
        })
    }
}

/// The counters of a device: one [`QueueStats`] per queue.
#[derive(Debug)]
pub struct DeviceStats {
    queues: Vec<QueueStats>,
}

impl DeviceStats {
    /// Counters for `n` queues.
    pub fn new(n: usize) -> DeviceStats {
        DeviceStats {
            queues: (0..n).map(|_| QueueStats::default()).collect(),
        }
    }

    /// Queue `i`'s counters (the last queue's for an index out of range).
    pub fn queue(&self, i: usize) -> &QueueStats {
        &self.queues[i.min(self.queues.len().saturating_sub(1))]
    }

    /// Requests completed on every queue.
    pub fn requests(&self) -> u64 {
        self.queues.iter().map(|q| q.requests.load(Relaxed)).sum()
    }

    /// Error completions on every queue.
    pub fn errors(&self) -> u64 {
        self.queues.iter().map(|q| q.errors.load(Relaxed)).sum()
    }

    /// One JSON line, `t` seconds after start.
    pub fn json_line(&self, t: f64, final_line: bool) -> String {
        json!({
            "t": (t * 100.0).round() / 100.0,
            "final": final_line,
            "requests": self.requests(),
            "errors": self.errors(),
            "queues": self.queues.iter().enumerate().map(|(i, q)| q.json(i)).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_json_line_shape() {
        let s = DeviceStats::new(2);
        s.queue(1).requests.fetch_add(3, Relaxed);
        s.queue(9).errors.fetch_add(1, Relaxed);
        let v: Value = serde_json::from_str(&s.json_line(1.234, true)).expect("json");
        assert_eq!(v["requests"], 3);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["final"], true);
        assert_eq!(v["queues"][1]["requests"], 3);
        assert_eq!(v["queues"].as_array().map(Vec::len), Some(2));
    }
}
