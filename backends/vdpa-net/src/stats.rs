//! Per-device and per-queue-pair counters, and their JSON lines.
//!
//! `rx` counts frames the frontend sent to the device (its transmit queues),
//! `tx` frames the device delivered to the frontend (its receive queues).
//! `drops` are frames lost for lack of room (port queue full, no receive
//! buffers, filtered), `errors` malformed chains and failed port I/O.
//! Workers add per batch with relaxed atomics; a reader sees each counter
//! monotonic, not a consistent snapshot across counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

/// Counters of one queue pair (or of the control queue).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames from the frontend.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (virtio-net header excluded).
    pub rx_bytes: AtomicU64,
    /// Frames to the frontend.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (virtio-net header excluded).
    pub tx_bytes: AtomicU64,
    /// Frames dropped.
    pub drops: AtomicU64,
    /// Errors (bad chains, port failures, rejected control commands).
    pub errors: AtomicU64,
}

/// A plain copy of [`QueueStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// See [`QueueStats::rx_packets`].
    pub rx_packets: u64,
    /// See [`QueueStats::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`QueueStats::tx_packets`].
    pub tx_packets: u64,
    /// See [`QueueStats::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`QueueStats::drops`].
    pub drops: u64,
    /// See [`QueueStats::errors`].
    pub errors: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.drops += o.drops;
        self.errors += o.errors;
    }

    fn json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("rx_packets".into(), self.rx_packets.into());
        m.insert("rx_bytes".into(), self.rx_bytes.into());
        m.insert("tx_packets".into(), self.tx_packets.into());
        m.insert("tx_bytes".into(), self.tx_bytes.into());
        m.insert("drops".into(), self.drops.into());
        m.insert("errors".into(), self.errors.into());
        m
    }
}

impl QueueStats {
    /// Adds a batch received from the frontend.
    pub fn add_rx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.rx_packets.fetch_add(packets, Relaxed);
            self.rx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// Adds a batch delivered to the frontend.
    pub fn add_tx(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.tx_packets.fetch_add(packets, Relaxed);
            self.tx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// Adds drops.
    pub fn add_drops(&self, n: u64) {
        if n > 0 {
            self.drops.fetch_add(n, Relaxed);
        }
    }

    /// Adds errors.
    pub fn add_errors(&self, n: u64) {
        if n > 0 {
            self.errors.fetch_add(n, Relaxed);
        }
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> Counters {
        Counters {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: self.drops.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Counters of one device: one set per queue pair and one for the control queue.
#[derive(Debug)]
pub struct DeviceStats {
    /// The socket path the device serves.
    pub socket: String,
    /// The port description.
    pub port: String,
    /// One per queue pair.
    pub queues: Vec<QueueStats>,
    /// The control queue (errors only: rejected commands).
    pub ctrl: QueueStats,
}

impl DeviceStats {
    /// Counters for a device with `pairs` queue pairs.
    pub fn new(socket: &str, port: &str, pairs: usize) -> DeviceStats {
        DeviceStats {
            socket: socket.to_string(),
            port: port.to_string(),
            queues: (0..pairs.max(1)).map(|_| QueueStats::default()).collect(),
            ctrl: QueueStats::default(),
        }
    }

    /// The counters of queue pair `i` (the last pair for an index past the end).
    pub fn queue(&self, i: usize) -> &QueueStats {
        let last = self.queues.len() - 1;
        &self.queues[i.min(last)]
    }

    /// Sum over the queue pairs and the control queue.
    pub fn total(&self) -> Counters {
        let mut t = self.ctrl.snapshot();
        for q in &self.queues {
            t.add(&q.snapshot());
        }
        t
    }

    fn json(&self) -> Value {
        let mut m = self.total().json();
        m.insert("socket".into(), self.socket.clone().into());
        m.insert("port".into(), self.port.clone().into());
        let queues: Vec<Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut qm = q.snapshot().json();
                qm.insert("queue".into(), i.into());
                Value::Object(qm)
            })
            .collect();
        m.insert("queues".into(), Value::Array(queues));
        Value::Object(m)
    }
}

/// One JSON line for all devices: totals at the top level, then `devices`,
/// each with its totals and `queues`. `final` marks the line written at exit.
pub fn json_line(devices: &[&DeviceStats], uptime_secs: f64, final_line: bool) -> String {
    let mut total = Counters::default();
    for d in devices {
        total.add(&d.total());
    }
    let mut m = total.json();
    m.insert(
        "time".into(),
        json!((uptime_secs * 1000.0).round() / 1000.0),
    );
    m.insert("final".into(), final_line.into());
    m.insert(
        "devices".into(),
        Value::Array(devices.iter().map(|d| d.json()).collect()),
    );
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_json_line_totals_and_queues() {
        let a = DeviceStats::new("/tmp/a.sock", "sink", 2);
        a.queue(0).add_rx(3, 180);
        a.queue(1).add_rx(1, 60);
        a.queue(1).add_tx(2, 120);
        a.queue(9).add_drops(1);
        a.ctrl.add_errors(1);
        let b = DeviceStats::new("/tmp/b.sock", "reflect", 1);
        b.queue(0).add_errors(2);
        let line = json_line(&[&a, &b], 1.5, true);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["rx_packets"], 4);
        assert_eq!(v["rx_bytes"], 240);
        assert_eq!(v["tx_packets"], 2);
        assert_eq!(v["drops"], 1);
        assert_eq!(v["errors"], 3);
        assert_eq!(v["final"], true);
        assert_eq!(v["devices"][0]["socket"], "/tmp/a.sock");
        assert_eq!(v["devices"][0]["queues"][1]["rx_packets"], 1);
        assert_eq!(v["devices"][0]["queues"][1]["drops"], 1);
        assert_eq!(v["devices"][0]["errors"], 1);
        assert_eq!(v["devices"][1]["errors"], 2);
        assert_eq!(v["devices"][1]["port"], "reflect");
    }

    #[test]
    fn test_zero_adds_are_noops() {
        let q = QueueStats::default();
        q.add_rx(0, 100);
        q.add_tx(0, 100);
        assert_eq!(q.snapshot(), Counters::default());
    }
}
