//! The control sockets, all on one thread: an epoll loop over the listening
//! sockets, the connections that have not said HELLO yet, and the bound
//! clients' connections (which carry nothing after HELLO but their end).
//!
//! No connection gets a thread of its own, so a peer that connects and
//! says nothing costs the daemon one fd, and only for a while:
//! - a connection that has not sent its HELLO within [`HANDSHAKE_TIMEOUT`]
//!   is closed;
//! - at most [`MAX_PENDING_PER_UID`] connections of one user, and
//!   [`MAX_PENDING`] in all, wait for their HELLO; a new connection beyond
//!   either cap takes the place of the oldest waiting one of that user (of
//!   anyone, for the global cap), which is served at once if its HELLO has
//!   arrived and closed otherwise. So one user's flood of silent
//!   connections keeps at most its own cap of fds, and a real client, which
//!   sends its HELLO as soon as it is connected, is still served;
//! - an accept that fails for lack of fds backs off ([`AcceptBackoff`])
//!   instead of spinning.
//!
//! What a packet means is the [`Handler`]'s business (the device).

use crate::proto::{self, Packet};
use crate::shm;
use ioasis::accept::{self, AcceptBackoff};
use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{self, SockFlag};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Longest a connection may stay without sending its HELLO.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections of one user waiting for their HELLO.
pub const MAX_PENDING_PER_UID: usize = 64;
/// Most connections waiting for their HELLO in all.
pub const MAX_PENDING: usize = 256;
/// Connections taken from a listener before the loop looks at the others.
const ACCEPT_BATCH: usize = 64;
/// Longest the loop sleeps before it looks at the stop flag again.
const TICK: Duration = Duration::from_millis(100);

/// Token of the loop's own eventfd.
const WAKE: u64 = 0;
/// First token of a listener (listener `i` is `LISTENER + i`).
const LISTENER: u64 = 1;
/// First token of a connection.
const FIRST_CONN: u64 = 1 << 32;

static EVICTED: ioasis::ratelimit::RateLimit = ioasis::ratelimit::RateLimit::peer();
static TIMED_OUT: ioasis::ratelimit::RateLimit = ioasis::ratelimit::RateLimit::peer();

/// What the control loop calls back into.
pub trait Handler: Send + Sync + 'static {
    /// A bound client.
    type Client: Send + 'static;
    /// The first packet of a connection (its HELLO): binds a client and
    /// replies, or replies with an error and returns `None` (the loop then
    /// closes the connection).
    fn hello(&self, conn: BorrowedFd<'_>, pkt: &Packet) -> Option<Self::Client>;
    /// A later packet of a bound client, or the error receiving it
    /// (`EMSGSIZE` for one too large; it was dropped with its fds).
    fn request(&self, client: &Self::Client, conn: BorrowedFd<'_>, pkt: nix::Result<&Packet>);
    /// A bound client's connection closed, or the loop stops.
    fn closed(&self, client: Self::Client);
    /// The loop should stop.
    fn stopping(&self) -> bool;
}

/// Connections and listeners handed to the loop from other threads.
enum Incoming {
    Listener(OwnedFd),
    Connection(OwnedFd),
}

/// The running loop, as other threads see it.
#[derive(Debug)]
pub struct Control {
    wake: EventFd,
    incoming: Mutex<Vec<Incoming>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Listener(fd) => f.debug_tuple("Listener").field(fd).finish(),
            Incoming::Connection(fd) => f.debug_tuple("Connection").field(fd).finish(),
        }
    }
}

impl Control {
    /// Starts the loop for `handler` on a thread of its own.
    pub fn spawn<H: Handler>(handler: Arc<H>) -> std::io::Result<(Arc<Control>, JoinHandle<()>)> {
        let control = Arc::new(Control {
            wake: shm::new_eventfd()?,
            incoming: Mutex::new(Vec::new()),
        });
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(std::io::Error::from)?;
        epoll
            .add(
                shm::borrow_eventfd(&control.wake),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE),
            )
            .map_err(std::io::Error::from)?;
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name("sva-control".into())
            .spawn(move || {
                Loop {
                    handler,
                    epoll,
                    control: c,
                    listeners: Vec::new(),
                    conns: HashMap::new(),
                    next: FIRST_CONN,
                    pending: VecDeque::new(),
                    pending_of: HashMap::new(),
                    n_pending: 0,
                }
                .run()
            })?;
        Ok((control, thread))
    }

    /// Serves connections accepted from `listener` (a listening socket).
    pub fn add_listener(&self, listener: OwnedFd) {
        self.push(Incoming::Listener(listener));
    }

    /// Serves one connected socket (its first packet must be HELLO).
    pub fn add_connection(&self, conn: OwnedFd) {
        self.push(Incoming::Connection(conn));
    }

    /// Wakes the loop (to stop, for instance).
    pub fn wake(&self) {
        shm::signal(&self.wake);
    }

    fn push(&self, i: Incoming) {
        if let Ok(mut v) = self.incoming.lock() {
            v.push(i);
        }
        self.wake();
    }
}

struct Listener {
    fd: OwnedFd,
    backoff: AcceptBackoff,
    /// Not watched until then (accept failed for lack of resources).
    paused_until: Option<Instant>,
}

enum State<C> {
    /// Waiting for its HELLO; the peer's uid.
    Pending(u32),
    Bound(C),
}

struct Conn<C> {
    fd: OwnedFd,
    state: State<C>,
}

struct Loop<H: Handler> {
    handler: Arc<H>,
    epoll: Epoll,
    control: Arc<Control>,
    listeners: Vec<Listener>,
    conns: HashMap<u64, Conn<H::Client>>,
    next: u64,
    /// Pending connections by deadline, oldest first (entries of
    /// connections no longer pending are skipped).
    pending: VecDeque<(Instant, u64)>,
    pending_of: HashMap<u32, usize>,
    n_pending: usize,
}

impl<H: Handler> Loop<H> {
    fn run(mut self) {
        let mut events = [EpollEvent::empty(); 64];
        while !self.handler.stopping() {
            let timeout = self.timeout();
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    warn!("control loop: epoll_wait failed: {e}");
                    std::thread::sleep(TICK);
                    0
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE => self.take_incoming(),
                    t if t < FIRST_CONN => self.accept_from((t - LISTENER) as usize),
                    t => self.readable(t),
                }
            }
            self.expire();
            self.resume_listeners();
        }
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.close(t);
        }
    }

    /// Milliseconds until the next deadline, a paused listener's return, or
    /// the next look at the stop flag.
    fn timeout(&self) -> u16 {
        let now = Instant::now();
        let mut next = now + TICK;
        if let Some((d, _)) = self.pending.front() {
            next = next.min(*d);
        }
        for l in &self.listeners {
            if let Some(u) = l.paused_until {
                next = next.min(u);
            }
        }
        let ms = next.saturating_duration_since(now).as_millis();
        // Round up, so that a deadline is past when the loop wakes.
        u16::try_from(ms + 1).unwrap_or(u16::MAX)
    }

    fn take_incoming(&mut self) {
        shm::drain(&self.control.wake);
        let incoming = match self.control.incoming.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        for i in incoming {
            match i {
                Incoming::Listener(fd) => {
                    if let Err(e) = set_nonblocking(fd.as_fd()) {
                        warn!("control loop: listener: {e}");
                        continue;
                    }
                    let token = LISTENER + self.listeners.len() as u64;
                    if let Err(e) = self
                        .epoll
                        .add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
                    {
                        warn!("control loop: cannot watch a listener: {e}");
                        continue;
                    }
                    self.listeners.push(Listener {
                        fd,
                        backoff: AcceptBackoff::new(),
                        paused_until: None,
                    });
                }
                Incoming::Connection(fd) => {
                    if let Err(e) = set_nonblocking(fd.as_fd()) {
                        debug!("control loop: connection: {e}");
                        continue;
                    }
                    self.admit(fd);
                }
            }
        }
    }

    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            match socket::accept4(&l.fd, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
                Ok(fd) => {
                    l.backoff.succeeded();
                    self.admit(fd);
                }
                Err(e) => {
                    let e = std::io::Error::from(e);
                    if accept::is_transient(&e) {
                        return;
                    }
                    // Out of fds (or worse): stop watching the listener for
                    // a while; its backlog waits.
                    let pause = l.backoff.failed("sva-accel portal", &e);
                    l.paused_until = Some(Instant::now() + pause);
                    let _ = self.epoll.delete(l.fd.as_fd());
                    return;
                }
            }
        }
    }

    fn resume_listeners(&mut self) {
        let now = Instant::now();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.paused_until.is_some_and(|u| u <= now) {
                l.paused_until = None;
                let token = LISTENER + i as u64;
                if let Err(e) = self
                    .epoll
                    .add(l.fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
                {
                    warn!("control loop: cannot watch a listener again: {e}");
                }
            }
        }
    }

    /// Takes a new connection in as pending, making room under the caps.
    fn admit(&mut self, fd: OwnedFd) {
        let uid = match ioasis::ownership::Peer::of(&fd) {
            Ok(p) => p.uid,
            Err(e) => {
                debug!("control loop: peer credentials: {e}");
                return;
            }
        };
        if self.pending_of.get(&uid).copied().unwrap_or(0) >= MAX_PENDING_PER_UID {
            self.make_room(Some(uid));
        }
        if self.n_pending >= MAX_PENDING {
            self.make_room(None);
        }
        let token = self.next;
        self.next += 1;
        if let Err(e) = self.epoll.add(
            fd.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, token),
        ) {
            warn!("control loop: cannot watch a connection: {e}");
            return;
        }
        self.conns.insert(
            token,
            Conn {
                fd,
                state: State::Pending(uid),
            },
        );
        *self.pending_of.entry(uid).or_insert(0) += 1;
        self.n_pending += 1;
        self.pending
            .push_back((Instant::now() + HANDSHAKE_TIMEOUT, token));
    }

    /// Frees a pending place: the oldest pending connection of `uid` (of
    /// anyone, for `None`) is served if its HELLO is there, else closed.
    fn make_room(&mut self, uid: Option<u32>) {
        let oldest = self
            .pending
            .iter()
            .find_map(|(_, t)| match self.conns.get(t) {
                Some(Conn {
                    state: State::Pending(u),
                    ..
                }) if uid.is_none_or(|x| x == *u) => Some(*t),
                _ => None,
            });
        let Some(t) = oldest else {
            return;
        };
        if self.has_data(t) {
            self.readable(t);
        }
        if self.is_pending(t) {
            ioasis::log_limited!(limit: EVICTED,
                log::Level::Info,
                "control socket: too many connections waiting for HELLO ({}); closing the oldest",
                if uid.is_some() { "from one user" } else { "in all" }
            );
            self.close(t);
        }
    }

    fn is_pending(&self, t: u64) -> bool {
        matches!(
            self.conns.get(&t),
            Some(Conn {
                state: State::Pending(_),
                ..
            })
        )
    }

    fn has_data(&self, t: u64) -> bool {
        let Some(c) = self.conns.get(&t) else {
            return false;
        };
        let mut b = [0u8; 1];
        matches!(
            socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&c.fd),
                &mut b,
                socket::MsgFlags::MSG_PEEK | socket::MsgFlags::MSG_DONTWAIT,
            ),
            Ok(n) if n > 0
        )
    }

    /// Closes pending connections past their deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, t)) = self.pending.front() {
            if !self.is_pending(t) {
                self.pending.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.pending.pop_front();
            ioasis::log_limited!(limit: TIMED_OUT,
                log::Level::Info,
                "control socket: no HELLO within {HANDSHAKE_TIMEOUT:?}; closing"
            );
            self.close(t);
        }
        // Entries of connections that said HELLO or went away before their
        // deadline stay behind; drop them once they outnumber the live ones,
        // so that a churn of connections cannot grow the queue (or the scans
        // of `make_room`) without bound.
        if self.pending.len() > 2 * self.n_pending + ACCEPT_BATCH {
            let conns = &self.conns;
            self.pending.retain(|(_, t)| {
                matches!(
                    conns.get(t),
                    Some(Conn {
                        state: State::Pending(_),
                        ..
                    })
                )
            });
        }
    }

    fn readable(&mut self, t: u64) {
        let Some(conn) = self.conns.get(&t) else {
            return;
        };
        let got = proto::recv(conn.fd.as_fd());
        if matches!(got, Err(Errno::EAGAIN)) {
            return;
        }
        match &conn.state {
            State::Pending(uid) => {
                let uid = *uid;
                let Ok(Some(pkt)) = got else {
                    // End of file, a receive error, or a first packet too
                    // large.
                    self.close(t);
                    return;
                };
                match self.handler.hello(conn.fd.as_fd(), &pkt) {
                    Some(client) => {
                        self.unpend(uid);
                        if let Some(c) = self.conns.get_mut(&t) {
                            c.state = State::Bound(client);
                        }
                    }
                    None => self.close(t),
                }
            }
            State::Bound(client) => match got {
                Ok(Some(pkt)) => self.handler.request(client, conn.fd.as_fd(), Ok(&pkt)),
                Err(Errno::EMSGSIZE) => {
                    self.handler
                        .request(client, conn.fd.as_fd(), Err(Errno::EMSGSIZE))
                }
                Ok(None) | Err(_) => self.close(t),
            },
        }
    }

    /// A pending connection of `uid` stops being pending (its entry in
    /// `pending` is skipped later).
    fn unpend(&mut self, uid: u32) {
        self.n_pending = self.n_pending.saturating_sub(1);
        if let Some(n) = self.pending_of.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_of.remove(&uid);
            }
        }
    }

    fn close(&mut self, t: u64) {
        let Some(conn) = self.conns.remove(&t) else {
            return;
        };
        let _ = self.epoll.delete(conn.fd.as_fd());
        match conn.state {
            State::Pending(uid) => self.unpend(uid),
            State::Bound(client) => self.handler.closed(client),
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockType};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counting {
        hellos: AtomicUsize,
        closed: AtomicUsize,
        stop: AtomicBool,
    }

    impl Handler for Counting {
        type Client = ();
        fn hello(&self, _: BorrowedFd<'_>, pkt: &Packet) -> Option<()> {
            self.hellos.fetch_add(1, Ordering::SeqCst);
            (pkt.data == b"hello").then_some(())
        }
        fn request(&self, _: &(), _: BorrowedFd<'_>, _: nix::Result<&Packet>) {}
        fn closed(&self, _: ()) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
        fn stopping(&self) -> bool {
            self.stop.load(Ordering::SeqCst)
        }
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn eof(fd: &OwnedFd) -> bool {
        let mut b = [0u8; 8];
        matches!(
            socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                &mut b,
                socket::MsgFlags::MSG_DONTWAIT
            ),
            Ok(0)
        )
    }

    /// Waits for `f`, at most 1 s (well within the handshake timeout, which
    /// would close the connections too).
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(1), "{what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Past the per-user cap the oldest silent connections are closed and
    /// the newer ones kept; a kept one is served when its HELLO comes; a
    /// bound one's end is reported once; the loop stops on request.
    /// Checked to fail with the per-user eviction removed ("the oldest are
    /// closed").
    #[test]
    fn test_oldest_silent_connections_make_room() {
        let h = Arc::new(Counting::default());
        let (control, thread) = Control::spawn(h.clone()).expect("spawn");
        let extra = 6;
        let peers: Vec<OwnedFd> = (0..MAX_PENDING_PER_UID + extra)
            .map(|_| {
                let (ours, theirs) = pair();
                control.add_connection(ours);
                // One at a time, so that the loop admits them in order.
                std::thread::sleep(Duration::from_millis(1));
                theirs
            })
            .collect();
        eventually("the oldest are closed", || peers[..extra].iter().all(eof));
        assert!(!peers[extra..].iter().any(eof), "a newer one was closed");
        // A kept one says HELLO and is bound; closing it reports its end.
        let last = &peers[peers.len() - 1];
        proto::send(last.as_fd(), b"hello", &[]).expect("send");
        eventually("hello served", || h.hellos.load(Ordering::SeqCst) == 1);
        drop(peers);
        eventually("bound end reported", || {
            h.closed.load(Ordering::SeqCst) == 1
        });
        h.stop.store(true, Ordering::SeqCst);
        control.wake();
        thread.join().expect("loop thread");
    }
}
