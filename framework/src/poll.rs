//! Polling windows: how long a worker keeps polling after work before it
//! re-arms notifications and sleeps.
//!
//! A worker that polls its queues with the driver's notifications
//! suppressed costs the driver no kick and itself no wake-up per burst, but
//! burns its CPU while nothing comes. [`AdaptiveWindow`] decides, from what
//! the polls find and when, whether to keep polling ([`Idle::Poll`]) or to
//! sleep ([`Idle::Sleep`]); a device asks it from its polling loop and from
//! [`Worker::before_sleep`](crate::device::Worker::before_sleep). It is a
//! pure state machine: the caller passes the time (reading the clock as
//! rarely as it likes) and whether work was found since the last
//! observation.
//!
//! The window follows the load, as KVM's halt polling and QEMU's adaptive
//! event-loop polling size theirs (and in the spirit of Linux's NAPI
//! busy polling and DPDK's interrupt and power-management modes, which
//! poll while there is traffic and arm interrupts once it stops):
//!
//! - It **grows** (doubles, from [`AdaptiveWindow::START`]) when work
//!   turns up that a longer window would have caught without a sleep: after
//!   a sleep, work arriving within [`AdaptiveWindow::MAX`] of the previous
//!   work (the window was too short: the thread paid a wake-up the driver
//!   paid a kick for); while polling, work arriving in the second half of
//!   the window (it nearly expired: steady traffic with gaps close to it).
//! - It **shrinks** (halves, to 0 below `START`) when a sleep lasted longer
//!   than `MAX`: polling for the longest window would have found nothing.
//! - Otherwise it stays: a sleep longer than the window but shorter than
//!   `MAX` does not shrink it, so the window does not swing between two
//!   sizes when the gaps lie near its top.
//! - It **drops to its minimum** and the thread sleeps when the thread was
//!   preempted while polling ([`AdaptiveWindow::preempted`], seen through
//!   [`Preemptions`]): another task wants the CPU, and polling only delays
//!   it, which may be the very driver the worker waits for (KVM stops halt
//!   polling as soon as another task is runnable on the CPU, for the same
//!   reason). Polling pays on a CPU of its own, not on a shared one. The
//!   window then stays at its minimum for a hold-off (from
//!   [`AdaptiveWindow::HOLD_MIN`], doubling while preemptions recur, up to
//!   [`AdaptiveWindow::HOLD_MAX`]; back to the start when no preemption
//!   comes within a hold-off after the last one ended): the preemption is seen only after a time slice was lost,
//!   and short sleeps on a shared CPU (the driver runs only while the
//!   worker sleeps) would otherwise grow the window straight back.
//!
//! With a window of 0 the device is purely event-driven; an idle device
//! polls for at most one window after its last work and then sleeps until
//! the next kick: it uses no CPU while idle. [`AdaptiveWindow::fixed`] is
//! the same machine with a window that never changes (vdpa-net's
//! `--poll-us N`).

use std::time::{Duration, Instant};

use crate::device::Idle;

/// How a worker polls after work, with the driver's notifications
/// suppressed, before it re-arms them and sleeps: what a daemon's
/// `--poll-us` option chooses (see [`PollMode::from_poll_us`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PollMode {
    /// A window that follows the load ([`AdaptiveWindow`]: 0 to 200 µs,
    /// growing while work arrives that a longer window would have caught,
    /// shrinking while sleeps outlast the longest window, dropping to 0
    /// when the worker is preempted while it polls: another task wants its
    /// CPU). The default.
    #[default]
    Adaptive,
    /// A fixed window (`--poll-us N`).
    Fixed(Duration),
    /// No polling: every pass ends with notifications enabled
    /// (`--poll-us 0`).
    Off,
}

impl PollMode {
    /// The mode `--poll-us` asks for: none given is adaptive, 0 is off.
    pub fn from_poll_us(poll_us: Option<u64>) -> PollMode {
        match poll_us {
            None => PollMode::Adaptive,
            Some(0) => PollMode::Off,
            Some(n) => PollMode::Fixed(Duration::from_micros(n)),
        }
    }

    /// A worker's window in this mode (None: no polling).
    pub fn window(self) -> Option<AdaptiveWindow> {
        match self {
            PollMode::Adaptive => Some(AdaptiveWindow::new()),
            PollMode::Fixed(d) => Some(AdaptiveWindow::fixed(d)),
            PollMode::Off => None,
        }
    }

    /// The preemption watch a worker in this mode keeps: only the adaptive
    /// window gives way to other tasks (a fixed one polls whatever else
    /// wants the CPU).
    pub fn preemptions(self) -> Option<Preemptions> {
        (self == PollMode::Adaptive).then(Preemptions::new)
    }
}

/// A self-tuning polling window (see the [module](self) documentation).
///
/// ```
/// use std::time::{Duration, Instant};
/// use ioasis::device::Idle;
/// use ioasis::poll::AdaptiveWindow;
///
/// let mut w = AdaptiveWindow::new();
/// let t0 = Instant::now();
/// // Starts event-driven: work, then sleep at once.
/// assert_eq!(w.observe(t0, true), Idle::Sleep);
/// // Woken 20 µs later with work: a window would have caught it.
/// let t1 = t0 + Duration::from_micros(20);
/// assert_eq!(w.observe(t1, true), Idle::Poll);
/// assert_eq!(w.window(), AdaptiveWindow::START);
/// ```
#[derive(Clone, Debug)]
pub struct AdaptiveWindow {
    window: Duration,
    min: Duration,
    max: Duration,
    /// When work was last found.
    last_work: Option<Instant>,
    /// When the window last told the caller to sleep, while it sleeps.
    asleep_since: Option<Instant>,
    /// No growth before this (the thread was preempted while polling).
    hold_until: Option<Instant>,
    /// The last hold-off (0: none yet).
    hold: Duration,
}

impl Default for AdaptiveWindow {
    fn default() -> AdaptiveWindow {
        AdaptiveWindow::new()
    }
}

impl AdaptiveWindow {
    /// The first window after 0, and the one below which a shrinking window
    /// drops to 0. About what one sleep and wake-up costs on a current x86
    /// host (the driver's eventfd write, the wake-up of the thread from
    /// `epoll_wait` and its context switch, caches gone cold): polling that
    /// long for work that then does not come wastes no more than the
    /// wake-up it could have saved.
    pub const START: Duration = Duration::from_micros(8);
    /// The largest window. Bursts further apart than this are served
    /// event-driven, one wake-up each: at most `1 / MAX` = 5000 wake-ups a
    /// second, a few per cent of a CPU at a few µs each; bursts closer
    /// together than this keep the worker polling (a CPU, no wake-ups, no
    /// kicks). It is also what a device polls in vain at most once its
    /// traffic stops. KVM's halt polling makes the same trade with the same
    /// bound by default (200 µs).
    pub const MAX: Duration = Duration::from_micros(200);
    /// The first hold-off after a preemption: a few scheduler time slices
    /// (a few ms each on a loaded CPU).
    pub const HOLD_MIN: Duration = Duration::from_millis(10);
    /// The longest hold-off: a CPU that stays shared is looked at again
    /// once a second.
    pub const HOLD_MAX: Duration = Duration::from_secs(1);

    /// An adaptive window between 0 and [`MAX`](Self::MAX), starting at 0
    /// (event-driven until the load shows that polling pays).
    pub fn new() -> AdaptiveWindow {
        AdaptiveWindow::with_bounds(Duration::ZERO, Self::MAX)
    }

    /// An adaptive window between `min` and `max` (`max` is raised to
    /// `min` if lower), starting at `min`.
    pub fn with_bounds(min: Duration, max: Duration) -> AdaptiveWindow {
        AdaptiveWindow {
            window: min,
            min,
            max: max.max(min),
            last_work: None,
            asleep_since: None,
            hold_until: None,
            hold: Duration::ZERO,
        }
    }

    /// A window that stays `window` whatever the load.
    pub fn fixed(window: Duration) -> AdaptiveWindow {
        AdaptiveWindow::with_bounds(window, window)
    }

    /// The current window: how long polling goes on after the last work.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// True after the window said [`Idle::Sleep`] and until work is found
    /// again.
    pub fn is_asleep(&self) -> bool {
        self.asleep_since.is_some()
    }

    /// One observation at `now`: whether work was found since the last one.
    /// Returns whether to keep polling ([`Idle::Poll`]) or to re-arm
    /// notifications and sleep ([`Idle::Sleep`]). Times earlier than a
    /// previous observation count as equal to it.
    pub fn observe(&mut self, now: Instant, work: bool) -> Idle {
        if work {
            self.work(now);
        }
        if self.asleep_since.is_some() {
            return Idle::Sleep;
        }
        let since_work = self
            .last_work
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if since_work >= self.window {
            self.asleep_since = Some(now);
            return Idle::Sleep;
        }
        Idle::Poll
    }

    /// The thread was preempted while polling: the window drops to its
    /// minimum and the answer is [`Idle::Sleep`]. (A fixed window stays
    /// what it is; a caller that wants it polled regardless does not
    /// report preemptions.)
    pub fn preempted(&mut self, now: Instant) -> Idle {
        self.window = self.min;
        // Preempted again within a hold-off of the last one's end: the CPU
        // stays shared, hold off longer; otherwise start over.
        let recurs = self.hold_until.is_some_and(|u| now < u + self.hold);
        self.hold = if recurs {
            (self.hold * 2).min(Self::HOLD_MAX)
        } else {
            Self::HOLD_MIN
        };
        self.hold_until = Some(now + self.hold);
        self.asleep_since = Some(now);
        Idle::Sleep
    }

    fn work(&mut self, now: Instant) {
        if let Some(last) = self.last_work {
            let gap = now.saturating_duration_since(last);
            match self.asleep_since {
                Some(since) => {
                    let slept = now.saturating_duration_since(since);
                    if gap <= self.max {
                        // A window this long would have caught it.
                        self.grow(now);
                    } else if slept > self.max {
                        // The longest window would have found nothing.
                        self.shrink();
                    }
                }
                // Nearly expired while polling.
                None if gap > self.window / 2 => self.grow(now),
                None => {}
            }
        }
        self.last_work = Some(now);
        self.asleep_since = None;
    }

    fn grow(&mut self, now: Instant) {
        // Held off after a preemption.
        if self.hold_until.is_some_and(|until| now < until) {
            return;
        }
        let next = (self.window * 2).max(Self::START);
        self.window = next.clamp(self.min, self.max);
    }

    fn shrink(&mut self) {
        let mut next = self.window / 2;
        if next < Self::START {
            next = Duration::ZERO;
        }
        self.window = next.clamp(self.min, self.max);
    }
}

/// Sees the calling thread lose its CPU to other tasks: at each look, the
/// wall time since the last look against the CPU time the thread got
/// meanwhile (`CLOCK_THREAD_CPUTIME_ID`, one system call a look). More than
/// [`Preemptions::LOST_MIN`] missing means the scheduler ran something else
/// on the thread's CPU for that long. Use it from the thread that polls; the
/// first look only records.
///
/// A preemption shorter than that (a kernel worker, a timer, a short-lived
/// task run for some µs) is not reported: counting every involuntary switch
/// instead (as this did before) made a device polling a CPU of its own
/// stop polling at each of them, about 18 a second on an otherwise idle
/// CPU, and serve its traffic event-driven for the hold-off after each
/// (into the backend, as users start vdpa-net: 0.37 of a CPU used and
/// 60 000 sleeps a second while the driver sent at full rate).
#[derive(Debug, Default)]
pub struct Preemptions {
    /// Wall and thread CPU time at the last look.
    last: Option<(Instant, Duration)>,
}

impl Preemptions {
    /// CPU time lost between two looks that counts as a preemption: a time
    /// slice a driver sharing the CPU gets (a few ms) is well above it; a
    /// kernel worker's few µs are well below. Losing less than a polling
    /// window ([`AdaptiveWindow::MAX`]) costs less than giving up polling
    /// would.
    pub const LOST_MIN: Duration = AdaptiveWindow::MAX;

    /// A counter that has not looked yet.
    pub fn new() -> Preemptions {
        Preemptions::default()
    }

    /// True if the calling thread lost at least [`Self::LOST_MIN`] of CPU
    /// time to other tasks since the last look (false at the first look,
    /// and if the thread's CPU time cannot be read).
    pub fn since_last(&mut self) -> bool {
        use nix::time::{clock_gettime, ClockId};
        let Ok(cpu) = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID) else {
            return false;
        };
        let now = (Instant::now(), Duration::from(cpu));
        self.last.replace(now).is_some_and(|(wall, cpu)| {
            Self::lost(
                now.0.saturating_duration_since(wall),
                now.1.saturating_sub(cpu),
            )
        })
    }

    /// Whether `elapsed` of wall time during which the thread ran for `ran`
    /// of CPU time lost it [`Self::LOST_MIN`] or more.
    fn lost(elapsed: Duration, ran: Duration) -> bool {
        elapsed.saturating_sub(ran) >= Self::LOST_MIN
    }

    /// Forgets the last look (the thread slept: time asleep is not time
    /// lost to another task).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feeds work every `gap` for `bursts` bursts, polling every `tick` in
    /// between; returns the sleeps the window asked for.
    fn steady(w: &mut AdaptiveWindow, t: &mut Instant, gap: Duration, bursts: usize) -> usize {
        let tick = us(2);
        let mut sleeps = 0;
        for _ in 0..bursts {
            let mut asleep = w.observe(*t, true) == Idle::Sleep;
            let next = *t + gap;
            let mut now = *t;
            while !asleep {
                now += tick;
                if now >= next {
                    break;
                }
                asleep = w.observe(now, false) == Idle::Sleep;
            }
            if asleep {
                sleeps += 1;
            }
            *t = next;
        }
        sleeps
    }

    #[test]
    fn starts_event_driven_and_sleeps_after_work() {
        let mut w = AdaptiveWindow::new();
        let t = Instant::now();
        assert_eq!(w.window(), Duration::ZERO);
        assert_eq!(w.observe(t, true), Idle::Sleep);
        assert!(w.is_asleep());
        // Nothing new: still asleep, no change.
        assert_eq!(w.observe(t + us(5), false), Idle::Sleep);
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn grows_to_max_under_close_bursts_then_stops_sleeping() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        // Bursts 50 µs apart: the first few wake-ups grow the window...
        let early = steady(&mut w, &mut t, us(50), 8);
        assert!((1..=5).contains(&early), "{early} sleeps");
        assert!(w.window() >= us(50), "window {:?}", w.window());
        // ...then the worker polls through: no sleep at all.
        assert_eq!(steady(&mut w, &mut t, us(50), 1000), 0);
        assert!(w.window() <= AdaptiveWindow::MAX);
    }

    #[test]
    fn window_never_exceeds_max() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        steady(&mut w, &mut t, us(150), 200);
        steady(&mut w, &mut t, us(3), 2000);
        assert_eq!(w.window(), AdaptiveWindow::MAX);
    }

    #[test]
    fn shrinks_to_zero_when_sleeps_outlast_max() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        steady(&mut w, &mut t, us(20), 100);
        assert!(w.window() > Duration::ZERO);
        // Bursts 2 ms apart: each sleep outlasts MAX; the window halves each
        // time and ends at 0 (pure event-driven).
        let sleeps = steady(&mut w, &mut t, Duration::from_millis(2), 10);
        assert_eq!(sleeps, 10);
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn gaps_just_above_the_window_do_not_swing_it() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        steady(&mut w, &mut t, us(150), 200);
        assert_eq!(w.window(), AdaptiveWindow::MAX);
        // Gaps of 300 µs: each sleep lasts ~100 µs (< MAX) and the gap is
        // over MAX: neither grow nor shrink.
        steady(&mut w, &mut t, us(300), 50);
        assert_eq!(w.window(), AdaptiveWindow::MAX);
    }

    #[test]
    fn idle_costs_one_window_then_sleep() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        steady(&mut w, &mut t, us(10), 100);
        let window = w.window();
        assert!(window > Duration::ZERO);
        // Traffic stops: polling ends one window after the last work.
        let last = t;
        assert_eq!(w.observe(last, true), Idle::Poll);
        let mut now = last;
        let mut polls = 0;
        while w.observe(now, false) == Idle::Poll {
            now += us(1);
            polls += 1;
            assert!(polls < 10_000, "never sleeps");
        }
        assert_eq!(now.duration_since(last), window);
        assert!(w.is_asleep());
    }

    #[test]
    fn polling_work_late_in_the_window_grows_it() {
        let mut w = AdaptiveWindow::fixed(us(40));
        let t = Instant::now();
        w.observe(t, true);
        // Fixed: never changes.
        w.observe(t + us(30), true);
        assert_eq!(w.window(), us(40));

        let mut w = AdaptiveWindow::with_bounds(us(40), us(160));
        w.observe(t, true);
        assert_eq!(w.observe(t + us(10), true), Idle::Poll);
        assert_eq!(w.window(), us(40), "early work: no change");
        assert_eq!(w.observe(t + us(40), true), Idle::Poll);
        assert_eq!(w.window(), us(80), "late work: doubled");
    }

    #[test]
    fn fixed_window_polls_its_length() {
        let mut w = AdaptiveWindow::fixed(us(100));
        let t = Instant::now();
        assert_eq!(w.observe(t, true), Idle::Poll);
        assert_eq!(w.observe(t + us(99), false), Idle::Poll);
        assert_eq!(w.observe(t + us(100), false), Idle::Sleep);
        // Long sleeps do not shrink it.
        assert_eq!(w.observe(t + Duration::from_secs(1), true), Idle::Poll);
        assert_eq!(w.window(), us(100));
    }

    #[test]
    fn preemption_drops_the_window_and_sleeps() {
        let mut w = AdaptiveWindow::new();
        let mut t = Instant::now();
        steady(&mut w, &mut t, us(20), 100);
        assert!(w.window() > Duration::ZERO);
        assert_eq!(w.observe(t, true), Idle::Poll);
        assert_eq!(w.preempted(t + us(1)), Idle::Sleep);
        assert_eq!(w.window(), Duration::ZERO);
        assert!(w.is_asleep());
        // Held at 0 for HOLD_MIN: close bursts do not grow it...
        steady(&mut w, &mut t, us(20), 100);
        assert_eq!(w.window(), Duration::ZERO);
        // ...after it they do again.
        t += AdaptiveWindow::HOLD_MIN;
        steady(&mut w, &mut t, us(20), 100);
        assert!(w.window() > Duration::ZERO);
        // Preempted again soon: a longer hold-off.
        w.preempted(t);
        t += AdaptiveWindow::HOLD_MIN;
        steady(&mut w, &mut t, us(20), 100);
        assert_eq!(w.window(), Duration::ZERO, "held for 2 x HOLD_MIN");
        let mut f = AdaptiveWindow::fixed(us(100));
        f.preempted(t);
        assert_eq!(f.window(), us(100));
    }

    /// A thread that busy-loops on a CPU shared with another busy thread is
    /// preempted within a bounded time; one that does not is not reported
    /// preempted on its first look.
    #[test]
    fn preemptions_are_seen() {
        let mut p = Preemptions::new();
        assert!(!p.since_last(), "the first look only records");
        // Pin this thread and a spinner to one CPU.
        fn pin(cpu: usize) -> bool {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
            // sched_setaffinity get a pointer to it and its size.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
            }
        }
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
        if !pin(cpu) {
            return;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin(cpu);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            std::hint::spin_loop();
            seen = p.since_last();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = spin.join();
        assert!(seen, "no preemption seen in 5 s on a shared CPU");
    }

    /// Only CPU time lost counts: a kernel worker's few µs do not stop a
    /// poll, a time slice does.
    #[test]
    fn short_preemptions_are_not_counted() {
        let lost = |wall_us: u64, ran_us: u64| Preemptions::lost(us(wall_us), us(ran_us));
        assert!(!lost(1000, 1000), "ran all the time");
        assert!(!lost(1000, 950), "50 µs lost");
        assert!(!lost(1000, 1001), "CPU clock ahead of the wall clock");
        assert!(lost(3000, 100), "a time slice lost");
        assert!(lost(1000, 800), "exactly LOST_MIN");
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut w = AdaptiveWindow::new();
        let t = Instant::now() + Duration::from_secs(1);
        w.observe(t, true);
        w.observe(t - us(50), true);
        w.observe(t - us(100), false);
        assert!(w.window() <= AdaptiveWindow::MAX);
    }
}
