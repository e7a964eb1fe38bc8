//! The vhost-user glue: the virtio-net device on the framework's device trait.
//!
//! Queue layout (VIRTIO net): queue `2i` receives for pair `i` (device to
//! driver), queue `2i+1` transmits (driver to device), the control queue comes
//! last. Each queue pair is served by its own worker thread, which owns that
//! pair's port endpoint while the device runs and gives it back when the
//! frontend stops or disconnects; the control queue rides on thread 0.
//!
//! The per-frame work on the rings is the packet engine's
//! ([`crate::engine`]); this module is the device around it: configuration,
//! the ports parked between workers, the worker's events (port readiness,
//! kicks), polling (an adaptive window by default, a fixed one with
//! `--poll-us`, continued from the framework's before-sleep hook) and the
//! receive gate: when
//! the driver has no receive buffers the port's readiness is switched off
//! until the driver kicks the receive queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ioasis::device::{
    Device, DeviceError, EventHandle, EventRegistrar, Idle, Interest, Queues, Result,
    TransportKind, Worker,
};
use ioasis::poll::{AdaptiveWindow, PollMode, Preemptions};
use log::{debug, info, warn};

use crate::engine::PairEngine;
use crate::net::{self, Features, MacAddr, NetDevice, NET_CONFIG_LEN};
use crate::port::{Port, PortSpec, TapIo};
use crate::stats::DeviceStats;

/// VIRTIO_ID_NET.
pub const VIRTIO_ID_NET: u32 = 1;
/// Largest queue size offered.
pub const QUEUE_SIZE: u16 = 1024;
/// Longest a polling session keeps one DMA access section open.
const MAX_POLL_SECTION: Duration = Duration::from_millis(1);
/// PAUSE instructions after a polling pass that moved nothing.
const IDLE_PAUSES: usize = 128;
/// Passes a polling session makes between two readings of the clock.
const POLL_PASSES_PER_CLOCK: usize = 8;
/// Token of a worker's port readiness in the framework's event loop.
const PORT_TOKEN: u64 = 1;

/// Configuration of one virtio-net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Unix socket path the device listens on.
    pub socket: String,
    /// Where frames go.
    pub port: PortSpec,
    /// Queue pairs (1..=8).
    pub queues: u16,
    /// MAC address in the config space.
    pub mac: MacAddr,
    /// How workers poll after work.
    pub poll: PollMode,
    /// How tap ports do their I/O.
    pub tap_io: TapIo,
    /// The CPU each queue pair's worker is pinned to, by pair (empty: not
    /// pinned; a pair beyond the list: not pinned).
    pub worker_cpus: Vec<usize>,
}

/// State shared by the control plane and the workers of one device.
#[derive(Debug)]
struct Shared {
    net: Mutex<NetDevice>,
    /// Bumped whenever the receive filter changes; workers re-read it then.
    filter_gen: AtomicU64,
    /// Port endpoints, one per pair, parked here while no worker runs.
    ports: Vec<Mutex<Option<Box<dyn Port>>>>,
    stats: Arc<DeviceStats>,
    poll: PollMode,
    /// See [`NetConfig::worker_cpus`].
    worker_cpus: Vec<usize>,
    label: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The virtio-net device as the framework sees it.
#[derive(Debug)]
pub struct VhostUserNetBackend {
    shared: Arc<Shared>,
}

impl VhostUserNetBackend {
    /// Opens the ports of a device; the device then waits for a frontend.
    pub fn new(cfg: &NetConfig) -> std::result::Result<VhostUserNetBackend, crate::port::Error> {
        let pairs = cfg.queues.clamp(1, net::MAX_QUEUE_PAIRS);
        let ports = cfg.port.open(pairs, cfg.mac, cfg.tap_io)?;
        let offloads = ports[0].offloads();
        let mtu = ports[0].mtu();
        let stats = Arc::new(DeviceStats::new(
            &cfg.socket,
            &cfg.port.to_string(),
            pairs as usize,
        ));
        let shared = Shared {
            net: Mutex::new(NetDevice::new(cfg.mac, pairs, offloads, mtu)),
            filter_gen: AtomicU64::new(0),
            ports: ports.into_iter().map(|p| Mutex::new(Some(p))).collect(),
            stats,
            poll: cfg.poll,
            worker_cpus: cfg.worker_cpus.clone(),
            label: cfg.socket.clone(),
        };
        Ok(VhostUserNetBackend {
            shared: Arc::new(shared),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<DeviceStats> {
        self.shared.stats.clone()
    }

    /// The number of queue pairs.
    pub fn pairs(&self) -> u16 {
        lock(&self.shared.net).max_pairs
    }
}

impl Device for VhostUserNetBackend {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        lock(&self.shared.net).offered
    }

    fn num_queues(&self) -> usize {
        lock(&self.shared.net).num_queues()
    }

    fn max_queue_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn worker(&self, thread: usize) -> Result<Box<dyn Worker>> {
        let (features, pairs) = {
            let n = lock(&self.shared.net);
            (n.acked, n.max_pairs)
        };
        let pair = thread.min(pairs as usize - 1);
        let Some(mut port) = lock(&self.shared.ports[pair]).take() else {
            return Err(DeviceError::Other(format!(
                "port of queue pair {pair} is already in use"
            )));
        };
        if let Err(e) = port.set_guest_offloads(features.tun_offloads()) {
            warn!("{}: {e}", self.shared.label);
        }
        let ctrl = (thread == 0 && features.has(net::VIRTIO_NET_F_CTRL_VQ)).then_some(2 * pairs);
        Ok(Box::new(NetWorker::new(
            self.shared.clone(),
            pair,
            port,
            features,
            ctrl,
        )))
    }

    fn worker_cpus(&self, thread: usize) -> Option<Vec<usize>> {
        // Worker `thread` serves queue pair `thread` (queues_per_thread).
        self.shared.worker_cpus.get(thread).map(|&c| vec![c])
    }

    fn config_size(&self) -> u32 {
        NET_CONFIG_LEN as u32
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        let c = lock(&self.shared.net)
            .config()
            .read(offset, data.len() as u32);
        let n = data.len().min(c.len());
        data[..n].copy_from_slice(&c[..n]);
        Ok(())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        lock(&self.shared.net).write_config(offset, data);
        self.shared.filter_gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn set_features(&self, features: u64) -> Result<()> {
        let mut n = lock(&self.shared.net);
        n.set_features(features);
        debug!("{}: features acked {:#x}", self.shared.label, n.acked.0);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let (pairs, ctrl) = {
            let n = lock(&self.shared.net);
            (n.max_pairs as u32, n.has_ctrl_queue())
        };
        (0..pairs)
            .map(|i| {
                let mut m = (1u64 << (2 * i)) | (1u64 << (2 * i + 1));
                if i == 0 && ctrl {
                    m |= 1u64 << (2 * pairs);
                }
                m
            })
            .collect()
    }

    fn set_transport(&self, transport: TransportKind) {
        if transport == TransportKind::Vduse {
            // The kernel refuses a VDUSE net device with a control queue.
            lock(&self.shared.net).without_ctrl_queue();
            info!(
                "{}: served over VDUSE: no control queue (one queue pair in use)",
                self.shared.label
            );
        }
    }

    fn reset(&self) {
        // Workers are gone: every port is back in its slot.
        for p in &self.shared.ports {
            if let Some(p) = lock(p).as_mut() {
                p.reset();
            }
        }
        lock(&self.shared.net).reset();
        self.shared.filter_gen.fetch_add(1, Ordering::Release);
        info!("{}: device reset", self.shared.label);
    }
}

/// Level-triggered readiness of the port, switched off (removed from the
/// worker's event loop) while the driver has no receive buffers, so a tap
/// with frames queued does not spin the worker.
#[derive(Debug)]
struct RxGate {
    events: EventHandle,
    armed: bool,
}

impl RxGate {
    fn set(&mut self, port: &dyn Port, on: bool) {
        if on == self.armed {
            return;
        }
        let Some(fd) = port.rx_fd() else { return };
        let r = if on {
            self.events.add(&fd, Interest::Readable, PORT_TOKEN)
        } else {
            self.events.remove(&fd)
        };
        match r {
            Ok(()) => self.armed = on,
            Err(e) => warn!("port readiness switch failed: {e}"),
        }
    }
}

/// Data plane of one queue pair (and the control queue on thread 0).
struct NetWorker {
    shared: Arc<Shared>,
    pair: usize,
    rx_q: u16,
    tx_q: u16,
    ctrl_q: Option<u16>,
    port: Option<Box<dyn Port>>,
    gate: Option<RxGate>,
    /// A pass stopped with work left, or a polling session yielded its
    /// access section: serve again before the thread sleeps (a fresh
    /// section, through [`Worker::before_sleep`]).
    again: bool,
    engine: PairEngine,
    filter_gen: u64,
    rx_blocked: bool,
    /// The polling window (None: event-driven, `--poll-us 0`).
    poll: Option<AdaptiveWindow>,
    /// Preemptions of the worker while it polls (adaptive mode only: a
    /// fixed window polls whatever else wants the CPU).
    preempt: Option<Preemptions>,
}

impl std::fmt::Debug for NetWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("pair", &self.pair)
            .field("port", &self.port)
            .finish()
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        // Stop watching the port's fd before it goes back to the device.
        if let (Some(g), Some(p)) = (self.gate.as_mut(), self.port.as_ref()) {
            g.set(p.as_ref(), false);
        }
        self.gate = None;
        if let Some(p) = self.port.take() {
            *lock(&self.shared.ports[self.pair]) = Some(p);
        }
    }
}

impl NetWorker {
    fn new(
        shared: Arc<Shared>,
        pair: usize,
        port: Box<dyn Port>,
        features: Features,
        ctrl_q: Option<u16>,
    ) -> NetWorker {
        let filter = lock(&shared.net).filter.clone();
        let filter_gen = shared.filter_gen.load(Ordering::Acquire);
        let engine = PairEngine::new(pair, &shared.label, shared.stats.clone(), features, filter);
        NetWorker {
            pair,
            rx_q: (2 * pair) as u16,
            tx_q: (2 * pair + 1) as u16,
            ctrl_q,
            port: Some(port),
            gate: None,
            again: false,
            engine,
            filter_gen,
            rx_blocked: false,
            poll: shared.poll.window(),
            preempt: shared.poll.preemptions(),
            shared,
        }
    }

    fn refresh_filter(&mut self) {
        let g = self.shared.filter_gen.load(Ordering::Acquire);
        if g != self.filter_gen {
            self.engine.filter = lock(&self.shared.net).filter.clone();
            self.filter_gen = g;
        }
    }

    fn process_tx(&mut self, queues: &mut Queues<'_>) -> Result<usize> {
        let Some(port) = self.port.as_mut() else {
            return Ok(0);
        };
        let Some(mut q) = queues.get(self.tx_q) else {
            return Ok(0);
        };
        let (n, more) = self.engine.tx(&mut q, port.as_mut())?;
        if more {
            self.serve_again();
        }
        Ok(n)
    }

    /// Has [`Worker::before_sleep`] serve again (a fresh access section).
    fn serve_again(&mut self) {
        self.again = true;
    }

    fn process_rx(&mut self, queues: &mut Queues<'_>) -> Result<usize> {
        self.refresh_filter();
        let Some(port) = self.port.as_mut() else {
            return Ok(0);
        };
        if !port.produces_frames() {
            return Ok(0);
        }
        let Some(mut q) = queues.get(self.rx_q) else {
            return Ok(0);
        };
        let pass = self.engine.rx(&mut q, port.as_mut())?;
        if pass.blocked && !self.engine.suppress {
            self.rx_blocked = true;
            if let Some(g) = self.gate.as_mut() {
                g.set(port.as_ref(), false);
            }
        }
        if pass.more {
            self.serve_again();
        }
        Ok(pass.moved)
    }

    /// Moves frames both ways; `moved` is what the caller already moved
    /// for this wake-up.
    ///
    /// Without a polling window (`--poll-us 0`): one pass each, ending with
    /// driver notifications enabled. With an open window: keeps polling both
    /// queues and the port with notifications suppressed for as long as the
    /// window says so ([`AdaptiveWindow::observe`] at every reading of the
    /// clock), then one ordinary pass; a session that stays busy yields its
    /// access section every [`MAX_POLL_SECTION`], or at the next reading of
    /// the clock when an unmap waits for it, and resumes before the
    /// thread sleeps ([`Worker::before_sleep`] answers [`Idle::Poll`]),
    /// notifications still off. A window of 0 (where the adaptive one
    /// starts) is the ordinary pass alone. Work the ordinary pass finds is
    /// shown to the window: it may open (or grow), and the worker then
    /// polls from the before-sleep hook.
    fn serve(&mut self, queues: &mut Queues<'_>, moved: usize) -> Result<()> {
        let polling = self.poll.as_ref().is_some_and(|w| !w.window().is_zero());
        if polling {
            let start = Instant::now();
            self.engine.suppress = true;
            // Bounded by time: the window or the section limit ends it
            // (the clock is read every few passes: a pass over idle queues
            // costs about what reading it does).
            // A port with a readiness fd (tap, switch) costs a system call
            // or a lock to ask for frames: it is asked once per clock
            // reading; one without (reflect, source) at every pass.
            let rx_fd = self.port.as_ref().is_some_and(|p| p.rx_fd().is_some());
            let mut moved = moved;
            if let Some(p) = self.preempt.as_mut() {
                // A baseline: switches before the session are not its.
                p.since_last();
            }
            let r = 'poll: loop {
                for pass in 0..POLL_PASSES_PER_CLOCK {
                    let mut now_moved = match self.process_tx(queues) {
                        Ok(n) => n,
                        Err(e) => break 'poll Err(e),
                    };
                    if !rx_fd || pass + 1 == POLL_PASSES_PER_CLOCK {
                        match self.process_rx(queues) {
                            Ok(n) => now_moved += n,
                            Err(e) => break 'poll Err(e),
                        }
                    }
                    if now_moved == 0 {
                        // Nothing anywhere: back off before reading the
                        // driver's avail index again. Every poll takes that
                        // line from the driver's core, which then writes it
                        // late: into `sink` 128 PAUSEs gave 29.6-30.6 Mpps
                        // against 28.0-28.6 with 4 (and 512 fell behind the
                        // driver: 25).
                        for _ in 0..IDLE_PAUSES {
                            std::hint::spin_loop();
                        }
                    }
                    moved += now_moved;
                }
                let now = Instant::now();
                let preempted = self.preempt.as_mut().is_some_and(|p| p.since_last());
                let idle = match self.poll.as_mut() {
                    // Another task wants this CPU (the driver, perhaps):
                    // polling would only delay it.
                    Some(w) if preempted => w.preempted(now),
                    Some(w) => w.observe(now, moved > 0),
                    None => Idle::Sleep,
                };
                moved = 0;
                if idle == Idle::Sleep {
                    break Ok(false);
                }
                // An unmap (a guest IOMMU invalidation in strict mode
                // comes with every buffer) waits for this section to end:
                // end it now and poll on in a new one.
                if now.duration_since(start) >= MAX_POLL_SECTION
                    || queues.dma().invalidation_requested()
                {
                    break Ok(true);
                }
            };
            self.engine.suppress = false;
            if r? {
                self.serve_again();
                return Ok(());
            }
            // The session polled the receive queue itself, so a block from
            // before it is stale: the driver may have refilled every buffer
            // meanwhile and will not kick again. Without this the pass below
            // skipped the receive queue and the device slept for ever on a
            // `source` port (the benchmark's from-backend test in the
            // adaptive default mode: 0 frames a second after the first
            // sleep). The pass below looks again and, if the driver still
            // has no buffers, blocks properly (asking for a kick).
            if self.rx_blocked {
                self.rx_blocked = false;
                if let (Some(g), Some(p)) = (self.gate.as_mut(), self.port.as_ref()) {
                    g.set(p.as_ref(), true);
                }
            }
            // Going back to sleep: the receive queue kicks again (buffers the
            // driver adds may be what a port's frames wait for).
            if let Some(mut q) = queues.get(self.rx_q) {
                q.enable_notification()?;
            }
        }
        let mut found = self.process_tx(queues)?;
        // A port with a readiness fd is served when it fires; one without
        // (reflect, source) may have frames as a result of this pass.
        let rx_now = self
            .port
            .as_ref()
            .is_some_and(|p| p.produces_frames() && p.rx_fd().is_none());
        if rx_now && !self.rx_blocked {
            found += self.process_rx(queues)?;
        }
        if !polling {
            found += moved;
        }
        // Work right after the window closed (or with none open): the
        // window decides whether polling pays now. One reading of the clock
        // per wake-up that found work.
        if found > 0 {
            if let Some(w) = self.poll.as_mut() {
                if w.observe(Instant::now(), true) == Idle::Poll {
                    self.serve_again();
                }
            }
        }
        Ok(())
    }
}

impl Worker for NetWorker {
    fn init(&mut self, events: &mut EventRegistrar<'_>) -> Result<()> {
        let Some(port) = self.port.as_ref() else {
            return Ok(());
        };
        if let Some(fd) = port.rx_fd() {
            events
                .add(&fd, Interest::Readable, PORT_TOKEN)
                .map_err(|source| DeviceError::Io {
                    op: "register port readiness",
                    source,
                })?;
            let handle = events.handle().map_err(|source| DeviceError::Io {
                op: "worker event handle",
                source,
            })?;
            self.gate = Some(RxGate {
                events: handle,
                armed: true,
            });
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16, queues: &mut Queues<'_>) -> Result<()> {
        if index == self.tx_q {
            // Reflected frames may be waiting after the transmit pass.
            self.serve(queues, 0)?;
        } else if index == self.rx_q {
            self.rx_blocked = false;
            if let (Some(g), Some(p)) = (self.gate.as_mut(), self.port.as_ref()) {
                g.set(p.as_ref(), true);
            }
            // Frames the port held back for lack of buffers go first.
            let moved = self.process_rx(queues)?;
            if self.poll.is_some() {
                self.serve(queues, moved)?;
            }
        } else if Some(index) == self.ctrl_q {
            if let Some(mut q) = queues.get(index) {
                if self.engine.ctrl(&mut q, &self.shared.net)? > 0 {
                    self.shared.filter_gen.fetch_add(1, Ordering::Release);
                }
            }
            self.refresh_filter();
        }
        Ok(())
    }

    fn handle_event(&mut self, token: u64, queues: &mut Queues<'_>) -> Result<()> {
        if token == PORT_TOKEN {
            let moved = self.process_rx(queues)?;
            if self.poll.is_some() {
                self.serve(queues, moved)?;
            }
        }
        Ok(())
    }

    fn before_sleep(&mut self, queues: &mut Queues<'_>) -> Result<Idle> {
        if !std::mem::take(&mut self.again) {
            return Ok(Idle::Sleep);
        }
        self.serve(queues, 0)?;
        Ok(if self.again { Idle::Poll } else { Idle::Sleep })
    }
}

#[cfg(test)]
#[path = "vhu_net_tests.rs"]
mod tests;
