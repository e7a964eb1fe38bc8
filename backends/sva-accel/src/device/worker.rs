//! The worker threads: turns among clients weighted by priority, taking
//! descriptors from portals, spinning and sleeping.

use super::*;

/// Descriptors a worker takes from a portal at once.
pub(super) const POP_MAX: usize = 32;

/// Takes one unit of work of client `c`: its ready queue (work that yielded,
/// was answered after a fault, or waited behind a drain) first, else up to
/// [`POP_MAX`] fresh descriptors from its portal. False when it had
/// nothing to run.
pub(super) fn take_from(
    s: &Shared,
    c: &ClientCtx,
    buf: &mut Vec<[u8; DESC_SIZE]>,
    tr: &mut Translator,
) -> bool {
    if c.has_ready.load(Ordering::Acquire) {
        return run_pass(s, c, Source::Ready, tr);
    }
    if c.has_held.load(Ordering::Acquire) || !c.portal.has_work() {
        return false;
    }
    let room = if s.cfg.wq_mode == WqMode::Shared {
        // Free slots of the work queue, and of the client's share of it
        // (an equal share per connected client, at least one), so that no
        // client holds every slot while its work runs.
        let occ = s.occupancy.load(Ordering::Acquire);
        let cap = u64::from(s.cfg.wq_size);
        let share = (cap / s.n_clients.load(Ordering::Acquire).max(1) as u64).max(1);
        let mine = c.slots.load(Ordering::Acquire);
        if occ >= cap || mine >= share {
            return false;
        }
        (cap - occ).min(share - mine) as usize
    } else {
        POP_MAX
    };
    buf.clear();
    let Some(n) = c.portal.pop(buf, room.min(POP_MAX)) else {
        return false;
    };
    if n == 0 {
        return false;
    }
    c.inflight.fetch_add(n as u64, Ordering::AcqRel);
    take_slots(s, c, n as u64);
    c.stats.submitted.fetch_add(n as u64, Ordering::Relaxed);
    if c.dead.load(Ordering::SeqCst) {
        retire(s, c, n as u64);
        c.stats.aborted.fetch_add(n as u64, Ordering::Relaxed);
        return true;
    }
    // Everything before the first drain runs now, in one pass; the drain
    // and what follows it are held.
    let mut run = [Descriptor::new(opcode::NOOP, 0); POP_MAX];
    let mut n_run = 0;
    let mut held_from = buf.len();
    for (i, raw) in buf.iter().enumerate() {
        let mut d = Descriptor::from_bytes(raw);
        // ENQCMD semantics: the PASID is the portal owner's.
        d.pasid = c.pasid;
        if d.opcode == opcode::DRAIN {
            held_from = i;
            break;
        }
        if let Some(slot) = run.get_mut(n_run) {
            *slot = d;
            n_run += 1;
        }
    }
    if held_from < buf.len() {
        // A drain holds itself and everything after it until all that came
        // before has completed.
        if let Ok(mut held) = c.held.lock() {
            // Checked under the lock abort_work drains the held work with.
            if c.dead.load(Ordering::SeqCst) || c.unbound.load(Ordering::SeqCst) {
                let n = (buf.len() - held_from) as u64;
                for raw in &buf[held_from..] {
                    report_dropped(c, &Descriptor::from_bytes(raw));
                }
                retire(s, c, n);
                c.stats.aborted.fetch_add(n, Ordering::Relaxed);
            } else {
                for raw in &buf[held_from..] {
                    let mut d = Descriptor::from_bytes(raw);
                    d.pasid = c.pasid;
                    held.push_back(Job::new(d));
                }
                c.has_held.store(true, Ordering::Release);
            }
        }
    }
    run_pass(s, c, Source::Fresh(run[..n_run].iter()), tr);
    check_held(s, c, tr);
    true
}

/// One round of a worker: answered faults and released drains, then one
/// unit of work ([`WORK_UNIT`]) of the client whose turn it is.
///
/// Turns go round the clients in the order they connected (weighted round
/// robin, as DSA's arbiter weighs work queues by priority: a queue of
/// priority 6 gets three times the descriptors of one of priority 2): the
/// client whose turn it is runs up to `priority` units, one per call, then
/// the turn passes; a client with nothing to run (or no free work queue
/// slot) passes it at once. So between two units of a client with work,
/// every other client runs at most `priority` units.
pub(super) fn work_once(
    s: &Shared,
    clients: &[Arc<ClientCtx>],
    buf: &mut Vec<[u8; DESC_SIZE]>,
    tr: &mut Translator,
) -> bool {
    let mut did = resume_answered(s, clients);
    for c in clients {
        did |= check_held(s, c, tr);
    }
    let n = clients.len();
    if n == 0 {
        return did;
    }
    let start = s.turn.load(Ordering::Relaxed) % n;
    for k in 0..n {
        let i = (start + k) % n;
        let c = &clients[i];
        if !take_from(s, c, buf, tr) {
            continue;
        }
        // Charge the unit to c's turn (c takes the turn when the clients
        // before it had nothing to run); other workers may charge the same
        // turn meanwhile, which only shortens it.
        let used = if k == 0 {
            s.turn_used.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            s.turn_used.store(1, Ordering::Relaxed);
            1
        };
        if used >= u32::from(c.priority) {
            s.turn.store(i + 1, Ordering::Relaxed);
            s.turn_used.store(0, Ordering::Relaxed);
        } else {
            s.turn.store(i, Ordering::Relaxed);
        }
        return true;
    }
    did
}

/// Longest a worker sleeps before it looks again (at the stop flag, and at
/// invalidations of what it has cached).
pub(super) const SLEEP_MS: i32 = 100;

/// Drops the translator's cache if an unmap or detach invalidated it since
/// its last access section (an empty section does that). A worker's cache
/// holds references to the memory it translated; were they kept while the
/// worker idles, a departed client's memory (or a buffer a client
/// unmapped) would stay mapped in the daemon until the worker next ran.
/// Called before and after every sleep, so such memory goes within
/// [`SLEEP_MS`] of its unmap (`tests/hostile_departed.rs`).
pub(super) fn drop_invalidated(tr: &mut Translator) {
    drop(tr.access());
}

pub(super) fn worker(s: &Arc<Shared>) {
    let mut buf = Vec::with_capacity(POP_MAX);
    let mut gen = u64::MAX;
    let mut clients: Arc<Vec<Arc<ClientCtx>>> = Arc::new(Vec::new());
    // Adaptive busy-poll budget: grows when work shows up while spinning,
    // shrinks when the spin ends in sleep.
    let mut spin = Duration::from_micros(100);
    let (spin_min, spin_max) = (SPIN_MIN, SPIN_MAX);
    let mut idle_since: Option<Instant> = None;
    let mut tr = s.iommu.device.translator();
    while !s.shutdown.load(Ordering::Relaxed) {
        let g = s.clients_gen.load(Ordering::Acquire);
        if g != gen {
            if let Ok(l) = s.clients.read() {
                clients = l.clone();
            }
            gen = g;
        }
        if work_once(s, &clients, &mut buf, &mut tr) {
            if idle_since.take().is_some() {
                spin = (spin * 2).min(spin_max);
            }
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            // Pure spinning: yielding to a busy neighbour can cost a whole
            // scheduler slice.
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            continue;
        }
        spin = (spin / 2).max(spin_min);
        drop_invalidated(&mut tr);
        // Sleep: ask every portal for a doorbell, re-check, then wait.
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        for c in clients.iter() {
            c.portal.set_need_doorbell(true);
        }
        let pending = s.fault_answered.load(Ordering::SeqCst)
            || clients
                .iter()
                .any(|c| c.portal.has_work() || c.has_ready.load(Ordering::SeqCst));
        if !pending && s.clients_gen.load(Ordering::Acquire) == gen {
            // The internal doorbell (answers, shutdown, new clients) and
            // every client's own.
            let mut efds = Vec::with_capacity(clients.len() + 1);
            efds.push(&s.doorbell);
            efds.extend(clients.iter().map(|c| &c.doorbell_efd));
            let fds: Vec<_> = efds.iter().map(|e| shm::borrow_eventfd(e)).collect();
            if let Ok(ready) = shm::poll_in(&fds, SLEEP_MS) {
                for (e, r) in efds.iter().zip(ready) {
                    if r != 0 {
                        shm::drain(e);
                    }
                }
            }
            drop_invalidated(&mut tr);
        }
        if s.sleepers.fetch_sub(1, Ordering::SeqCst) == 1 {
            for c in clients.iter() {
                c.portal.set_need_doorbell(false);
            }
        }
        idle_since = None;
    }
}
